"""Checkpoints across layouts: pipeline ⇄ dense/official, ZeRO (any stage) → dense, and DeepSpeed universal
checkpoints for resuming with another world size or ZeRO stage.

* `pipeline_checkpoint_to_dense(ckpt_dir, cfg)`: read a PipelineEngine checkpoint (`<dir>/<tag>/layer_XX-*.pt`,
  one file per layer position; the tied token table is saved with layer 00) and return the official-name state
  dict. `export_pipeline_checkpoint` writes it as an HF-style folder and/or an official `.pt`.
* Dense → pipeline: load the dense weights (`ofa_ds.checkpoint.load_any`, or `zero_checkpoint_to_dense` for a
  ZeRO checkpoint) and call `ofa_ds.training.pipeline.load_dense_into_pipeline` on every stage before
  `deepspeed.initialize`; a pipeline run started this way continues from the dense weights (optimizer state
  starts fresh, as with any change of layout that DeepSpeed cannot map).
* `zero_checkpoint_to_dense(ckpt_dir)`: DeepSpeed's own consolidation (zero_to_fp32) of a ZeRO-1/2/3 checkpoint,
  returned with official names (the engine's module is the OFAModel, so names already match).
* `to_universal(ckpt_dir, tag)`: run DeepSpeed's `ds_to_universal` converter (fp32 weights + Adam moments per
  parameter, independent of the number of ranks). Resume with `{"checkpoint": {"load_universal": true}}` in the
  ds_config and `engine.load_checkpoint(ckpt_dir, tag=f"{tag}_universal")` on any world size / ZeRO stage.

CLI:
    python -m ofa_ds.training.universal pipe-to-folder CKPT_DIR OUT_DIR --preset huge [--tag T] [--official F.pt]
    python -m ofa_ds.training.universal zero-to-folder CKPT_DIR OUT_DIR [--tag T] [--official F.pt] --preset P
    python -m ofa_ds.training.universal to-universal CKPT_DIR [--tag T]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

import torch

from ofa_ds.config import ModelConfig, preset


def _tag_dir(ckpt_dir: str, tag: str | None) -> str:
    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{ckpt_dir}: no 'latest' file; pass the tag")
        with open(latest) as f:
            tag = f.read().strip()
    d = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{d}: no such checkpoint tag folder")
    return d


def pipeline_checkpoint_to_dense(ckpt_dir: str, cfg: ModelConfig, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Official-name state dict from a PipelineEngine checkpoint (any number of stages)."""
    from ofa_ds.training.pipeline import layer_roles, pipe_state_to_dense
    d = _tag_dir(ckpt_dir, tag)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted(glob.glob(os.path.join(d, "layer_*-model_states.pt"))):
        idx = int(re.match(r"layer_(\d+)", os.path.basename(path)).group(1))
        if idx in layers:           # data-parallel copies of the same layer are identical
            continue
        layers[idx] = torch.load(path, map_location="cpu", weights_only=True)
    expected = {i for i, (r, _) in enumerate(layer_roles(cfg)) if r not in ("tied_dec", "tied_head")}
    missing = sorted(expected - set(layers))
    if missing:
        raise FileNotFoundError(f"{d}: no layer files for pipeline positions {missing} (wrong preset?)")
    return pipe_state_to_dense(cfg, layers)


def _dense_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str):
    from ofa_ds.checkpoint import load_state_strict
    from ofa_ds.model import OFAModel
    model = OFAModel(cfg)
    load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, where)
    return model


def export_pipeline_checkpoint(ckpt_dir: str, cfg: ModelConfig, folder: str | None = None,
                               official: str | None = None, tag: str | None = None):
    """Write a pipeline checkpoint as an HF-style folder and/or an official .pt; returns the dense OFAModel."""
    from ofa_ds.checkpoint import export_folder, save_official
    model = _dense_model(cfg, pipeline_checkpoint_to_dense(ckpt_dir, cfg, tag), ckpt_dir)
    if folder:
        export_folder(model, folder)
    if official:
        save_official(model, official)
    return model


def zero_checkpoint_to_dense(ckpt_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 official-name state dict of a ZeRO-1/2/3 (non-pipeline) checkpoint, via DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def to_universal(ckpt_dir: str, tag: str | None = None, num_workers: int = 1) -> str:
    """Convert `<ckpt_dir>/<tag>` to `<ckpt_dir>/<tag>_universal` with DeepSpeed's ds_to_universal; returns the tag."""
    d = _tag_dir(ckpt_dir, tag)
    tag = os.path.basename(d)
    out = os.path.join(ckpt_dir, f"{tag}_universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", d, "--output_folder", out,
           "--num_extract_workers", str(num_workers), "--num_merge_workers", str(num_workers)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return f"{tag}_universal"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofa_ds.training.universal", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pipe-to-folder", "zero-to-folder"):
        a = sub.add_parser(name)
        a.add_argument("ckpt_dir")
        a.add_argument("out_dir")
        a.add_argument("--preset", required=True)
        a.add_argument("--tag")
        a.add_argument("--official", help="also write the official .pt here")
    u = sub.add_parser("to-universal")
    u.add_argument("ckpt_dir")
    u.add_argument("--tag")
    args = p.parse_args(argv)
    if args.cmd == "to-universal":
        print(json.dumps({"universal_tag": to_universal(args.ckpt_dir, args.tag)}))
        return 0
    cfg = preset(args.preset)
    if args.cmd == "pipe-to-folder":
        export_pipeline_checkpoint(args.ckpt_dir, cfg, args.out_dir, args.official, args.tag)
    else:
        from ofa_ds.checkpoint import export_folder, save_official
        model = _dense_model(cfg, zero_checkpoint_to_dense(args.ckpt_dir, args.tag), args.ckpt_dir)
        export_folder(model, args.out_dir)
        if args.official:
            save_official(model, args.official)
    print(json.dumps({"written": args.out_dir, "official": args.official}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
