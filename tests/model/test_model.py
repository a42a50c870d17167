"""OFA model: sizes, official key layout, position buckets, incremental decoding, code path, patch sampling."""
import pytest
import torch

from ofa_ds.config import PRESETS, ModelConfig, preset
from ofa_ds.model import OFAModel, forward_flops, reorder_cache
from ofa_ds.model.positions import make_image_rp_bucket, make_token_rp_bucket

EXPECTED_PARAMS = {"tiny": 33_488_336, "medium": 92_892_000, "base": 182_238_536, "large": 472_977_152,
                   "huge": 929_486_848}


def _official_keys(assets_dir, name):
    with open(f"{assets_dir}/checkpoint_keys/ofa_{name}.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {k: (shape, dtype) for k, shape, dtype in rows}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_param_count_and_state_dict_layout(name, assets_dir):
    with torch.device("meta"):
        model = OFAModel(PRESETS[name])
    assert model.num_params() == EXPECTED_PARAMS[name]
    ours = {k: (str(list(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert ours == _official_keys(assets_dir, name)


def test_token_bucket_vectors():
    t = make_token_rp_bucket()
    vectors = {0: 255, 1: 256, -1: 254, 127: 382, 128: 383, -128: 127, 129: 384, 130: 384, 200: 411, -200: 99,
               500: 467, 1023: 510, -1023: 0}
    for rel, expected in vectors.items():
        i, j = (rel, 0) if rel >= 0 else (0, -rel)
        assert t[i, j].item() == expected, rel


def test_image_bucket_vectors():
    t = make_image_rp_bucket()
    pid = lambda r, c: r * 42 + c + 1  # noqa: E731
    assert t[pid(5, 7), pid(5, 7)] == 3444
    assert t[pid(0, 1), pid(0, 0)] == 3445
    assert t[pid(1, 0), pid(0, 0)] == 3527
    assert t[pid(0, 0), pid(1, 1)] == 3360
    assert t[pid(23, 23), pid(0, 0)] == 5376
    assert (t[0, 1], t[1, 0], t[0, 0]) == (6889, 6890, 6891)


def test_config_json_round_trip_and_unknown_keys():
    cfg = preset("huge", dropout=0.1)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 3})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = OFAModel(cfg).eval()
    with torch.no_grad():  # make the relative tables matter (BERT init makes them small)
        for p in m.parameters():
            if p.dim() == 2 and p.shape[1] == cfg.num_heads:
                p.normal_()
    return m


def _batch(b=2, L=7, T=6, size=64, pad_last=True):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 1000, (b, L), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    if pad_last:
        src[-1, -2:] = 1
    prev = torch.randint(4, 1000, (b, T), generator=g)
    prev[:, 0] = 0
    img = torch.randn(b, 3, size, size, generator=g)
    return src, img, prev


@pytest.mark.parametrize("code", [False, True])
def test_incremental_decoding_matches_full(tiny, code):
    src, img, prev = _batch()
    code_masks = torch.tensor([code, False]) if code else None
    with torch.no_grad():
        enc = tiny.encode(src, img, torch.tensor([True, False]))
        full = tiny.decode(prev, enc, code_masks)
        cache: dict = {}
        steps = [tiny.decode(prev[:, : t + 1], enc, code_masks, cache=cache) for t in range(prev.shape[1])]
        # several new positions at once (forced prefixes) also work
        cache2: dict = {}
        a = tiny.decode(prev[:, :3], enc, code_masks, cache=cache2)
        b = tiny.decode(prev, enc, code_masks, cache=cache2)
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=1e-4)


def test_reorder_cache_for_beams(tiny):
    src, img, prev = _batch(pad_last=False)
    order = torch.tensor([1, 1, 0])
    with torch.no_grad():
        enc = tiny.encode(src, img)
        cache: dict = {}
        tiny.decode(prev[:, :3], enc, cache=cache)
        reorder_cache(cache, order)
        step = tiny.decode(prev[order, :4], enc.index_select(order), cache=cache)
        full = tiny.decode(prev[order, :4], enc.index_select(order))
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_padding_image_and_text_are_ignored(tiny):
    """A sample without image (patch_masks False) gives the same logits as the text-only encoder call."""
    src, img, prev = _batch(b=1, pad_last=False)
    with torch.no_grad():
        with_dummy = tiny(src, img, torch.tensor([False]), prev)
        text_only = tiny(src, None, None, prev)
    torch.testing.assert_close(with_dummy, text_only, atol=1e-4, rtol=1e-4)


def test_sample_patch_num_keeps_positions(tiny):
    """Sampled patches keep their true position ids: sampling all 16 patches (a random permutation per sample)
    leaves the text outputs unchanged and permutes the image outputs."""
    src, img, prev = _batch(size=64)
    with torch.no_grad():
        full = tiny.encode(src, img).hidden
        torch.manual_seed(3)
        perm = tiny.encode(src, img, sample_patch_num=16).hidden
        few = tiny.encode(src, img, sample_patch_num=5).hidden
    assert few.shape[1] == 5 + src.shape[1]
    torch.testing.assert_close(perm[:, 16:], full[:, 16:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(perm[:, :16], full[:, :16])
    torch.testing.assert_close(perm[:, :16].sort(1).values, full[:, :16].sort(1).values, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_trainable_parameter(tiny):
    model = OFAModel(preset("tiny", encoder_layers=1, decoder_layers=1)).train()
    src, img, prev = _batch()
    logits = model(src, img, torch.tensor([True, True]), prev, code_masks=torch.tensor([False, True]))
    logits.float().logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_flops_scale_with_inputs():
    cfg = PRESETS["base"]
    f1 = forward_flops(cfg, 384, 20, 20)
    f2 = forward_flops(cfg, 384, 20, 40)
    assert f2 > f1 > 2 * PRESETS["base"].d_model ** 2  # sane magnitude and monotone
    # dominated by the 2·params·tokens rule of thumb within a factor of 3 for text-only work
    text = forward_flops(cfg, None, 512, 512)
    with torch.device("meta"):
        n = OFAModel(cfg).num_params()
    assert 0.3 < text / (2 * n * 1024) < 3


def test_normformer_init_sets_only_the_normformer_layernorms():
    """normformer_init=g gives exactly the 20 NormFormer LayerNorm weights of Tiny (encoder attn_ln/ffn_layernorm,
    decoder self_attn_ln/cross_attn_ln/ffn_layernorm) the value g; every other parameter is drawn as with 1."""
    cfg = preset("tiny", vocab_size=600, max_source_positions=64, max_target_positions=64)
    torch.manual_seed(0)
    ref = OFAModel(cfg).state_dict()
    torch.manual_seed(0)
    m = OFAModel(preset("tiny", vocab_size=600, max_source_positions=64, max_target_positions=64,
                        normformer_init=0.1))
    changed = sorted(k for k, v in m.state_dict().items() if not torch.equal(v, ref[k]))
    assert len(changed) == 20 and all(k.endswith(("attn_ln.weight", "ffn_layernorm.weight")) for k in changed)
    assert all(torch.all(m.state_dict()[k] == 0.1) for k in changed)
    with pytest.raises(ValueError, match="normformer_init"):
        ModelConfig(normformer_init=-1.0)


def test_resnet_zero_init_residual_starts_every_bottleneck_as_its_shortcut():
    """resnet_zero_init_residual=True zeroes exactly the bn3 weight of each of Tiny's 13 bottlenecks (nothing else
    changes), so at init a block without downsampling returns relu(x) = x for its (non-negative) input; off, the
    same block changes its input."""
    kw = dict(vocab_size=600, max_source_positions=64, max_target_positions=64)
    torch.manual_seed(0)
    ref = OFAModel(preset("tiny", **kw)).state_dict()
    torch.manual_seed(0)
    m = OFAModel(preset("tiny", resnet_zero_init_residual=True, **kw))
    changed = sorted(k for k, v in m.state_dict().items() if not torch.equal(v, ref[k]))
    assert len(changed) == 3 + 4 + 6 and all(k.endswith(".bn3.weight") for k in changed)
    assert all(torch.all(m.state_dict()[k] == 0) for k in changed)
    x = torch.relu(torch.randn(2, 256, 8, 8))
    block_on = m.encoder.embed_images.layer1[1].eval()
    torch.testing.assert_close(block_on(x), x)
    torch.manual_seed(0)
    block_off = OFAModel(preset("tiny", **kw)).encoder.embed_images.layer1[1].eval()
    assert (block_off(x) - x).abs().max() > 0.1


def test_entangle_position_embedding_adds_raw_positions_before_the_layernorms(tmp_path):
    """OFA's --entangle-position-embedding: same parameters (identical state-dict keys), the encoder adds the raw
    position embeddings to the text and image-patch embeddings before their LayerNorms; off (every released config)
    nothing is added. The flag survives an official .pt round trip."""
    from ofa_ds.checkpoint import load_official, save_official
    kw = dict(vocab_size=600)
    torch.manual_seed(0)
    off = OFAModel(preset("tiny", **kw)).eval()
    on = OFAModel(preset("tiny", entangle_position_embedding=True, **kw)).eval()
    assert set(on.state_dict()) == set(off.state_dict())
    on.load_state_dict(off.state_dict())
    src = torch.tensor([[0, 5, 9, 17, 2], [0, 33, 2, 1, 1]])
    img = torch.randn(2, 3, 64, 64)
    e = on.encoder
    with torch.no_grad():
        types = e.type_embedding.weight
        feats = e.embed_images(img).flatten(2).transpose(1, 2)                          # [2, 16, 1024]
        pid = e.embed(src, img)["image_pid"]
        for model, add in ((off, 0.0), (on, 1.0)):
            x = model.encoder.embed(src, img)["x"]
            want_img = e.patch_layernorm_embedding(e.image_proj(feats) + types[1] + add * e.embed_image_positions(pid))
            want_txt = e.layernorm_embedding(e.embed_tokens(src) + types[0] + add * e.embed_positions.weight[:5])
            want_txt = want_txt * src.ne(1)[..., None]                                 # padding zeroed
            assert torch.allclose(x[:, :16], want_img, atol=1e-5)
            assert torch.allclose(x[:, 16:], want_txt, atol=1e-5)
        prev = torch.tensor([[0, 7, 8], [0, 9, 1]])
        assert not torch.allclose(on(src, img, None, prev), off(src, img, None, prev))
    path = str(tmp_path / "ent.pt")
    save_official(on, path)
    back = load_official(path).eval()
    assert back.cfg.entangle_position_embedding
    with torch.no_grad():
        assert torch.equal(back(src, img, None, prev), on(src, img, None, prev))


def test_dedup_images_shares_one_resnet_pass_and_matches_per_sample_outputs_and_grads():
    """Samples that carry the same image (OFA's pretraining pairs) run the ResNet once: the ResNet sees only the
    distinct images, and in eval mode the logits and every gradient equal the per-sample path."""
    from ofa_ds.model.ofa import distinct_images
    torch.manual_seed(0)
    kw = dict(vocab_size=600, max_source_positions=64, max_target_positions=64, encoder_layers=1, decoder_layers=1)
    a, b = torch.randn(2, 3, 32, 32)
    near = a.clone()
    near[0, 0, 0] += 1e-3                                          # differs in one pixel: must stay separate
    img = torch.stack([a, b, a, near, b])
    assert [t.tolist() for t in distinct_images(img)] == [[0, 1, 3], [0, 1, 0, 2, 1]]
    assert distinct_images(torch.stack([a, b, near])) is None
    src = torch.randint(4, 600, (5, 7))
    prev = torch.randint(4, 600, (5, 5))
    grads, outs = {}, {}
    for dedup in (False, True):
        torch.manual_seed(1)
        m = OFAModel(preset("tiny", dedup_images=dedup, **kw)).eval()
        seen = []
        m.encoder.embed_images.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
        out = m(src, img, torch.ones(5, dtype=torch.bool), prev)
        out.float().pow(2).mean().backward()
        outs[dedup] = out.detach()
        grads[dedup] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        assert seen == ([3] if dedup else [5])
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4, msg=n)


def test_forward_keep_returns_the_kept_rows_of_the_full_logits():
    """forward(..., keep=mask) projects only the kept target rows: packed logits [N, V] equal the rows of the full
    logits selected by the mask (row-major), images, padding and code masks included; gradients flow."""
    torch.manual_seed(0)
    m = OFAModel(preset("tiny", vocab_size=600, encoder_layers=1, decoder_layers=2)).eval()
    src = torch.tensor([[0, 5, 9, 17, 2], [0, 33, 2, 1, 1], [0, 8, 8, 2, 1]])
    img = torch.randn(3, 3, 32, 32)
    prev = torch.tensor([[0, 7, 8, 9], [0, 9, 1, 1], [0, 4, 5, 1]])
    keep = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    for cm in (None, torch.tensor([False, True, False])):
        with torch.no_grad():
            full = m(src, img, torch.tensor([True, False, True]), prev, code_masks=cm)
            packed = m(src, img, torch.tensor([True, False, True]), prev, code_masks=cm, keep=keep)
        assert packed.shape == (int(keep.sum()), 600)
        torch.testing.assert_close(packed, full[keep], atol=1e-6, rtol=1e-6)
    m(src, None, None, prev, keep=keep).sum().backward()
    assert m.decoder.output_projection.weight.grad is not None
