"""Prompt tuning in the model: OFA's key names and shapes, the prefix attention itself, the decoder's causal and
incremental paths, the Triton path, freezing, prompts on their own, exports, and a prompt-free model unchanged."""
import dataclasses

import pytest
import torch

from ofa_ds.config import PromptTuningConfig, RunConfig, preset
from ofa_ds.model import OFAModel
from ofa_ds.model.layers import MultiheadAttention
from ofa_ds.model.prompt import (PromptEncoder, add_prompt_encoders, attach_prompts, freeze_all_but_prompts,
                                 load_prompts, save_prompts, with_prompts)


def small(**kw):
    return preset("debug", d_model=32, ffn_dim=64, num_heads=2, **kw)


def batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 300, (b, 6), generator=g)
    src[1, -2:] = 1                                            # padding in the encoder input
    prev = torch.randint(4, 300, (b, 5), generator=g)
    prev[:, 0] = 0
    return src, torch.randn(b, 3, 32, 32, generator=g), torch.ones(b, dtype=torch.bool), prev


def logits(m, data):
    src, img, pm, prev = data
    with torch.no_grad():
        return m(src, img, pm, prev)


@pytest.mark.parametrize("projection", [False, True])
def test_official_keys_shapes_and_counts_of_ofa_large(projection):
    """OFA's names: encoder.encoder_prompt_encoder.embedding.weight [P, L·2·D] (no projection), or embedding [P, D]
    + trans.0 [dim, D] + trans.2 [L·2·D, dim]; ofa_large with P=100 trains 4 915 200 prompt parameters."""
    cfg = preset("large", encoder_prompt_length=100, decoder_prompt_length=100, prompt_projection=projection)
    with torch.device("meta"):
        m = OFAModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if "prompt" in k}
    expect = {}
    for side in ("encoder", "decoder"):
        pre = f"{side}.{side}_prompt_encoder."
        if projection:
            expect.update({pre + "embedding.weight": (100, 1024), pre + "trans.0.weight": (2048, 1024),
                           pre + "trans.0.bias": (2048,), pre + "trans.2.weight": (24576, 2048),
                           pre + "trans.2.bias": (24576,)})
        else:
            expect[pre + "embedding.weight"] = (100, 24576)
    assert shapes == expect
    trainable, total = freeze_all_but_prompts(m)
    assert total == 472_977_152 + trainable
    if not projection:
        assert trainable == 4_915_200


def test_prompt_layout_per_layer_key_then_value():
    """Flat offset of layer l, key/value kv, head h, dim j inside the L·2·D vector: ((l·2 + kv)·H + h)·d + j."""
    enc = PromptEncoder(length=3, layers=2, d_model=8, num_heads=2).eval()
    with torch.no_grad():
        enc.embedding.weight.copy_(torch.arange(3 * 2 * 2 * 8, dtype=torch.float).view(3, 32))
    kv = enc(batch=2)
    assert len(kv) == 2 and all(k.shape == v.shape == (2, 2, 3, 4) for k, v in kv)
    w = enc.embedding.weight
    for layer in range(2):
        for which in range(2):
            for h in range(2):
                for p in range(3):
                    off = ((layer * 2 + which) * 2 + h) * 4
                    assert torch.equal(kv[layer][which][1, h, p], w[p, off:off + 4])


def test_prefix_attention_matches_the_formula():
    """softmax(q·[Pk; K]ᵀ + [0 | bias] + mask) · [Pv; V]: no bias and never padding on the prompt columns."""
    torch.manual_seed(0)
    cfg = small()
    att = MultiheadAttention(cfg).eval()
    b, n, p, hd = 2, 5, 3, cfg.head_dim
    x = torch.randn(b, n, cfg.d_model)
    bias = torch.randn(b, cfg.num_heads, n, n)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, -2:] = True
    pk, pv = torch.randn(b, cfg.num_heads, p, hd), torch.randn(b, cfg.num_heads, p, hd)
    with torch.no_grad():
        out = att(x, x, bias=bias, key_padding_mask=pad, prompt_kv=(pk, pv))
        heads = lambda t: t.view(b, n, cfg.num_heads, hd).transpose(1, 2)  # noqa: E731
        q = heads(att.q_proj(x)) * att.scaling
        k = torch.cat([pk, heads(att.k_proj(x))], 2)
        v = torch.cat([pv, heads(att.v_proj(x))], 2)
        s = q @ k.transpose(-1, -2)
        s[..., p:] += bias
        s[..., p:] = s[..., p:].masked_fill(pad[:, None, None], float("-inf"))
        o = (s.softmax(-1) @ v) * att.c_attn.view(1, -1, 1, 1)
        ref = att.out_proj(o.transpose(1, 2).reshape(b, n, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_decoder_sees_every_prompt_and_incremental_decoding_equals_teacher_forcing():
    torch.manual_seed(0)
    m = OFAModel(small(encoder_prompt_length=3, decoder_prompt_length=4)).eval()
    src, img, pm, prev = batch()
    full = logits(m, (src, img, pm, prev))
    # causality still holds with the prefix: row 0 does not depend on later target tokens
    prev2 = prev.clone()
    prev2[:, 2:] = 7
    torch.testing.assert_close(logits(m, (src, img, pm, prev2))[:, :2], full[:, :2])
    cache: dict = {}
    with torch.no_grad():
        enc = m.encode(src, img, pm)
        steps = [m.decode(prev[:, :t + 1], enc, cache=cache)[:, -1] for t in range(prev.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache[0]["self"]["k"].shape[2] == prev.shape[1]        # the cache holds real keys only, no prompt


def test_triton_path_equals_torch_path_with_prompts():
    torch.manual_seed(0)
    cfg = preset("debug", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=1,
                 encoder_prompt_length=2, decoder_prompt_length=3)
    m = OFAModel(cfg).eval()
    data = batch()
    ref = logits(m, data)
    tri = OFAModel(dataclasses.replace(cfg, kernel_backend="triton")).eval()
    tri.load_state_dict(m.state_dict())
    torch.testing.assert_close(logits(tri, data), ref, rtol=1e-4, atol=1e-4)


def test_prompt_free_model_unchanged_and_prompts_removable():
    """Length 0 builds no prompt module (same parameters, same draws, same outputs); a prompted model stripped of its
    prompts computes exactly the prompt-free model."""
    torch.manual_seed(0)
    plain = OFAModel(small()).eval()
    torch.manual_seed(0)
    zero = OFAModel(small(encoder_prompt_length=0, decoder_prompt_length=0)).eval()
    assert plain.state_dict().keys() == zero.state_dict().keys()
    data = batch()
    ref = logits(plain, data)
    assert torch.equal(logits(zero, data), ref)
    prompted = OFAModel(small(encoder_prompt_length=3, decoder_prompt_length=2)).eval()
    prompted.load_state_dict(plain.state_dict(), strict=False)
    assert not torch.allclose(logits(prompted, data), ref, atol=1e-4)    # the prompts do something
    add_prompt_encoders(prompted, plain.cfg)
    assert torch.equal(logits(prompted, data), ref)


def test_only_prompts_get_gradients():
    torch.manual_seed(0)
    m = OFAModel(small(encoder_prompt_length=3, decoder_prompt_length=2, prompt_projection=True)).train()
    trainable, total = freeze_all_but_prompts(m)
    names = {k for k, p in m.named_parameters() if p.requires_grad}
    assert names == {f"{s}.{s}_prompt_encoder.{n}" for s in ("encoder", "decoder")
                     for n in ("embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight",
                               "trans.2.bias")}
    assert trainable == sum(p.numel() for p in m.parameters() if p.requires_grad) and total == m.num_params()
    src, img, pm, prev = batch()
    m(src, img, pm, prev).float().logsumexp(-1).mean().backward()
    for k, p in m.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (k in names), k


def test_prompts_alone_saved_loaded_and_merged(tmp_path):
    """save_prompts writes the prompt tensors only; attach_prompts merges them into the frozen model it was tuned
    from; the merged model exports (folder and official .pt) with the prompts and loads back with the same logits."""
    from ofa_ds.checkpoint import export_folder, load_any, load_official, main, save_official
    torch.manual_seed(0)
    rn = (3, 4, 6)                                                   # the official format names a real ResNet
    base = OFAModel(small(resnet_layers=rn)).eval()
    tuned = OFAModel(small(resnet_layers=rn, encoder_prompt_length=3, decoder_prompt_length=2,
                           prompt_projection=True, prompt_dim=16)).eval()
    tuned.load_state_dict(base.state_dict(), strict=False)
    data = batch()
    ref = logits(tuned, data)
    path = str(tmp_path / "prompts.safetensors")
    save_prompts(tuned.state_dict(), tuned.cfg, path)
    state, facts = load_prompts(path)
    assert set(state) == {k for k in tuned.state_dict() if "_prompt_encoder." in k}
    assert facts["prompt_dim"] == 16 and facts["encoder_prompt_length"] == 3
    merged = attach_prompts(OFAModel(small(resnet_layers=rn)).eval(), path)      # other base weights, then the base's
    merged.load_state_dict({k: v for k, v in base.state_dict().items()}, strict=False)
    assert torch.equal(logits(merged, data), ref)
    export_folder(merged, str(tmp_path / "folder"))
    save_official(merged, str(tmp_path / "m.pt"))
    for m in (OFAModel.from_pretrained(str(tmp_path / "folder")), load_official(str(tmp_path / "m.pt"))):
        assert (m.cfg.encoder_prompt_length, m.cfg.decoder_prompt_length, m.cfg.prompt_projection,
                m.cfg.prompt_dim) == (3, 2, True, 16)
        assert torch.equal(logits(m, data), ref)
    export_folder(base, str(tmp_path / "base"))
    assert main(["merge-prompts", str(tmp_path / "base"), path, str(tmp_path / "cli")]) == 0
    assert torch.equal(logits(load_any(str(tmp_path / "cli")), data), ref)
    other = OFAModel(small(encoder_layers=3, resnet_layers=rn)).eval()
    with pytest.raises(ValueError, match="encoder_layers 2 in the file, 3 in the model"):
        attach_prompts(other, path)


def test_pretrained_weights_load_into_a_prompted_model(tmp_path):
    """A checkpoint without prompt keys loads strictly into a model built with prompts (fresh prompts kept), as
    OFA's upgrade_state_dict_named does; a prompt file of other lengths is refused by name."""
    from ofa_ds.checkpoint import export_folder, load_any
    torch.manual_seed(0)
    base = OFAModel(small()).eval()
    export_folder(base, str(tmp_path / "base"))
    m = load_any(str(tmp_path / "base"), encoder_prompt_length=4, decoder_prompt_length=0)
    assert m.encoder.encoder_prompt_encoder.embedding.weight.shape == (4, 2 * 2 * 32)
    assert m.decoder.decoder_prompt_encoder is None
    assert torch.equal(m.encoder.embed_tokens.weight, base.encoder.embed_tokens.weight)


def test_train_prompt_tuning_section_in_json_and_set():
    run = RunConfig().override(["train.prompt_tuning.encoder_length=10", "train.prompt_tuning.projection=true"])
    pt = run.train.prompt_tuning
    assert isinstance(pt, PromptTuningConfig) and pt.enabled and pt.encoder_length == 10 and pt.projection
    assert RunConfig.from_json(run.to_json()).train.prompt_tuning == pt
    cfg = with_prompts(preset("tiny"), pt)
    assert (cfg.encoder_prompt_length, cfg.decoder_prompt_length, cfg.prompt_projection) == (10, 0, True)
    with pytest.raises(ValueError, match="lenght"):
        RunConfig().override(["train.prompt_tuning.lenght=3"])
    from ofa_ds.recipes import get_recipe
    for task in ("vqa", "caption", "refcoco", "snli_ve"):
        r = get_recipe(f"{task}_prompt")
        assert r.train.prompt_tuning.encoder_length == r.train.prompt_tuning.decoder_length == 100
        assert r.data.task == get_recipe(task).data.task and r.train.ema_decay == 0


def test_beam_search_with_prompts_scores_what_teacher_forcing_scores():
    """Beam search (cached decoder, beams sharing the encoder rows) on a prompted model: the best hypothesis'
    per-token log-probabilities equal a plain teacher-forced forward of the same tokens."""
    from ofa_ds.generation import GenerationConfig, generate
    torch.manual_seed(0)
    m = OFAModel(small(encoder_prompt_length=3, decoder_prompt_length=4)).eval()
    src, img, pm, _ = batch()
    with torch.no_grad():
        hyps = generate(m, {"src_tokens": src, "patch_images": img, "patch_masks": pm},
                        GenerationConfig(beam=3, max_len_b=4, min_len=1))
        for i, h in enumerate(hyps):
            toks = h[0]["tokens"]
            prev = torch.cat([torch.zeros(1, dtype=torch.long), toks[:-1]])[None]
            lp = m(src[i:i + 1], img[i:i + 1], pm[i:i + 1], prev).float().log_softmax(-1)[0]
            torch.testing.assert_close(h[0]["positional_scores"], lp.gather(1, toks[:, None])[:, 0],
                                       rtol=1e-4, atol=1e-4)

