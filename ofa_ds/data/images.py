"""Image decoding and OFA's transforms in PIL + numpy (no torchvision), with boxes carried alongside.

Conventions: boxes are float numpy arrays [N, 4] of (x0, y0, x1, y1) pixels; every random transform takes a
`numpy.random.Generator` so that a sample's augmentation is a function of its seed (exact resume).
Unusual points copied from OFA on purpose:
* `random_resize` clamps *each* side to max_size independently (OFA's utils/transforms.resize), so RandomResize([512],
  max_size=512) squashes any image to exactly 512x512 and the aspect ratio is only kept below max_size.
* Base64 is decoded with the URL-safe decoder, which also accepts the standard alphabet; missing '=' padding is added.
* Decoding is OFA's `Image.open(...).convert("RGB")`: no EXIF rotation (the stored pixels as they are, which is what
  boxes of public datasets refer to), alpha dropped, palette expanded, 16-bit grey clipped to 8 bits as PIL does.
  `decode_image` is the one decoder of the loader, `validate` and `convert`; every failure of it is a BadRow
  ('image'), never another exception: any exception PIL raises, a format outside IMAGE_FORMATS, a zero size, and
  more than MAX_IMAGE_PIXELS pixels, which is read off the header before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from .tsv import BadRow

BICUBIC = Image.BICUBIC
MEAN_05 = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_IMAGE_PIXELS = 89_478_485
"""Largest accepted width x height: PIL's default Image.MAX_IMAGE_PIXELS (a 1 GiB RGBA image / 3); an image above it
is a bad row, whatever PIL's own (global, changeable) setting is."""
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "ICO", "JPEG2000",
                           "AVIF"})
"""Raster formats accepted inside a TSV. Others PIL can open (EPS runs Ghostscript, PSD, FITS, ...) are bad rows."""


# ---- decoding -----------------------------------------------------------------------------------------------------
def _undecodable(e: BaseException) -> BadRow:
    if isinstance(e, UnidentifiedImageError):  # its message holds the BytesIO's address: not reproducible
        why = "not an image file PIL can identify"
    else:
        why = f"{type(e).__name__}: {str(e)[:80]}"
    return BadRow(f"undecodable image ({why})", "image")


def decode_image(raw: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image file bytes -> RGB PIL image, or BadRow('image') saying why not (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning (checked below), palette-transparency notes
        try:
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
        except Image.DecompressionBombError as e:  # PIL's own check, at twice its Image.MAX_IMAGE_PIXELS
            n = re.search(r"\((\d+) pixels\)", str(e))
            raise BadRow(f"image of {n.group(1) if n else 'too many'} pixels is over the {max_pixels}-pixel limit",
                         "image") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error, ...)
            raise _undecodable(e) from None
        if img.format not in IMAGE_FORMATS:
            raise BadRow(f"undecodable image ({img.format} is not one of the accepted formats)", "image")
        if w < 1 or h < 1:
            raise BadRow(f"image has zero size ({w}x{h})", "image")
        if w * h > max_pixels:
            raise BadRow(f"image of {w}x{h} = {w * h} pixels is over the {max_pixels}-pixel limit", "image")
        try:
            img.load()
            return img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - truncated data, broken chunks, unsupported modes, MemoryError
            raise _undecodable(e) from None


def decode_base64_image(s: str) -> Image.Image:
    """Standard or URL-safe base64 of an image file -> RGB PIL image (BadRow('image') when it is not one)."""
    s = s.strip()
    if not s:
        raise BadRow("empty image field", "image")
    try:
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError) as e:  # bad padding, or a character outside ASCII
        raise BadRow(f"undecodable image (not base64: {str(e)[:90]})", "image") from None
    return decode_image(raw)


def encode_base64_image(img: Image.Image, fmt: str = "JPEG", quality: int = 92, urlsafe: bool = False) -> str:
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt)
    data = buf.getvalue()
    return (base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)).decode("ascii")


# ---- tensors ------------------------------------------------------------------------------------------------------
def to_tensor(img: Image.Image, mean=MEAN_05, std=MEAN_05) -> np.ndarray:
    """PIL RGB -> float32 [3, H, W], (x/255 - mean) / std."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def resize_exact(img: Image.Image, w: int, h: int, boxes: Optional[np.ndarray] = None):
    """Bicubic resize to (w, h); boxes scaled per axis."""
    ow, oh = img.size
    out = img.resize((w, h), BICUBIC) if (ow, oh) != (w, h) else img
    if boxes is not None:
        boxes = boxes * np.array([w / ow, h / oh, w / ow, h / oh], dtype=np.float64)
    return out, boxes


def _size_with_max(w: int, h: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """OFA's get_size_with_aspect_ratio: shorter side -> size, then each side clamped to max_size. Returns (w, h)."""
    if (w <= h and w == size) or (h <= w and h == size):
        ow, oh = w, h
    elif w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    if max_size is not None:
        ow, oh = min(ow, max_size), min(oh, max_size)
    return ow, oh


def random_resize(img, boxes, sizes, max_size, rng: np.random.Generator):
    size = int(sizes[int(rng.integers(len(sizes)))])
    w, h = _size_with_max(img.size[0], img.size[1], size, max_size)
    return resize_exact(img, w, h, boxes)


def crop(img: Image.Image, boxes: Optional[np.ndarray], top: int, left: int, ch: int, cw: int, delete: bool = True):
    """Crop (zero padding outside the image, like torchvision); boxes shifted, clipped, empty ones dropped."""
    out = img.crop((left, top, left + cw, top + ch))
    keep = None
    if boxes is not None:
        b = boxes - np.array([left, top, left, top], dtype=np.float64)
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, cw)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, ch)
        if delete:
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b = b[keep]
        boxes = b
    return out, boxes, keep


def center_crop(img, size: int, boxes=None):
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    out, boxes, _ = crop(img, boxes, top, left, size, size, delete=False)
    return out, boxes


def object_center_crop(img, boxes: np.ndarray, size: int):
    """Crop size x size centred on the first box, shifted to stay inside the image; boxes clipped, not dropped."""
    w, h = img.size
    x0, y0, x1, y1 = (float(v) for v in boxes[0])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = max(cx - size / 2 + min(w - cx - size / 2, 0), 0)
    top = max(cy - size / 2 + min(h - cy - size / 2, 0), 0)
    out, boxes, _ = crop(img, boxes, int(top), int(left), size, size, delete=False)
    return out, boxes


def hflip(img, boxes=None):
    w = img.size[0]
    out = img.transpose(Image.FLIP_LEFT_RIGHT)
    if boxes is not None:
        boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array([w, 0, w, 0])
    return out, boxes


def large_scale_jitter(img, boxes: np.ndarray, out_size: int, rng: np.random.Generator,
                       scale_min: float = 1.0, scale_max: float = 1.5):
    """OFA's LargeScaleJitter: rescale by a random factor of out_size, random crop, pad right/bottom with zeros.
    Returns (image, boxes, keep) where keep marks the boxes still present."""
    w, h = img.size
    scaled = round(float(rng.random() * (scale_max - scale_min) + scale_min) * out_size)
    scale = min(scaled / h, scaled / w)
    sh, sw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))  # a 1 px side of a very wide image
    img = img.resize((sw, sh), BICUBIC)
    boxes = boxes * scale
    ch, cw = min(out_size, sh), min(out_size, sw)
    oy = int(round(max(sh - out_size, 0) * float(rng.random())))
    ox = int(round(max(sw - out_size, 0) * float(rng.random())))
    img, boxes, keep = crop(img, boxes, oy, ox, ch, cw, delete=True)
    if (cw, ch) != (out_size, out_size):
        canvas = Image.new("RGB", (out_size, out_size))
        canvas.paste(img, (0, 0))
        img = canvas
    return img, boxes, keep


# ---- RandomAugment (BLIP-style, N ops each applied with p=0.5 at magnitude M of 10) ------------------------------
AUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
           "TranslateY", "Rotate")
_FILL = (128, 128, 128)


def _apply_op(img: Image.Image, op: str, m: float, rng: np.random.Generator) -> Image.Image:
    sign = -1.0 if rng.random() < 0.5 else 1.0
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(m / 10 * 1.8 + 0.1)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(m / 10 * 1.8 + 0.1)
    if op == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, sign * m / 10 * 0.3, 0, 0, 1, 0), fillcolor=_FILL)
    if op == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * m / 10 * 0.3, 1, 0), fillcolor=_FILL)
    if op == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, sign * m / 10 * 10, 0, 1, 0), fillcolor=_FILL)
    if op == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * m / 10 * 10), fillcolor=_FILL)
    if op == "Rotate":
        return img.rotate(sign * m / 10 * 30, fillcolor=_FILL)
    raise ValueError(f"unknown augment op {op}")


def random_augment(img: Image.Image, rng: np.random.Generator, n: int = 2, m: float = 7, ops=AUG_OPS) -> Image.Image:
    for k in rng.integers(len(ops), size=n):
        if rng.random() < 0.5:
            img = _apply_op(img, ops[int(k)], m, rng)
    return img


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """timm/torchvision RandomResizedCrop (10 tries, then a centre crop), bicubic."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        ta = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return img.crop((left, top, left + cw, top + ch)).resize((size, size), BICUBIC)
    s = min(w, h)
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), BICUBIC)


def random_erasing(x: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    """timm RandomErasing(mode='pixel', count 1) on a normalised [3,H,W] array."""
    if rng.random() >= p:
        return x
    _, h, w = x.shape
    for _ in range(10):
        ta = h * w * rng.uniform(0.02, 1 / 3)
        ar = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
        if eh < h and ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            x = x.copy()
            x[:, top:top + eh, left:left + ew] = rng.standard_normal((3, eh, ew)).astype(np.float32)
            return x
    return x
