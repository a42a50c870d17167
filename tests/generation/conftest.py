"""Fixtures for generation tests: a tiny random OFA (2 decoder layers, 32 wide) with sharpened output logits so that
beams differ and eos appears at different steps, and a batch of two samples with different source padding."""
import pytest
import torch

from ofa_ds.config import ModelConfig
from ofa_ds.model import OFAModel


def tiny_model(seed: int = 0, sharpen: float = 20.0) -> OFAModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="custom", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=2,
                      resnet_layers=(1, 1, 1))
    m = OFAModel(cfg).eval()
    with torch.no_grad():
        m.decoder.embed_tokens.weight.mul_(sharpen)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.tensor([[0, 100, 200, 300, 2], [0, 50, 60, 2, 1], [0, 7, 2, 1, 1]])
    return {"src_tokens": src, "patch_images": torch.randn(3, 3, 64, 64, generator=g),
            "patch_masks": torch.tensor([True, True, False])}


@pytest.fixture(autouse=True)
def _one_thread():
    """Generation runs many tiny ops: on the shared 2-core CI machine, intra-op threads mostly spin and wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
