"""OFA as a DeepSpeed `PipelineModule`: the dense model's blocks laid out as one sequential chain of layers.

DeepSpeed pipelines need a strictly sequential list of layers, each taking and returning a tensor or a tuple of
tensors. OFA is an encoder-decoder with a shared token table, so it is flattened as follows (index: layer, what it
passes on):

    0            tied "embed" (encoder lookup)   (tok, src, img, pmask, prev, cm)
    1            EncoderEmbedPipe                (x, pos, abs_bias, pad, pid, prev, cm)
    2 … 1+Le     EncoderLayerPipe i              same; the last one drops abs_bias and pid
    2+Le         EncoderFinalNormPipe            (enc, pos, pad, prev, cm)
    3+Le         tied "embed" (decoder lookup)   (tok, enc, pos, pad, prev, cm)
    4+Le         DecoderEmbedPipe                (x, enc, pad, self_abs, cross, self_pad, cm)
    5+Le …       DecoderLayerPipe j              same; the last one returns x only
    5+Le+Ld      DecoderFinalNormPipe            x
    6+Le+Ld      tied "embed" (output head)      logits [B, T, V]

Rules the layout follows, all forced by the PipelineEngine (engine.py `_exec_send_grads`/`_exec_backward_pass`):
  * every floating-point tensor that crosses a stage boundary gets `requires_grad` on the receiving side and the
    engine asserts it has a gradient after backward; so every float tensor passed on is consumed by a later layer
    (abs_bias, pid dropped after the last encoder layer; decoder biases dropped after the last decoder layer), and
    masks travel as **int64** (0/1) tensors, not floats, so they are never asked for a gradient;
  * no None can travel: absent things are empty tensors (no image: img [B,0] / pid [B,0]; no code masks: cm [0]),
    masks are always full tensors and turned back into None when nothing is padded, exactly as the dense model does;
  * the shared V×C table is one `TiedLayerSpec` key used three times (its own forward = encoder lookup, so stage
    0's layer_00 file saves it; decoder lookup and head use forward_fn); DeepSpeed all-reduces its gradient across
    the owning stages;
  * the embedding blocks and the per-layer biases are the dense model's own functions (`embed_encoder`,
    `encoder_layer_bias`, `embed_decoder`, `decoder_layer_bias` of ofa_ds.model.ofa) called with this layer's
    modules, so the pipeline computes exactly what the dense model computes;
  * the big relative-bucket index tables are cached once per process/device, not stored per layer.

Parameter names: `pipe_to_dense_names(cfg)` maps every pipeline parameter/buffer (layer index + local name) to the
official name (`encoder.layers.3.fc1.weight`, ...); `dense_state_to_pipe` / `pipe_state_to_dense` convert whole state
dicts; `ofa_ds.training.universal` converts DeepSpeed checkpoint folders both ways.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofa_ds.config import ModelConfig
from ofa_ds.model.layers import DecoderLayer, EncoderLayer, LayerNorm
from ofa_ds.model.ofa import (PAD, add_decoder_embeddings, add_encoder_embeddings, bert_init_, decoder_layer_bias,
                              embed_decoder, embed_encoder, encoder_layer_bias, normformer_init_)
from ofa_ds.model.positions import make_decoder_image_position_idx, make_image_rp_bucket, make_token_rp_bucket
from ofa_ds.model.resnet import ResNet, linspace

TIED_KEY = "embed"
DENSE_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")

# --------------------------------------------------------------------------------------------------------------
# shared index tables
_TABLES: dict[tuple, Tensor] = {}


def _table(kind: str, a: int, b: int, device: torch.device) -> Tensor:
    """The dense model's index buffers, built once per process and device: "token" = make_token_rp_bucket(a, b),
    "image" = make_image_rp_bucket(a), "code" = make_decoder_image_position_idx(a, b)."""
    key = (kind, a, b, str(device))
    if key not in _TABLES:
        if kind == "token":
            t = make_token_rp_bucket(a, b)
        elif kind == "image":
            t = make_image_rp_bucket(a)
        else:
            t = make_decoder_image_position_idx(a, b)
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def _out(*ts: Tensor) -> tuple:
    """What a layer passes on: p2p sends need contiguous tensors (expanded position embeddings are not)."""
    return tuple(t.contiguous() for t in ts)


def _mask_or_none(m: Tensor) -> Tensor | None:
    m = m.to(torch.bool)
    return m if bool(m.any()) else None


# --------------------------------------------------------------------------------------------------------------
# layers
class TokenEmbeddingPipe(nn.Embedding):
    """The shared V×C token table (TiedLayerSpec key "embed"). Its own forward is the encoder-side lookup."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.vocab_size, cfg.d_model, padding_idx=PAD)

    def forward(self, inputs: tuple) -> tuple:             # type: ignore[override]
        src = inputs[0]
        return _out(F.embedding(src, self.weight, self.padding_idx), *inputs)


def decoder_lookup(emb: TokenEmbeddingPipe, inputs: tuple) -> tuple:
    """forward_fn of the tied table at the decoder input: prepend embed(prev_output_tokens)."""
    prev = inputs[3]
    return _out(F.embedding(prev, emb.weight, emb.padding_idx), *inputs)


def output_head(emb: TokenEmbeddingPipe, x: Tensor) -> Tensor:
    """forward_fn of the tied table as the output projection (no bias)."""
    return F.linear(x, emb.weight)


class EncoderEmbedPipe(nn.Module):
    """The encoder's embedding block (`embed_encoder`) without the token table: ResNet, image projection, type
    embedding, position tables and the shared absolute bias. Attribute names equal the dense Encoder's."""

    def __init__(self, cfg: ModelConfig, sample_patch_num: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.sample_patch_num = sample_patch_num
        add_encoder_embeddings(self, cfg)

    def forward(self, inputs: tuple) -> tuple:
        tok, src, img, pmask, prev, cm = inputs
        img = _none_if_empty(img)
        state = embed_encoder(self, self.cfg, tok, src, img, None if img is None else _none_if_empty(pmask),
                              self.sample_patch_num)
        b, s = state["x"].shape[:2]
        pad = state["padding_mask"]
        pad = torch.zeros(b, s, dtype=torch.long, device=src.device) if pad is None else pad.long()
        pid = state["image_pid"]
        pid = torch.zeros(b, 0, dtype=torch.long, device=src.device) if pid is None else pid
        return _out(state["x"], state["pos_embed"], state["abs_bias"], pad, pid, prev, cm)


class _RelTables(nn.Module):
    """One layer's relative-position tables (names follow the dense lists: token_rel_pos_table, image_…)."""

    def _init_tables(self, cfg: ModelConfig) -> None:
        self.token_rel_pos_table = nn.Embedding(2 * cfg.token_bucket_size - 1, cfg.num_heads)
        self.image_rel_pos_table = nn.Embedding((2 * cfg.image_bucket_size - 1) ** 2 + 3, cfg.num_heads)


class EncoderLayerPipe(_RelTables):
    """Encoder layer idx with its own relative-position tables; its bias is `encoder_layer_bias`."""

    def __init__(self, cfg: ModelConfig, idx: int, last: bool):
        super().__init__()
        self.cfg, self.idx, self.last = cfg, idx, last
        self.layer = EncoderLayer(cfg, linspace(cfg.encoder_drop_path_rate, cfg.encoder_layers)[idx])
        self._init_tables(cfg)

    def forward(self, inputs: tuple) -> tuple:
        x, pos, abs_bias, pad, pid, prev, cm = inputs
        cfg, dev = self.cfg, x.device
        image_pid = _none_if_empty(pid)
        num_text = x.shape[1] - (0 if image_pid is None else image_pid.shape[1])
        bias = encoder_layer_bias(self.token_rel_pos_table, self.image_rel_pos_table,
                                  _table("token", cfg.token_bucket_size, cfg.max_source_positions, dev),
                                  _table("image", cfg.image_bucket_size, 0, dev), abs_bias, num_text, image_pid)
        x = self.layer(x, _mask_or_none(pad), bias)
        if self.last:
            return _out(x, pos, pad, prev, cm)
        return _out(x, pos, abs_bias, pad, pid, prev, cm)


class EncoderFinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = LayerNorm(cfg.d_model, cfg.kernel_backend)

    def forward(self, inputs: tuple) -> tuple:
        x, pos, pad, prev, cm = inputs
        return _out(self.layer_norm(x), pos, pad, prev, cm)


class DecoderEmbedPipe(nn.Module):
    """The decoder's embedding block (`embed_decoder`) without the token table: position tables, absolute self
    bias, cross bias, LayerNorms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        add_decoder_embeddings(self, cfg)

    def forward(self, inputs: tuple) -> tuple:
        tok, enc, pos, pad, prev, cm = inputs
        cfg = self.cfg
        state = embed_decoder(self, cfg, tok, prev, pos, _table("code", cfg.code_image_size, cfg.image_bucket_size,
                                                                  prev.device), _none_if_empty(cm))
        sp = state["self_padding_mask"]
        sp = torch.zeros_like(prev) if sp is None else sp.long()
        return _out(state["x"], enc, pad, state["self_abs_bias"], state["cross_bias"], sp, cm)


class DecoderLayerPipe(_RelTables):
    """Decoder layer idx with its relative-position tables; its bias is `decoder_layer_bias`."""

    def __init__(self, cfg: ModelConfig, idx: int, last: bool):
        super().__init__()
        self.cfg, self.idx, self.last = cfg, idx, last
        self.layer = DecoderLayer(cfg, linspace(cfg.decoder_drop_path_rate, cfg.decoder_layers)[idx])
        self._init_tables(cfg)

    def forward(self, inputs: tuple):
        x, enc, pad, self_abs, cross, sp, cm = inputs
        cfg, dev = self.cfg, x.device
        code_masks = _none_if_empty(cm)
        bias = decoder_layer_bias(self.token_rel_pos_table, self.image_rel_pos_table,
                                  _table("token", cfg.token_bucket_size, cfg.max_target_positions, dev),
                                  _table("image", cfg.image_bucket_size, 0, dev),
                                  _table("code", cfg.code_image_size, cfg.image_bucket_size, dev), self_abs,
                                  None if code_masks is None else code_masks.to(torch.bool))
        x = self.layer(x, enc, _mask_or_none(pad), bias, cross, _mask_or_none(sp))
        if self.last:
            return x
        return _out(x, enc, pad, self_abs, cross, sp, cm)


class DecoderFinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = LayerNorm(cfg.d_model, cfg.kernel_backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_norm(x)


LAYER_TYPES = (EncoderLayerPipe, DecoderLayerPipe)


# --------------------------------------------------------------------------------------------------------------
# layout and names
def layer_roles(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(role, block index) for every pipeline position; roles: tied_enc, enc_embed, enc_layer, enc_norm, tied_dec,
    dec_embed, dec_layer, dec_norm, tied_head."""
    roles = [("tied_enc", 0), ("enc_embed", 0)] + [("enc_layer", i) for i in range(cfg.encoder_layers)]
    roles += [("enc_norm", 0), ("tied_dec", 0), ("dec_embed", 0)]
    roles += [("dec_layer", i) for i in range(cfg.decoder_layers)]
    return roles + [("dec_norm", 0), ("tied_head", 0)]


def _local_to_dense(role: str, i: int, local: str) -> str:
    if role == "tied_enc":
        return "encoder.embed_tokens." + local
    if role == "enc_embed":
        return "encoder." + local
    if role in ("enc_layer", "dec_layer"):
        side = "encoder" if role == "enc_layer" else "decoder"
        head, rest = local.split(".", 1)
        if head == "layer":
            return f"{side}.layers.{i}.{rest}"
        return f"{side}.{head}_list.{i}.{rest}"             # token_rel_pos_table.weight → …_list.i.weight
    if role == "enc_norm":
        return "encoder." + local
    if role == "dec_embed":
        return "decoder." + local
    if role == "dec_norm":
        return "decoder." + local
    raise KeyError(f"pipeline role {role} has no parameters of its own")


def pipe_key_to_dense(cfg: ModelConfig, layer_idx: int, local: str) -> str:
    """Official name of parameter/buffer `local` of pipeline layer `layer_idx` (as in the layer_XX checkpoint files)."""
    role, i = layer_roles(cfg)[layer_idx]
    return _local_to_dense(role, i, local)


def dense_key_to_pipe(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """Official name → (pipeline layer index, local name), for every parameter/buffer a pipeline holds.
    The tied table maps to layer 0 ("weight") under each of its three official names."""
    ref = build_layer_modules(cfg)
    out: dict[str, tuple[int, str]] = {}
    for idx, (role, _i) in enumerate(layer_roles(cfg)):
        mod = ref[idx]
        if mod is None:
            continue
        for local in mod.state_dict():
            out[pipe_key_to_dense(cfg, idx, local)] = (idx, local)
    for k in DENSE_TIED[1:]:
        out[k] = (0, "weight")
    return out


def pipe_to_dense_names(cfg: ModelConfig) -> dict[str, str]:
    """PipelineModule.state_dict() name (`3.layer.fc1.weight`, `tied_modules.embed.weight`) → official name."""
    out = {}
    for dense, (idx, local) in dense_key_to_pipe(cfg).items():
        if idx == 0:
            if dense == DENSE_TIED[0]:
                out[f"tied_modules.{TIED_KEY}.{local}"] = dense
        else:
            out[f"{idx}.{local}"] = dense
    return out


def build_layer_modules(cfg: ModelConfig, device: str = "meta") -> list[nn.Module | None]:
    """One module per pipeline position (None for the tied re-uses), on the meta device by default (for names)."""
    with torch.device(device):
        specs = _layer_specs(cfg, None)
        return [None if r in ("tied_dec", "tied_head") else s.typename(*s.module_args, **s.module_kwargs)
                for s, (r, _) in zip(specs, layer_roles(cfg))]


def _layer_specs(cfg: ModelConfig, sample_patch_num: int | None) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    le, ld = cfg.encoder_layers, cfg.decoder_layers
    specs: list = [TiedLayerSpec(TIED_KEY, TokenEmbeddingPipe, cfg),
                   LayerSpec(EncoderEmbedPipe, cfg, sample_patch_num)]
    specs += [LayerSpec(EncoderLayerPipe, cfg, i, i == le - 1) for i in range(le)]
    specs += [LayerSpec(EncoderFinalNormPipe, cfg), TiedLayerSpec(TIED_KEY, TokenEmbeddingPipe, cfg,
                                                                    forward_fn=decoder_lookup),
              LayerSpec(DecoderEmbedPipe, cfg)]
    specs += [LayerSpec(DecoderLayerPipe, cfg, j, j == ld - 1) for j in range(ld)]
    specs += [LayerSpec(DecoderFinalNormPipe, cfg), TiedLayerSpec(TIED_KEY, TokenEmbeddingPipe, cfg,
                                                                    forward_fn=output_head)]
    return specs


def dense_state_to_pipe(cfg: ModelConfig, dense: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Official-name state dict → {pipeline layer index: local state dict} (layer 0 holds the tied table)."""
    out: dict[int, dict[str, Tensor]] = {}
    for name, (idx, local) in dense_key_to_pipe(cfg).items():
        if name in DENSE_TIED[1:]:
            continue
        if name not in dense:
            raise KeyError(f"dense state has no {name} (needed by pipeline layer {idx}.{local})")
        out.setdefault(idx, {})[local] = dense[name]
    return out


def pipe_state_to_dense(cfg: ModelConfig, layers: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{pipeline layer index: local state} → official-name state dict (tied table under its three names)."""
    out: dict[str, Tensor] = {}
    for idx, sd in layers.items():
        for local, t in sd.items():
            out[pipe_key_to_dense(cfg, idx, local)] = t
    if DENSE_TIED[0] in out:
        for k in DENSE_TIED[1:]:
            out[k] = out[DENSE_TIED[0]]
    return out


# --------------------------------------------------------------------------------------------------------------
# loss, batches, module
class PipeLoss:
    """A plain loss_fn for a pipeline built outside the trainer (benchmarks, tests): OFA's label-smoothed CE
    (ofa_ds.losses) over the [B, T, V] logits, divided by the micro-batch's real-token count. The training CLI
    passes its own loss_fn (ofa_ds.training.pipeline_strategy), which supports every option of the dense loss."""

    __name__ = "label_smoothed_ce"

    def __init__(self, eps: float = 0.1):
        self.eps = eps

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        from ofa_ds.losses import label_smoothed_ce
        out = label_smoothed_ce(logits, target, eps=self.eps)
        return out.loss / max(out.ntokens, 1)


def batch_to_pipe(batch: dict) -> tuple[tuple[Tensor, ...], Tensor]:
    """A collated batch dict (ofa_ds.data) → ((src, img, pmask, prev, cm), target) as the PipelineEngine wants.
    Empty tensors stand for missing images / code masks; masks travel as int64."""
    src = batch["src_tokens"]
    b = src.shape[0]
    img = batch.get("patch_images")
    img = torch.zeros(b, 0) if img is None else (img if img.is_floating_point() else img.float())  # keeps bf16
    pm = batch.get("patch_masks")
    pm = torch.ones(b, dtype=torch.long) if pm is None else pm.long()
    cm = batch.get("code_masks")
    cm = torch.zeros(0, dtype=torch.long) if cm is None else cm.long()
    return (src, img, pm, batch["prev_output_tokens"], cm), batch["target"]


def pipeline_settings(ds_cfg: dict) -> dict:
    """build_pipeline keyword arguments from a ds_config's "pipeline" block (DeepSpeed's own key names):
    stages, partition, activation_checkpoint_interval (0 or 1 = per layer)."""
    p = ds_cfg.get("pipeline") or {}
    stages = p.get("stages", 2)
    return {"num_stages": 2 if stages == "auto" else int(stages),
            "partition_method": p.get("partition", "parameters"),
            "activation_checkpointing": int(p.get("activation_checkpoint_interval", 0)) > 0}


def build_pipeline(cfg: ModelConfig, num_stages: int = 2, loss_fn: Callable | None = None,
                   partition_method: str = "parameters", activation_checkpointing: bool = False,
                   sample_patch_num: int | None = None, dynamic_shape: bool = True, **kw):
    """The PipelineModule (call after deepspeed.init_distributed). partition_method: 'parameters' (tied table
    counted on the first and last stage), 'uniform', 'type:EncoderLayerPipe|DecoderLayerPipe' (equal
    transformer-layer count), or 'ofa:N' = first N layer positions on stage 0 (2 stages).
    activation_checkpointing recomputes every encoder/decoder layer in backward (torch's non-reentrant checkpoint)."""
    from ofa_ds.training.activation_checkpoint import pipeline_checkpoint_kwargs
    from deepspeed.pipe import PipelineModule

    class OFAPipelineModule(PipelineModule):
        def _count_layer_params(self):
            # the tied table lives on the first stage (encoder lookup) and on the last (head): count it at its
            # first and last use, not three times (DeepSpeed's default) and not once (it is replicated)
            keys = [getattr(s, "key", None) for s in self._layer_specs]
            counts = []
            for i, spec in enumerate(self._layer_specs):
                k = keys[i]
                if k is not None and i != keys.index(k) and i != len(keys) - 1 - keys[::-1].index(k):
                    counts.append(0)
                    continue
                with torch.device("meta"):
                    counts.append(sum(p.numel() for p in spec.build().parameters() if p.requires_grad))
            return counts

        def _partition_layers(self, method="parameters"):
            if method.startswith("ofa:"):
                n = int(method.split(":")[1])
                self.parts = [0, n, len(self._layer_specs)]
                self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])
            else:
                super()._partition_layers(method)
            # stage 0 must own the encoder embedding with the first lookup (the float image input has no gradient)
            if len(self.parts) > 2 and self.parts[1] < 2:
                self.parts[1] = 2
                self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    ac = pipeline_checkpoint_kwargs(activation_checkpointing)
    module = OFAPipelineModule(_layer_specs(cfg, sample_patch_num), num_stages=num_stages,
                               loss_fn=loss_fn or PipeLoss(), partition_method=partition_method,
                               dynamic_shape=dynamic_shape, **ac, **kw)
    reset_parameters(module, cfg.normformer_init)
    return module


@torch.no_grad()
def reset_parameters(module, normformer_init: float = 1.0) -> None:
    """OFAModel's init (BERT-style N(0, 0.02), padding row 0, LayerNorm (1, 0), ResNet kaiming, NormFormer
    LayerNorm weights = normformer_init) on this stage's layers, then the tied table is re-broadcast so every stage
    holds stage 0's copy."""
    for name, m in module.named_modules():
        if isinstance(m, ResNet):
            m.reset_parameters()
        elif ".embed_images." not in name:
            bert_init_(m)
    normformer_init_(module, normformer_init)
    module._synchronize_tied_weights()


def local_layers(module) -> dict[int, nn.Module]:
    """{global layer index: module} of the layers this stage built (tied table as index of its first use)."""
    out = {int(name): m for name, m in module.named_children() if name.isdigit()}
    if TIED_KEY in module.tied_modules:
        out.setdefault(0, module.tied_modules[TIED_KEY])
    return out


@torch.no_grad()
def load_dense_into_pipeline(module, dense: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Copy an official-name state dict (OFAModel.state_dict(), load_official, a ZeRO fp32 consolidation) into the
    layers this stage owns. Every local parameter/buffer must be found (KeyError names what is missing)."""
    per_layer = dense_state_to_pipe(cfg, dense)
    for idx, mod in local_layers(module).items():
        want = per_layer.get(idx, {})
        own = mod.state_dict()
        missing = sorted(set(own) - set(want))
        if missing:
            raise KeyError(f"pipeline layer {idx}: no dense weights for {missing[:10]}")
        mod.load_state_dict({k: want[k] for k in own}, strict=True)


def gather_dense_state(module, cfg: ModelConfig) -> dict[str, Tensor] | None:
    """Collect the whole model's official-name state dict on global rank 0 (None elsewhere): each stage's data
    parallel rank 0 contributes its layers through torch.distributed.gather_object."""
    import torch.distributed as dist
    mine = {idx: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for idx, m in local_layers(module).items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict[int, dict[str, Tensor]] = {}
    for p in parts:
        merged.update(p)
    return pipe_state_to_dense(cfg, merged)
