"""launch/evaluate.py end to end on the synthetic caption, VQA and RefCOCO files with a tiny checkpoint: the last
stdout line is the metrics JSON, files are written, an official .pt and an exported folder give the same results,
and one rank and two CPU ranks (torchrun, gloo) give identical predictions and metrics."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ofa_ds.cluster.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "evaluate.py")
TASKS = ["caption", "vqa", "refcoco"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from ofa_ds.checkpoint import export_folder, save_official
    from ofa_ds.config import ModelConfig, preset
    from ofa_ds.data.synthetic import generate as synth
    from ofa_ds.model import OFAModel
    root = tmp_path_factory.mktemp("evale2e")
    man = synth(str(root / "syn"), seed=3, size="tiny", image_size=64)
    torch.manual_seed(0)
    cfg = preset("debug")
    m = OFAModel(cfg).eval()
    with torch.no_grad():
        m.decoder.embed_tokens.weight.mul_(10)      # peakier outputs: beams and answers differ between samples
    export_folder(m, str(root / "folder"))
    torch.save({"model": m.state_dict()}, str(root / "ours.pt"))          # our bare training-state layout,
    os.makedirs(root / "ours", exist_ok=True)                              # config.json next to it
    os.replace(root / "ours.pt", root / "ours" / "ours.pt")
    with open(root / "ours" / "config.json", "w") as f:
        json.dump({"ofa_ds_config": cfg.to_dict()}, f)
    # the official format names a ResNet type, so that model needs a standard depth (resnet50's 3 stages)
    torch.manual_seed(1)
    std = OFAModel(ModelConfig(name="custom", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1,
                               decoder_layers=1, resnet_layers=(3, 4, 6))).eval()
    save_official(std, str(root / "official.pt"))
    export_folder(std, str(root / "official_folder"))
    files = {t: str(root / "syn" / man["files"][f"{t}_valid"]) for t in TASKS}
    return {"root": root, "files": files, "answers": str(root / "syn" / man["vqa_answers"])}


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"                    # tiny ops: threads only fight over the shared cores
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _args(assets, task, ckpt, out):
    a = ["--task", task, "--checkpoint", ckpt, "--data", assets["files"][task], "--out", out,
         "--patch-image-size", "64", "--batch-size", "3", "--caption-tokenizer", "python"]
    if task == "vqa":
        a += ["--ans2label", assets["answers"]]
    return a


_ONE_RANK: dict = {}


def _run(cmd, out):
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    metrics = json.loads(last)
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == metrics
    with open(os.path.join(out, "predictions.json")) as f:
        preds = json.load(f)
    return metrics, preds


def _strip(m):
    return {k: v for k, v in m.items() if k not in ("samples_per_s", "ranks", "checkpoint")}


@pytest.mark.distributed
def test_single_rank_all_tasks_and_checkpoint_kinds(assets):
    root = assets["root"]
    rows = {t: sum(1 for _ in open(assets["files"][t])) for t in TASKS}
    for task in TASKS:
        out = str(root / f"one_{task}")
        m, preds = _run([sys.executable, SCRIPT] + _args(assets, task, str(root / "folder"), out), out)
        _ONE_RANK[task] = (m, preds)
        assert m["task"] == task and m["n"] == rows[task] == len(preds)
        assert [p["id"] for p in preds] == list(range(rows[task]))
        if task == "caption":
            assert {"CIDEr", "Bleu_4", "ROUGE_L"} <= set(m) and all(isinstance(p["caption"], str) for p in preds)
        elif task == "vqa":
            answers = set(json.load(open(assets["answers"])))
            assert all(p["answer"] in answers for p in preds) and 0 <= m["vqa_acc"] <= 1
        else:
            assert all(len(p["box"]) == 4 for p in preds) and 0 <= m["acc@0.5"] <= 1
        if task == "caption":    # our training-state .pt of the same weights gives the same predictions
            out2 = str(root / "one_caption_ours")
            m2, p2 = _run([sys.executable, SCRIPT] + _args(assets, task, str(root / "ours" / "ours.pt"), out2), out2)
            assert p2 == preds and _strip(m2) == _strip(m)


@pytest.mark.distributed
def test_official_pt_equals_exported_folder(assets):
    root = assets["root"]
    res = []
    for ck in ("official.pt", "official_folder"):
        out = str(root / f"off_{ck}")
        args = _args(assets, "refcoco", str(root / ck), out) + ["--max-samples", "6"]
        res.append(_run([sys.executable, SCRIPT] + args, out))
    assert res[0][1] == res[1][1] and _strip(res[0][0]) == _strip(res[1][0]) and res[0][0]["n"] == 6


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(assets):
    root = assets["root"]
    for task in TASKS:
        out1, out2 = str(root / f"r1_{task}"), str(root / f"r2_{task}")
        if task not in _ONE_RANK:   # this test run alone
            _ONE_RANK[task] = _run([sys.executable, SCRIPT] + _args(assets, task, str(root / "folder"), out1), out1)
        m1, p1 = _ONE_RANK[task]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), SCRIPT] + _args(assets, task, str(root / "folder"), out2)
        m2, p2 = _run(cmd, out2)
        assert m2["ranks"] == 2 and m1["ranks"] == 1
        assert p1 == p2
        assert _strip(m1) == _strip(m2)
