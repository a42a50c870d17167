"""The held-out evaluation during training (`ofa_ds.training.evaluate`) on a tiny random model and the synthetic
validation files: its predictions equal launch/evaluate.py's evaluators run with the same settings and plain
reference implementations of its definitions (greedy decoding from bos, 4 tokens restricted to the location bins,
the sum of full-vocabulary log-probs of answer + eos); its metrics equal the evaluators' metrics. Under ZeRO-3
(parameters marked with `ds_id`) two ranks with different batches make the same number of decoder calls."""
import os

import pytest
import torch
import torch.distributed as dist

from ofa_ds.data import DataStream
from ofa_ds.data.synthetic import data_config, generate as synth
from ofa_ds.metrics.tasks import make_evaluator
from ofa_ds.tokenizer import get_tokenizer
from ofa_ds.training import evaluate as training_eval
from tests.generation.conftest import tiny_model
from tests.ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")   # many tiny ops: no spinning on shared cores

MAX_LEN = 6
GREEDY = {"beam": 1, "no_repeat_ngram_size": 0, "ban_bos": True}        # launch/evaluate.py --gen-args
BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    synth(root, seed=2, size="tiny", image_size=64)
    return root


def _stream(root, task, batch_size=4, prompt_type="none"):
    cfg = data_config(root, task, patch_image_size=32, batch_size=batch_size, shuffle=False, prompt_type=prompt_type)
    return DataStream(cfg, split="valid")


def _run(model, task, stream, batches, num_bins=1000):
    return training_eval.evaluate_task(model, task, batches, get_tokenizer(), device=torch.device("cpu"), dtype=None,
                                       max_len=MAX_LEN, num_bins=num_bins, max_image_size=512,
                                       candidates=getattr(stream.task, "ans2label", None), eps=0.1)


@torch.no_grad()
def _greedy(model, batch, steps, bins_from=None):
    """Reference greedy decoding: argmax from bos for `steps` tokens (pad and bos never chosen, eos not at the first
    step); `bins_from`: every token must be a location bin (id >= bins_from). Tokens before the first eos."""
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    prev = torch.full((batch["src_tokens"].shape[0], 1), BOS)
    for step in range(steps):
        logits = model.decode(prev, enc)[:, -1].float()
        logits[:, [BOS, PAD]] = float("-inf")
        if step == 0 or bins_from is not None:
            logits[:, EOS] = float("-inf")
        if bins_from is not None:
            logits[:, :bins_from] = float("-inf")
        prev = torch.cat([prev, logits.argmax(-1, keepdim=True)], 1)
    return [row[: row.index(EOS)] if EOS in row else row for row in prev[:, 1:].tolist()]


@torch.no_grad()
def _best_candidates(model, batch, cands):
    """Reference all-candidate scoring: teacher-forced prompt + answer, sum of full-vocabulary log p(answer + eos)."""
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    best = []
    for i, prompt in enumerate(batch["decoder_prompt"]):
        scores = []
        for c in cands:
            prev = torch.tensor([list(prompt) + c])
            lp = torch.log_softmax(model.decode(prev, enc.index_select(torch.tensor([i]))).float(), -1)[0]
            tgt = c + [EOS]
            scores.append(sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(tgt)))
        best.append(max(range(len(cands)), key=lambda j: (scores[j], -j)))
    return best


def test_training_eval_equals_evaluators_and_references(syn):
    model, tok = tiny_model(seed=1), get_tokenizer()         # seed 1: its answers vary between the samples
    for task, prompt_type in (("caption", "none"), ("refcoco", "none"), ("vqa", "none"), ("vqa", "prev_output")):
        stream = _stream(syn, task, prompt_type=prompt_type)     # none: pretraining runs, prev_output: finetuning
        batch = next(iter(stream))
        recs, loss, size = _run(model, task, stream, [batch])
        assert [r["id"] for r in recs] == batch["id"].tolist()
        assert (size > 0) == (task != "caption")
        recs = training_eval.gather_records(recs + recs[:1])        # a wrapped-round duplicate is dropped
        metrics = training_eval.summarise(task, recs, None, tok)
        assert metrics[f"{task}_n"] == len(batch["id"])
        if task == "caption":
            ev = make_evaluator(task, stream.task, tok, dict(GREEDY, max_len_b=MAX_LEN), caption_tokenizer="none")
            launch = ev.predict(model, batch)
            assert [r["caption"] for r in recs] == [r["caption"] for r in launch]
            ref = [tok.decode(t) for t in _greedy(model, batch, MAX_LEN)]
            assert [training_eval.caption_words(r["caption"]) for r in recs] == [training_eval.caption_words(t)
                                                                                 for t in ref]
            assert metrics["caption_cider"] == pytest.approx(ev.metrics(launch)["CIDEr"], abs=1e-12)
        elif task == "refcoco":
            ev = make_evaluator(task, stream.task, tok, GREEDY, restrict_bins=True)
            launch = ev.predict(model, batch)
            assert [r["box"] for r in recs] == [r["box"] for r in launch]
            ref = _greedy(model, batch, 4, bins_from=tok.bin_offset)
            assert [r["box"] for r in recs] == [tok.ids_to_box(t, 512, float(w), float(h)) for t, w, h in
                                                zip(ref, batch["w_resize_ratios"], batch["h_resize_ratios"])]
            ratios = [(float(w), float(h)) * 2 for w, h in zip(batch["w_resize_ratios"], batch["h_resize_ratios"])]

            def in_first_10_bins(rs):
                return all(v * r <= 9 / 999 * 512 + 1e-9 for rec, rr in zip(rs, ratios) for v, r in zip(rec["box"], rr))
            assert not in_first_10_bins(recs) and in_first_10_bins(_run(model, task, stream, [batch], num_bins=10)[0])
            m = ev.metrics(launch)
            assert (metrics["refcoco_acc50"], metrics["refcoco_miou"]) == pytest.approx((m["acc@0.5"],
                                                                                         m["mean_iou"]))
        else:
            ev = make_evaluator(task, stream.task, tok, mode="allcand", constrained=False)
            launch = ev.predict(model, batch)
            assert [r["pred_answer"] for r in recs] == [r["answer"] for r in launch]
            assert len({r["pred_answer"] for r in recs}) > 1
            best = _best_candidates(model, batch, ev.cand_tokens)
            assert [r["pred_answer"] for r in recs] == [ev.answers[j] for j in best]
            assert metrics["vqa_acc"] == pytest.approx(ev.metrics(launch)["vqa_acc"])


def _worker(rank, port, root, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_model()
    for i, p in enumerate(model.parameters()):
        p.ds_id = i                                 # what DeepSpeed's ZeRO-3 marks its partitioned parameters with
    if rank == 1:                                   # rank 1's captions end at the second token, rank 0's later
        decode = model.decode

        def eos_early(tokens, *a, **kw):
            logits = decode(tokens, *a, **kw)
            if tokens.shape[1] >= 2:
                logits[..., EOS] += 1e4
            return logits
        model.decode = eos_early
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    out = {}
    for task in ("caption", "refcoco", "vqa"):
        stream = _stream(root, task, batch_size=2)
        batches = [b for _, b in zip(range(2), stream)]
        calls.clear()
        recs, _, _ = _run(model, task, stream, batches)
        out[task] = (len(calls), len(recs), [r.get("caption") for r in recs])
    q.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_zero3_ranks_make_the_same_decoder_calls(syn):
    assert training_eval.partitioned(tiny_model()) is False
    res = run_ranks(_worker, syn)
    for task in ("caption", "refcoco", "vqa"):
        (n0, r0, _), (n1, r1, _) = res[0][task], res[1][task]
        assert n0 == n1 and r0 == r1 == 4, (task, res)
    short, long = res[1]["caption"][2], res[0]["caption"][2]
    assert all(len(c.split()) <= 1 for c in short) and max(len(c.split()) for c in long) > 1
