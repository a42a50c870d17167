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
    python -m ofa_ds.training.universal to-universal CKPT_DIR [--tag T] [--target-stage 1]
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


def to_universal(ckpt_dir: str, tag: str | None = None, num_workers: int = 1, target_stage: int = 3) -> str:
    """Convert `<ckpt_dir>/<tag>` to `<ckpt_dir>/<tag>_universal` with DeepSpeed's ds_to_universal; returns the tag.

    DeepSpeed 0.19 writes ZeRO-3 universal files as bare tensors, which only the ZeRO-3 loader reads; with
    target_stage 0/1/2 the folder `<tag>_universal_z12` is written instead, its per-parameter files in the
    {"param": tensor} form the ZeRO-1/2 loader expects, plus the module file and ds_version that loader needs."""
    d = _tag_dir(ckpt_dir, tag)
    tag = os.path.basename(d)
    suffix = "_universal" if target_stage == 3 else "_universal_z12"
    out = os.path.join(ckpt_dir, f"{tag}{suffix}")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", d, "--output_folder", out,
           "--num_extract_workers", str(num_workers), "--num_merge_workers", str(num_workers)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    if target_stage < 3:
        _add_module_file(d, out)
        _wrap_param_files(out)
    return f"{tag}{suffix}"


def _wrap_param_files(out: str) -> None:
    from deepspeed.checkpoint.constants import PARAM
    zdir = os.path.join(out, "zero")
    osd = torch.load(os.path.join(zdir, "optimizer_state.pt"), map_location="cpu", weights_only=False)
    step = osd["optimizer_state_dict"]["state"][0]["step"]      # ZeRO-3 keeps one Adam step for all parameters
    for name in os.listdir(zdir):
        pdir = os.path.join(zdir, name)
        if not os.path.isdir(pdir):
            continue
        for f in os.listdir(pdir):
            path = os.path.join(pdir, f)
            obj = torch.load(path, map_location="cpu", weights_only=False)
            if torch.is_tensor(obj) and f != "step.pt":
                torch.save({PARAM: obj}, path)
        torch.save(step, os.path.join(pdir, "step.pt"))


def _add_module_file(src: str, out: str) -> None:
    """ZeRO-1/2 engines load module weights from `mp_rank_00_model_states.pt`, which a ZeRO-3 checkpoint does not
    have (its per-rank files hold empty partitions). Write one with the consolidated fp32 weights, so the universal
    folder of a ZeRO-3 run also resumes under ZeRO-0/1/2 (the optimizer states still come from `zero/`)."""
    target = os.path.join(out, "mp_rank_00_model_states.pt")
    first = os.path.join(src, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if os.path.exists(target) or not os.path.exists(first):
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = torch.load(first, map_location="cpu", weights_only=False)
    if "ds_config" in sd and (sd["ds_config"].get("zero_optimization") or {}).get("stage", 0) != 3:
        return
    sd["module"] = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(src), tag=os.path.basename(src))
    torch.save(sd, target)
    # the ZeRO-1/2 universal loader insists on a ds_version in zero/optimizer_state.pt; ZeRO-3's converter omits it
    opt_path = os.path.join(out, "zero", "optimizer_state.pt")
    if os.path.exists(opt_path):
        import deepspeed
        osd = torch.load(opt_path, map_location="cpu", weights_only=False)
        if not osd.get("ds_version"):
            osd["ds_version"] = sd.get("ds_version") or deepspeed.__version__
            torch.save(osd, opt_path)


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
    u.add_argument("--target-stage", type=int, default=3, help="ZeRO stage of the run that will resume (0-3)")
    args = p.parse_args(argv)
    if args.cmd == "to-universal":
        print(json.dumps({"universal_tag": to_universal(args.ckpt_dir, args.tag,
                                                              target_stage=args.target_stage)}))
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
