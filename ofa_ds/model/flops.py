"""Analytic FLOP count of one OFA sample, for TFLOP/s and MFU reporting.

Counts 2 FLOPs per multiply-accumulate of every matmul and convolution (ResNet convs, projections, attention
q·kᵀ and p·v, the position-bias matmuls, FFNs, the output projection); LayerNorm, softmax, GELU and embedding
look-ups are ignored (well under 1% for every preset). Training = forward × 3 (backward is twice the forward), the
usual convention of MFU reports. Attention is counted as dense (no causal halving), as the kernels compute it.
Samples that share an image share one ResNet pass (`ModelConfig.dedup_images`); the trainer subtracts
`resnet_train_flops` for each of them.
"""
from __future__ import annotations

from ofa_ds.config import ModelConfig


def forward_flops(cfg: ModelConfig, image_size: int | None, src_len: int, tgt_len: int,
                  sample_patch_num: int | None = None) -> int:
    """Forward FLOPs of one sample: an image of image_size² (None = text only), src_len text tokens in the
    encoder (bos/eos included), tgt_len decoder positions."""
    C, F, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    total = 0
    n_img = 0
    if image_size:
        total += _resnet_flops(cfg, image_size)
        n_img = (image_size // 16) ** 2
        if sample_patch_num:
            n_img = min(n_img, sample_patch_num)
        total += 2 * n_img * 1024 * C                                    # image_proj
    S, T = n_img + src_len, tgt_len
    total += 2 * 2 * S * C * C + 2 * S * S * C                           # shared absolute bias
    enc_layer = 4 * 2 * S * C * C + 2 * 2 * S * S * C + 2 * 2 * S * C * F
    total += cfg.encoder_layers * enc_layer
    total += 2 * 2 * T * C * C + 2 * T * T * C                           # decoder self abs bias
    total += 2 * T * C * C + 2 * S * C * C + 2 * T * S * C               # cross abs bias
    dec_layer = (4 * 2 * T * C * C + 2 * 2 * T * T * C                   # self-attention
                 + 2 * 2 * T * C * C + 2 * 2 * S * C * C + 2 * 2 * T * S * C   # cross-attention
                 + 2 * 2 * T * C * F)                                    # FFN
    total += cfg.decoder_layers * dec_layer
    total += 2 * T * C * V                                               # tied output projection
    return total


def _resnet_flops(cfg: ModelConfig, size: int) -> int:
    h = w = size
    h, w = (h + 1) // 2, (w + 1) // 2
    total = 2 * 3 * 64 * 49 * h * w                                      # stem conv 7×7/2
    h, w = (h + 1) // 2, (w + 1) // 2                                    # maxpool /2
    c_in = 64
    for planes, blocks, stride in zip((64, 128, 256), cfg.resnet_layers, (1, 2, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            total += 2 * c_in * planes * h * w                           # conv1 1×1 at input resolution
            h, w = (h + s - 1) // s, (w + s - 1) // s
            total += 2 * planes * planes * 9 * h * w + 2 * planes * planes * 4 * h * w   # conv2 3×3, conv3 1×1
            if i == 0:
                total += 2 * c_in * planes * 4 * h * w                   # downsample 1×1
            c_in = planes * 4
    return total


def resnet_train_flops(cfg: ModelConfig, image_size: int) -> int:
    """Forward + backward FLOPs of the ResNet on one image (what a sample sharing its image with another saves)."""
    return 3 * _resnet_flops(cfg, image_size)


def train_flops_per_sample(cfg: ModelConfig, image_size: int | None, src_len: int, tgt_len: int,
                           sample_patch_num: int | None = None) -> int:
    """Forward + backward FLOPs of one training sample (3 × forward)."""
    return 3 * forward_flops(cfg, image_size, src_len, tgt_len, sample_patch_num)
