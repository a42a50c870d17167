"""Official OFA checkpoints (`ofa_*.pt`) in and out, and the Hugging Face-style folder format.

* `load_official(path)` reads a fairseq OFA checkpoint without fairseq and without running code from the file:
  unpickling goes through torch's weights-only unpickler with exactly the extra globals these files contain
  (argparse.Namespace, numpy scalars) allowed; anything else fails with an error naming the global. The model
  configuration is inferred from `cfg["model"]` (or legacy `args`) and from the tensors themselves (vocabulary size,
  FrozenBatchNorm, decoder image_position_idx length), then the state dict is loaded strictly: every missing or
  unexpected key and every shape mismatch is reported by name. The three tied token tables must agree.
  VQA finetunes carry EMA weights in `extra_state["ema"]`: `load_official(path, ema=True)` uses them.
* `save_official(model, path)` writes the official layout (fairseq key names incl. the tied triplet and buffers,
  `cfg["model"]` as an argparse.Namespace), loadable by both this module and the original code.
* `export_folder(model, folder)` / `load_folder(folder)`: `config.json` + `model.safetensors` (tied table stored
  once; recomputable index buffers omitted) + tokenizer files. The folder format, `load_state_strict` and
  `CheckpointError` live in ofa_ds/model/weights.py (so that `OFAModel.from_pretrained` needs nothing from here)
  and are re-exported by this module, the one entry point for weights in and out.

CLI: `python -m ofa_ds.checkpoint to-folder ofa_tiny.pt out_dir [--ema]`,
`python -m ofa_ds.checkpoint to-official out_dir ofa_tiny.pt` and
`python -m ofa_ds.checkpoint merge-prompts MODEL prompts.safetensors DST` (a prompt-tuning run's prompts merged into
the frozen model it tuned; DST a folder, or an official .pt when it ends in .pt).
A folder with an `ema/` subfolder (a training run's `final/` with train.ema_decay) given to `to-official` puts those
weights into `extra_state["ema"]`, where OFA keeps them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
from typing import Any, Sequence

import torch

from ofa_ds.config import PRESETS, RELEASED_PRESETS, ModelConfig
from ofa_ds.model import OFAModel
from ofa_ds.model.weights import (CheckpointError, DictSource, FolderSource, TensorSource, export_folder,
                                  load_state_strict, read_folder_config)

RESNET_TYPES = {"resnet50": (3, 4, 6), "resnet101": (3, 4, 23), "resnet152": (3, 8, 36)}


def _allowed_globals() -> list:
    allowed: list = [argparse.Namespace]
    try:  # numpy scalars/dtypes appear in fairseq's extra_state (best metric values)
        import numpy as np
        allowed += [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                allowed.append(getattr(__import__(mod, fromlist=["scalar"]), "scalar"))
            except Exception:
                pass
    except ImportError:
        pass
    return allowed


def read_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """Unpickle an official checkpoint with the restricted (weights-only) unpickler; clear errors otherwise.
    `mmap=True` leaves the tensors in the file (paged in when read) where its format allows (torch's zip format;
    older files are read whole)."""
    ckpt = unpickle_restricted(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected an official OFA checkpoint (a dict with 'model'), found {keys}")
    return ckpt


def unpickle_restricted(path: str, extra_globals: Sequence[Any] = (), mmap: bool = False) -> Any:
    """Any torch file through the weights-only unpickler with the allow-list of `_allowed_globals` plus
    `extra_globals` (classes, or (inert placeholder, "module.Name") pairs as torch.serialization.safe_globals
    takes them); a file naming any other global is refused with a CheckpointError naming it, before it runs.
    `mmap=True`: tensors stay in a zip-format file until read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if mmap:
        import zipfile
        mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals() + list(extra_globals)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not found:                # torch's own text suggests an unsafe reload: keep only the unpickler's reason
            why = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
            why = why.group(1).strip() if why else type(e).__name__
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({why[:200]})") from None
        raise CheckpointError(
            f"{path}: refused to unpickle {', '.join(found)}: outside the allow-list (argparse.Namespace, "
            f"OrderedDict, tensors, numpy scalars); nothing from the file was executed") from None
    except Exception as e:  # truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    return ckpt


def _model_namespace(ckpt: dict) -> dict[str, Any]:
    cfg = ckpt.get("cfg")
    ns = None
    if isinstance(cfg, dict) and cfg.get("model") is not None:
        ns = cfg["model"]
    elif ckpt.get("args") is not None:
        ns = ckpt["args"]
    if ns is None:
        return {}
    return dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)


def config_from_checkpoint(ckpt: dict, state: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the ModelConfig of an official checkpoint from its arch/flags and its tensors."""
    a = _model_namespace(ckpt)
    arch = str(a.get("arch", "")).replace("ofa_", "")
    released = arch in RELEASED_PRESETS
    base = PRESETS[arch] if released else PRESETS["large"]  # ofa_large_architecture holds the shared defaults
    get = lambda k, d: a[k] if a.get(k) is not None else d  # noqa: E731
    emb = state.get("encoder.embed_tokens.weight")
    n_enc = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")), default=-1)
    n_dec = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")), default=-1)
    idx = state.get("decoder.image_position_idx")
    code_image_size = get("code_image_size", base.code_image_size)
    if idx is not None:  # 1 + w² + 769 entries, w = code_image_size / 8
        w = int(round((idx.numel() - 770) ** 0.5))
        code_image_size = 8 * w
    return dataclasses.replace(
        base, name=arch if released else "custom",
        vocab_size=int(emb.shape[0]) if emb is not None else base.vocab_size,
        d_model=int(emb.shape[1]) if emb is not None else get("encoder_embed_dim", base.d_model),
        ffn_dim=get("encoder_ffn_embed_dim", base.ffn_dim),
        num_heads=get("encoder_attention_heads", base.num_heads),
        encoder_layers=n_enc if n_enc > 0 else get("encoder_layers", base.encoder_layers),
        decoder_layers=n_dec if n_dec > 0 else get("decoder_layers", base.decoder_layers),
        resnet_layers=RESNET_TYPES.get(a.get("resnet_type"), base.resnet_layers),
        token_bucket_size=get("token_bucket_size", base.token_bucket_size),
        image_bucket_size=get("image_bucket_size", base.image_bucket_size),
        attn_scale_factor=float(get("attn_scale_factor", base.attn_scale_factor)),
        entangle_position_embedding=bool(get("entangle_position_embedding", base.entangle_position_embedding)),
        code_image_size=code_image_size,
        scale_attn="encoder.layers.0.attn_ln.weight" in state,
        scale_fc="encoder.layers.0.ffn_layernorm.weight" in state,
        scale_heads="encoder.layers.0.self_attn.c_attn" in state,
        frozen_bn=not any(k.endswith("num_batches_tracked") for k in state),
        **_prompt_fields(state, int(emb.shape[1]) if emb is not None else base.d_model),
    )


def _prompt_fields(state: dict[str, torch.Tensor], d_model: int) -> dict[str, Any]:
    """ModelConfig prompt fields from the prompt-tuning keys of a state dict (none: no prompts)."""
    out: dict[str, Any] = {}
    dims = set()
    for side in ("encoder", "decoder"):
        emb = state.get(f"{side}.{side}_prompt_encoder.embedding.weight")
        if emb is None:
            continue
        out[f"{side}_prompt_length"] = int(emb.shape[0])
        first = state.get(f"{side}.{side}_prompt_encoder.trans.0.weight")
        dims.add(None if first is None else int(first.shape[0]))
    if len(dims) > 1:
        raise CheckpointError(f"prompt encoders with and without projection, or of different widths ({dims}); "
                              f"ofa_ds supports one prompt_projection/prompt_dim for both sides")
    if dims and None not in dims:
        dim = dims.pop()
        out.update(prompt_projection=True, prompt_dim=0 if dim == 2 * d_model else dim)
    return out


def load_official(path: str, ema: bool = False, **config_overrides: Any) -> OFAModel:
    """Build the model an official OFA `.pt` describes and load its weights (EMA weights with `ema=True`).

    `config_overrides` replace ModelConfig fields (e.g. `kernel_backend="triton"`, `dropout=0.1`). Eval mode.
    """
    ckpt = read_checkpoint_file(path)
    state = ckpt["model"]
    if ema:
        extra = ckpt.get("extra_state") or {}
        if "ema" not in extra:
            raise CheckpointError(f"{path}: ema=True but the file has no extra_state['ema'] (only VQA finetunes do)")
        state = extra["ema"]
    cfg = dataclasses.replace(config_from_checkpoint(ckpt, state), **config_overrides)
    model = OFAModel(cfg)
    load_state_strict(model, state, path)
    return model.eval()


def has_ema(path: str) -> bool:
    """Whether an official checkpoint carries EMA weights (extra_state['ema'])."""
    return "ema" in (read_checkpoint_file(path).get("extra_state") or {})


def _namespace_for(cfg: ModelConfig) -> argparse.Namespace:
    rn = {v: k for k, v in RESNET_TYPES.items()}
    if tuple(cfg.resnet_layers) not in rn:
        raise CheckpointError(f"the official checkpoint format names the ResNet stem by type ({', '.join(RESNET_TYPES)}"
                              f"); resnet_layers {tuple(cfg.resnet_layers)} is none of them, so the file could not be "
                              f"loaded back. Export this model as a folder (export_folder) instead.")
    return argparse.Namespace(
        arch=f"ofa_{cfg.name}" if cfg.name in RELEASED_PRESETS else "ofa_large", encoder_embed_dim=cfg.d_model,
        decoder_embed_dim=cfg.d_model, encoder_ffn_embed_dim=cfg.ffn_dim, decoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        resnet_type=rn[tuple(cfg.resnet_layers)], token_bucket_size=cfg.token_bucket_size,
        image_bucket_size=cfg.image_bucket_size, attn_scale_factor=cfg.attn_scale_factor,
        code_image_size=cfg.code_image_size, scale_attn=cfg.scale_attn, scale_fc=cfg.scale_fc,
        scale_heads=cfg.scale_heads, scale_resids=False, disable_entangle=True, freeze_resnet=cfg.frozen_bn,
        entangle_position_embedding=cfg.entangle_position_embedding,
        share_all_embeddings=True, encoder_normalize_before=True, decoder_normalize_before=True,
        add_type_embedding=True, layernorm_embedding=True, patch_layernorm_embedding=True,
        code_layernorm_embedding=True, num_bins=cfg.num_bins, bpe="gpt2" if cfg.vocab_size > 40000 else "bert",
        **_prompt_namespace(cfg))


def _prompt_namespace(cfg: ModelConfig) -> dict[str, Any]:
    """OFA's prompt-tuning model flags for a model with prompts (nothing for one without)."""
    out: dict[str, Any] = {}
    for side, n in (("encoder", cfg.encoder_prompt_length), ("decoder", cfg.decoder_prompt_length)):
        if n > 0:
            out.update({f"{side}_prompt": True, f"{side}_prompt_type": "prefix", f"{side}_prompt_length": n,
                        f"{side}_prompt_projection": cfg.prompt_projection,
                        f"{side}_prompt_dim": cfg.prompt_dim or 2 * cfg.d_model})
    return out


def save_official(model: OFAModel, path: str, template: str | None = None, ema_state: dict | None = None) -> None:
    """Write `model` in the official fairseq layout. `template`: an official file whose cfg/extra entries are kept."""
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    if template is not None:
        ckpt = dict(_load_template(template))
    else:
        ckpt = {"args": None, "cfg": {"model": _namespace_for(model.cfg)}, "criterion": None,
                "optimizer_history": [], "task_state": {}, "extra_state": {}}
    ckpt["model"] = state
    if ema_state is not None:
        ckpt.setdefault("extra_state", {})["ema"] = ema_state
    _atomic_torch_save(ckpt, path)


def _load_template(path: str) -> dict:
    """A template as it is, through the same restricted unpickler; it may lack "model" (a skeleton file such as
    tests/assets/ofa_tiny_skeleton.pt)."""
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- Hugging Face-style folder -----------------------------------------------------------------------------------
def load_folder(folder: str, **config_overrides: Any) -> OFAModel:
    """Inverse of `export_folder`; eval mode. `config_overrides` replace ModelConfig fields."""
    return OFAModel.from_pretrained(folder, **config_overrides)


def open_weights(path: str, **config_overrides: Any) -> tuple[ModelConfig, TensorSource]:
    """The ModelConfig and a per-tensor reader of an official `.pt` (memory-mapped) or an exported folder, without
    building the model: for loading a sharded model module by module (`training/zero3.py`)."""
    if os.path.isdir(path):
        cfg, weights = read_folder_config(path, **config_overrides)
        return cfg, FolderSource(weights)
    ckpt = read_checkpoint_file(path, mmap=True)
    state = ckpt["model"]
    cfg = dataclasses.replace(config_from_checkpoint(ckpt, state), **config_overrides)
    return cfg, DictSource(state, path)


def load_any(path: str, **config_overrides: Any) -> OFAModel:
    """An official `.pt` or an exported folder, whichever `path` is."""
    if os.path.isdir(path):
        return load_folder(path, **config_overrides)
    return load_official(path, **config_overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofa_ds.checkpoint", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-folder", help="official .pt -> Hugging Face-style folder")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--ema", action="store_true", help="export the EMA weights (VQA finetunes)")
    b = sub.add_parser("to-official", help="folder (or official .pt) -> official .pt")
    b.add_argument("src")
    b.add_argument("dst")
    c = sub.add_parser("merge-prompts", help="model (folder or .pt) + prompts.safetensors -> folder or .pt")
    c.add_argument("src")
    c.add_argument("prompts")
    c.add_argument("dst")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-folder":
            model = load_official(args.src, ema=args.ema)
            export_folder(model, args.dst)
        elif args.cmd == "merge-prompts":
            from ofa_ds.model.prompt import attach_prompts
            model = attach_prompts(load_any(args.src), args.prompts)
            (save_official if args.dst.endswith(".pt") else export_folder)(model, args.dst)
        else:
            model = load_any(args.src)
            ema_dir = os.path.join(args.src, "ema")           # a training export's EMA weights (final/ema/)
            ema = load_folder(ema_dir).state_dict() if os.path.isdir(args.src) and os.path.isdir(ema_dir) else None
            save_official(model, args.dst, ema_state=ema)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"written": args.dst, "preset": model.cfg.name, "params": model.num_params()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
