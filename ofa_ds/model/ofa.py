"""The OFA encoder-decoder, single-device PyTorch, parameter names = the official keys.

What is unusual about OFA, and what this file does about it:
  * Image tokens come first: a truncated ResNet turns the image into h·w tokens (own LayerNorm, type embedding 1),
    then the text tokens follow (type embedding 0). No position embedding is *added* to a token embedding
    (entangle off, disable_entangle on in every released config): positions enter only through attention biases.
    `entangle_position_embedding` (OFA's flag) also adds the raw encoder positions before the embedding LayerNorms.
  * Absolute-position bias, shared by all layers: layer-normed position embeddings → pos_q/pos_k linears →
    q·kᵀ per head. Relative-position bias, one table per layer: 1-D buckets on the text×text block, 2-D buckets
    on the image×image block, nothing on the mixed blocks. Cross-attention gets only the absolute term, its key
    side being the encoder's normalised position embeddings (returned in `EncoderOut.pos_embed`). Every sample of
    a batch sits at the same positions, so these biases are built once, [1, H, Lq, Lk], and broadcast over the
    batch (the attention kernels sum their gradient over it); only a per-sample patch subset (`sample_patch_num`)
    or per-sample `code_masks` make them [B, H, Lq, Lk].
  * The decoder generates either text or image codes (`code_masks`, per sample): code samples use image position
    ids, image LayerNorms and 2-D relative buckets. When `code_masks` is given both variants are computed and
    selected per sample, so every rank runs the same modules whatever its batch holds (ZeRO-3 needs that).
  * One V×C token table is shared by the encoder input, the decoder input and the output projection. In
    `OFAModel.forward` (eager) the look-up's gradient is sparse: autograd adds its rows into the output
    projection's dense gradient of the same weight (`TokenEmbedding`).
  * Samples that carry the same image (OFA's pretraining pairs) share one ResNet pass (`dedup_images`).
  * `sample_patch_num` keeps a random subset of image tokens (with their true position ids) per sample.
  * Incremental decoding: pass a `cache` dict to `decode`; positions already cached are skipped. Position biases
    are computed for the new query rows only, once per position kind (text; image codes when `code_masks` is given)
    and broadcast over the batch, since every row of a step sits at the same positions. The encoder output may
    have fewer rows than the decoder input (B sentences, n = beams or samples each, rows b·n … b·n+n−1 belong to
    sentence b): cross-attention K/V and the cross bias's key side then stay per sentence (grouped
    cross-attention in `MultiheadAttention`), not copied per beam.
  * The embedding blocks and the per-layer biases are plain functions of the modules that hold them
    (`embed_encoder`, `encoder_layer_bias`, `embed_decoder`, `decoder_layer_bias`): the dense Encoder/Decoder call
    them with their own submodules, the pipeline stages (`ofa_ds.training.pipeline`) with theirs (same names, same
    parameters), so both layouts compute one function.
  * `forward(..., keep=mask)` projects only the kept (real target) rows: packed logits [N, V] for training.
  * Prompt tuning (`cfg.encoder_prompt_length` / `decoder_prompt_length` > 0): `encoder_prompt_encoder` /
    `decoder_prompt_encoder` give every layer prefix keys/values for its self-attention (ofa_ds/model/prompt.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofa_ds.config import ModelConfig
from ofa_ds.model.layers import DecoderLayer, EncoderLayer, LayerNorm
from ofa_ds.model.positions import (image_position_ids, make_decoder_image_position_idx, make_image_rp_bucket,
                                    make_token_rp_bucket)
from ofa_ds.model.prompt import build_prompt_encoder
from ofa_ds.model.resnet import ResNet, linspace

PAD = 1


@dataclass
class EncoderOut:
    """Encoder result, batch-major. `padding_mask` is None when nothing in the batch is padding."""

    hidden: Tensor                   # [B, S, C] after the final LayerNorm
    padding_mask: Tensor | None      # [B, S] bool, True = padding
    pos_embed: Tensor                # [B, S, C] normalised position embeddings (image part first)

    def index_select(self, order: Tensor) -> "EncoderOut":
        """Reorder/repeat samples (beam search, candidate scoring)."""
        pm = None if self.padding_mask is None else self.padding_mask.index_select(0, order)
        return EncoderOut(self.hidden.index_select(0, order), pm, self.pos_embed.index_select(0, order))


def _pos_heads(lin: nn.Linear, p: Tensor, heads: int) -> Tensor:
    """Project position embeddings and split heads: [B, L, C] → [B, H, L, d]."""
    return lin(p).unflatten(-1, (heads, -1)).transpose(1, 2)


def _abs_bias(q_lin: nn.Linear, k_lin: nn.Linear, pq: Tensor, pk: Tensor, heads: int, scaling: float) -> Tensor:
    """Per-head q·kᵀ of projected position embeddings: [B, Lq, C] × [B, Lk, C] → [B, H, Lq, Lk]."""
    return torch.matmul(_pos_heads(q_lin, pq, heads) * scaling, _pos_heads(k_lin, pk, heads).transpose(-1, -2))


def add_encoder_embeddings(m: nn.Module, cfg: ModelConfig) -> None:
    """The encoder's embedding modules except the token table (names = official keys). Shared with the pipeline
    stage that embeds the encoder input, so both build the same modules in the same order."""
    c, be = cfg.d_model, cfg.kernel_backend
    m.layernorm_embedding = LayerNorm(c, be)
    m.type_embedding = nn.Embedding(2, c)
    m.embed_images = ResNet(cfg.resnet_layers, cfg.frozen_bn, cfg.resnet_drop_path_rate,
                            zero_init_residual=cfg.resnet_zero_init_residual)
    m.image_proj = nn.Linear(1024, c)
    m.patch_layernorm_embedding = LayerNorm(c, be)
    m.embed_positions = nn.Embedding(cfg.max_source_positions + 2, c)
    m.embed_image_positions = nn.Embedding(cfg.image_bucket_size ** 2 + 1, c)
    m.pos_ln = LayerNorm(c, be)
    m.image_pos_ln = LayerNorm(c, be)
    m.pos_q_linear = nn.Linear(c, c)
    m.pos_k_linear = nn.Linear(c, c)
    m.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5


def add_decoder_embeddings(m: nn.Module, cfg: ModelConfig) -> None:
    """The decoder's embedding and position-bias modules except the token table (shared with the pipeline)."""
    c, be = cfg.d_model, cfg.kernel_backend
    m.layernorm_embedding = LayerNorm(c, be)
    m.embed_positions = nn.Embedding(cfg.max_target_positions + 2, c)
    m.embed_image_positions = nn.Embedding(cfg.image_bucket_size ** 2 + 1, c)
    m.pos_ln = LayerNorm(c, be)
    m.image_pos_ln = LayerNorm(c, be)
    m.self_pos_q_linear = nn.Linear(c, c)
    m.self_pos_k_linear = nn.Linear(c, c)
    m.cross_pos_q_linear = nn.Linear(c, c)
    m.cross_pos_k_linear = nn.Linear(c, c)
    m.code_layernorm_embedding = LayerNorm(c, be)
    m.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5


class TokenEmbedding(nn.Embedding):
    """The shared V×C token table: nn.Embedding (same parameter name) whose lookup can return its gradient as a
    sparse tensor of the looked-up rows (`sparse_grad=True`). `OFAModel.forward` asks for it because the same weight
    also receives the output projection's dense gradient in the same backward: autograd adds the rows into that
    dense gradient, instead of zero-filling a second V×C tensor (V = 59,457) and adding the two."""

    def forward(self, input: Tensor, sparse_grad: bool = False) -> Tensor:   # type: ignore[override]
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse or sparse_grad)


def distinct_images(images: Tensor) -> tuple[Tensor, Tensor] | None:
    """(index of each distinct image [U], position of every sample's image among them [B]) for a batch
    [B, 3, H, W], or None when all images differ. Candidates are the images whose ~4k evenly spaced values are
    bitwise equal (cheap; no arithmetic, so no rounding can split two equal images); only candidate pairs are then
    compared in full, so a batch of distinct images costs almost nothing and two different images are never
    merged."""
    b = images.shape[0]
    if b < 2:
        return None
    flat = images.detach().flatten(1)
    probe = flat[:, :: max(1, flat.shape[1] // 4096)]
    group = torch.unique(probe, dim=0, return_inverse=True)[1].tolist()
    first: dict[int, int] = {}
    rep = [first.setdefault(g, i) for i, g in enumerate(group)]
    cand = [i for i in range(b) if rep[i] != i]
    if not cand:
        return None
    c = torch.tensor(cand, device=flat.device)
    same = flat[c].eq(flat[torch.tensor([rep[i] for i in cand], device=flat.device)]).all(1).tolist()
    for i, ok in zip(cand, same):
        if not ok:
            rep[i] = i
    uniq = sorted(set(rep))
    if len(uniq) == b:
        return None
    pos = {u: k for k, u in enumerate(uniq)}
    dev = images.device
    return torch.tensor(uniq, device=dev), torch.tensor([pos[r] for r in rep], device=dev)


def image_features(resnet: nn.Module, images: Tensor, dedup: bool = True) -> Tensor:
    """ResNet features [B, C, h, w]; with `dedup`, computed once per distinct image and gathered back (the gather's
    backward sums the gradients of the samples that share an image)."""
    groups = distinct_images(images) if dedup else None
    if groups is None:
        return resnet(images)
    uniq, inverse = groups
    return resnet(images[uniq])[inverse]


def embed_encoder(m: nn.Module, cfg: ModelConfig, token_embeddings: Tensor, src_tokens: Tensor,
                  patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                  sample_patch_num: int | None = None) -> dict:
    """The encoder's embedding block: image + text embeddings and everything the layers need.

    `m` holds the modules of `add_encoder_embeddings` (the dense Encoder, or the pipeline stage that embeds the
    encoder input); `token_embeddings` = embed_tokens(src_tokens) [B, L, C], looked up by the caller (the dense
    model and the pipeline hold the shared token table differently). Dropout follows `m.training`.
    Returns a dict of tensors: x [B, S, C], padding_mask (None when nothing is padding), pos_embed [B, S, C],
    abs_bias [P, H, S, S] (shared by all layers), image_pid [P, N] or None, num_text L. Every sample sits at the
    same positions unless `sample_patch_num` draws a patch subset per sample, so P = 1 (the biases are built once
    and broadcast over the batch; pos_embed is then a stride-0 view of one row), else P = B."""
    b, L = src_tokens.shape
    # Embedding modules are always *called* (never their .weight read): ZeRO-3 gathers parameters per call.
    types = m.type_embedding(torch.arange(2, device=src_tokens.device))                    # [2, C]
    raw_pos = m.embed_positions(torch.arange(L, device=src_tokens.device))                 # [L, C]
    x = token_embeddings + types[0]
    if cfg.entangle_position_embedding:
        x = x + raw_pos
    x = m.layernorm_embedding(x)
    pad = src_tokens.eq(PAD)
    pos = m.pos_ln(raw_pos)[None]                                                      # [1, L, C]: every row
    image_pid = None
    if patch_images is not None:
        feats = image_features(m.embed_images, patch_images, cfg.dedup_images)            # [B, 1024, h, w]
        h, w = feats.shape[-2:]
        feats = feats.flatten(2).transpose(1, 2)                                      # [B, h·w, 1024]
        image_pid = image_position_ids(h, w, cfg.image_bucket_size, feats.device)[None]   # [1, N]
        img_pad = torch.zeros(b, h * w, dtype=torch.bool, device=feats.device)
        if patch_masks is not None:
            img_pad = img_pad | ~patch_masks.to(torch.bool)[:, None]
        if sample_patch_num is not None:                 # a random patch subset per sample: positions differ by row
            k = min(sample_patch_num, h * w)
            order = torch.stack([torch.randperm(h * w, device=feats.device)[:k] for _ in range(b)])  # [B, k]
            feats = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
            image_pid = image_pid.expand(b, -1).gather(1, order)
            img_pad = img_pad.gather(1, order)
            pos = pos.expand(b, -1, -1)
        raw_ipos = m.embed_image_positions(image_pid)
        xi = m.image_proj(feats) + types[1]
        if cfg.entangle_position_embedding:
            xi = xi + raw_ipos
        xi = m.patch_layernorm_embedding(xi)
        pi = m.image_pos_ln(raw_ipos)
        x, pad, pos = torch.cat([xi, x], 1), torch.cat([img_pad, pad], 1), torch.cat([pi, pos], 1)
    x = F.dropout(x, cfg.dropout, m.training)
    has_pad = bool(pad.any())
    if has_pad:
        x = x * (~pad)[..., None].to(x.dtype)
    abs_bias = _abs_bias(m.pos_q_linear, m.pos_k_linear, pos, pos, cfg.num_heads, m.pos_scaling)
    return {"x": x, "padding_mask": pad if has_pad else None, "pos_embed": pos.expand(b, -1, -1),
            "abs_bias": abs_bias, "image_pid": image_pid, "num_text": L}


def encoder_layer_bias(token_table: nn.Embedding, image_table: nn.Embedding, token_rp_bucket: Tensor,
                       image_rp_bucket: Tensor, abs_bias: Tensor, num_text: int, image_pid: Tensor | None) -> Tensor:
    """Self-attention bias of one encoder layer, [P, H, S, S]: the shared absolute bias (from `embed_encoder`,
    P = 1 or B rows) + this layer's relative tables, 1-D buckets on the last `num_text` (text) positions, 2-D
    buckets of the image position ids `image_pid` [P, N] on the first N (image) positions."""
    bias = abs_bias.clone()
    L = num_text
    rel_t = token_table(token_rp_bucket[:L, :L])                                     # [L, L, H]
    bias[:, :, -L:, -L:] += rel_t.permute(2, 0, 1)[None]
    if image_pid is not None:
        n = image_pid.shape[1]
        buckets = image_rp_bucket[image_pid[:, :, None], image_pid[:, None, :]]          # [P, N, N]
        bias[:, :, :n, :n] += image_table(buckets).permute(0, 3, 1, 2)
    return bias


def embed_decoder(m: nn.Module, cfg: ModelConfig, token_embeddings: Tensor, prev_output_tokens: Tensor,
                  enc_pos_embed: Tensor, image_position_idx: Tensor, code_masks: Tensor | None = None,
                  start: int = 0, cache: dict | None = None) -> dict:
    """The decoder's embedding block: input embeddings of positions start… and the biases every layer shares
    (absolute self bias over all T positions, cross bias of the new rows).

    `m` holds the modules of `add_decoder_embeddings`; `token_embeddings` = embed_tokens(prev_output_tokens[:,
    start:]); `enc_pos_embed` = EncoderOut.pos_embed; `image_position_idx` = the decoder's code-position table
    (make_decoder_image_position_idx). With a generation `cache`, the key side of the cross bias (a function of the
    encoder output only) is computed once and kept in cache["pos"]["cross"]["k"], shaped like the cross-attention
    K/V so that beam reordering treats it alike, and the biases come from `_step_biases` (new rows only).
    Returns a dict: x, self_abs_bias [P, H, T, T] (with a cache: [1 or B, H, T−start, T]), cross_bias
    [P, H, T−start, S] (grouped as `_step_biases` says when the encoder has fewer rows), code_masks ([B] bool or
    None), self_padding_mask (None when nothing is padding), start. Without a cache and without code_masks every
    row sits at the same positions, so the self bias has P = 1 row (broadcast over the batch), and so has the cross
    bias when `enc_pos_embed` is a stride-0 view of one row (as `embed_encoder` returns it); else P = B."""
    b, T = prev_output_tokens.shape
    dev = prev_output_tokens.device
    heads, s = cfg.num_heads, m.pos_scaling
    if code_masks is not None and T > image_position_idx.numel():
        raise ValueError(f"decoder length {T} exceeds image_position_idx ({image_position_idx.numel()})")
    tok_pos = m.embed_positions(torch.arange(T, device=dev))[None]                  # [1, T, C]
    cm = None
    if code_masks is not None:
        code_masks = code_masks.to(torch.bool)
        cm = code_masks[:, None, None]                                                  # [B, 1, 1]
    if cache is not None:
        kept = cache.setdefault("pos", {}).setdefault("cross", {})
        if "k" not in kept:
            kept["k"] = _pos_heads(m.cross_pos_k_linear, enc_pos_embed, heads).contiguous()  # [B, H, S, d]
        self_abs, cross = _step_biases(m, heads, s, tok_pos, image_position_idx, code_masks, start, kept["k"], b)
    else:
        if cm is not None:
            img_pos = m.embed_image_positions(image_position_idx[:T])[None]
            raw = torch.where(cm, img_pos, tok_pos)                                      # [B, T, C]
            pos = torch.where(cm, m.image_pos_ln(raw), m.pos_ln(raw))
        else:
            pos = m.pos_ln(tok_pos)                                                      # [1, T, C]: every row
        self_abs = _abs_bias(m.self_pos_q_linear, m.self_pos_k_linear, pos, pos, heads, s)
        if enc_pos_embed.shape[0] == b and enc_pos_embed.stride(0) == 0:
            enc_pos_embed = enc_pos_embed[:1]          # a stride-0 view of one row (embed_encoder): project it once
        elif enc_pos_embed.shape[0] != b:
            pos = pos.expand(b, -1, -1)                # grouped cross-attention takes a bias per decoder row
        cross_k = _pos_heads(m.cross_pos_k_linear, enc_pos_embed, heads)                # [1 or B, H, S, d]
        cross = torch.matmul(_pos_heads(m.cross_pos_q_linear, pos[:, start:], heads) * s,
                             cross_k.transpose(-1, -2))
    x = token_embeddings
    if cm is None:
        x = m.layernorm_embedding(x)
    else:
        x = torch.where(cm, m.code_layernorm_embedding(x), m.layernorm_embedding(x))
    x = F.dropout(x, cfg.dropout, m.training)
    pad = prev_output_tokens.eq(PAD)
    return {"x": x, "self_abs_bias": self_abs, "cross_bias": cross, "code_masks": code_masks,
            "self_padding_mask": pad if bool(pad.any()) else None, "start": start}


def _step_biases(m: nn.Module, heads: int, s: float, tok_pos: Tensor, image_position_idx: Tensor,
                 code_masks: Tensor | None, start: int, cross_k: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Incremental decoding's biases for the query rows start…T−1 of `rows` decoder rows. Every row sits at the same
    positions, so each bias is computed once per position kind (text, and image codes when `code_masks` is given:
    both, then selected per row, as the full path does) at batch 1.
    Returns (self bias [1, H, T', T], or [rows, H, T', T] with code_masks; cross bias). With B = cross_k's rows and
    n = rows / B > 1 (grouped cross-attention) the cross bias is [B, H, n·T', S] ([B, H, 1, S] when T' = 1 and no
    code_masks: it broadcasts over the n rows); with n = 1 it is [rows, H, T', S]."""
    T = tok_pos.shape[1]
    kinds = [m.pos_ln(tok_pos)]
    if code_masks is not None:
        kinds.append(m.image_pos_ln(m.embed_image_positions(image_position_idx[:T])[None]))
    selfs, crosses = [], []
    for p in kinds:                                                                     # p [1, T, C]
        selfs.append(_abs_bias(m.self_pos_q_linear, m.self_pos_k_linear, p[:, start:], p, heads, s))
        q = _pos_heads(m.cross_pos_q_linear, p[:, start:], heads) * s                  # [1, H, T', d]
        crosses.append(torch.matmul(q, cross_k.transpose(-1, -2)))                     # [B, H, T', S]
    b = cross_k.shape[0]
    n, t_new = rows // b, T - start
    if code_masks is None:
        cross = crosses[0]
        if n > 1 and t_new > 1:
            cross = cross[:, :, None].expand(-1, -1, n, -1, -1).flatten(2, 3)
        return selfs[0], cross
    sel = code_masks[:, None, None, None]
    self_abs = torch.where(sel, selfs[1], selfs[0])
    if n == 1:
        return self_abs, torch.where(sel, crosses[1], crosses[0])
    g = code_masks.view(b, n)[:, None, :, None, None]                                   # [B, 1, n, 1, 1]
    return self_abs, torch.where(g, crosses[1][:, :, None], crosses[0][:, :, None]).flatten(2, 3)


def decoder_layer_bias(token_table: nn.Embedding, image_table: nn.Embedding, token_rp_bucket: Tensor,
                       image_rp_bucket: Tensor, image_position_idx: Tensor, self_abs_bias: Tensor,
                       code_masks: Tensor | None, start: int = 0) -> Tensor:
    """Self-attention bias of one decoder layer for the query rows start…T−1, [P, H, T−start, T]: the shared
    absolute bias (from `embed_decoder`: [P, H, T, T] with P = 1 or B, or only its last rows [B or 1, H, T−start,
    T] when incremental) + this layer's relative table, 1-D buckets for text samples, 2-D buckets of the code
    positions for the samples whose `code_masks` [B] (bool) is set (then P = B)."""
    T = self_abs_bias.shape[-1]
    q0 = T - self_abs_bias.shape[-2]                        # first query row held in self_abs_bias
    if T > token_rp_bucket.shape[0]:       # only image codes run past the text table (bos + 1,024 codes = 1,025)
        if code_masks is None or not bool(code_masks.all()):
            raise ValueError(f"decoder length {T} exceeds the text relative-position table "
                             f"({token_rp_bucket.shape[0]}); only image-code rows (code_masks) may be longer")
        pid = image_position_idx[:T]
        img_rel = image_table(image_rp_bucket[pid[q0:, None], pid[None, :]]).permute(2, 0, 1)[None]
        return (self_abs_bias + img_rel)[:, :, start - q0:]
    rel = token_table(token_rp_bucket[q0:T, :T]).permute(2, 0, 1)[None]
    if code_masks is not None:
        pid = image_position_idx[:T]
        img_rel = image_table(image_rp_bucket[pid[q0:, None], pid[None, :]])
        rel = torch.where(code_masks[:, None, None, None], img_rel.permute(2, 0, 1)[None], rel)
    return (self_abs_bias + rel)[:, :, start - q0:]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        c, be = cfg.d_model, cfg.kernel_backend
        self.cfg = cfg
        self.register_buffer("version", torch.tensor([3.0]))
        self.embed_tokens = embed_tokens
        add_encoder_embeddings(self, cfg)
        rates = linspace(cfg.encoder_drop_path_rate, cfg.encoder_layers)
        self.layers = nn.ModuleList(EncoderLayer(cfg, r) for r in rates)
        self.layer_norm = LayerNorm(c, be)
        n_img_rel = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, cfg.num_heads) for _ in range(cfg.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(n_img_rel, cfg.num_heads) for _ in range(cfg.encoder_layers))
        self.register_buffer("token_rp_bucket", make_token_rp_bucket(cfg.token_bucket_size, cfg.max_source_positions))
        self.register_buffer("image_rp_bucket", make_image_rp_bucket(cfg.image_bucket_size))
        self.encoder_prompt_encoder = build_prompt_encoder(cfg, "encoder")

    def embed(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
              sample_patch_num: int | None = None, token_embeddings: Tensor | None = None) -> dict:
        """`embed_encoder` with this encoder's modules and token table (`token_embeddings`: the looked-up rows of
        src_tokens when the caller already has them)."""
        if token_embeddings is None:
            token_embeddings = self.embed_tokens(src_tokens)
        return embed_encoder(self, self.cfg, token_embeddings, src_tokens, patch_images, patch_masks,
                             sample_patch_num)

    def forward(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                sample_patch_num: int | None = None, token_embeddings: Tensor | None = None) -> EncoderOut:
        state = self.embed(src_tokens, patch_images, patch_masks, sample_patch_num, token_embeddings)
        x = state["x"]
        prompts = self.encoder_prompt_encoder(x.shape[0]) if self.encoder_prompt_encoder is not None else None
        for idx, layer in enumerate(self.layers):
            bias = encoder_layer_bias(self.token_rel_pos_table_list[idx], self.image_rel_pos_table_list[idx],
                                      self.token_rp_bucket, self.image_rp_bucket, state["abs_bias"],
                                      state["num_text"], state["image_pid"])
            x = layer(x, state["padding_mask"], bias, prompt_kv=None if prompts is None else prompts[idx])
        return EncoderOut(self.layer_norm(x), state["padding_mask"], state["pos_embed"])


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        c, be = cfg.d_model, cfg.kernel_backend
        self.cfg = cfg
        self.register_buffer("version", torch.tensor([3.0]))
        self.embed_tokens = embed_tokens
        add_decoder_embeddings(self, cfg)
        rates = linspace(cfg.decoder_drop_path_rate, cfg.decoder_layers)
        self.layers = nn.ModuleList(DecoderLayer(cfg, r) for r in rates)
        self.layer_norm = LayerNorm(c, be)
        self.output_projection = nn.Linear(c, cfg.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight                           # tied
        n_img_rel = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, cfg.num_heads) for _ in range(cfg.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(n_img_rel, cfg.num_heads) for _ in range(cfg.decoder_layers))
        self.register_buffer("token_rp_bucket", make_token_rp_bucket(cfg.token_bucket_size, cfg.max_target_positions))
        self.register_buffer("image_rp_bucket", make_image_rp_bucket(cfg.image_bucket_size))
        self.register_buffer("image_position_idx", make_decoder_image_position_idx(cfg.code_image_size,
                                                                                   cfg.image_bucket_size))
        self.decoder_prompt_encoder = build_prompt_encoder(cfg, "decoder")

    def embed(self, prev_output_tokens: Tensor, enc: EncoderOut, code_masks: Tensor | None = None,
              start: int = 0, cache: dict | None = None, token_embeddings: Tensor | None = None) -> dict:
        """`embed_decoder` with this decoder's modules, token table and code-position table (`token_embeddings`:
        the looked-up rows of prev_output_tokens[:, start:] when the caller already has them)."""
        if token_embeddings is None:
            token_embeddings = self.embed_tokens(prev_output_tokens[:, start:])
        return embed_decoder(self, self.cfg, token_embeddings, prev_output_tokens,
                             enc.pos_embed, self.image_position_idx, code_masks, start, cache)

    def forward(self, prev_output_tokens: Tensor, enc: EncoderOut, code_masks: Tensor | None = None,
                cache: dict | None = None, features_only: bool = False,
                token_embeddings: Tensor | None = None) -> Tensor:
        start = 0
        if cache is not None:
            start = cache.get("length", 0)
            if start >= prev_output_tokens.shape[1]:
                raise ValueError(f"cache already holds {start} positions; give the prefix plus new tokens")
        state = self.embed(prev_output_tokens, enc, code_masks, start, cache, token_embeddings)
        x = state["x"]
        prompts = self.decoder_prompt_encoder(x.shape[0]) if self.decoder_prompt_encoder is not None else None
        for idx, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.setdefault(idx, {})
            bias = decoder_layer_bias(self.token_rel_pos_table_list[idx], self.image_rel_pos_table_list[idx],
                                      self.token_rp_bucket, self.image_rp_bucket, self.image_position_idx,
                                      state["self_abs_bias"], state["code_masks"], start)
            x = layer(x, enc.hidden, enc.padding_mask, bias, state["cross_bias"], state["self_padding_mask"],
                      layer_cache, prompt_kv=None if prompts is None else prompts[idx])
        if cache is not None:
            cache["length"] = prev_output_tokens.shape[1]
        x = self.layer_norm(x)
        return x if features_only else self.output_projection(x)


def reorder_cache(cache: dict, order: Tensor) -> None:
    """Reorder (beam search) or repeat the batch dimension of every cached key/value in place."""
    for key, layer_cache in cache.items():
        if key == "length":
            continue
        for kind in layer_cache.values():
            for name in ("k", "v"):
                if name in kind:
                    kind[name] = kind[name].index_select(0, order)


@torch.no_grad()
def bert_init_(m: nn.Module) -> None:
    """OFA's init of one module, not recursive: Linear/Embedding N(0, 0.02) (padding row 0, bias 0),
    LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


NORMFORMER_LN = ("attn_ln", "self_attn_ln", "cross_attn_ln", "ffn_layernorm")


@torch.no_grad()
def normformer_init_(module: nn.Module, gain: float) -> None:
    """Set the weight of every NormFormer LayerNorm under `module` to `gain` (ModelConfig.normformer_init)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.LayerNorm) and name.rsplit(".", 1)[-1] in NORMFORMER_LN:
            m.weight.fill_(gain)


class OFAModel(nn.Module):
    """OFA: `model(src_tokens, patch_images, patch_masks, prev_output_tokens)` → logits [B, T, V].

    bos = 0, pad = 1, eos = 2. `state_dict()` has exactly the official key names (the tied table appears under
    its three official names). Construct with a `ModelConfig` (see `ofa_ds.config.PRESETS`).
    """

    def __init__(self, cfg: ModelConfig, init: bool = True):
        """`init=False` leaves the parameters as their constructors made them: a caller that builds the model
        sharded (parameters partitioned as each submodule is made) runs `init_steps()` itself, one module at a
        time."""
        super().__init__()
        self.cfg = cfg
        embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD)
        self.encoder = Encoder(cfg, embed_tokens)
        self.decoder = Decoder(cfg, embed_tokens)
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """OFA's BERT-style init: Linear/Embedding N(0, 0.02), padding row 0, LayerNorm (1, 0), ResNet kaiming;
        then the NormFormer LayerNorm weights set to cfg.normformer_init (1 = OFA's init)."""
        for m, fn in self.init_steps():
            fn(m)

    def init_steps(self) -> list[tuple[nn.Module, Callable[[nn.Module], None]]]:
        """`reset_parameters` as ordered (module, init function) steps; each step touches only that module's own
        parameters (not its children's), so the same init can run on a model whose parameters are sharded."""
        steps: list[tuple[nn.Module, Callable[[nn.Module], None]]] = [
            (m, bert_init_) for name, m in self.named_modules()
            if not (".embed_images" in name or name.endswith("embed_images"))]
        steps += self.encoder.embed_images.init_steps()
        gain = self.cfg.normformer_init
        steps += [(m, lambda m: m.weight.fill_(gain)) for name, m in self.named_modules()
                  if isinstance(m, nn.LayerNorm) and name.rsplit(".", 1)[-1] in NORMFORMER_LN]
        return steps

    def encode(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
               sample_patch_num: int | None = None) -> EncoderOut:
        return self.encoder(src_tokens, patch_images, patch_masks, sample_patch_num)

    def decode(self, prev_output_tokens: Tensor, enc: EncoderOut, code_masks: Tensor | None = None,
               cache: dict | None = None) -> Tensor:
        """Logits for prev_output_tokens (teacher forcing), or only for the positions not yet in `cache`."""
        return self.decoder(prev_output_tokens, enc, code_masks, cache)

    def forward(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                prev_output_tokens: Tensor | None = None, code_masks: Tensor | None = None,
                sample_patch_num: int | None = None, keep: Tensor | None = None, **unused) -> Tensor:
        """Logits [B, T, V]; with `keep` (bool [B, T], True where the target is real) only the kept rows are
        projected, in row-major order: packed logits [N, V] (the tied V×C projection dominates a small model's step,
        and a padded batch would spend it on every pad position). `ofa_ds.losses` accepts both shapes."""
        if prev_output_tokens is None:
            raise ValueError("OFAModel.forward needs prev_output_tokens (decoder input, starting with bos=0)")
        # One look-up of the shared table for both token sets. Its gradient is sparse (the looked-up rows), added by
        # autograd into the dense gradient the output projection below gives the same weight, so no V×C tensor is
        # zero-filled for it. Eager only: a compiled graph keeps the plain dense gradient.
        n = src_tokens.numel()
        sparse = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        rows = self.encoder.embed_tokens(torch.cat([src_tokens.reshape(-1), prev_output_tokens.reshape(-1)]),
                                         sparse_grad=sparse)
        src_emb = rows[:n].view(*src_tokens.shape, -1)
        prev_emb = rows[n:].view(*prev_output_tokens.shape, -1)
        enc = self.encoder(src_tokens, patch_images, patch_masks, sample_patch_num, token_embeddings=src_emb)
        h = self.decoder(prev_output_tokens, enc, code_masks, features_only=keep is not None,
                         token_embeddings=prev_emb)
        return h if keep is None else self.decoder.output_projection(h[keep])             # [B, T, V] or [N, V]

    # -- accounting ------------------------------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        """Unique parameters (the tied token table counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def from_pretrained(cls, folder: str, **kw) -> "OFAModel":
        """Load a Hugging Face-style folder written by `export_folder` (ofa_ds/model/weights.py); eval mode.
        `kw` replace ModelConfig fields."""
        from ofa_ds.model.weights import load_state_strict, read_folder
        cfg, state, where = read_folder(folder, **kw)
        model = cls(cfg)
        load_state_strict(model, state, where)
        return model.eval()
