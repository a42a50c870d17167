"""Loss functions against a direct per-token computation written from OFA's definitions
(docs/ofa.md#label-smoothed-cross-entropy, docs/ofa.md#encouraging-loss)."""
import math

import pytest
import torch

from ofa_ds.losses import encouraging_loss, label_smoothed_ce, pair_loss

PAD = 1


def direct_ce(logits, target, eps, conf=None, mask=None, crange=None, drop_worst=0.0):
    """One token at a time, in float64, exactly as the reference text reads."""
    B, T, V = logits.shape
    losses, nlls = [], []
    for b in range(B):
        for t in range(T):
            y = int(target[b, t])
            if y == PAD:
                continue
            x = logits[b, t].double().clone()
            if mask is not None:
                allowed = mask[b, t].clone()
            elif crange is not None:
                allowed = torch.zeros(V, dtype=torch.bool)
                allowed[:4] = True
                allowed[crange[0]:crange[1]] = True
            else:
                allowed = torch.ones(V, dtype=torch.bool)
            x[~allowed] = -math.inf
            lp = x - torch.logsumexp(x, 0)
            c = 1.0 if conf is None else float(conf[b])
            lp = lp * c
            K = int(allowed.sum())
            nll = -float(lp[y])
            smooth = -float(lp[allowed].sum())
            eps_i = eps / (K - 1 + (1e-6 if (mask is not None or crange is not None) else 0.0))
            losses.append((1 - eps - eps_i) * nll + eps_i * smooth)
            nlls.append(nll)
    if drop_worst > 0:
        k = int(len(losses) * (1 - drop_worst))
        order = sorted(range(len(losses)), key=lambda i: losses[i])[:k]
        losses, nlls = [losses[i] for i in order], [nlls[i] for i in order]
    return sum(losses), sum(nlls), len(losses)


def make(B=3, T=5, V=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    target = torch.randint(4, V, (B, T), generator=g)
    target[0, 3:] = PAD
    target[B - 1, :2] = PAD      # a prompt prefix
    return logits, target


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_plain_and_conf(eps):
    logits, target = make()
    conf = torch.tensor([1.0, 0.3, 2.0])
    for c in (None, conf):
        out = label_smoothed_ce(logits, target, eps=eps, conf=c)
        ref, nll, n = direct_ce(logits, target, eps, conf=c)
        assert out.ntokens == n == int((target != PAD).sum())
        assert out.sample_size == n
        assert abs(out.loss.item() - ref) < 1e-4 * max(1, abs(ref))
        assert abs(out.nll.item() - nll) < 1e-4 * max(1, abs(nll))


def test_constraint_masks_only_on_real_rows():
    logits, target = make(V=30)
    mask = torch.zeros(3, 5, 30, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    for b in range(3):
        for t in range(5):
            if target[b, t] != PAD:
                mask[b, t, torch.randint(0, 30, (6,), generator=g)] = True
                mask[b, t, target[b, t]] = True
    # rows with a pad target stay all-False (as OFA's prompt positions): must not produce NaN
    out = label_smoothed_ce(logits, target, eps=0.1, constraint_masks=mask)
    ref, nll, n = direct_ce(logits, target, 0.1, mask=mask)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref) < 1e-4 * abs(ref)
    lg = logits.clone().requires_grad_(True)
    label_smoothed_ce(lg, target, eps=0.1, constraint_masks=mask).loss.backward()
    assert torch.isfinite(lg.grad).all()
    assert (lg.grad[target == PAD] == 0).all()


def test_compact_masks_equal_dense():
    logits, target = make(V=30)
    rows = torch.zeros(4, 30, dtype=torch.bool)
    rows[0] = True
    rows[2, 4:12] = True
    rows[3, 10:20] = True
    index = torch.randint(2, 4, (3, 5))
    index[target == PAD] = 1
    target = torch.where(target == PAD, target, torch.where(index == 2, torch.full_like(target, 5),
                                                             torch.full_like(target, 11)))
    dense = rows[index]
    a = label_smoothed_ce(logits, target, eps=0.1, constraint_masks=dense)
    b = label_smoothed_ce(logits, target, eps=0.1, constraint_rows=rows, constraint_index=index)
    assert torch.allclose(a.loss, b.loss)


def test_constraint_range():
    logits, target = make(V=40)
    target = torch.where(target == PAD, target, 20 + target % 10)     # inside [20, 35)
    out = label_smoothed_ce(logits, target, eps=0.1, constraint_range=(20, 35))
    ref, _, _ = direct_ce(logits, target, 0.1, crange=(20, 35))
    assert abs(out.loss.item() - ref) < 1e-4 * abs(ref)


def test_drop_worst_only_after():
    logits, target = make(B=4, T=6)
    ref, _, n = direct_ce(logits, target, 0.1, drop_worst=0.25)
    out = label_smoothed_ce(logits, target, eps=0.1, drop_worst_ratio=0.25, drop_worst_after=10, update_num=11)
    assert out.ntokens == n
    assert abs(out.loss.item() - ref) < 1e-4 * abs(ref)
    early = label_smoothed_ce(logits, target, eps=0.1, drop_worst_ratio=0.25, drop_worst_after=10, update_num=10)
    assert early.ntokens == int((target != PAD).sum())


def test_pair_loss():
    l1, t1 = make(seed=1)
    l2, t2 = make(B=2, T=7, seed=2)
    a, b = label_smoothed_ce(l1, t1), label_smoothed_ce(l2, t2)
    p = pair_loss(a, b)
    assert p.sample_size == 1.0
    assert abs(p.loss.item() - (a.loss.item() / a.ntokens + b.loss.item() / b.ntokens)) < 1e-5


def _bonus(p, log_end):
    if p > log_end and log_end != 1.0:
        return (p - log_end) / (log_end - 1) + math.log(1 - log_end)
    return math.log(max(1 - p, 1e-5))


@pytest.mark.parametrize("log_end", [0.75, 1.0])
def test_encouraging_loss(log_end):
    logits, target = make(V=17)
    eps = 0.1
    out = encouraging_loss(logits, target, eps=eps, log_end=log_end)
    ce, _, _ = direct_ce(logits, target, eps)
    c = 0.0
    V = logits.shape[-1]
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            y = int(target[b, t])
            if y == PAD:
                continue
            p = torch.softmax(logits[b, t].double(), 0)
            c += (1 - eps) * _bonus(float(p[y]), log_end) + eps / V * sum(_bonus(float(q), log_end) for q in p)
    assert abs(out.loss.item() - (ce + c)) < 1e-4 * abs(ce + c)
    # the bonus rewards confidence: raising the target logit lowers the encouraging part more than plain CE
    assert out.loss.item() < ce


def test_shape_mismatch_is_an_error():
    logits, target = make()
    with pytest.raises(ValueError, match="disagree"):
        label_smoothed_ce(logits[:, :-1], target)


def test_packed_logits_equal_full():
    """OFAModel's packed logits (forward(keep=...): real target rows only) give the loss of the full logits."""
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    m = OFAModel(preset("debug")).eval()
    src, prev = torch.randint(4, 100, (2, 7)), torch.randint(4, 100, (2, 5))
    tgt = prev.clone()
    tgt[0, 3:] = PAD
    img = torch.randn(2, 3, 32, 32)
    full = m(src, img, None, prev)
    packed = m(src, img, None, prev, keep=tgt.ne(PAD))
    assert packed.shape == (int(tgt.ne(PAD).sum()), full.shape[-1])
    a, b = label_smoothed_ce(full, tgt, eps=0.1), label_smoothed_ce(packed, tgt, eps=0.1)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    with pytest.raises(ValueError, match="packed"):
        label_smoothed_ce(packed[:-1], tgt)


def test_sample_token_weighting_gives_every_sample_the_same_weight():
    """train.token_weighting='sample': per-sample conf = mean tokens per sample / the sample's tokens, so each
    sample's tokens sum to the same weight and the batch's total token weight stays its token count."""
    from ofa_ds.losses import sample_weights
    target = torch.tensor([[5, 6, 7, 8, 2, 1], [9, 2, 1, 1, 1, 1], [4, 4, 2, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    w = sample_weights(target)
    n = target.ne(1).sum(1).float()
    assert w[3] == 0                                               # no real token: no weight, no division by 0
    per_sample = (w * n)[:3]
    torch.testing.assert_close(per_sample, per_sample[:1].expand(3))
    torch.testing.assert_close((w * n).sum(), n.sum())
    logits = torch.randn(4, 6, 12)
    out = label_smoothed_ce(logits, target, conf=w)
    lp = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    want = -(lp * w[:, None] * target.ne(1)).sum()
    torch.testing.assert_close(out.loss, want)
