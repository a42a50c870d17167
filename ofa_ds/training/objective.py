"""What one training micro-batch costs and contributes, shared by the dense and the pipeline strategy.

* `batch_loss`: the configured token loss (label-smoothed CE or the encouraging loss) of one batch dict, with its
  per-sample confidence, constraint masks and OFA's drop-worst/drop-best schedules.
* `micro_batch_sizes`: computed before the forward, so the step's global sample size can be all-reduced before the
  first backward. Sample size is fairseq's: target tokens of a batch, or 1 for a pretraining (v1, v2) pair, whose
  two parts are each normalised by their own token count (`losses.pair_loss`).
* FLOPs count one ResNet pass per distinct image of a batch when `model.dedup_images` is on, as the model runs it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ofa_ds.config import ModelConfig, TrainConfig
from ofa_ds.losses import LossOut, encouraging_loss, label_smoothed_ce, sample_weights
from ofa_ds.model import train_flops_per_sample
from ofa_ds.model.flops import resnet_train_flops
from ofa_ds.model.ofa import distinct_images


class MicroSizes(NamedTuple):
    size: float          # fairseq sample size: target tokens, or 1.0 for a (v1, v2) pair
    parts: int           # 1, or 2 for a pair
    samples: int
    tokens: int
    flops: float         # training FLOPs of the micro-batch


def parts_of(batch: Any) -> tuple[dict, ...]:
    """The batch dicts of a micro-batch: (batch,) or the (v1, v2) pair."""
    return batch if isinstance(batch, tuple) else (batch,)


def batch_loss(t: TrainConfig, logits: torch.Tensor, b: dict, update_num: int) -> LossOut:
    conf = b.get("conf")
    if t.token_weighting == "sample":
        conf = sample_weights(b["target"]) * (1.0 if conf is None else conf.to(torch.float32))
    kw = dict(eps=t.label_smoothing, conf=conf, constraint_masks=b.get("constraint_masks"),
              constraint_rows=b.get("constraint_rows"), constraint_index=b.get("constraint_index"),
              constraint_range=t.range_tuple(), drop_worst_ratio=t.drop_worst_ratio,
              drop_worst_after=t.drop_worst_after, update_num=update_num)
    if t.loss == "encouraging":
        return encouraging_loss(logits, b["target"], drop_best_ratio=t.drop_best_ratio,
                                drop_best_after=t.drop_best_after, log_end=t.log_end, **kw)
    return label_smoothed_ce(logits, b["target"], **kw)


def micro_batch_sizes(model_cfg: ModelConfig, t: TrainConfig, batch: Any) -> MicroSizes:
    parts = parts_of(batch)
    size = 1.0 if len(parts) == 2 else float(parts[0]["ntokens"])
    flops = 0.0
    spn = t.sample_patch_num or None
    for j, p in enumerate(parts):
        img = p["patch_images"].shape[-1] if p.get("patch_images") is not None else None
        f = train_flops_per_sample(model_cfg, img, p["src_tokens"].shape[1], p["target"].shape[1],
                                   spn if (len(parts) == 2 and j == 0) else None)
        flops += f * p["nsentences"]
        groups = distinct_images(p["patch_images"]) if img and model_cfg.dedup_images else None
        if groups is not None:
            flops -= resnet_train_flops(model_cfg, img) * (p["nsentences"] - len(groups[0]))
    return MicroSizes(size, len(parts), sum(p["nsentences"] for p in parts), sum(p["ntokens"] for p in parts), flops)
