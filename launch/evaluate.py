"""Evaluate an OFA checkpoint on one task: `python launch/evaluate.py --task caption --checkpoint C --data D`.

Runs on one rank or many (the deepspeed launcher, torchrun, or any launcher that sets RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT): the rows of the file are split between ranks (each row read exactly once), every rank
holds the whole model (eval needs no ZeRO partitioning, so ranks never wait on each other inside generation), and
the prediction records are gathered on rank 0 with torch.distributed over gloo. Rank 0 writes
`<out>/predictions.json` and `<out>/metrics.json` and prints the metrics as the last line of stdout (one JSON
object). Metrics are computed from the gathered records sorted by row id, so 1 and N ranks give the same numbers.

Checkpoints: an official OFA `.pt` (`--ema` for VQA finetunes' EMA weights), a folder written by
`python -m ofa_ds.checkpoint to-folder` / `export_folder`, or a training checkpoint of ours: a DeepSpeed checkpoint
folder (has `latest`; consolidated with deepspeed's zero_to_fp32) or a `.pt` holding a bare state dict or
{"module"/"model": state}, with the ModelConfig from a `config.json` next to it or `--preset`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ofa_ds.training.faults import RunFault, check_readable, report, write_failure  # noqa: E402


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
from ofa_ds.predict.loading import load_model  # noqa: E402,F401  (the loader shared with ofa_ds.predict)


# ---- distributed ----------------------------------------------------------------------------------------------------
def init_dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world


def gather(records: list[dict], world: int) -> list[dict]:
    if world == 1:
        return records
    import torch.distributed as dist
    parts: list = [None] * world
    dist.all_gather_object(parts, records)
    return [r for p in parts for r in p]


# ---- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launch/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=["caption", "vqa", "refcoco", "snli_ve", "imagenet", "gigaword",
                                                     "cola", "sst2", "mrpc", "qqp", "mnli", "rte", "qnli"])
    p.add_argument("--checkpoint", required=True, help="official .pt, exported folder, or our training checkpoint")
    p.add_argument("--data", required=True, help="TSV file (a comma list: the last path is evaluated)")
    p.add_argument("--out", default=None, help="output folder (default: ./eval_<task>)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam", type=int, default=None, help="override the task's beam size")
    p.add_argument("--gen-args", default=None, help="JSON of generator options (OFA --eval-args keys)")
    p.add_argument("--vqa-mode", choices=["allcand", "beam"], default="allcand",
                   help="VQA / SNLI-VE / ImageNet: all-candidate scoring (paper numbers) or trie beam search")
    p.add_argument("--zero-shot", action="store_true",
                   help="VQA with a pretrained checkpoint: free beam 20, no trie, prompt_type none")
    p.add_argument("--restrict-bins", action="store_true", help="RefCOCO: the 4 box tokens must be location bins")
    p.add_argument("--ans2label", default="", help="candidate answers (.json or OFA's .pkl) for VQA / ImageNet")
    p.add_argument("--selected-cols", default=None)
    p.add_argument("--patch-image-size", type=int, default=None, help="default: 480 (512 for RefCOCO)")
    p.add_argument("--max-image-size", type=int, default=512)
    p.add_argument("--prompt-type", default=None, choices=["none", "src", "prev_output"],
                   help="decoder prompt layout (default: src for GLUE, prev_output otherwise)")
    p.add_argument("--add-object", action="store_true", help="VQA: append the object tags to the question")
    p.add_argument("--add-caption", action="store_true", help="SNLI-VE: premise in the prompt (released finetunes)")
    p.add_argument("--caption-tokenizer", default="auto", choices=["auto", "python", "java", "none"])
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights: an official .pt's "
                   "extra_state['ema'], an export's ema/ folder, or a training checkpoint's EMA files")
    p.add_argument("--prompts", default="", help="prompts.safetensors of a prompt-tuning run, merged into the model")
    p.add_argument("--preset", default=None, help="model preset when a training checkpoint has no config.json")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N rows (0 = all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Evaluate; a fault (a missing or unreadable --checkpoint / --data / --ans2label, a checkpoint that does not
    load, an output folder that cannot be written) ends in one line `error: ...` and exit status 2 (1 for faults met
    while running, e.g. a full disk)."""
    args = parse_args(argv)
    try:
        return evaluate(args)
    except Exception as e:                       # noqa: BLE001 (unknown ones are re-raised)
        return report(e)


def evaluate(args) -> int:
    check_readable(args.checkpoint, "checkpoint")
    check_readable(args.data.split(",")[-1], "data file")
    if args.ans2label:
        check_readable(args.ans2label, "answer list (--ans2label)")
    rank, world = init_dist()
    from ofa_ds.data import DataConfig, DataStream
    from ofa_ds.metrics.tasks import GLUE, make_evaluator
    from ofa_ds.tokenizer import get_tokenizer
    from ofa_ds.training.evaluate import to_device

    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    size = args.patch_image_size or (512 if args.task == "refcoco" else 480)
    dcfg = DataConfig(task=args.task, data=args.data, selected_cols=args.selected_cols, batch_size=args.batch_size,
                      num_workers=args.num_workers, shuffle=False, equalize_shards=False, patch_image_size=size,
                      max_image_size=args.max_image_size, add_object=args.add_object,
                      prompt_type=args.prompt_type or ("src" if args.task in GLUE else
                                                       "none" if args.zero_shot else "prev_output"),
                      add_caption=args.add_caption, ans2label_file=args.ans2label, bad_row_threshold=1.0)
    stream = DataStream(dcfg, split="valid", rank=rank, world=world)
    tok = get_tokenizer()
    gen = json.loads(args.gen_args) if args.gen_args else {}
    if args.beam is not None:
        gen["beam"] = args.beam
    ev = make_evaluator(args.task, stream.task, tok, gen, mode=args.vqa_mode, restrict_bins=args.restrict_bins,
                        zero_shot=args.zero_shot,
                        max_image_size=args.max_image_size, caption_tokenizer=args.caption_tokenizer)
    t0 = time.time()
    model = load_model(args.checkpoint, ema=args.ema, preset_name=args.preset)
    if args.prompts:                                   # a prompt-tuning run's prompts on the frozen model
        from ofa_ds.model.prompt import attach_prompts
        try:
            attach_prompts(model, args.prompts)
        except ValueError as e:
            raise RunFault(f"--prompts: {e}", status=2) from None
    model = model.to(device=device, dtype=dtype).eval()
    log(f"rank {rank}/{world}: model {model.cfg.name} loaded in {time.time() - t0:.1f}s on {device} ({args.dtype})")
    records: list[dict] = []
    t0, n_seen = time.time(), 0
    with torch.no_grad():
        for batch in stream:
            if args.max_samples:
                keep = [i for i, sid in enumerate(batch["id"].tolist()) if sid < args.max_samples]
                if not keep:
                    continue
                if len(keep) < len(batch["id"]):
                    batch = _subset(batch, keep)
            records += ev.predict(model, to_device(batch, device, dtype))
            n_seen += int(batch["src_tokens"].shape[0])
    seconds = time.time() - t0
    all_records = ev.dedupe(gather(records, world))
    timing = gather([{"rank": rank, "samples": n_seen, "seconds": seconds}], world)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0:
        return 0
    metrics = ev.metrics(all_records)
    metrics.update({"task": args.task, "checkpoint": args.checkpoint, "ranks": world,
                    "samples_per_s": round(sum(t["samples"] for t in timing) / max(max(t["seconds"] for t in timing),
                                                                                  1e-9), 3)})
    out = args.out or f"eval_{args.task}"
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "predictions.json"), "w") as f:
            json.dump(all_records, f, indent=1)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    except OSError as e:
        raise write_failure(e, out, f"writing the results to {out}") from e
    log(f"{len(all_records)} samples in {seconds:.1f}s; wrote {out}/predictions.json and metrics.json")
    print(json.dumps(metrics), flush=True)
    return 0


def _subset(batch: dict, keep: list[int]) -> dict:
    b = len(batch["id"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
            out[k] = v[keep]
        elif isinstance(v, list) and len(v) == b:
            out[k] = [v[i] for i in keep]
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    from ofa_ds.training.shutdown import exit_process
    exit_process(main())   # not sys.exit: see ports.exit_process
