"""The seven GLUE tasks (docs/ofa.md#gigaword-and-glue): cola, sst2, mrpc, qqp, mnli, rte, qnli. No image.

Layout (OFA's GLUE datasets, recipes use prompt_type 'src'): src = bos + prompt + eos; prev = src ('src'),
src[:-1] ('prev_output') or [bos] ('none'); the target is prev shifted left plus the single label token, with every
position but the last set to pad. The constraint row of the last position allows the first token of each
candidate label; all other rows are False.
A file has max(selected_cols) + 1 columns (QQP: id, qid1, qid2, question1, question2, label; RTE and QNLI start with
an index); the leading columns the task does not read must exist but are not checked further.
"""
from __future__ import annotations

from ..collate import Sample
from ..text import build_trie
from ..tsv import BadRow
from .base import Task

YES_NO = {"0": "no", "1": "yes"}
SPECS = {
    # name: (default cols, n sentences, prompt, label map)
    "cola": ([1, 2], 1, ' is the text " {0} " grammatically correct?', YES_NO),
    "sst2": ([0, 1], 1, ' is the sentiment of text " {0} " positive or negative?', {"0": "negative", "1": "positive"}),
    "mrpc": ([0, 1, 2], 2, ' does text1 " {0} " and text2 " {1} " have the same semantics?', YES_NO),
    "qqp": ([3, 4, 5], 2, ' is question " {0} " and question " {1} " equivalent?', YES_NO),
    "mnli": ([0, 1, 2], 2, ' can text1 " {0} " imply text2 " {1} "?',
             {"0": "maybe", "1": "yes", "2": "no", "neutral": "maybe", "entailment": "yes", "contradiction": "no"}),
    "rte": ([1, 2, 3], 2, ' can text1 " {0} " imply text2 " {1} "?', {"entailment": "yes", "not_entailment": "no"}),
    # QNLI rows are (question, sentence, label) but the prompt names the sentence first.
    "qnli": ([1, 2, 3], 2, ' does " {1} " contain the answer to question " {0} "?',
             {"1": "yes", "0": "no", "entailment": "yes", "not_entailment": "no"}),
}


class GlueTask(Task):
    name = "glue"
    has_images = False
    spec = SPECS["cola"]

    def __init__(self, cfg, split="train", tokenizer=None):
        super().__init__(cfg, split, tokenizer)
        self.default_cols = list(self.spec[0])
        self.num_fields = self.spec[1] + 1
        n = max(self.default_cols) + 1
        self.layout = tuple((f"column {c}", "field" if c in self.default_cols else "unread") for c in range(n))
        self.answers = sorted(set(self.spec[3].values()))
        self.trie = build_trie(self.tok, self.answers)

    def parse(self, row):
        n, labels = self.spec[1], self.spec[3]
        fields = self.fields(row)
        label = fields[-1].strip()
        if label not in labels:
            raise BadRow(f"unknown label {label[:30]!r}", "label")
        for k, s in enumerate(fields[:n]):
            if not s.strip():
                raise BadRow(f"empty sentence {k + 1}", "text")
        return fields[:n], label

    def make(self, parsed, sid, rng):
        prompt, labels = self.spec[2], self.spec[3]
        texts, label = parsed
        sents = [" ".join(s.lower().strip().split()[: self.cfg.max_src_length]) for s in texts]
        src = self.wrap(self.enc(prompt.format(*sents)))
        ans = self.enc(" " + labels[label])
        pt = self.cfg.prompt_type
        if pt == "none":
            prev, target = [self.bos], list(ans)
        elif pt == "src":
            prev = list(src)
            target = prev[1:] + ans
        elif pt == "prev_output":
            prev = src[:-1]
            target = prev[1:] + ans
        else:
            raise ValueError(f"prompt_type must be none, src or prev_output, got {pt!r}")
        target = [self.pad] * (len(target) - 1) + target[-1:]
        cons = [None] * (len(target) - 1) + [self.trie.next_tokens([self.bos])]
        return Sample(id=sid, source=src, target=target, prev=prev, constraint=cons,
                      extras={"ref_dict": {labels[label]: 1.0}, "decoder_prompt": prev})


GLUE_TASKS: dict[str, type[GlueTask]] = {
    name: type(f"{name.capitalize()}Task", (GlueTask,), {"name": name, "spec": spec}) for name, spec in SPECS.items()
}
