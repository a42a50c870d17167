"""Text-to-image end to end: caption → sampled image codes → VQGAN pixels → PNG, with OFA's sampling rules (all of
the code grid, only <code_i> ids), seeds, nucleus sampling, CLIP reranking, and the decoder reaching the 1,025th
position that 1,024 codes need."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_ds.config import ModelConfig, preset
from ofa_ds.generation import GenerationConfig, _max_len
from ofa_ds.metrics.clip_score import TINY_ARCH, open_clip_available, random_clip
from ofa_ds.model import OFAModel
from ofa_ds.model.vqgan import VQGANConfig, random_vqgan
from ofa_ds.text_to_image import GeneratedImage, caption_tokens, text_to_image
from ofa_ds.tokenizer import get_tokenizer
from tests.model.fixture_weights import rule_state_dict

SMALL_VQ = VQGANConfig(n_embed=8192, embed_dim=16, z_channels=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                       attn_resolutions=(8,), resolution=32)
"""8,192 codes (OFA's vocabulary), f = 4: an 8 × 8 code grid gives 32 px images."""


def small_ofa(code_image_size: int = 64, seed: int = 0) -> OFAModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="custom", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=2,
                      resnet_layers=(1, 1, 1), code_image_size=code_image_size)
    return OFAModel(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("en")


def test_prompt_and_sampling_rules(tok):
    ids, cap = caption_tokens(tok, "A Man riding/a horse!")
    assert cap == "a man riding a horse!"
    assert ids[0] == tok.bos and ids[-1] == tok.eos
    assert tok.decode(ids) == " what is the complete image? caption: a man riding a horse!"
    with pytest.raises(ValueError, match="non-empty"):
        caption_tokens(tok, "  ")
    m = small_ofa(code_image_size=256)
    g = GenerationConfig(max_len_b=1024, min_len=1024)
    assert _max_len(g, 12, m, torch.ones(3, dtype=torch.bool)) == 1024           # the whole 32 × 32 grid
    assert _max_len(g, 12, m, torch.tensor([True, False])) == 1023                # text rows keep the old cap
    assert _max_len(g, 12, m) == 1023


def test_decoder_reaches_position_1025_for_codes_only():
    """bos + 1,024 codes: the last sampling step decodes at position 1,025, past the 1,024-entry text tables. The
    incremental step (sampling's path) equals the full forward there."""
    m = small_ofa(code_image_size=256)
    src = torch.tensor([[0, 100, 200, 2]])
    enc = m.encode(src)
    prev = torch.cat([torch.zeros(1, 1, dtype=torch.long),
                      torch.randint(50265, 58457, (1, 1024), generator=torch.Generator().manual_seed(0))], 1)
    codes = torch.tensor([True])
    with torch.no_grad():
        full = m.decode(prev, enc, codes)
        cache: dict = {}
        m.decode(prev[:, :1024], enc, codes, cache)
        last = m.decode(prev, enc, codes, cache)
    assert full.shape[1] == 1025
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="only image-code rows"):
        with torch.no_grad():
            m.decode(prev, enc, None)


def test_text_to_image_small_grid(tok, tmp_path, one_thread):
    m, vq = small_ofa(), random_vqgan(SMALL_VQ, seed=0)
    texts = ["a red bus on a street", "two cats"]
    out = text_to_image(m, tok, texts, vqgan=vq, num_samples=3, num_return=2, seed=7, batch_size=2)
    assert len(out) == 2 and all(len(o) == 2 for o in out)
    for i, o in enumerate(out):
        for j, g in enumerate(o):
            assert isinstance(g, GeneratedImage) and g.score is None
            assert len(g.codes) == 64 and all(0 <= c < 8192 for c in g.codes)
            assert g.image.mode == "RGB" and g.image.size == (32, 32)
            path = tmp_path / f"{i}_{j}.png"
            g.image.save(path)
            back = Image.open(path)
            assert back.size == (32, 32) and np.array_equal(np.asarray(back), np.asarray(g.image))
            # the pixels are the VQGAN decoding of exactly these codes (batched vs single: within one level)
            want = vq(torch.tensor(g.codes).view(1, 8, 8))
            want = ((want.clamp(-1, 1) + 1) / 2 * 255).permute(0, 2, 3, 1)[0].numpy().astype(np.uint8)
            assert np.abs(np.asarray(g.image).astype(int) - want).max() <= 1 and np.asarray(g.image).std() > 1
    again = text_to_image(m, tok, texts, vqgan=vq, num_samples=3, num_return=2, seed=7, batch_size=2)
    assert [[g.codes for g in o] for o in again] == [[g.codes for g in o] for o in out]
    other = text_to_image(m, tok, texts[:1], vqgan=vq, num_samples=1, seed=8)
    assert other[0][0].codes != out[0][0].codes
    nucleus = text_to_image(m, tok, texts[:1], vqgan=vq, num_samples=2, top_p=0.5, seed=7)
    assert len(nucleus[0][0].codes) == 64 and all(0 <= c < 8192 for c in nucleus[0][0].codes)
    with pytest.raises(ValueError, match="num_return"):
        text_to_image(m, tok, texts, vqgan=vq, num_samples=2, num_return=3)


def test_top_k_one_is_greedy_over_codes(tok, one_thread):
    """top-k 1 picks the most likely <code_i> at every step: two samples are then identical."""
    m, vq = small_ofa(seed=3), random_vqgan(SMALL_VQ, seed=1)
    out = text_to_image(m, tok, ["a field"], vqgan=vq, num_samples=2, num_return=2, top_k=1, seed=0)
    assert out[0][0].codes == out[0][1].codes


@pytest.mark.skipif(not open_clip_available()[0], reason=open_clip_available()[1])
def test_clip_reranks_best_first(tok, one_thread):
    m, vq = small_ofa(), random_vqgan(SMALL_VQ, seed=0)
    clip = random_clip(TINY_ARCH, seed=0)
    out = text_to_image(m, tok, ["a red bus"], vqgan=vq, clip=clip, num_samples=4, num_return=4, seed=1)[0]
    scores = [g.score for g in out]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    sims = clip.similarity([g.image for g in out], ["a red bus"] * 4).tolist()
    assert scores == pytest.approx(sims, abs=1e-5)


def test_ofa_tiny_writes_256px_images_from_1024_codes(tok, tmp_path, one_thread):
    """OFA-Tiny (fixture weights) at code_image_size 256 with OFA's VQGAN configuration (random weights): 1,024
    sampled codes per image, decoded to 256 × 256 PNGs. About 20 s of one core: 1,025 decoder steps (16 s) and one
    256 px VQGAN decode (3 s)."""
    m = OFAModel(preset("tiny", code_image_size=256))
    m.load_state_dict(rule_state_dict(m.state_dict()))
    out = text_to_image(m.eval(), tok, ["a dog on a beach"], vqgan=random_vqgan(VQGANConfig(), seed=0),
                        num_samples=1, seed=42)
    g = out[0][0]
    assert len(g.codes) == 1024 and all(0 <= c < 8192 for c in g.codes)
    g.image.save(tmp_path / "dog.png")
    assert Image.open(tmp_path / "dog.png").size == (256, 256)
    assert math.isfinite(np.asarray(g.image, dtype=np.float64).std())
