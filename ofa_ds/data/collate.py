"""Samples and their collation into the model's batch dict (contract in docs/data.md).

A `Sample` holds python token lists; collation right-pads with pad=1. Constraint masks travel sparsely (one list of
allowed ids per target position, None = all False) and become either the dense Bool[B,T,V] OFA uses, padded with
True like OFA's collate_tokens, or a compact (rows Bool[R,V], index Long[B,T]) pair that shares identical rows.
Samples without an image get a zero image and patch_mask False whenever the task has images, so every rank runs the
same modules under ZeRO-3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

PAD = 1


@dataclass
class Sample:
    id: int
    source: list[int]
    target: list[int]
    prev: list[int]
    image: Optional[np.ndarray] = None
    patch_mask: bool = False
    code_mask: bool = False
    conf: Optional[float] = None
    constraint: Optional[list[Optional[list[int]]]] = None
    extras: dict[str, Any] = field(default_factory=dict)
    v2: bool = False


def _pad(seqs: list[list[int]], pad: int = PAD) -> torch.Tensor:
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _constraint_table(samples: list[Sample], t: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique constraint rows (row 0 = padding, all True; row 1 = all False) and a [B, T] index into them."""
    keys: dict[Any, int] = {"pad": 0, "none": 1}
    index = torch.zeros((len(samples), t), dtype=torch.long)
    for i, s in enumerate(samples):
        rows = s.constraint or [None] * len(s.target)
        index[i, : len(rows)] = torch.tensor(
            [keys.setdefault("none" if r is None else tuple(sorted(r)), len(keys)) for r in rows], dtype=torch.long)
    table = torch.zeros((len(keys), vocab_size), dtype=torch.bool)
    table[0] = True
    for k, r in keys.items():
        if isinstance(k, tuple) and k:
            table[r, list(k)] = True
    return table, index


def collate(samples: list[Sample], image_size: Optional[int], vocab_size: int,
            constraint_format: str = "dense") -> dict[str, Any]:
    """Pad a list of samples into a batch. image_size None = the task never has images (patch_images None)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    b = len(samples)
    src = _pad([s.source for s in samples])
    tgt = _pad([s.target for s in samples])
    prev = _pad([s.prev for s in samples])
    batch: dict[str, Any] = {
        "id": torch.tensor([s.id for s in samples], dtype=torch.long),
        "nsentences": b,
        "ntokens": int((tgt != PAD).sum()),
        "src_tokens": src,
        "src_lengths": torch.tensor([len(s.source) for s in samples], dtype=torch.long),
        "prev_output_tokens": prev,
        "target": tgt,
        "patch_masks": torch.tensor([s.patch_mask for s in samples], dtype=torch.bool),
        "code_masks": torch.tensor([s.code_mask for s in samples], dtype=torch.bool)
        if any(s.code_mask for s in samples) else None,
        "conf": torch.tensor([1.0 if s.conf is None else s.conf for s in samples], dtype=torch.float32)
        if any(s.conf is not None for s in samples) else None,
    }
    shapes = [s.image.shape for s in samples if s.image is not None]
    if shapes or image_size is not None:
        shape = shapes[0] if shapes else (3, image_size, image_size)
        imgs = np.zeros((b, *shape), dtype=np.float32)
        for i, s in enumerate(samples):
            if s.image is not None:
                if s.image.shape != shape:
                    raise ValueError(f"images of different shapes in one batch: {s.image.shape} vs {shape}")
                imgs[i] = s.image
        batch["patch_images"] = torch.from_numpy(imgs)
    else:
        batch["patch_images"] = None
    batch["constraint_masks"] = None
    if any(s.constraint is not None for s in samples):
        table, index = _constraint_table(samples, tgt.shape[1], vocab_size)
        if constraint_format == "compact":
            batch["constraint_rows"], batch["constraint_index"] = table, index
        else:
            batch["constraint_masks"] = table[index]
    extras: dict[str, list] = {}
    for s in samples:
        for k, v in s.extras.items():
            extras.setdefault(k, []).append(v)
    for k, vals in extras.items():
        if len(vals) != b:
            continue  # key present on some samples only: not batchable
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            batch[k] = torch.tensor(vals, dtype=torch.float32 if any(isinstance(v, float) for v in vals)
                                    else torch.long)
        elif all(isinstance(v, np.ndarray) for v in vals) and len({v.shape for v in vals}) == 1:
            batch[k] = torch.from_numpy(np.stack(vals))
        else:
            batch[k] = vals
    return batch
