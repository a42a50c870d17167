"""Generation outputs pinned on fixed inputs: beam search (caption, text-only with length penalty), trie-constrained
VQA beam with forced prefixes, grounding (bin steps), top-k sampling with a seeded generator, image-code decoding
(`code_masks`) and all-candidate scoring, on the tiny fixture model. `pinned_outputs.json` holds what the
generator produced before its speed work (KV cache layout, per-step biases, shared cross-attention K/V): every
optimisation must give the same tokens, and the same scores up to float32 summation order (1e-5).

Regenerate only when the outputs are meant to change: `python tests/generation/test_pinned_outputs.py --write`."""
import json
import os
import sys

import pytest
import torch

from ofa_ds.generation import Trie, generate, sample, score_candidates, task_config
from ofa_ds.tokenizer import get_tokenizer

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinned_outputs.json")
CASES = ("caption_beam5", "text_lenpen", "vqa_trie_prefix", "vqa_trie", "grounding", "sample_topk", "codes_sample",
         "codes_beam", "allcand", "allcand_trie")
ANSWERS = [[500, 501], [500, 502, 503], [600], [700, 701, 702, 703], [500]]


def _trie(answers):
    t = Trie()
    for a in answers:
        t.insert([0] + a + [2])
    return t


def _hyps(out):
    return [[{"tokens": h["tokens"].tolist(), "score": float(h["score"]),
              "positional_scores": [float(x) for x in h["positional_scores"]]} for h in hh] for hh in out]


def record(model, batch) -> dict:
    """Every pinned case: name -> per sample, hypotheses (tokens, score, positional scores), or a score matrix."""
    out = {}
    text_only = {"src_tokens": batch["src_tokens"]}
    out["caption_beam5"] = _hyps(generate(model, batch, task_config("caption", max_len_b=8)))
    out["text_lenpen"] = _hyps(generate(model, text_only, task_config("gigaword", max_len_b=7)))
    out["vqa_trie_prefix"] = _hyps(generate(model, batch, task_config("vqa_beam", beam=4, max_len_b=12),
                                            prefix_tokens=[[40, 41, 42], [43], [44, 45]], trie=_trie(ANSWERS)))
    out["vqa_trie"] = _hyps(generate(model, batch, task_config("vqa_beam", beam=5, max_len_b=10),
                                     trie=_trie(ANSWERS)))
    out["grounding"] = _hyps(generate(model, batch, task_config("refcoco", bin_steps=4),
                                      bin_offset=get_tokenizer().bin_offset))
    gen = torch.Generator().manual_seed(0)
    out["sample_topk"] = _hyps(sample(model, batch, task_config("caption", beam=4, max_len_b=6, sampling=True,
                                                                sampling_topk=20, temperature=2.0), generator=gen))
    codes = torch.tensor([True, False, True])
    gen = torch.Generator().manual_seed(1)
    out["codes_sample"] = _hyps(sample(model, batch, task_config("caption", beam=2, max_len_b=6, min_len=6,
                                                                 no_repeat_ngram_size=0, sampling=True,
                                                                 sampling_topk=50, constraint_range=(1000, 9192)),
                                       code_masks=codes, generator=gen))
    out["codes_beam"] = _hyps(generate(model, batch, task_config("caption", beam=3, max_len_b=5),
                                       code_masks=codes))
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    prompts = [[0, 40, 41, 42], [0, 43], [0]]
    for name, t in (("allcand", None), ("allcand_trie", _trie(ANSWERS))):
        out[name] = score_candidates(model, enc, prompts, ANSWERS, trie=t, chunk_rows=4).tolist()
    assert tuple(out) == CASES
    return out


@pytest.fixture(scope="module")
def recorded(model, batch):
    torch.set_num_threads(1)
    with torch.no_grad():
        return record(model, batch)


def _pinned():
    with open(PINNED) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_pinned(recorded, case):
    want, got = _pinned()[case], recorded[case]
    if case.startswith("allcand"):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-6)
        return
    assert [[h["tokens"] for h in hh] for hh in got] == [[h["tokens"] for h in hh] for hh in want], case
    for gh, wh in zip(got, want):
        for g, w in zip(gh, wh):
            assert abs(g["score"] - w["score"]) <= 1e-5 + 1e-6 * abs(w["score"]), case
            torch.testing.assert_close(torch.tensor(g["positional_scores"]), torch.tensor(w["positional_scores"]),
                                       atol=1e-5, rtol=1e-6)


if __name__ == "__main__" and "--write" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import batch as _b, tiny_model
    torch.set_num_threads(1)
    with torch.no_grad():
        rec = record(tiny_model(), _b.__wrapped__())
    with open(PINNED, "w") as f:
        json.dump(rec, f, indent=0)
    print("wrote", PINNED, sorted(rec))
