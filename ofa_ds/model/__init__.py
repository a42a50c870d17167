"""The OFA model: plain single-device PyTorch (never imports deepspeed or torch.distributed)."""
from ofa_ds.model.flops import forward_flops, train_flops_per_sample
from ofa_ds.model.ofa import Decoder, Encoder, EncoderOut, OFAModel, reorder_cache

__all__ = ["OFAModel", "Encoder", "Decoder", "EncoderOut", "reorder_cache", "forward_flops",
           "train_flops_per_sample"]
