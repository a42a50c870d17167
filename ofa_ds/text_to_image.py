"""Text-to-image end to end, as OFA does it (docs/ofa.md#text-to-image-decoding): the caption prompt, sampling of the
whole image-code grid, the VQGAN decoder to pixels, CLIP reranking of the samples.

What is unusual, and what this file does about it:
  * OFA samples exactly (code_image_size / 8)² codes (1,024 for 256 px: min_len = max_len_b = 1024) from top-k 256,
    restricted to the <code_i> ids (constraint range [code offset, bin offset)); the specials 0–3 are banned until
    the last step, where only eos is allowed. Here: `constraint_range`, `min_len`, pad (always), bos (`ban_bos`) and
    unk (`unk_penalty` = ∞) of `ofa_ds.generation.sample`, with `code_masks` set for every row.
  * Generated tokens map to codes by subtracting the code offset and fill the grid row-major.
  * Reranking: every sample of a caption is scored against the (pre-processed) caption by CLIP, best first; without
    a CLIP model the samples keep their sampling order and carry no score.
  * Captions are sampled `batch_size` at a time (each with `num_samples` rows); only the `num_return` kept images of a
    caption outlive its batch. A seed makes a run repeatable for the same batch_size (rows share one generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from ofa_ds.data.text import pre_caption
from ofa_ds.generation import PAD, GenerationConfig, sample
from ofa_ds.metrics.clip_score import ClipScorer, load_clip, random_clip  # noqa: F401  (the API's CLIP side)
from ofa_ds.model.vqgan import VQGANConfig, VQGANDecoder, load_vqgan, random_vqgan, to_pil  # noqa: F401

PROMPT = " what is the complete image? caption: {}"
MAX_CAPTION_WORDS = 64
"""OFA's max_src_length for text-to-image: captions keep their first 64 words."""
DECODE_CHUNK = 8
"""Images decoded by the VQGAN at once (a 256 px image holds ~35 MB of activations per layer in float32)."""


@dataclass
class GeneratedImage:
    """One generated image: `image` (PIL RGB, 256 × 256 for OFA's 32 × 32 grid), `score` (CLIP cosine similarity
    with the caption, None without CLIP) and `codes` (the sampled VQGAN code ids, row-major, 1,024 for 256 px)."""

    image: Any
    score: Optional[float]
    codes: list[int]


def caption_tokens(tokenizer, text: str) -> tuple[list[int], str]:
    """(bos + prompt + eos ids, the pre-processed caption CLIP compares against) for one caption."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a text-to-image caption must be a non-empty string, got {text!r}")
    cap = pre_caption(text, MAX_CAPTION_WORDS)
    return [tokenizer.bos, *tokenizer.encode(PROMPT.format(cap)), tokenizer.eos], cap


def sampling_config(n_codes: int, tokenizer, num_samples: int, top_k: int = 256, top_p: Optional[float] = None,
                    temperature: float = 1.0) -> GenerationConfig:
    """OFA's image-code sampling settings for a grid of `n_codes` codes."""
    return GenerationConfig(beam=num_samples, sampling=True, sampling_topk=top_k if top_k else -1,
                            sampling_topp=top_p if top_p else -1.0, temperature=temperature,
                            min_len=n_codes, max_len_a=0, max_len_b=n_codes,
                            constraint_range=(tokenizer.code_offset, tokenizer.bin_offset),
                            ban_bos=True, unk_penalty=math.inf, no_repeat_ngram_size=0)


@torch.no_grad()
def iter_text_to_image(model, tokenizer, texts: Sequence[str], *, vqgan: VQGANDecoder,
                       clip: Optional[ClipScorer] = None, num_samples: int = 24, num_return: int = 1,
                       top_k: int = 256, top_p: Optional[float] = None, temperature: float = 1.0,
                       seed: Optional[int] = None, batch_size: int = 1) -> Iterator[list[GeneratedImage]]:
    """`text_to_image`, one caption's images at a time (in input order)."""
    if num_samples < 1 or not 1 <= num_return <= num_samples:
        raise ValueError(f"need 1 <= num_return ({num_return}) <= num_samples ({num_samples})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid = model.cfg.code_image_size // 8
    n_codes = grid * grid
    prepared = [caption_tokens(tokenizer, t) for t in texts]       # bad captions fail before any sampling
    cfg = sampling_config(n_codes, tokenizer, num_samples, top_k, top_p, temperature)
    dev = next(model.parameters()).device
    gen = None if seed is None else torch.Generator(device=dev).manual_seed(int(seed))
    for s in range(0, len(prepared), batch_size):
        chunk = prepared[s: s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        src = torch.full((len(chunk), width), PAD, dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            src[i, : len(ids)] = torch.tensor(ids)
        hyps = sample(model, {"src_tokens": src.to(dev)}, cfg,
                      code_masks=torch.ones(len(chunk), dtype=torch.bool, device=dev), generator=gen)
        for (_, cap), rows in zip(chunk, hyps):
            codes = torch.stack([h["tokens"][:n_codes] for h in rows]).cpu() - tokenizer.code_offset
            if codes.shape[1] != n_codes or int(codes.min()) < 0 or int(codes.max()) >= tokenizer.code_dict_size:
                raise RuntimeError(f"sampling gave {codes.shape[1]} tokens or non-code ids for {cap!r}; "
                                   f"expected {n_codes} image codes")
            images = []
            for c in range(0, len(codes), DECODE_CHUNK):
                images += to_pil(vqgan(codes[c: c + DECODE_CHUNK].view(-1, grid, grid)))
            if clip is not None:
                order, scores = clip.rank(images, cap)
            else:
                order, scores = list(range(len(images))), [None] * len(images)
            yield [GeneratedImage(images[i], sc, codes[i].tolist()) for i, sc in
                   zip(order[:num_return], scores[:num_return])]


def text_to_image(model, tokenizer, texts: Sequence[str], *, vqgan: VQGANDecoder, clip: Optional[ClipScorer] = None,
                  num_samples: int = 24, num_return: int = 1, top_k: int = 256, top_p: Optional[float] = None,
                  temperature: float = 1.0, seed: Optional[int] = None,
                  batch_size: int = 1) -> list[list[GeneratedImage]]:
    """Images for each caption of `texts`: `num_samples` code grids sampled by the OFA text-to-image `model`
    (top-k `top_k`, or nucleus `top_p` when given, at `temperature`), decoded by `vqgan`, reranked by `clip` when
    given; the best `num_return` per caption, best first. Defaults are OFA's evaluation settings (24 samples,
    top-k 256, temperature 1)."""
    return list(iter_text_to_image(model, tokenizer, texts, vqgan=vqgan, clip=clip, num_samples=num_samples,
                                   num_return=num_return, top_k=top_k, top_p=top_p, temperature=temperature,
                                   seed=seed, batch_size=batch_size))
