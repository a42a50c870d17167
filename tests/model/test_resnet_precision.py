"""ResNet normalisation under DeepSpeed's bf16/fp16 modes: parameters in bf16, running statistics left in fp32.

DeepSpeed casts a module's parameters to bf16/fp16 but not its buffers; torch's batch_norm rejects that mix
(found when a bf16 ZeRO config failed at the first BatchNorm). These tests pin the dtype contract and that the
statistics follow nn.BatchNorm2d's."""
import torch
from torch import nn

from ofa_ds.model.resnet import BatchNorm2d, FrozenBatchNorm2d


def _params_only_cast(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    for p in m.parameters():          # what DeepSpeed's bf16 engine does: parameters, not buffers
        p.data = p.data.to(dtype)
    return m


def test_batchnorm_bf16_input_with_fp32_statistics_matches_fp32_reference():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = BatchNorm2d(6, eps=1e-5, momentum=0.1)
    bn.load_state_dict(ref.state_dict())
    _params_only_cast(bn, torch.bfloat16)
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.bfloat16
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    for _ in range(3):                                     # training: batch statistics, running stats updated
        y = bn(x.to(torch.bfloat16))
        y_ref = ref(x.to(torch.bfloat16).float())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(bn.running_var, ref.running_var, atol=3e-2, rtol=1e-2)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    bn.eval()                                              # eval: running statistics
    ref.eval()
    torch.testing.assert_close(bn(x.to(torch.bfloat16)).float(), ref(x.to(torch.bfloat16).float()),
                               atol=3e-2, rtol=2e-2)


def test_batchnorm_bf16_gradients_reach_bf16_parameters():
    bn = _params_only_cast(BatchNorm2d(3), torch.bfloat16)
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    (bn(x).float() * torch.arange(3.0)[None, :, None, None]).sum().backward()
    assert bn.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert bn.bias.grad.abs().sum() > 0


def test_batchnorm_fp32_path_is_nn_batchnorm():
    torch.manual_seed(1)
    a, b = nn.BatchNorm2d(4), BatchNorm2d(4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(a(x), b(x)) and torch.equal(a.running_var, b.running_var)


def test_frozen_batchnorm_keeps_the_input_dtype():
    fb = FrozenBatchNorm2d(4)
    with torch.no_grad():
        fb.weight.uniform_(0.5, 2)
        fb.running_var.uniform_(0.5, 2)
        fb.running_mean.normal_()
    x = torch.randn(2, 4, 3, 3)
    y = fb(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fb(x.to(torch.bfloat16).float()), atol=3e-2, rtol=2e-2)
