"""What a user hands the predictor, turned into RGB PIL images and checked texts, one request at a time.

An image input is a file path (str or os.PathLike), a PIL image or a numpy array (H x W grey, H x W x 1/3/4, uint8,
bool, or float in [0, 1]). Every failure is an `InputError` with a one-line reason naming the input; the predictor
turns it into an error record and goes on with the other inputs.

What is unusual:
  * Files are decoded by the data path's own decoder (`ofa_ds.data.images.decode_image`: the accepted formats, the
    pixel limit read off the header, `convert("RGB")`), then turned upright by their EXIF orientation. The training
    data is read without that rotation (public datasets' boxes refer to the stored pixels); a photo handed to the
    predictor is meant as it is displayed, so boxes come back in the pixels of the upright image (`exif=False`
    gives the stored pixels instead).
  * Nothing is decoded before it is needed: `describe` names an input without opening it, and the predictor reads
    one batch of inputs at a time.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ofa_ds.data.images import MAX_IMAGE_PIXELS, decode_image
from ofa_ds.data.text import pre_caption, pre_question
from ofa_ds.data.tsv import BadRow

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jp2", ".avif")
"""Files a folder input contributes (case-insensitive); others in the folder are skipped."""


class InputError(ValueError):
    """A bad input: the message is the one-line reason, without the input's name."""


def describe(x: Any, index: int) -> str:
    """A short name for input number `index`: the path for files, else its type and position."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    if isinstance(x, Image.Image):
        return f"<PIL image #{index}>"
    if isinstance(x, np.ndarray):
        return f"<array #{index}>"
    return f"<{type(x).__name__} #{index}>"


def load_image(x: Any, exif: bool = True) -> Image.Image:
    """An image input -> RGB PIL image (InputError saying why not)."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if not path:
            raise InputError("empty image path")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise InputError("no such file") from None
        except IsADirectoryError:
            raise InputError("is a folder, not an image file") from None
        except OSError as e:
            raise InputError(f"cannot read the file ({e.strerror or type(e).__name__})") from None
        try:
            img = decode_image(raw)
        except BadRow as e:
            raise InputError(str(e)) from None
    elif isinstance(x, Image.Image):
        w, h = x.size
        if w < 1 or h < 1:
            raise InputError(f"image has zero size ({w}x{h})")
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"image of {w}x{h} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
        try:
            img = x.convert("RGB") if x.mode != "RGB" else x
        except Exception as e:  # noqa: BLE001 - PIL raises many types for modes it cannot convert
            raise InputError(f"cannot convert a {x.mode} image to RGB ({type(e).__name__})") from None
    elif isinstance(x, np.ndarray):
        img = array_to_image(x)
    else:
        raise InputError(f"not an image input: {type(x).__name__} (give a path, a PIL image or a numpy array)")
    return ImageOps.exif_transpose(img) if exif else img


def array_to_image(a: np.ndarray) -> Image.Image:
    """H x W or H x W x C (C = 1, 3, 4; alpha dropped) array -> RGB PIL image. Floats are read as [0, 1]."""
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3]
    elif a.ndim != 2:
        raise InputError(f"array of shape {tuple(a.shape)} is not an image (expected H x W or H x W x 1/3/4)")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image has zero size ({a.shape[1]}x{a.shape[0]})")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError("array holds NaN or infinite values")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"array of dtype {a.dtype} (expected uint8, bool, or float in [0, 1])")
    img = Image.fromarray(np.ascontiguousarray(a))
    return img.convert("RGB")


def need(text: Any, what: str, question: bool = False) -> str:
    """A text field that must keep a word after OFA's normalisation (InputError 'empty question' otherwise)."""
    if text is None:
        raise InputError(f"no {what} given")
    if not isinstance(text, str):
        raise InputError(f"{what} must be text, got {type(text).__name__}")
    if not (pre_question if question else pre_caption)(text, 1 << 30):
        raise InputError(f"empty {what}" if not text.strip() else f"no words in the {what} {text[:40]!r}")
    return text


def list_folder(folder: str) -> list[str]:
    """Image files of a folder and its subfolders, sorted by path (hidden entries skipped)."""
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(files)
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return out
