"""CLIP score and reranking (text-to-image): OpenAI CLIP's preprocessing, cosine scores on random open_clip weights,
and loading weights files strictly (a state dict, and OpenAI's TorchScript release layout as OFA ships it).
The open_clip tests skip where open_clip does not import (e.g. a torchvision that does not match torch)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ofa_ds.checkpoint import CheckpointError
from ofa_ds.metrics.clip_score import (CLIP_MEAN, CLIP_STD, TINY_ARCH, clip_score, load_clip, open_clip_available,
                                       preprocess, random_clip)

OK, WHY = open_clip_available()
needs_open_clip = pytest.mark.skipif(not OK, reason=WHY)


def test_preprocess_is_openai_clips():
    flat = Image.new("RGB", (300, 200), (255, 0, 51))
    x = preprocess([flat], 224)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    want = (np.array([255, 0, 51]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[0].mean((1, 2)).numpy(), want, atol=1e-5)
    # shorter side to 224 (400 × 200 → 448 × 224), centre crop: the left 40 % (black) is mostly cut away
    a = np.full((200, 400, 3), 255, np.uint8)
    a[:, :160] = 0
    x = preprocess([Image.fromarray(a)], 224)[0]
    black = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    white = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[:, :, :60].mean((1, 2)).numpy(), black, atol=1e-4)     # columns 112 … 172
    np.testing.assert_allclose(x[:, :, 80:].mean((1, 2)).numpy(), white, atol=1e-4)
    with pytest.raises(TypeError, match="PIL"):
        preprocess([np.zeros((4, 4, 3))])


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@needs_open_clip
def test_scores_are_cosines_and_rank_sorts_them():
    scorer = random_clip(TINY_ARCH, seed=0)
    images, texts = _images(3), ["a red car", "two dogs on grass", "a plate of food"]
    sims = scorer.similarity(images, texts)
    with torch.no_grad():
        fi = scorer.model.encode_image(preprocess(images, 32))
        ft = scorer.model.encode_text(scorer.tokenizer(texts))
    torch.testing.assert_close(sims, torch.nn.functional.cosine_similarity(fi, ft), atol=1e-5, rtol=0)
    assert sims.abs().max() <= 1 + 1e-6 and len(set(sims.tolist())) == 3
    assert clip_score(scorer, images, texts) == pytest.approx(float(sims.mean()), abs=1e-6)
    order, scores = scorer.rank(images, "a red car")
    assert sorted(order) == [0, 1, 2] and scores == sorted(scores, reverse=True)
    assert scores[order.index(0)] == pytest.approx(float(sims[0]), abs=1e-5)


@needs_open_clip
def test_load_state_dict_file_strictly(tmp_path):
    src = random_clip(TINY_ARCH, seed=1)
    path = str(tmp_path / "clip.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in src.model.state_dict().items()}}, path)
    loaded = load_clip(path, arch=TINY_ARCH)
    images = _images(2, seed=1)
    torch.testing.assert_close(loaded.similarity(images, ["a", "b"]), src.similarity(images, ["a", "b"]))
    bad = dict(src.model.state_dict())
    bad.pop("ln_final.weight")
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"missing \['ln_final.weight'\]"):
        load_clip(path, arch=TINY_ARCH)


@needs_open_clip
def test_load_openai_torchscript_release(tmp_path):
    """OFA's clip/ViT-B-16.pt is OpenAI's TorchScript archive: rebuilt from its tensors, features unchanged."""
    src = random_clip(TINY_ARCH, seed=2)
    m = src.model.half().float()                  # OpenAI's release stores float16 weights
    mask = m._buffers.pop("attn_mask")            # OpenAI's model keeps the causal mask as a constant, not a buffer
    m.attn_mask = mask
    img, txt = preprocess(_images(2, seed=2), 32), src.tokenizer(["a", "b"])
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.trace(m, (img, txt), strict=False).save(path)
    loaded = load_clip(path, arch=TINY_ARCH)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(img), m.encode_image(img), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(txt), m.encode_text(txt), atol=1e-5, rtol=0)


def test_missing_open_clip_is_a_clear_error(tmp_path):
    if OK:
        pytest.skip("open_clip imports here")
    with pytest.raises(RuntimeError, match=r"needs open_clip: pip install torch==\S+ 'ofa_ds\[t2i\]'"):
        load_clip(str(tmp_path / "x.pt"))
