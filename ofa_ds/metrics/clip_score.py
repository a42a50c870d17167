"""CLIP score of generated images against their captions, and OFA's CLIP reranking of text-to-image samples
(docs/ofa.md#text-to-image-decoding). The model is open_clip's, built from a weights file the user provides; nothing
is fetched from a network.

What is unusual, and what this file does about it:
  * OFA's score is the plain cosine similarity of the L2-normalised image and text features: no ×100 logit scale,
    no 2.5 weight or clipping at 0 (those are CLIPScore's conventions, not OFA's).
  * OFA's CLIP is OpenAI's ViT-B/16 (QuickGELU), shipped as `clip/ViT-B-16.pt`, a TorchScript archive. Such a file is
    read with `torch.jit.load` (TorchScript's own deserializer, which builds no Python objects) and the model is
    rebuilt by open_clip from the tensors' shapes; its float16 weights are used in float32, as OpenAI's
    `clip.load` does on a CPU. Any other file (.pt/.bin/.ckpt of a state dict, or
    .safetensors) goes through the restricted unpickler of `ofa_ds.checkpoint` and is loaded strictly into
    `open_clip.create_model(arch)`.
  * Image preprocessing is OpenAI CLIP's, done here with PIL and numpy: bicubic resize of the shorter side to the
    model's input size, centre crop, scale to [0, 1], normalise with CLIP's mean and std.
  * open_clip imports torchvision; a torchvision build that does not match the installed torch fails at import with
    an error other than ImportError. `open_clip_available()` reports the reason instead of raising.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_ARCH = "ViT-B-16-quickgelu"
"""OFA's reranker, OpenAI CLIP ViT-B/16, in open_clip's naming (OpenAI's weights use QuickGELU)."""


def open_clip_available() -> tuple[bool, str]:
    """(True, "") when open_clip imports; else (False, the reason), e.g. not installed or a broken torchvision."""
    try:
        import open_clip  # noqa: F401
    except Exception as e:                     # torchvision/torch mismatches raise RuntimeError, not ImportError
        return False, f"open_clip does not import here ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return True, ""


def _open_clip():
    ok, why = open_clip_available()
    if not ok:
        pin = torch.__version__.split("+")[0]        # unpinned, pip would replace torch to suit a newer torchvision
        raise RuntimeError(f"CLIP scoring needs open_clip: pip install torch=={pin} 'ofa_ds[t2i]' ({why})")
    import open_clip
    return open_clip


def preprocess(images: Sequence[Any], size: int = 224) -> Tensor:
    """PIL images → [N, 3, size, size] float32: shorter side to `size` (bicubic), centre crop, CLIP normalisation."""
    from PIL import Image
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"expected PIL images, got {type(im).__name__}")
        w, h = im.size
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.convert("RGB").resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        a = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std
        out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
    return torch.stack(out)


@dataclass
class ClipScorer:
    """An open_clip model in eval mode, its tokenizer and input size."""

    model: Any
    tokenizer: Any
    image_size: int = 224

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: Sequence[Any], batch_size: int = 32) -> Tensor:
        """L2-normalised image features [N, D] (float32)."""
        feats = []
        dtype = next(self.model.parameters()).dtype
        for s in range(0, len(images), batch_size):
            x = preprocess(images[s: s + batch_size], self.image_size).to(self.device, dtype)
            feats.append(self.model.encode_image(x).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text features [N, D] (float32); texts are cut at CLIP's 77-token context."""
        f = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def similarity(self, images: Sequence[Any], texts: Sequence[str]) -> Tensor:
        """Cosine similarity [N] of images[i] with texts[i] (OFA's text–image score)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return (self.image_features(images) * self.text_features(texts)).sum(-1)

    def rank(self, images: Sequence[Any], text: str) -> tuple[list[int], list[float]]:
        """OFA's reranking: indices of `images` by descending similarity to `text`, and the similarities."""
        sims = (self.image_features(images) @ self.text_features([text])[0]).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])
        return order, [sims[i] for i in order]


def clip_score(scorer: ClipScorer, images: Sequence[Any], texts: Sequence[str]) -> float:
    """The CLIP score of a set of generated images: mean cosine similarity of each image with its caption."""
    if not len(images):
        raise ValueError("clip_score needs at least one image")
    return float(scorer.similarity(images, texts).mean())


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in z.namelist())


def _read_state(path: str) -> tuple[dict[str, Tensor], bool]:
    """(state dict, is OpenAI's TorchScript release) of a CLIP weights file."""
    from ofa_ds.checkpoint import CheckpointError, unpickle_restricted
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such CLIP weights file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path), False
    if _is_torchscript(path):
        return {k: v.detach() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}, True
    obj = unpickle_restricted(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a CLIP state dict (tensors, optionally under 'state_dict')")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}, False


def load_clip(path: str, arch: str = DEFAULT_ARCH, device: Any = "cpu") -> ClipScorer:
    """A ClipScorer from a local weights file. OpenAI's TorchScript release (OFA's `clip/ViT-B-16.pt`) rebuilds its
    own architecture from the tensors (`arch` only picks the tokenizer then); any other file is loaded strictly
    into `open_clip.create_model(arch)`, and every missing, unexpected or mis-shaped key is named."""
    from ofa_ds.checkpoint import CheckpointError
    open_clip = _open_clip()
    if arch == TINY_ARCH:
        register_tiny_arch()
    path = os.fspath(path)
    state, openai = _read_state(path)
    if openai:
        from open_clip.model import build_model_from_openai_state_dict
        model = build_model_from_openai_state_dict(state, quick_gelu=True)
    else:
        model = open_clip.create_model(arch, pretrained=None)
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{path}: not open_clip {arch} weights: missing {missing[:10]}, unexpected "
                                  f"{unexpected[:10]}, mis-shaped {shapes[:10]}")
        model.load_state_dict(state, strict=True)
    return _scorer(model.float(), arch, device)


def _scorer(model, arch: str, device: Any) -> ClipScorer:
    open_clip = _open_clip()
    model.requires_grad_(False)
    model = model.to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipScorer(model=model, tokenizer=open_clip.get_tokenizer(arch), image_size=size)


TINY_ARCH = "ofa-ds-tiny-clip"
"""A 2-layer, 64-wide CLIP on 32 px inputs (not a released model): `random_clip(TINY_ARCH)` for fast tests."""
TINY_ARCH_CONFIG = {"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 64, "patch_size": 16},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def register_tiny_arch() -> str:
    """Make TINY_ARCH known to open_clip (idempotent); returns its name."""
    open_clip = _open_clip()
    if TINY_ARCH not in open_clip.list_models():
        import json
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, TINY_ARCH + ".json"), "w") as f:
                json.dump(TINY_ARCH_CONFIG, f)
            open_clip.add_model_config(d)
    return TINY_ARCH


def random_clip(arch: str = DEFAULT_ARCH, seed: int = 0, device: Any = "cpu") -> ClipScorer:
    """A ClipScorer with seeded random weights (tests and smoke runs; no file). TINY_ARCH is registered on use."""
    open_clip = _open_clip()
    if arch == TINY_ARCH:
        register_tiny_arch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    return _scorer(model.float(), arch, device)
