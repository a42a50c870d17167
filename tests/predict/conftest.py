"""Fixtures of the inference tests: OFA-Tiny with the parity fixture weights (tests/model/fixture_weights.py) as an
official .pt and as an exported folder, built once per session, and a Predictor on it at a small image side (the
model's 16-pixel patches make a 32-pixel image 4 tokens) so that every task decodes in a fraction of a second."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_ds.checkpoint import export_folder, save_official
from ofa_ds.config import preset
from ofa_ds.model import OFAModel
from tests.model.fixture_weights import rule_state_dict

SKELETON = os.path.join(os.path.dirname(__file__), "..", "assets", "ofa_tiny_skeleton.pt")
SMALL = 32
"""Image side of the test predictor."""


@pytest.fixture(scope="session")
def tiny_model():
    m = OFAModel(preset("tiny"))
    m.load_state_dict(rule_state_dict(m.state_dict()))
    return m.eval()


@pytest.fixture(scope="session")
def tiny_pt(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("predict_ckpt") / "ofa_tiny_rule.pt")
    save_official(tiny_model, path, template=SKELETON)
    return path


@pytest.fixture(scope="session")
def tiny_folder(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("predict_folder") / "ofa_tiny_rule")
    export_folder(tiny_model, path)
    return path


@pytest.fixture(scope="session")
def predictor(tiny_pt):
    from ofa_ds.predict import Predictor
    return Predictor(tiny_pt, image_size=SMALL, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding is many small ops: on the shared CI machine, intra-op threads mostly spin and wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A w x h RGB image with a few flat rectangles (different per seed)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        a[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Three image files of different sizes and modes (RGB JPEG, RGBA PNG, grey PNG)."""
    d = tmp_path_factory.mktemp("predict_images")
    paths = [str(d / "a.jpg"), str(d / "b.png"), str(d / "c.png")]
    picture(120, 80, 1).save(paths[0], quality=95)
    picture(64, 100, 2).convert("RGBA").save(paths[1])
    picture(50, 50, 3).convert("L").save(paths[2])
    return paths
