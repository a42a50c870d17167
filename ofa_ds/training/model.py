"""`TrainingOFA`: OFAModel whose forward can return the logits of the real target positions only.

The tied output projection (d_model × 59457) dominates a small OFA's step: a padded target batch wastes it on every
pad position. Given `keep` (Bool[B,T], True where the target is real), forward runs the decoder to its final features
and projects only those rows, returning packed logits [N, V] that `ofa_ds.losses` accepts. It is a subclass with no
parameters of its own, so state dicts, checkpoints and parameter names are exactly OFAModel's; under ZeRO-3 the
projection is still a module call, so DeepSpeed gathers its (tied) weight as usual.
"""
from __future__ import annotations

from torch import Tensor

from ofa_ds.model import OFAModel


class TrainingOFA(OFAModel):
    def forward(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                prev_output_tokens: Tensor | None = None, code_masks: Tensor | None = None,
                sample_patch_num: int | None = None, keep: Tensor | None = None, **unused) -> Tensor:
        if keep is None:
            return super().forward(src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks,
                                   sample_patch_num)
        if prev_output_tokens is None:
            raise ValueError("TrainingOFA.forward needs prev_output_tokens")
        enc = self.encode(src_tokens, patch_images, patch_masks, sample_patch_num)
        h = self.decoder(prev_output_tokens, enc, code_masks, features_only=True)    # [B, T, C]
        return self.decoder.output_projection(h[keep])                                # [N, V]


def as_training_model(model: OFAModel) -> TrainingOFA:
    """A TrainingOFA holding `model`'s weights (fresh models are built as TrainingOFA directly)."""
    if isinstance(model, TrainingOFA):
        return model
    out = TrainingOFA(model.cfg)
    out.load_state_dict(model.state_dict())
    return out.train(model.training)
