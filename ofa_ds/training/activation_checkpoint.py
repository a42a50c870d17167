"""Per-layer activation checkpointing for both strategies (dense/ZeRO and pipeline), switchable at run time.

Every encoder and decoder layer's activations are dropped after the forward pass and recomputed in backward, so
the activation memory of a layer stack shrinks to one layer's worth plus the layer inputs.

* Dense / ZeRO-0…3: `set_activation_checkpointing(model, True)` wraps the `forward` of every EncoderLayer and
  DecoderLayer *instance* with `torch.utils.checkpoint.checkpoint(use_reentrant=False)`; parameter names and the model
  class are unchanged, `False` restores the plain forward. The non-reentrant variant is used because it works with
  inputs that do not require grad, keyword arguments and ZeRO-3 (whose per-module hooks simply gather the parameters
  again during recomputation; DeepSpeed's own reentrant checkpointing has been reported to fail with ZeRO-3 where
  torch's worked, see docs/scale.md#activation-checkpointing). Calls in eval mode, under no_grad, or with an
  incremental-decoding cache (generation) run the plain forward.
* Pipeline: `pipeline_checkpoint_kwargs(True)` gives the PipelineModule arguments that checkpoint each
  EncoderLayerPipe/DecoderLayerPipe (interval 1, the embedding/norm/head layers are never checkpointed).

Dropout and drop-path draw the same random numbers in the recomputation (torch saves and restores the RNG state).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ofa_ds.model.layers import DecoderLayer, EncoderLayer

_ATTR = "_ofa_ds_plain_forward"


def _checkpointed(layer: nn.Module, plain, *args, **kwargs):
    cache = kwargs.get("cache", args[6] if len(args) > 6 else None)
    if layer.training and torch.is_grad_enabled() and cache is None:
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch per-layer checkpointing on/off for every encoder/decoder layer in `model` (an OFAModel or any module
    containing its layers, e.g. a DeepSpeed engine's `.module`). Returns the number of layers affected."""
    n = 0
    for m in model.modules():
        if not isinstance(m, (EncoderLayer, DecoderLayer)):
            continue
        n += 1
        wrapped = _ATTR in m.__dict__
        if enabled and not wrapped:
            plain = m.forward
            m.__dict__[_ATTR] = plain
            m.forward = functools.partial(_checkpointed, m, plain)
        elif not enabled and wrapped:
            del m.__dict__["forward"]
            del m.__dict__[_ATTR]
    return n


def is_checkpointing(model: nn.Module) -> bool:
    return any(_ATTR in m.__dict__ for m in model.modules() if isinstance(m, (EncoderLayer, DecoderLayer)))


def _torch_checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def pipeline_checkpoint_kwargs(enabled: bool) -> dict:
    """PipelineModule keyword arguments: checkpoint every transformer layer (or nothing)."""
    if not enabled:
        return {"activation_checkpoint_interval": 0}
    return {"activation_checkpoint_interval": 1, "activation_checkpoint_func": _torch_checkpoint,
            "checkpointable_layers": ["EncoderLayerPipe", "DecoderLayerPipe"]}
