"""Grouped cross-attention: a decoder input with n rows per encoder row (beams of one sentence) decodes exactly like
the same input against the encoder output repeated n times, step by step on the KV cache, with a multi-token first
step, with and without image-code rows."""
import pytest
import torch


@pytest.mark.parametrize("codes", [None, [True, False]])
def test_grouped_equals_repeated_encoder_rows(model, batch, codes):
    n = 3
    b2 = {k: v[:2] for k, v in batch.items()}
    with torch.no_grad():
        enc = model.encode(b2["src_tokens"], b2["patch_images"], b2["patch_masks"])
        rep = enc.index_select(torch.arange(2).repeat_interleave(n))
        cm = None if codes is None else torch.tensor(codes).repeat_interleave(n)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, 9000, (2 * n, 6), generator=g)
        tokens[:, 0] = 0
        grouped, repeated = {}, {}
        for t in (3, 4, 5, 6):                  # first call decodes 3 positions, then one per step
            a = model.decode(tokens[:, :t], enc, cm, grouped)
            b = model.decode(tokens[:, :t], rep, cm, repeated)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
        assert grouped[0]["cross"]["k"].shape[0] == 2 and repeated[0]["cross"]["k"].shape[0] == 2 * n
        full = model.decode(tokens, rep, cm)[:, -1]                 # teacher forcing, no cache
        torch.testing.assert_close(a[:, -1], full, atol=1e-4, rtol=1e-5)
