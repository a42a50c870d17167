"""Image decoding and transforms: boxes must stay on the drawn object."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from ofa_ds.data import images
from ofa_ds.data.tsv import BadRow
from tests.data.conftest import make_image, red_bbox


def test_base64_std_urlsafe_and_unpadded():
    img = make_image(40, 30)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    raw = buf.getvalue()
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    for s in (std, url, url.rstrip("=")):
        out = images.decode_base64_image(s)
        assert out.size == (40, 30) and np.array_equal(np.asarray(out), np.asarray(img))
    assert images.decode_base64_image(images.encode_base64_image(img, urlsafe=True)).size == (40, 30)
    with pytest.raises(BadRow, match="undecodable"):
        images.decode_base64_image("aGVsbG8gd29ybGQ=")  # base64 of text, not an image
    with pytest.raises(BadRow):
        images.decode_base64_image("")


def test_to_tensor_normalisation():
    x = images.to_tensor(Image.new("RGB", (2, 2), (255, 0, 128)))
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)
    y = images.to_tensor(Image.new("RGB", (1, 1), (0, 0, 0)), images.IMAGENET_MEAN, images.IMAGENET_STD)
    np.testing.assert_allclose(y[:, 0, 0], -np.array(images.IMAGENET_MEAN) / np.array(images.IMAGENET_STD), rtol=1e-5)


def _close(a, b, tol=2.5):
    assert np.all(np.abs(np.asarray(a, float) - np.asarray(b, float)) <= tol), (a, b)


def test_random_resize_clamps_each_side_and_scales_boxes():
    box = np.array([[40.0, 30.0, 100.0, 90.0]])
    img = make_image(160, 120, tuple(box[0].astype(int)))
    out, b = images.random_resize(img, box, [64], 64, np.random.default_rng(0))
    assert out.size == (64, 64)  # OFA's clamp: squashed, aspect not kept
    _close(b[0], red_bbox(np.asarray(out)))
    out, b = images.random_resize(img, box, [60], 200, np.random.default_rng(0))
    assert out.size == (80, 60)  # aspect kept below max_size
    _close(b[0], red_bbox(np.asarray(out)))


def test_hflip_boxes():
    img = make_image(64, 48, (5, 10, 25, 30))
    out, b = images.hflip(img, np.array([[5.0, 10.0, 25.0, 30.0]]))
    assert b[0].tolist() == [39.0, 10.0, 59.0, 30.0]
    _close(b[0], red_bbox(np.asarray(out)), 0)


def test_object_center_crop_keeps_object():
    img = make_image(200, 150, (150, 100, 190, 140))
    out, b = images.object_center_crop(img, np.array([[150.0, 100.0, 190.0, 140.0]]), 96)
    assert out.size == (96, 96)
    _close(b[0], red_bbox(np.asarray(out)), 0)


def test_center_crop_pads_small_images():
    out, _ = images.center_crop(make_image(40, 30, None), 50)
    assert out.size == (50, 50)


@pytest.mark.parametrize("seed", range(4))
def test_large_scale_jitter_boxes_follow_object(seed):
    rng = np.random.default_rng(seed)
    boxes = np.array([[20.0, 20.0, 60.0, 50.0], [100.0, 90.0, 120.0, 110.0]])
    img = make_image(128, 128, (20, 20, 60, 50))
    out, b, keep = images.large_scale_jitter(img, boxes, 64, rng)
    assert out.size == (64, 64) and keep[0] and len(b) == keep.sum()
    x0, y0, x1, y1 = b[0]
    arr = np.asarray(out)
    if x1 - x0 > 3 and y1 - y0 > 3:  # interior of the transformed box is red
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        assert arr[cy, cx, 0] > 180 and arr[cy, cx, 1] < 90


def test_random_augment_is_seeded_and_keeps_size():
    img = make_image(64, 64)
    a = images.random_augment(img, np.random.default_rng(3), 2, 7)
    b = images.random_augment(img, np.random.default_rng(3), 2, 7)
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    for op in images.AUG_OPS:
        assert images._apply_op(img, op, 7, np.random.default_rng(0)).size == (64, 64)


def test_random_resized_crop_and_erasing_shapes():
    rng = np.random.default_rng(0)
    assert images.random_resized_crop(make_image(80, 60), 32, rng).size == (32, 32)
    x = np.zeros((3, 32, 32), np.float32)
    y = images.random_erasing(x, np.random.default_rng(1), p=1.0)
    assert y.shape == x.shape and (y != 0).any() and (x == 0).all()
