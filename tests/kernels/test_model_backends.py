"""OFA-Tiny end to end: the same weights give the same logits, loss and gradients with kernel_backend="triton"
(the Triton kernels, through the interpreter on CPU) and kernel_backend="torch" (the references)."""
import pytest
import torch

try:
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
except ImportError as e:  # a bare GPU box running benchmarks/gpu_suite.sh may lack the model's dependencies
    pytest.skip(f"model package not importable: {e}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(b=2, L=9, T=7, size=64):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 1000, (b, L), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[-1, -3:] = 1                                     # padding in the text of the last sample
    prev = torch.randint(4, 1000, (b, T), generator=g)
    prev[:, 0] = 0
    target = torch.randint(4, 1000, (b, T), generator=g)
    img = torch.randn(b, 3, size, size, generator=g)
    return src.to(DEVICE), img.to(DEVICE), prev.to(DEVICE), target.to(DEVICE)


def _loss_and_grads(backend, state):
    torch.manual_seed(0)
    model = OFAModel(preset("tiny", encoder_layers=1, decoder_layers=1, kernel_backend=backend)).eval()
    model.load_state_dict(state)
    model.to(DEVICE)
    src, img, prev, target = _batch()
    logits = model(src, img, torch.tensor([True, True], device=DEVICE), prev)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_model_backends_agree():
    torch.manual_seed(0)
    ref_model = OFAModel(preset("tiny", encoder_layers=1, decoder_layers=1))
    with torch.no_grad():  # make the relative-position tables matter (their init is tiny)
        for p in ref_model.parameters():
            if p.dim() == 2 and p.shape[1] == ref_model.cfg.num_heads:
                p.normal_()
    state = ref_model.state_dict()
    logits_t, loss_t, grads_t = _loss_and_grads("triton", state)
    logits_r, loss_r, grads_r = _loss_and_grads("torch", state)
    torch.testing.assert_close(logits_t, logits_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_r.keys() and len(grads_t) > 50
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], atol=1e-4, rtol=1e-3, msg=name)
