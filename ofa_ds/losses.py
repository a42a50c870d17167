"""OFA's training criterions (docs/ofa.md#label-smoothed-cross-entropy and docs/ofa.md#encouraging-loss), as plain
functions over logits.

What is unusual (and easy to get wrong):
  * Smoothing weight is ε/(K−1) per non-target allowed token and the target keeps 1−ε, where K is the size of the
    allowed set: the vocabulary, the True entries of a constraint-mask row (with 1e-6 added to K−1, as OFA), or
    4 + (b−a) for a constraint range (a, b). This differs slightly from stock fairseq.
  * Constraint masks are applied to the logits *before* the log-softmax (probabilities renormalised over the
    allowed set), and only on rows whose target is real. OFA masks every row and relies on dropping NaN rows later;
    here ignored rows are removed first, so no NaN is ever formed.
  * `conf` multiplies the log-probabilities (so it scales nll, smoothing and the encouraging bonus alike).
  * drop_worst keeps the int(n·(1−ratio)) tokens with the smallest loss across the whole local batch; the kept count
    is the sample size. drop_best (encouraging loss only) symmetrically drops the smallest-loss tokens.
  * A pretraining pair (v1, v2) is `loss_v1/n_v1 + loss_v2/n_v2` with sample size 1 (`pair_loss`).
  * Everything is summed, never averaged: the trainer divides by the global sample size, as fairseq does.

`logits` may be [B,T,V] or *packed* [N,V]: the rows of the N non-pad targets in row-major order (what
`OFAModel.forward(..., keep=mask)` returns), which skips the output projection of padded positions.

Compact constraint masks (`constraint_rows` Bool[R,V] + `constraint_index` Long[B,T], from the collater's
`constraint_masks="compact"` mode) are accepted wherever a dense Bool[B,T,V] mask is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 1


@dataclass
class LossOut:
    """Summed losses of one (micro-)batch. `sample_size` is what fairseq divides the summed gradient by."""

    loss: Tensor          # scalar, summed over kept tokens (differentiable)
    nll: Tensor           # scalar, summed −log p(target) over kept tokens (detached)
    ntokens: int          # tokens kept (after dropping pads and drop_worst/drop_best)
    sample_size: float    # ntokens, or 1 for a pretraining pair


def _kept_rows(logits: Tensor, target: Tensor, conf: Tensor | None, constraint_masks: Tensor | None,
               constraint_rows: Tensor | None, constraint_index: Tensor | None,
               ignore_index: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Flatten to the rows whose target is not `ignore_index`: logits [N,V], target [N], conf [N], mask [N,V]."""
    keep = target.ne(ignore_index)
    if logits.dim() == 2:                                   # packed: logits of the kept rows only, in order
        if logits.shape[0] != int(keep.sum()):
            raise ValueError(f"packed logits have {logits.shape[0]} rows but target has {int(keep.sum())} real tokens")
        lg = logits
    elif logits.shape[:2] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on [B, T]")
    else:
        lg = logits[keep]
    tg = target[keep]
    cf = None
    if conf is not None:
        cf = conf.to(torch.float32)[:, None].expand_as(target)[keep]
    mask = None
    if constraint_masks is not None:
        mask = constraint_masks[:, : target.shape[1]][keep]
    elif constraint_rows is not None:
        if constraint_index is None:
            raise ValueError("constraint_rows given without constraint_index")
        mask = constraint_rows[constraint_index[:, : target.shape[1]][keep]]
    return lg, tg, cf, mask


def _range_mask(vocab: int, constraint_range: tuple[int, int], device: torch.device) -> Tensor:
    a, b = constraint_range
    m = torch.zeros(vocab, dtype=torch.bool, device=device)
    m[:4] = True
    m[a:b] = True
    return m


def _log_probs(logits: Tensor, target: Tensor, conf: Tensor | None, mask: Tensor | None,
               constraint_range: tuple[int, int] | None) -> tuple[Tensor, Tensor | None, float | Tensor]:
    """(conf-scaled float32 log-probs [N,V], allowed mask [N,V] or [V] or None, K−1 denominator per row)."""
    V = logits.shape[-1]
    x = logits.float()
    denom: float | Tensor = V - 1
    allowed = None
    if mask is not None:
        allowed = mask.to(torch.bool)
        x = x.masked_fill(~allowed, float("-inf"))
        denom = allowed.sum(-1).to(torch.float32) - 1 + 1e-6
    elif constraint_range is not None:
        allowed = _range_mask(V, constraint_range, logits.device)
        x = x.masked_fill(~allowed, float("-inf"))
        denom = float(4 + constraint_range[1] - constraint_range[0]) - 1 + 1e-6
    lp = F.log_softmax(x, dim=-1)
    if conf is not None:
        lp = lp * conf[:, None]
    return lp, allowed, denom


def _token_losses(lp: Tensor, target: Tensor, allowed: Tensor | None, denom: float | Tensor,
                  eps: float) -> tuple[Tensor, Tensor]:
    """Per-token smoothed loss and nll (docs/ofa.md#label-smoothed-cross-entropy)."""
    nll = -lp.gather(-1, target[:, None]).squeeze(-1)
    if allowed is None:
        smooth = -lp.sum(-1)
    else:
        smooth = -lp.masked_fill(~allowed, 0.0).sum(-1)   # −inf entries of disallowed tokens excluded
    eps_i = eps / denom
    return (1.0 - eps - eps_i) * nll + eps_i * smooth, nll


def _drop(loss: Tensor, ratio: float, largest: bool) -> Tensor:
    """Indices of the tokens kept after dropping `ratio` of them (the largest-loss ones when largest=True)."""
    k = int(loss.shape[0] * (1 - ratio))
    return torch.topk(loss, k=k, largest=not largest).indices


def label_smoothed_ce(logits: Tensor, target: Tensor, *, eps: float = 0.0, conf: Tensor | None = None,
                      constraint_masks: Tensor | None = None, constraint_rows: Tensor | None = None,
                      constraint_index: Tensor | None = None, constraint_range: tuple[int, int] | None = None,
                      drop_worst_ratio: float = 0.0, drop_worst_after: int = 0, update_num: int = 0,
                      ignore_index: int = PAD) -> LossOut:
    """OFA's `adjust_label_smoothed_cross_entropy` (docs/ofa.md#label-smoothed-cross-entropy): logits [B,T,V],
    target [B,T] (pad = ignored), conf [B] per-sample weight, constraint_masks Bool[B,T,V] (True = allowed) or the
    compact pair."""
    out, _ = _ce_core(logits, target, eps, conf, constraint_masks, constraint_rows, constraint_index,
                      constraint_range, drop_worst_ratio, drop_worst_after, update_num, ignore_index)
    return out


def _ce_core(logits, target, eps, conf, constraint_masks, constraint_rows, constraint_index, constraint_range,
             drop_worst_ratio, drop_worst_after, update_num, ignore_index):
    lg, tg, cf, mask = _kept_rows(logits, target, conf, constraint_masks, constraint_rows, constraint_index,
                                  ignore_index)
    lp, allowed, denom = _log_probs(lg, tg, cf, mask, constraint_range)
    loss, nll = _token_losses(lp, tg, allowed, denom, eps)
    if drop_worst_ratio > 0 and update_num > drop_worst_after and loss.numel():
        idx = _drop(loss, drop_worst_ratio, largest=True)
        loss, nll, lp, tg = loss[idx], nll[idx], lp[idx], tg[idx]
    n = int(loss.numel())
    return LossOut(loss.sum(), nll.detach().sum(), n, float(n)), (loss, lp, tg)


def _bonus(p: Tensor, log_end: float) -> Tensor:
    """Encouraging bonus (docs/ofa.md#encouraging-loss): ln(max(1−p, 1e-5)), continued linearly above log_end
    (when log_end ≠ 1)."""
    b = torch.log(torch.clamp(1.0 - p, min=1e-5))
    if log_end != 1.0:
        lin = (p - log_end) / (log_end - 1.0) + math.log(1.0 - log_end)
        b = torch.where(p > log_end, lin, b)
    return b


def encouraging_loss(logits: Tensor, target: Tensor, *, eps: float = 0.0, conf: Tensor | None = None,
                     constraint_masks: Tensor | None = None, constraint_rows: Tensor | None = None,
                     constraint_index: Tensor | None = None, constraint_range: tuple[int, int] | None = None,
                     drop_worst_ratio: float = 0.0, drop_worst_after: int = 0, drop_best_ratio: float = 0.0,
                     drop_best_after: int = 0, update_num: int = 0, log_end: float = 0.75,
                     ignore_index: int = PAD) -> LossOut:
    """OFA's `adjust_label_smoothed_encouraging_loss` (docs/ofa.md#encouraging-loss): the label-smoothed CE above
    plus c_loss = (1−ε)·Σ bonus(p_y) + (ε/V)·Σ_t Σ_v bonus(p_v) over the kept tokens."""
    out, (loss, lp, tg) = _ce_core(logits, target, eps, conf, constraint_masks, constraint_rows, constraint_index,
                                   constraint_range, drop_worst_ratio, drop_worst_after, update_num, ignore_index)
    if drop_best_ratio > 0 and update_num > drop_best_after and loss.numel():
        idx = _drop(loss, drop_best_ratio, largest=False)
        loss, lp, tg = loss[idx], lp[idx], tg[idx]
    V = lp.shape[-1]
    p = lp.exp()                                                     # disallowed entries: exp(−inf) = 0 → bonus 0
    bonus = _bonus(p, log_end)
    c_loss = (1.0 - eps) * bonus.gather(-1, tg[:, None]).sum() + (eps / V) * bonus.sum()
    nll = -lp.gather(-1, tg[:, None]).squeeze(-1)
    n = int(loss.numel())
    return LossOut(loss.sum() + c_loss, nll.detach().sum(), n, float(n))


def pair_loss(v1: LossOut, v2: LossOut) -> LossOut:
    """Pretraining (v1, v2) batch (docs/ofa.md#pretraining-pair-loss): loss_v1/n_v1 + loss_v2/n_v2, sample size 1."""
    l1 = v1.loss / max(v1.ntokens, 1)
    l2 = v2.loss / max(v2.ntokens, 1)
    nll = v1.nll / max(v1.ntokens, 1) + v2.nll / max(v2.ntokens, 1)
    return LossOut(l1 + l2, nll, v1.ntokens + v2.ntokens, 1.0)


def sample_weights(target: Tensor, ignore_index: int = PAD) -> Tensor:
    """Per-sample weights [B] that give every sample of the batch the same total weight while keeping the total
    token weight equal to the token count: mean real tokens per sample / the sample's real tokens (0 for a sample
    with no real token). Used as `conf` when `train.token_weighting='sample'`."""
    n = target.ne(ignore_index).sum(-1).to(torch.float32)
    real = n.gt(0)
    mean = n.sum() / real.sum().clamp(min=1)
    return torch.where(real, mean / n.clamp(min=1), torch.zeros_like(n))
