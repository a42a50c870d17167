"""Inference throughput: captions/s with the encoder and the decoding (beam search on the KV cache, OFA's caption
settings, docs/ofa.md#generation-settings) timed separately, per preset and batch size, with random weights and
random images; optionally all-candidate VQA samples/s (docs/ofa.md#all-candidate-scoring).

    python benchmarks/bench_generate.py                                  # tiny and base, batch 1 and 16, 480 px
    python benchmarks/bench_generate.py --presets base --batches 16 --threads 2
    python benchmarks/bench_generate.py --compare-ref 35e7c73            # before/after table, alternating runs
    python benchmarks/bench_generate.py --presets tiny --batches 1 --vqa-candidates 3129

Every measurement runs in a worker process that imports `ofa_ds` from one source tree. `--compare-ref REV` also
extracts REV (`git archive`) into a temporary folder and alternates single runs of the two trees (ref, this tree;
then this tree, ref; …) on identical weights and inputs, so that load on a shared machine hits both alike; the
table prints both and the ratio. Random weights give captions of arbitrary length, so decoding is capped by
--max-len-b and, with --fixed-len (on by default), eos is banned until the last step: every caption costs exactly
max_len_b+1 steps, the slowest case, comparable between runs. Prints one JSON line per row and appends the rows to
benchmarks/results/generate.csv (date, commit, machine, this machine's GEMM peak measured in the same run).
Workers keep freed memory (`--malloc keep`, see KEEP_FREED), as docs/benchmarks.md#generation advises for CPU
inference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- worker: one source tree, one process ---------------------------------------------------------------------------
def _worker(a) -> None:
    """Serve measurement requests read from stdin ({"preset", "batch"} JSON lines), one timed run each; answers
    are `RESULT {...}` lines on stdout. `ofa_ds` comes from a.worker (a source tree)."""
    sys.path.insert(0, a.worker)
    import torch

    from ofa_ds.config import preset
    from ofa_ds.generation import Trie, generate, score_candidates, task_config
    from ofa_ds.model import OFAModel
    torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    models: dict = {}
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for line in sys.stdin:
        req = json.loads(line)
        name, B = req["preset"], req["batch"]
        if name not in models:
            torch.manual_seed(0)
            models[name] = OFAModel(preset(name, kernel_backend=a.backend)).to(dev, dtype).eval()
        model = models[name]
        g = torch.Generator().manual_seed(0)
        src = torch.randint(4, 50000, (B, 9), generator=g)
        src[:, 0], src[:, -1] = 0, 2
        batch = {"src_tokens": src.to(dev),
                 "patch_images": torch.randn(B, 3, a.image_size, a.image_size, generator=g).to(dev, dtype),
                 "patch_masks": torch.ones(B, dtype=torch.bool, device=dev)}
        out: dict = {}
        with torch.no_grad():
            if req.get("vqa", 0):
                cands = [torch.randint(4, 50000, (1 + j % 3,), generator=g).tolist() for j in range(req["vqa"])]
                trie = Trie()
                for c in cands:
                    trie.insert([0] + c + [2])
                prompts = [[0] + torch.randint(4, 50000, (12,), generator=g).tolist() for _ in range(B)]
                sync()
                t0 = clock()
                enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
                score_candidates(model, enc, prompts, cands, trie=trie, chunk_rows=a.vqa_chunk)
                sync()
                out["vqa_s"] = clock() - t0
            else:
                cfg = task_config("caption", beam=a.beam, max_len_b=a.max_len_b,
                                  min_len=a.max_len_b if a.fixed_len else 1)
                sync()
                t0 = clock()
                enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
                sync()
                t1 = clock()
                hyps = generate(model, batch, cfg, enc=enc)
                sync()
                out.update(encoder_s=t1 - t0, decoding_s=clock() - t1,
                           steps=max(len(h[0]["tokens"]) for h in hyps))
        print("RESULT " + json.dumps(out), flush=True)


KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc malloc settings (read at process start) that keep freed memory in the process: without them every buffer
over 32 MB (the encoder's activations at batch 16, 480 px) goes back to the OS when freed and the next batch pays
for faulting its pages in again, kernel time about as large as the encoder's own compute."""


class _Worker:
    def __init__(self, tree: str, argv: list[str], malloc: str):
        env = dict(os.environ, PYTHONPATH=tree, **(KEEP_FREED if malloc == "keep" else {}))
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", tree, *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, req: dict) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"benchmark worker exited with code {self.p.wait()} (its stderr is above)")

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def _extract(rev: str, into: str) -> str:
    """Source tree of git revision `rev` (git archive) in `into`, with the ofa_ds/kernels link a checkout has."""
    arch = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=arch, check=True)
    link = os.path.join(into, "ofa_ds", "kernels")
    if not os.path.exists(link) and os.path.isdir(os.path.join(into, "kernels")):
        os.symlink("../kernels", link)
    return into


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,base", help="comma-separated presets")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=16)
    p.add_argument("--fixed-len", type=int, default=1, help="1: ban eos before max_len_b (worst case, comparable)")
    p.add_argument("--vqa-candidates", type=int, default=0, help=">0: also time all-candidate scoring (3129: VQA)")
    p.add_argument("--vqa-chunk", type=int, default=512, help="decoder rows per all-candidate chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the worker's CPU time (process_time; with --threads 1, a machine others load "
                        "inflates it far less than wall time); recorded in the device column as cpu-time")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: workers run with glibc's MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^40 (KEEP_FREED)")
    p.add_argument("--compare-ref", default=None, metavar="REV", help="also run git revision REV, alternating")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        return _worker(a)
    sys.path.insert(0, ROOT)
    from benchmarks.common import append_csv, base_row, gemm_peak_gflops
    torch.set_num_threads(a.threads)
    worker_argv = [f"--{k}={v}" for k, v in (("threads", a.threads), ("device", a.device), ("dtype", a.dtype),
                                              ("backend", a.backend), ("image-size", a.image_size), ("beam", a.beam),
                                              ("max-len-b", a.max_len_b), ("fixed-len", a.fixed_len),
                                              ("vqa-chunk", a.vqa_chunk), ("clock", a.clock))]
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    trees = [("HEAD", ROOT)]
    if a.compare_ref:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", a.compare_ref], capture_output=True,
                             text=True, check=True).stdout.strip()
        trees.insert(0, (f"ref:{rev}", _extract(rev, tmp)))
    start = base_row()                           # commit and machine as of the start (the tree may change)
    workers = [_Worker(t, worker_argv, a.malloc) for _, t in trees]
    rows: list[dict] = []
    try:
        peak = gemm_peak_gflops()
        for name in a.presets.split(","):
            for B in (int(x) for x in a.batches.split(",")):
                reqs = [{"preset": name, "batch": B}]
                if a.vqa_candidates > 0:
                    reqs.append({"preset": name, "batch": B, "vqa": a.vqa_candidates})
                for req in reqs:
                    res: list[list[dict]] = [[] for _ in trees]
                    for i in range(a.warmup + a.repeats):
                        order = range(len(trees)) if i % 2 == 0 else reversed(range(len(trees)))
                        for k in order:
                            r = workers[k].run(req)
                            if i >= a.warmup:
                                res[k].append(r)
                    for (label, _), rs in zip(trees, res):
                        rows.append(_row({**start, "date": base_row()["date"]}, peak, a, name, B, label, req, rs))
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not a.no_csv:
        for r in rows:
            append_csv("generate.csv", r)
    if a.compare_ref:
        _table(rows)
    return rows


FIELDS = ("date", "commit", "machine", "torch", "gemm_peak_gflops", "tree", "preset", "batch", "image_size", "beam",
          "max_len_b", "decode_steps", "threads", "device", "dtype", "backend", "malloc", "encoder_s_per_caption",
          "decoding_s_per_caption", "caption_batch_s", "captions_per_s", "vqa_candidates", "vqa_batch_s",
          "vqa_samples_per_s", "repeats")
"""generate.csv's columns (a caption row leaves the vqa ones empty and the other way round)."""


def _row(base: dict, peak: float, a, name: str, B: int, label: str, req: dict, rs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    row = {**dict.fromkeys(FIELDS, ""), **base, "gemm_peak_gflops": peak, "tree": label, "preset": name, "batch": B,
           "image_size": a.image_size, "beam": a.beam, "max_len_b": a.max_len_b, "threads": a.threads,
           "device": a.device if a.clock == "wall" else f"{a.device} cpu-time", "dtype": a.dtype,
           "backend": a.backend, "malloc": a.malloc, "repeats": a.repeats}
    if "vqa_s" in med:
        row.update(vqa_candidates=req["vqa"], vqa_batch_s=round(med["vqa_s"], 4),
                   vqa_samples_per_s=round(B / med["vqa_s"], 4))
        return row
    total = med["encoder_s"] + med["decoding_s"]
    row.update(decode_steps=int(med["steps"]), encoder_s_per_caption=round(med["encoder_s"] / B, 4),
               decoding_s_per_caption=round(med["decoding_s"] / B, 4), caption_batch_s=round(total, 4),
               captions_per_s=round(B / total, 3))
    return row


def _table(rows: list[dict]) -> None:
    """Before/after table: per preset and batch, the ref tree's and this tree's figures and their ratio."""
    cap = [r for r in rows if "captions_per_s" in r]
    print(f"\n{'preset':6} {'batch':>5} | {'encoder s/cap':>21} | {'decoding s/cap':>23} | {'captions/s':>21}")
    print(f"{'':6} {'':>5} | {'ref':>6} {'new':>6} {'x':>6} | {'ref':>7} {'new':>7} {'x':>6} | "
          f"{'ref':>6} {'new':>6} {'x':>6}")
    for ref, new in zip(cap[0::2], cap[1::2]):
        e0, e1 = ref["encoder_s_per_caption"], new["encoder_s_per_caption"]
        d0, d1 = ref["decoding_s_per_caption"], new["decoding_s_per_caption"]
        c0, c1 = ref["captions_per_s"], new["captions_per_s"]
        print(f"{ref['preset']:6} {ref['batch']:>5} | {e0:6.3f} {e1:6.3f} {e0 / e1:6.2f} | {d0:7.4f} {d1:7.4f} "
              f"{d0 / d1:6.2f} | {c0:6.3f} {c1:6.3f} {c1 / c0:6.2f}")


if __name__ == "__main__":
    main()
