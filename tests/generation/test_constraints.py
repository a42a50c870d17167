"""Trie-constrained decoding (never leaves the trie, with and without a forced prefix), constraint range and bin
restriction, and all-candidate scoring against OFA's dense-mask formulation."""
import math

import torch

from ofa_ds.generation import (GenerationConfig, Trie, boxes_from_hypos, generate, sample, score_candidates,
                               strip_prefix)
from ofa_ds.tokenizer import get_tokenizer

ANSWERS = [[500, 501], [500, 502, 503], [600], [700, 701, 702, 703], [500]]


def _trie():
    t = Trie()
    for a in ANSWERS:
        t.insert([0] + a + [2])
    return t


def test_constrained_beam_never_leaves_trie(model, batch):
    trie = _trie()
    full = {tuple(a + [2]) for a in ANSWERS}
    hyps = generate(model, batch, GenerationConfig(beam=5, max_len_b=10), trie=trie)
    for hh in hyps:
        assert hh, "every sample has finished hypotheses"
        for h in hh:
            assert tuple(h["tokens"].tolist()) in full
            assert h["score"] > -math.inf
    free = generate(model, batch, GenerationConfig(beam=2, max_len_b=10))
    assert any(tuple(h["tokens"].tolist()) not in full for hh in free for h in hh)   # the trie does something


def test_constrained_with_forced_prefix(model, batch):
    trie = _trie()
    prefix = [[40, 41, 42], [43], [44, 45]]
    hyps = generate(model, batch, GenerationConfig(beam=4, max_len_b=12, normalize_scores=False),
                    prefix_tokens=prefix, trie=trie)
    for b, hh in enumerate(hyps):
        for h in hh:
            seq = h["tokens"].tolist()
            assert seq[: len(prefix[b])] == prefix[b]
            assert strip_prefix(h, len(prefix[b])).tolist() in ANSWERS


def test_constrained_sampling_stays_in_trie(model, batch):
    trie = _trie()
    full = {tuple(a + [2]) for a in ANSWERS}
    gen = torch.Generator().manual_seed(0)
    out = sample(model, batch, GenerationConfig(beam=6, max_len_b=10, sampling=True, temperature=5.0), trie=trie,
                 generator=gen)
    for hh in out:
        for h in hh:
            assert tuple(h["tokens"].tolist()) in full


def test_constraint_range_and_bin_steps(model, batch):
    V = model.cfg.vocab_size
    hyps = generate(model, batch, GenerationConfig(beam=3, max_len_b=5, constraint_range=(1000, 1100)))
    for hh in hyps:
        for h in hh:
            assert all(t < 4 or 1000 <= t < 1100 for t in h["tokens"].tolist())
    tok = get_tokenizer()
    hyps = generate(model, batch, GenerationConfig(beam=5, max_len_b=4, min_len=4, bin_steps=4),
                    bin_offset=tok.bin_offset)
    for hh in hyps:
        for h in hh:
            seq = h["tokens"].tolist()
            assert len(seq) == 5 and seq[4] == 2 and all(tok.bin_offset <= t < V for t in seq[:4])
    boxes = boxes_from_hypos(hyps, tok, [0.5, 1.0, 2.0], [1.0, 1.0, 4.0])
    for hh, box, wr, hr in zip(hyps, boxes, [0.5, 1.0, 2.0], [1.0, 1.0, 4.0]):
        bins = [t - tok.bin_offset for t in hh[0]["tokens"][:4].tolist()]
        want = [bins[0] / 999 * 512 / wr, bins[1] / 999 * 512 / hr, bins[2] / 999 * 512 / wr, bins[3] / 999 * 512 / hr]
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(box, want))


def _dense_reference(model, enc, prompts, cands, trie):
    """OFA's way: prev = prompt + answer, dense constraint mask (all-False on prompt rows), full logits."""
    V = model.cfg.vocab_size
    out = torch.zeros(len(prompts), len(cands))
    for b, p in enumerate(prompts):
        for j, a in enumerate(cands):
            prev = torch.tensor([p + a])
            tgt = p[1:] + a + [2]
            mask = torch.zeros(len(tgt), V, dtype=torch.bool)
            for k in range(len(a) + 1):
                row = len(p) - 1 + k
                if trie is None:
                    mask[row] = True
                else:
                    mask[row, trie.next_tokens([0] + a[:k])] = True
            logits = model.decode(prev, enc.index_select(torch.tensor([b])))[0].float()
            lp = torch.log_softmax(logits.masked_fill(~mask, -math.inf), -1)
            g = lp.gather(1, torch.tensor(tgt)[:, None]).squeeze(1)
            keep = mask.any(1)
            out[b, j] = g[keep].sum()
    return out


def test_all_candidate_scores_match_dense_masks(model, batch):
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    prompts = [[0, 40, 41, 42], [0, 43], [0]]
    trie = _trie()
    for t in (None, trie):
        got = score_candidates(model, enc, prompts, ANSWERS, trie=t, chunk_rows=4)
        ref = _dense_reference(model, enc, prompts, ANSWERS, t)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(got, score_candidates(model, enc, prompts, ANSWERS, chunk_rows=4))
    # a candidate outside the trie gets -inf; one chunk or many give the same scores
    s = score_candidates(model, enc, prompts, ANSWERS + [[900]], trie=trie, chunk_rows=1000)
    assert torch.isinf(s[:, -1]).all() and torch.allclose(s[:, :-1], got, atol=1e-5)


def test_first_token_only_is_the_constrained_last_position(model, batch):
    """GLUE: log-softmax over the trie's first tokens at the prompt's last position, nothing after it."""
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    prompts = [[0, 40, 41, 2], [0, 43, 2], [0, 2]]
    labels = [[500], [600], [700]]
    trie = Trie()
    for a in labels:
        trie.insert([0] + a + [2])
    got = score_candidates(model, enc, prompts, labels, trie=trie, first_token_only=True)
    for b, p in enumerate(prompts):
        logits = model.decode(torch.tensor([p]), enc.index_select(torch.tensor([b])))[0, -1].float()
        lp = torch.log_softmax(logits[[500, 600, 700]], -1)
        torch.testing.assert_close(got[b], lp, atol=1e-5, rtol=0)


def test_scores_without_reading_a_partitioned_weight(model, batch):
    """Under ZeRO-3 the output projection's weight is a placeholder outside its module's call (DeepSpeed marks it
    with `ds_id`): scoring then computes every logit through the module and gives the same scores."""
    enc = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    prompts = [[0, 40, 41, 42], [0, 43], [0]]
    dense = [score_candidates(model, enc, prompts, ANSWERS, trie=t, chunk_rows=4) for t in (None, _trie())]
    w = model.decoder.output_projection.weight
    w.ds_id = 0
    try:
        for t, ref in zip((None, _trie()), dense):
            torch.testing.assert_close(score_candidates(model, enc, prompts, ANSWERS, trie=t, chunk_rows=4), ref,
                                       atol=1e-5, rtol=0)
    finally:
        del w.ds_id


def test_ban_bos(model, batch):
    """ban_bos: a model that ranks bos first still never emits it (OFA's generator only bans pad)."""
    decode = model.decode

    def bos_first(tokens, *a, **kw):
        logits = decode(tokens, *a, **kw)
        logits[..., 0] += 100.0
        return logits
    model.decode = bos_first
    try:
        for cfg in (GenerationConfig(beam=1, max_len_b=4), GenerationConfig(beam=3, max_len_b=4)):
            assert all(0 in h["tokens"].tolist() for hh in generate(model, batch, cfg) for h in hh)
            cfg.ban_bos = True
            assert all(0 not in h["tokens"].tolist() for hh in generate(model, batch, cfg) for h in hh)
    finally:
        del model.decode
