"""Fixtures for the data tests: the shared tokenizer, a tiny synthetic dataset (generated once per session),
and helpers writing small TSV files with hand-made rows in the official formats."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ofa_ds.data.images import encode_base64_image


@pytest.fixture(scope="session")
def tok():
    from ofa_ds.tokenizer import get_tokenizer
    return get_tokenizer()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from ofa_ds.data.synthetic import generate
    out = str(tmp_path_factory.mktemp("synth"))
    generate(out, seed=3, size="tiny", image_size=96)
    return out


def make_image(w=64, h=48, box=(10, 8, 30, 28), color=(255, 0, 0), bg=(255, 255, 255)):
    img = Image.new("RGB", (w, h), bg)
    if box is not None:
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=color)
    return img


def b64(img, urlsafe=False, fmt="PNG"):
    return encode_base64_image(img, fmt=fmt, urlsafe=urlsafe)


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write("\t".join(str(c) for c in r) + "\n")
    return str(path)


@pytest.fixture
def img64():
    return b64(make_image())


def red_bbox(arr: np.ndarray):
    """Bounding box (x0, y0, x1, y1) of strongly red pixels of an HWC uint8 / CHW normalised array."""
    if arr.dtype != np.uint8:
        arr = ((arr.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    m = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    ys, xs = np.nonzero(m)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
