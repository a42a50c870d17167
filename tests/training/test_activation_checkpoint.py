"""Per-layer activation checkpointing of the dense model: same loss and gradients, far fewer saved activations."""
import torch

from ofa_ds.config import preset
from ofa_ds.model import OFAModel
from ofa_ds.training.activation_checkpoint import is_checkpointing, set_activation_checkpointing


def _cfg():
    return preset("tiny", d_model=64, ffn_dim=256, num_heads=4, encoder_layers=3, decoder_layers=3,
                  resnet_layers=(1, 1, 1), vocab_size=300, dropout=0.1, encoder_drop_path_rate=0.1)


def _batch():
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 300, (2, 48), generator=g)
    src[1, -3:] = 1
    prev = torch.randint(4, 300, (2, 40), generator=g)
    prev[:, 0] = 0
    # a small image keeps the ResNet path in the test; long texts make the layers' activations dominate
    return src, torch.randn(2, 3, 32, 32, generator=g), torch.tensor([True, False]), prev


def _run(model):
    """loss, grads, and the bytes of activations autograd saved for backward during the forward pass (parameters,
    which autograd also saves by reference, and repeated references to one tensor are not counted)."""
    saved, seen = [0], {p.data_ptr() for p in model.parameters()}

    def pack(t):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            saved[0] += t.numel() * t.element_size()
        return t

    src, img, pm, prev = _batch()
    torch.manual_seed(11)                          # dropout / drop-path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(src, img, pm, prev)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), prev.roll(-1, 1).flatten(), ignore_index=1)
    model.zero_grad()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


def test_checkpointing_keeps_loss_and_grads_and_saves_activations():
    torch.manual_seed(0)
    model = OFAModel(_cfg()).train()
    l0, g0, s0 = _run(model)
    assert set_activation_checkpointing(model, True) == 6 and is_checkpointing(model)
    l1, g1, s1 = _run(model)
    assert abs(l0 - l1) < 1e-6
    assert g0.keys() == g1.keys()
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) < 1e-5
    assert s1 < 0.6 * s0, (s0, s1)                 # measured: the layers' internals are no longer kept
    set_activation_checkpointing(model, False)
    assert not is_checkpointing(model)
    l2, _, s2 = _run(model)
    assert abs(l2 - l0) < 1e-6 and s2 == s0


def test_no_checkpointing_in_eval_or_incremental_decoding():
    torch.manual_seed(0)
    model = OFAModel(_cfg()).eval()
    src, img, pm, prev = _batch()
    with torch.no_grad():
        ref = model(src, img, pm, prev)
        set_activation_checkpointing(model, True)
        out = model(src, img, pm, prev)
        enc = model.encode(src, img, pm)
        cache = {}
        step = model.decode(prev[:, :3], enc, cache=cache)
    assert torch.allclose(ref, out, atol=1e-6)
    assert torch.allclose(step, ref[:, :3], atol=1e-5)
