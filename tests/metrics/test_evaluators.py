"""Per-task evaluators in-process: SNLI-VE and VQA (all-candidate and trie beam) predictions stay in the candidate
set, and each task's metrics reach their maximum on ground-truth predictions and drop on wrong ones."""
import torch

from ofa_ds.data import DataStream
from ofa_ds.data.synthetic import data_config, generate as synth
from ofa_ds.metrics.tasks import make_evaluator
from ofa_ds.tokenizer import get_tokenizer
from tests.generation.conftest import tiny_model


def _batch(root, task):
    cfg = data_config(str(root), task, patch_image_size=32, batch_size=4, shuffle=False)
    stream = DataStream(cfg, split="valid")
    return stream.task, next(iter(stream))


def test_allcandidate_and_beam_answers_are_candidates(tmp_path):
    synth(str(tmp_path), seed=2, size="tiny", image_size=64)
    model, tok = tiny_model(), get_tokenizer()
    for task in ("snli_ve", "vqa"):
        dtask, batch = _batch(tmp_path, task)
        for mode in ("allcand", "beam"):
            ev = make_evaluator(task, dtask, tok, mode=mode)
            recs = ev.predict(model, batch)
            assert len(recs) == 4 and all(r["answer"] in ev.answers for r in recs)
            m = ev.metrics(recs + recs)                      # duplicates (wrapped shards) are counted once
            assert m["n"] == 4 and m["mode"] == mode
    dtask, batch = _batch(tmp_path, "vqa")
    zs = make_evaluator("vqa", dtask, tok, {"beam": 3, "max_len_b": 4}, zero_shot=True)
    assert zs.mode == "beam" and not zs.gen.normalize_scores and zs.gen.beam == 3
    recs = zs.predict(model, batch)                      # free generation: answers need not be candidates
    assert len(recs) == 4 and all(isinstance(r["answer"], str) for r in recs)
    assert any(r["answer"] not in zs.answers for r in recs)


def test_metrics_on_ground_truth_and_wrong_predictions(tmp_path):
    synth(str(tmp_path), seed=2, size="tiny", image_size=64)
    tok = get_tokenizer()
    dtask, batch = _batch(tmp_path, "refcoco")
    ev = make_evaluator("refcoco", dtask, tok)
    gt = batch["region_coords"].tolist()
    good = [{"id": i, "box": g, "gt": g, "iou": 1.0, "hit": True} for i, g in enumerate(gt)]
    assert ev.metrics(good)["acc@0.5"] == 1.0
    dtask, batch = _batch(tmp_path, "caption")
    ev = make_evaluator("caption", dtask, tok, caption_tokenizer="python")
    perfect = [{"id": i, "caption": refs[0], "refs": refs} for i, refs in enumerate(batch["captions"])]
    wrong = [{"id": i, "caption": "zebra", "refs": refs} for i, refs in enumerate(batch["captions"])]
    assert ev.metrics(perfect)["CIDEr"] > 1.0 > ev.metrics(wrong)["CIDEr"] == 0.0
    assert ev.metrics(perfect)["Bleu_4"] > 0.99
    dtask, batch = _batch(tmp_path, "vqa")
    ev = make_evaluator("vqa", dtask, tok)
    best = [max(d, key=d.get) for d in batch["ref_dict"]]
    recs = [{"id": i, "answer": a, "score": float(d[a])} for i, (a, d) in enumerate(zip(best, batch["ref_dict"]))]
    assert ev.metrics(recs)["vqa_acc"] == 1.0
    assert torch.is_tensor(batch["src_tokens"])
