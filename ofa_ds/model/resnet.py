"""OFA's image backbone: the first three stages of a torchvision-style ResNet ("v1.5", stride on the 3×3 conv).

Unusual compared with a stock ResNet: no stage 4, no pooling, no classifier (output is 1024 channels at stride 16);
"resnet50" in OFA means blocks [3, 4, 6] of Bottlenecks; per-block drop path inside the stages (rate 0 in every
released script); FrozenBatchNorm2d (buffers only, no num_batches_tracked) replaces BatchNorm when the checkpoint was
trained with --freeze-resnet. Module names equal the official `encoder.embed_images.*` keys.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linspace(end: float, n: int) -> list[float]:
    """n evenly spaced drop-path rates from 0 to end (python floats: works while building on the meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class DropPath(nn.Module):
    """Per-sample stochastic depth: zero a whole sample's branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0, batch_dim: int = 0):
        super().__init__()
        self.p = p
        self.batch_dim = batch_dim

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = [1] * x.dim()
        shape[self.batch_dim] = x.shape[self.batch_dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers (eps 1e-5)."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.float() * (self.running_var.float() + self.eps).rsqrt()
        shift = self.bias.float() - self.running_mean.float() * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that normalises bf16/fp16 inputs in fp32 and returns the input's dtype.

    DeepSpeed's bf16/fp16 modes cast the parameters (weight, bias) but not the buffers (running statistics), and
    torch's batch_norm rejects that mix (bf16 input and weight, fp32 running_mean). Statistics stay in their own
    dtype (fp32 unless the whole module was cast), which is also the more accurate place to accumulate them.
    Same parameters, buffers and state-dict keys as nn.BatchNorm2d; fp32 inputs take nn.BatchNorm2d's path."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        stat = self.running_mean.dtype if self.running_mean is not None else torch.float32
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        w = self.weight.to(stat) if self.weight is not None else None
        b = self.bias.to(stat) if self.bias is not None else None
        keep = not self.training or self.track_running_stats
        y = F.batch_norm(x.to(stat), self.running_mean if keep else None, self.running_var if keep else None,
                         w, b, use_batch, factor, self.eps)
        return y.to(x.dtype)


def _norm(n: int, frozen: bool) -> nn.Module:
    return FrozenBatchNorm2d(n) if frozen else BatchNorm2d(n, eps=1e-5, momentum=0.1)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, frozen: bool,
                 drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, frozen)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(planes, frozen)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(planes * 4, frozen)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


def _kaiming_(m: nn.Module) -> None:
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _bn_ones_zeros_(m: nn.Module) -> None:
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


def _zero_weight_(m: nn.Module) -> None:
    nn.init.zeros_(m.weight)


class ResNet(nn.Module):
    """Stem + three Bottleneck stages (planes 64/128/256, strides 1/2/2): B×3×H×W → B×1024×H/16×W/16."""

    def __init__(self, layers: tuple[int, int, int], frozen_bn: bool = False, drop_path_rate: float = 0.0,
                 zero_init_residual: bool = False):
        super().__init__()
        self.zero_init_residual = zero_init_residual
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(64, frozen_bn)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256), layers, (1, 2, 2))):
            rates = linspace(drop_path_rate, blocks)
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       _norm(planes * 4, frozen_bn))
            stage = [Bottleneck(inplanes, planes, stride, downsample, frozen_bn, 0.0)]
            inplanes = planes * 4
            stage += [Bottleneck(inplanes, planes, 1, None, frozen_bn, rates[j]) for j in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m, fn in self.init_steps():
            fn(m)

    def init_steps(self) -> list[tuple[nn.Module, Callable[[nn.Module], None]]]:
        """`reset_parameters` as ordered (module, init function) steps, each touching only that module's own
        parameters: conv kaiming (fan_out), BatchNorm (1, 0), then each bottleneck's bn3 at 0 when
        zero_init_residual. A caller whose parameters are sharded runs them one module at a time."""
        steps: list[tuple[nn.Module, Callable[[nn.Module], None]]] = []
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                steps.append((m, _kaiming_))
            elif isinstance(m, nn.BatchNorm2d):
                steps.append((m, _bn_ones_zeros_))
        if self.zero_init_residual:   # each bottleneck starts as its shortcut: bn3 (the branch's last norm) at 0
            steps += [(m.bn3, _zero_weight_) for m in self.modules()
                      if isinstance(m, Bottleneck) and isinstance(m.bn3, nn.BatchNorm2d)]
        return steps

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))
