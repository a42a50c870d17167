"""Data-loader throughput: samples/s per DataLoader worker for a 480x480 caption file, a 480x480 VQA file (with
answer-trie constraint masks) and the pretraining mixture (v1 at 384 px + v2 extras at 256 px).

Caption/VQA images are photo-like 640x480 JPEGs (shapes plus per-pixel noise, q90, ~130 KB) resized to 480x480
by the loader, so decoding and resizing cost what real data costs; the pretraining rows are the synthetic
generator's clean 480 px scenes. One CSV row per benchmark is appended to benchmarks/results/data.csv (date, commit,
machine, ...).
Usage: python -m benchmarks.bench_data [--rows 192] [--workers 0] [--batch 16] [--no-save]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import append_csv, base_row  # noqa: E402
from ofa_ds.data import DataConfig, DataStream  # noqa: E402
from ofa_ds.data.images import encode_base64_image  # noqa: E402
from ofa_ds.data.synthetic import caption_of, draw_scene, generate, question_of  # noqa: E402


def photo(rng, size=480):
    """A COCO-like 640x480 photo (so the loader also pays the bicubic resize to 480x480)."""
    img, objs = draw_scene(rng, size)
    img = img.resize((640, 480), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 18, (480, 640, 3)).astype(np.float32)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8)), objs


def write_files(d: str, rows: int) -> dict:
    rng = np.random.default_rng(0)
    ans = set()
    cap_p, vqa_p = os.path.join(d, "caption480.tsv"), os.path.join(d, "vqa480.tsv")
    kb = []
    with open(cap_p, "w") as fc, open(vqa_p, "w") as fv:
        for i in range(rows):
            img, objs = photo(rng)
            b = encode_base64_image(img, quality=90)
            kb.append(len(b) * 3 / 4 / 1024)
            fc.write(f"{i}\t{i}\t{caption_of(objs)}\t\t{b}\n")
            q, a, _ = question_of(objs, rng)
            ans.add(a)
            fv.write(f"{i}\t{i}\t{q}\t1.0|!+{a}\t\t{b}\n")
    ans_p = os.path.join(d, "answers.json")
    json.dump({a: k for k, a in enumerate(sorted(ans))}, open(ans_p, "w"))
    pre = os.path.join(d, "pre")
    generate(pre, seed=0, size="tiny", image_size=480)
    vl = os.path.join(pre, "pretrain", "vision_language_examples.tsv")
    lines = open(vl).read().splitlines()
    with open(vl, "w") as f:  # repeat to `rows` rows
        for k in range(rows):
            f.write(lines[k % len(lines)] + "\n")
    return {"caption": cap_p, "vqa": vqa_p, "answers": ans_p, "pre": pre, "jpeg_kb": float(np.mean(kb))}


def measure(cfg: DataConfig, warmup: int = 2) -> tuple[float, float, int]:
    """(samples/s, rows/s, samples) over one epoch after `warmup` batches."""
    s = DataStream(cfg)
    n_samples = n_rows = 0
    t0 = None
    for k, b in enumerate(s):
        if k == warmup:
            t0 = time.perf_counter()
        if k >= warmup:
            parts = b if isinstance(b, tuple) else (b,)
            n_samples += sum(p["nsentences"] for p in parts)
            n_rows += len(set(parts[0]["id"].tolist()))
    dt = time.perf_counter() - t0
    return n_samples / dt, n_rows / dt, n_samples


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = in-process, i.e. one worker)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        f = write_files(d, a.rows)
        print(f"wrote bench files in {time.perf_counter() - t:.1f}s (mean JPEG {f['jpeg_kb']:.0f} KB)")
        from ofa_ds.data.synthetic import data_config
        cases = {
            "caption480": DataConfig(task="caption", data=f["caption"], patch_image_size=480),
            "vqa480": DataConfig(task="vqa", data=f["vqa"], patch_image_size=480, ans2label_file=f["answers"]),
            "pretrain_mixture": data_config(f["pre"], "pretrain", patch_image_size=384, v2_image_size=256),
        }
        for name, cfg in cases.items():
            cfg.batch_size, cfg.num_workers = a.batch, a.workers
            sps, rps, n = measure(cfg)
            per_worker = sps / max(a.workers, 1)
            print(f"{name:18s} {sps:8.1f} samples/s  {rps:7.1f} rows/s  ({per_worker:.1f} samples/s per worker, "
                  f"{n} samples)")
            if not a.no_save:
                row = base_row()
                row.update({"benchmark": name, "image_size": cfg.patch_image_size, "batch": a.batch,
                            "workers": a.workers, "rows": a.rows, "samples_per_s": round(sps, 2),
                            "rows_per_s": round(rps, 2), "samples_per_s_per_worker": round(per_worker, 2),
                            "jpeg_kb": round(f["jpeg_kb"], 1)})
                append_csv("data.csv", row)


if __name__ == "__main__":
    main()
