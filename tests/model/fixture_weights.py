"""Weights of the parity fixtures, built by the rule in tests/assets/README (from the original fixtures' README).

Every floating-point entry of the official state dict gets values drawn from a numpy generator seeded by the
SHA-256 of its key (the tied decoder tables use the encoder table's key), shaped by a few per-kind rules.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

TIED_SRC = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
            "decoder.output_projection.weight": "encoder.embed_tokens.weight"}


def rule_value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    src = TIED_SRC.get(key, key)
    seed = int.from_bytes(hashlib.sha256(src.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    n = rng.standard_normal(shape)
    if key.endswith("running_var"):
        v = 0.5 + rng.random(shape)
    elif key.endswith("running_mean"):
        v = 0.1 * n
    elif len(shape) == 1 and (key.endswith(".weight") or key.endswith("c_attn")):
        v = 1.0 + 0.1 * n
    elif len(shape) == 4:
        v = n * np.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
    elif "rel_pos_table" in key:
        v = 1.0 * n
    elif len(shape) == 2 and ("pos_q_linear" in key or "pos_k_linear" in key):
        v = 0.2 * n
    else:
        v = 0.02 * n
    return v.astype(np.float32)


def rule_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout state dict with rule weights; integer buffers and versions keep the model's own values."""
    out = {}
    for k, t in reference.items():
        if t.is_floating_point() and not k.endswith(".version"):
            out[k] = torch.from_numpy(rule_value(k, tuple(t.shape)))
        else:
            out[k] = t.clone()
    return out
