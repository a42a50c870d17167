"""Inference throughput: captions/s (beam search on the KV cache with OFA's caption settings,
docs/ofa.md#generation-settings) and all-candidate VQA samples/s (docs/ofa.md#all-candidate-scoring), for one
preset and batch size, with random weights and random images.

    python benchmarks/bench_generate.py --preset base --batch 16 --image-size 480 --threads 2
    python benchmarks/bench_generate.py --preset tiny --batch 1 --vqa-candidates 3129

Random weights give captions of arbitrary length, so decoding is capped by --max-len-b and, with --fixed-len (on by
default), eos is banned until the last step: every caption then costs exactly max_len_b+1 steps, which is the
slowest case and makes runs comparable. The all-candidate part scores --vqa-candidates answers of 1-3 tokens with
a 12-token question prompt per sample. Prints one JSON object and appends a row to benchmarks/results/generate.csv
(date, commit, machine). On shared CPUs compare ratios from one run, not absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_csv, base_row  # noqa: E402
from ofa_ds.config import PRESETS, preset  # noqa: E402
from ofa_ds.generation import Trie, generate, score_candidates, task_config  # noqa: E402
from ofa_ds.model import OFAModel  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=16)
    p.add_argument("--fixed-len", type=int, default=1, help="1: ban eos before max_len_b (worst case, comparable)")
    p.add_argument("--vqa-candidates", type=int, default=3129, help="0 skips the all-candidate benchmark")
    p.add_argument("--vqa-chunk", type=int, default=512, help="decoder rows per all-candidate chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    model = OFAModel(preset(a.preset, kernel_backend=a.backend)).to(dev, dtype).eval()
    g = torch.Generator().manual_seed(0)
    B = a.batch
    src = torch.randint(4, 50000, (B, 9), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    batch = {"src_tokens": src.to(dev), "patch_images": torch.randn(B, 3, a.image_size, a.image_size,
                                                                  generator=g).to(dev, dtype),
             "patch_masks": torch.ones(B, dtype=torch.bool, device=dev)}
    cfg = task_config("caption", beam=a.beam, max_len_b=a.max_len_b,
                      min_len=a.max_len_b if a.fixed_len else 1)
    cap_times, steps = [], 0
    for i in range(a.warmup + a.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        hyps = generate(model, batch, cfg)
        _sync(dev)
        if i >= a.warmup:
            cap_times.append(time.perf_counter() - t0)
            steps = max(len(h[0]["tokens"]) for h in hyps)
    cap_s = statistics.median(cap_times)
    row = {**base_row(), "preset": a.preset, "batch": B, "image_size": a.image_size, "beam": a.beam,
           "max_len_b": a.max_len_b, "decode_steps": steps, "threads": a.threads, "device": a.device,
           "dtype": a.dtype, "backend": a.backend, "caption_batch_s": round(cap_s, 4),
           "captions_per_s": round(B / cap_s, 3)}
    if a.vqa_candidates > 0:
        cands = [torch.randint(4, 50000, (1 + j % 3,), generator=g).tolist() for j in range(a.vqa_candidates)]
        trie = Trie()
        for c in cands:
            trie.insert([0] + c + [2])
        prompts = [[0] + torch.randint(4, 50000, (12,), generator=g).tolist() for _ in range(B)]
        vqa_times = []
        for i in range(a.warmup + a.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
                score_candidates(model, enc, prompts, cands, trie=trie, chunk_rows=a.vqa_chunk)
            _sync(dev)
            if i >= a.warmup:
                vqa_times.append(time.perf_counter() - t0)
        vs = statistics.median(vqa_times)
        row.update({"vqa_candidates": a.vqa_candidates, "vqa_batch_s": round(vs, 4),
                    "vqa_samples_per_s": round(B / vs, 4)})
    else:
        row.update({"vqa_candidates": 0, "vqa_batch_s": "", "vqa_samples_per_s": ""})
    row["repeats"] = a.repeats
    if not a.no_csv:
        append_csv("generate.csv", row)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
