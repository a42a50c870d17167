"""One rule for bad data: for a file per task that mixes good rows (pathological but valid images included) with bad
rows of every category, `validate` reports exactly the lines the training loader skips, with the same categories;
the loader never raises on them; good rows decode the same way in both paths; an image over the pixel limit is
reported at once; past the threshold the run stops with TooManyBadRows naming file:line and the share."""
import base64
import io
import json
import pickle
import re
import struct
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ofa_ds.data import DataConfig, DataStream, make_task
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.images import MAX_IMAGE_PIXELS, decode_base64_image, decode_image
from ofa_ds.data.tsv import CATEGORIES, BadRow, BadRowCounter, TooManyBadRows, split_line
from tests.data.conftest import make_image


# ---- images -------------------------------------------------------------------------------------------------------
def enc(raw: bytes, urlsafe: bool = False, pad: bool = True) -> str:
    s = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode("ascii")
    return s if pad else s.rstrip("=")


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int, idat: bytes = zlib.compress(b"\0" * 16)) -> bytes:
    """A PNG whose header says w x h (its pixel data is not needed to reject it)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def real_png_over_limit() -> bytes:
    """A valid grey PNG of 9500 x 9500 = 90.25 M pixels: over MAX_IMAGE_PIXELS but under twice it, where PIL only
    warns and would decode all of it."""
    side = 9500
    z = zlib.compressobj(1)
    row = b"\0" * (side + 1)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_header(side, side, data)


def pathological() -> dict[str, bytes]:
    """Valid images that are easy to decode wrongly. All decode (no EXIF rotation, alpha dropped, ...)."""
    base = make_image(24, 16, (4, 4, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    a16 = (np.arange(24 * 16, dtype=np.uint16).reshape(16, 24) * 150)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", base.size, 0))
    return {
        "exif_rotated": save(base, "JPEG", exif=exif.tobytes()),
        "palette_transparency": save(base.convert("P"), "PNG", transparency=0),
        "16bit_grey": save(Image.fromarray(a16), "PNG"),
        "cmyk": save(base.convert("CMYK"), "JPEG"),
        "alpha": save(rgba, "PNG"),
        "grey_alpha": save(base.convert("LA"), "PNG"),
        "1x1": save(Image.new("RGB", (1, 1), (255, 0, 0))),
        "very_wide": save(Image.new("RGB", (3000, 2), (200, 10, 10))),
        "very_tall": save(Image.new("L", (1, 900), 128)),
        "gif": save(base.convert("P"), "GIF"),
        "webp": save(base, "WEBP"),
    }


def make_imgs() -> dict:
    """base64 cells: good ones, pathological but valid ones, and bad ones by name."""
    good = make_image(24, 16, (4, 4, 12, 12))
    jpeg = save(good, "JPEG", quality=90)
    patho = pathological()
    return {
        "good": enc(save(good)), "jpeg": enc(jpeg), "urlsafe_nopad": enc(jpeg, urlsafe=True, pad=False),
        "patho": {k: enc(v) for k, v in patho.items()},
        "bad": {
            "text_as_base64": enc(b"this is a caption, not an image"),
            "plain_text": "a photo of a dog",
            "truncated_jpeg": enc(jpeg[: len(jpeg) // 2]),
            "empty": "",
            "bad_padding": "abcde",
            "non_ascii": "/9j/4AAQ\u00e9SkZJRg",
            "eps": enc(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"),
            "zero_size": enc(png_header(0, 5)),
            "bomb_header": enc(png_header(20000, 20000)),
            "bomb_real": enc(real_png_over_limit()),
        },
    }


@pytest.fixture(scope="module")
def imgs():
    return make_imgs()


# ---- the mixed files ----------------------------------------------------------------------------------------------
BAD_UTF8 = b"caf\xe9 au lait"


class Rows:
    """Lines of a TSV as bytes, each marked good or bad (with the expected category)."""

    def __init__(self):
        self.lines: list[bytes] = []
        self.expect: dict[int, str] = {}   # 1-based line -> category

    def add(self, fields, bad: str = "", end: bytes = b"\n"):
        line = b"\t".join(f if isinstance(f, bytes) else str(f).encode() for f in fields) if isinstance(
            fields, (list, tuple)) else fields
        self.lines.append(line + end)
        if bad:
            assert bad in CATEGORIES, bad
            self.expect[len(self.lines)] = bad

    def write(self, path, trailing_empty: bool = True) -> str:
        if trailing_empty:
            self.add(b"", "columns")  # an empty line at the end
        with open(path, "wb") as f:
            f.write(b"".join(self.lines))
        return str(path)


def common_bad(r: Rows, good_row: list, image_col: int, imgs, text_col: int):
    """Bad rows every image task shares, made from one good row."""
    def with_(col, value):
        row = list(good_row)
        row[col] = value
        return row
    for name, value in imgs["bad"].items():
        r.add(with_(image_col, value), "image")
    r.add(with_(text_col, BAD_UTF8), "encoding")
    r.add(b"", "columns")                                                # an empty line in the middle
    r.add(b"   ", "columns")
    r.add(good_row[:-1], "columns")                                      # a column missing
    r.add(good_row + ["extra"], "columns")                               # an extra tab and column
    r.add(with_(text_col, "two\tparts"), "columns")                      # a tab inside a text column


def good_images(r: Rows, good_row: list, image_col: int, imgs):
    for value in [imgs["jpeg"], imgs["urlsafe_nopad"], *imgs["patho"].values()]:
        row = list(good_row)
        row[image_col] = value
        r.add(row)


def caption_file(tmp_path, imgs):
    r = Rows()
    g = ["c1", "101", "A red box, on white.", "box&&sky", imgs["good"]]
    r.add([b"\xef\xbb\xbfc0"] + g[1:])                                    # byte-order mark at the start: good
    r.add(g, end=b"\r\n")                                                # CRLF: good
    r.add(["c2", "102", "ref one&&ref two", "", imgs["good"]])            # eval style references, no objects: good
    good_images(r, g, 4, imgs)
    common_bad(r, g, 4, imgs, text_col=2)
    r.add(["", "101", "a box", "box", imgs["good"]], "id")
    r.add(["c3", " ", "a box", "box", imgs["good"]], "id")                # image-id: a column train does not read
    r.add(["c4", "104", "", "box", imgs["good"]], "text")
    r.add(["c5", "105", "...!", "box", imgs["good"]], "text")
    r.add(["c6", "106", "a box&&&&two", "box", imgs["good"]], "text")
    r.add(["c7", "107", "a box", "box&&&&sky", imgs["good"]], "objects")   # object labels: unread, still checked
    return r.write(tmp_path / "caption.tsv"), r.expect


def vqa_file(tmp_path, imgs):
    r = Rows()
    g = ["1", "11", "what color is the box?", "0.9|!+red&&0.3|!+pink", "box&&sky", imgs["good"]]
    r.add(g)
    r.add(["2", "12", "is it red", "1|!+yes", "", imgs["good"]])
    good_images(r, g, 5, imgs)
    common_bad(r, g, 5, imgs, text_col=2)
    for answers in ["red", "0.9|!+red&&pink", "high|!+red", "1.5|!+red", "nan|!+red", "-0.1|!+red", "1.0|!+",
                    "1.0|!+red&&", ""]:
        r.add(g[:3] + [answers] + g[4:], "answer")
    r.add(["", "11"] + g[2:], "id")
    r.add(["3", ""] + g[2:], "id")
    r.add(g[:2] + ["?"] + g[3:], "text")
    r.add(g[:4] + ["box&&"] + g[5:], "objects")
    return r.write(tmp_path / "vqa.tsv"), r.expect


def refcoco_file(tmp_path, imgs):
    r = Rows()
    g = ["r1", "11", "the red box", "4,4,12,12", imgs["good"]]
    r.add(g)
    r.add(g[:3] + ["0,0,24.8,16.9"] + g[4:])          # within the 1-pixel tolerance: good, bins clamped
    wide = imgs["patho"]["very_wide"]
    r.add(["r2", "12", "the strip", "0,0,3000,2", wide])
    good_images(r, ["r3", "13", "the image", "0,0,1,1", ""], 4, imgs)
    common_bad(r, g, 4, imgs, text_col=2)
    for box in ["4,4,12", "12,4,4,12", "-1,0,4,4", "a,b,c,d", "nan,0,4,4", "0,0,40,12", ""]:
        r.add(g[:3] + [box] + g[4:], "box")
    r.add(["r4", "11", "", "4,4,12,12", imgs["good"]], "text")
    r.add(["", "11", "x", "4,4,12,12", imgs["good"]], "id")
    r.add(["r5", "", "x", "4,4,12,12", imgs["good"]], "id")
    return r.write(tmp_path / "refcoco.tsv"), r.expect


def snli_file(tmp_path, imgs):
    r = Rows()
    g = ["s1#0", "11", imgs["good"], "a box is red.", "a red box on white.", "entailment"]
    r.add(g)
    good_images(r, g, 2, imgs)
    common_bad(r, g, 2, imgs, text_col=3)
    for label in ["unsure", "", "Entailment"]:
        r.add(g[:5] + [label], "label")
    r.add(g[:3] + [""] + g[4:], "text")
    r.add(g[:4] + [" "] + g[5:], "text")
    r.add(["s2", ""] + g[2:], "id")
    return r.write(tmp_path / "snli_ve.tsv"), r.expect


def imagenet_file(tmp_path, imgs):
    r = Rows()
    g = [imgs["urlsafe_nopad"], "769", "rugby ball"]
    r.add(g)
    good_images(r, g, 0, imgs)
    common_bad(r, g, 0, imgs, text_col=2)
    for label in ["0", "-3", "cat", "1.5", "", "7e2"]:
        r.add([g[0], label, g[2]], "label")
    r.add([g[0], "769", "rugby\tball"], "columns")
    r.add([g[0], "769", " "], "text")
    return r.write(tmp_path / "imagenet.tsv"), r.expect


def text_file(tmp_path, name, good: list, bad_rows: list):
    r = Rows()
    r.add(good)
    r.add(good, end=b"\r\n")
    for row, cat in bad_rows:
        r.add(row, cat)
    r.add(b"", "columns")
    r.add(good[:-1], "columns")
    r.add(good + ["x"], "columns")
    r.add([good[0] if isinstance(good[0], bytes) else BAD_UTF8] + good[1:], "encoding")
    return r.write(tmp_path / f"{name}.tsv"), r.expect


GLUE_GOOD = {"cola": ["gj04", "the book is red", "1"], "sst2": ["it is great", "1"],
             "mrpc": ["s one", "s two", "1"], "qqp": ["0", "1", "2", "q one?", "q two?", "1"],
             "mnli": ["a b", "c d", "2"], "rte": ["0", "a", "b", "not_entailment"],
             "qnli": ["0", "what?", "It is.", "entailment"]}


# ---- the checks ---------------------------------------------------------------------------------------------------
def validated(task, path, **kw):
    buf = io.StringIO()
    rows, bad = validate(task, path, stream=buf, **kw)
    got = {}
    for line in buf.getvalue().splitlines():
        m = re.match(re.escape(path) + r":(\d+): .* \[(\w+)\]$", line)
        if m:
            got[int(m.group(1))] = m.group(2)
    assert len(got) == bad, buf.getvalue()
    return got, buf.getvalue()


def streamed(cfg, split="train", tok=None, epochs=1):
    """Run the loader; returns ({path: {line}}, counter, batches) of what it skipped."""
    s = DataStream(cfg, split, tokenizer=tok)
    batches = []
    for _ in range(epochs):
        batches += list(s)
    skipped: dict[str, set] = {}
    for where in s.counter.seen:
        path, line = where.rsplit(":", 1)
        skipped.setdefault(path, set()).add(int(line))
    return skipped, s.counter, batches


def loose(task, path, **kw):
    kw.setdefault("patch_image_size", 16)
    return DataConfig(task=task, data=path, batch_size=4, shuffle=False, equalize_shards=False,
                      bad_row_threshold=1.0, **kw)


@pytest.mark.parametrize("task,make_file,splits", [
    ("caption", caption_file, ("train", "valid")), ("vqa", vqa_file, ("train",)),
    ("refcoco", refcoco_file, ("train",)), ("snli_ve", snli_file, ("valid",)),
    ("imagenet", imagenet_file, ("train", "valid"))])
def test_validate_reports_exactly_what_the_loader_skips(tmp_path, imgs, tok, task, make_file, splits):
    path, expect = make_file(tmp_path, imgs)
    got, _ = validated(task, path)
    assert got == expect
    n_rows = sum(1 for _ in open(path, "rb"))
    for split in splits:
        extra = {"max_image_size": 16} if task == "refcoco" else {}
        skipped, counter, batches = streamed(loose(task, path, **extra), split, tok)
        assert skipped == {path: set(expect)}, split
        assert counter.bad == len(expect) and counter.rows == n_rows
        assert counter.reasons == Counter(expect.values())
        assert sum(len(b["id"]) for b in batches) == n_rows - len(expect)


@pytest.mark.parametrize("name", sorted(GLUE_GOOD))
def test_glue_rows(tmp_path, tok, name):
    good = GLUE_GOOD[name]
    bad = [(good[:-1] + ["maybe_not"], "label"), (good[:-1] + [""], "label"),
           ([(" " if i == len(good) - 2 else v) for i, v in enumerate(good)], "text")]
    path, expect = text_file(tmp_path, name, good, bad)
    got, _ = validated(name, path)
    assert got == expect
    skipped, counter, _ = streamed(loose(name, path), "train", tok)
    assert skipped == {path: set(expect)} and counter.reasons["label"] == 2


@pytest.mark.parametrize("task,good,bad", [
    ("gigaword", ["factory orders rose #.# percent in <unk>", "orders up"],
     [(["", "orders up"], "text"), (["factory orders", "..."], "text")]),
    ("image_gen", ["1", "6674 4336 0 8191", "people posing for a photo"],
     [(["2", "1 2 x", "a photo"], "codes"), (["3", "8192", "a photo"], "codes"), (["4", "", "a photo"], "codes"),
      (["5", "1 2", " "], "text"), (["", "1 2", "a photo"], "id")]),
])
def test_text_tasks(tmp_path, tok, task, good, bad):
    path, expect = text_file(tmp_path, task, good, bad)
    got, _ = validated(task, path)
    assert got == expect
    skipped, _, _ = streamed(loose(task, path), "train", tok)
    assert skipped == {path: set(expect)}


def pretrain_files(tmp_path, imgs):
    g, wide = imgs["good"], imgs["patho"]["very_wide"]
    vl = Rows()
    vl.add(["c1", g, "a red box on white", "", "", "box", "coco", "caption"])
    vl.add(["q1", g, "", "what color is it?", "0.9|!+red&&0.1|!+pink", "", "vqa", "qa"])
    vl.add(["g1", g, "the red box", "", "4,4,12,12", "box", "refcoco", "visual_grounding"])
    vl.add(["g2", wide, "the strip", "", "0,0,3000,2", "", "refcoco", "visual_grounding"])
    good_images(vl, ["c2", "", "a picture", "", "", "", "cc12m", "caption"], 1, imgs)
    common_bad(vl, ["c1", g, "a red box on white", "", "", "box", "coco", "caption"], 1, imgs, text_col=2)
    vl.add(["x1", g, "a box", "", "", "", "coco", "captions"], "text")
    vl.add(["x2", g, "a box", "", "", "", "", "caption"], "text")
    vl.add(["x3", g, "", "", "", "", "coco", "caption"], "text")
    vl.add(["x4", g, "", "what?", "red", "", "vqa", "qa"], "answer")
    vl.add(["x5", g, "", "", "1.0|!+red", "", "vqa", "qa"], "text")
    vl.add(["x6", g, "the box", "", "0,0,30,12", "", "refcoco", "visual_grounding"], "box")
    vl.add(["x7", g, "the box", "", "4,4", "", "refcoco", "visual_grounding"], "box")
    vl.add(["x8", g, "a box", "", "", "box&&", "coco", "caption"], "objects")
    vl.add(["", g, "a box", "", "", "", "coco", "caption"], "id")
    codes = " ".join(str(i % 8192) for i in range(64))
    txt = Rows()
    txt.add(["t1", "The quick brown fox jumps over the lazy dog"])
    txt.add(["t2", " "], "text")
    txt.add(["t3", "a", "b"], "columns")
    txt.add(["", "text"], "id")
    txt.add(["t4", BAD_UTF8], "encoding")
    im = Rows()
    im.add(["i1", g, codes])
    im.add(["i2", imgs["patho"]["1x1"], codes])
    im.add(["i3", g, "1 2 99999"], "codes")
    im.add(["i4", imgs["bad"]["truncated_jpeg"], codes], "image")
    det = Rows()
    det.add(["d1", g, "4,4,12,12,1,red box&&0,0,2,2,2,dot"])
    det.add(["d2", wide, "0,0,100,2,3,strip"])                        # large-scale jitter of a 2 px high image
    det.add(["d3", g, "4,4,12,12,x,red box"], "box")
    det.add(["d4", g, "4,4,12,12,1"], "box")
    det.add(["d5", g, "4,4,12,12,1, "], "box")
    det.add(["d6", g, "4,4,40,12,1,red box"], "box")
    det.add(["d7", g, ""], "box")
    files = {"data": vl.write(tmp_path / "vl.tsv"), "text_data": txt.write(tmp_path / "text.tsv"),
             "image_data": im.write(tmp_path / "image.tsv"), "detection_data": det.write(tmp_path / "det.tsv")}
    expect = {"data": vl.expect, "text_data": txt.expect, "image_data": im.expect, "detection_data": det.expect}
    return files, expect


def test_pretraining_files(tmp_path, imgs, tok):
    files, expect = pretrain_files(tmp_path, imgs)
    kinds = {"data": "pretrain_vl", "text_data": "pretrain_text", "image_data": "pretrain_image",
             "detection_data": "pretrain_detection"}
    for key, kind in kinds.items():
        got, _ = validated(kind, files[key])
        assert got == expect[key], kind
    neg = tmp_path / "neg"
    neg.mkdir()
    (neg / "all_captions.txt").write_text("a green circle\n")
    (neg / "object.txt").write_text("circle\nbox\n")
    (neg / "type2ans.json").write_text(json.dumps({"color": ["red", "green"], "other": ["red", "x"]}))
    cfg = DataConfig(task="pretrain", batch_size=8, shuffle=False, equalize_shards=False, bad_row_threshold=1.0,
                     patch_image_size=16, v2_image_size=16, neg_sample_dir=str(neg), **files)
    skipped, _, _ = streamed(cfg, "train", tok, epochs=2)   # 2 epochs: every extras row is read at least once
    assert skipped == {files[k]: set(v) for k, v in expect.items()}


def one_per_category(imgs) -> dict:
    """category -> (task, a good row, the same row made bad in that way)."""
    g = imgs["good"]
    cap = ["c1", "1", "a red box", "box", g]
    vqa = ["1", "1", "what color?", "1.0|!+red", "", g]
    ref = ["r1", "1", "the box", "4,4,12,12", g]
    return {
        "encoding": ("caption", cap, [cap[0], cap[1], BAD_UTF8, cap[3], cap[4]]),
        "columns": ("caption", cap, cap + [""]),
        "id": ("caption", cap, ["", *cap[1:]]),
        "text": ("vqa", vqa, [*vqa[:2], "?", *vqa[3:]]),
        "objects": ("caption", cap, [*cap[:3], "box&&", cap[4]]),
        "answer": ("vqa", vqa, [*vqa[:3], "red", *vqa[4:]]),
        "label": ("imagenet", [g, "3", "box"], [g, "0", "box"]),
        "box": ("refcoco", ref, [*ref[:3], "4,4,40,12", g]),
        "codes": ("image_gen", ["1", "1 2", "a box"], ["1", "1 x", "a box"]),
        "image": ("caption", cap, [*cap[:4], imgs["bad"]["truncated_jpeg"]]),
    }


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_each_category(tmp_path, imgs, tok, category):
    task, good, bad = one_per_category(imgs)[category]
    r = Rows()
    r.add(good)
    r.add(bad, category)
    path = r.write(tmp_path / f"{category}.tsv", trailing_empty=False)
    got, _ = validated(task, path)
    assert got == {2: category}
    skipped, counter, _ = streamed(loose(task, path), "train", tok)
    assert skipped == {path: {2}} and counter.reasons == {category: 1}


def test_good_rows_decode_the_same_in_both_paths(tmp_path, imgs, tok):
    path, expect = caption_file(tmp_path, imgs)
    cfg = loose("caption", path, patch_image_size=8)
    task = make_task(cfg, "valid", tok)
    parsed = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i + 1 not in expect:
                parsed[i] = task.read(split_line(raw, first=i == 0))   # what validate runs
    _, _, batches = streamed(cfg, "valid", tok)
    seen = 0
    for b in batches:
        for k, rid in enumerate(b["id"].tolist()):
            assert np.array_equal(b["patch_images"][k].numpy(), task.square_image(parsed[rid][1]))
            seen += 1
    assert seen == len(parsed)
    p = {k: decode_image(base64.b64decode(v)) for k, v in imgs["patho"].items()}
    assert all(im.mode == "RGB" for im in p.values())
    assert p["exif_rotated"].size == (24, 16)                 # stored pixels, no EXIF rotation (as OFA)
    assert p["1x1"].getpixel((0, 0)) == (255, 0, 0) and p["very_wide"].size == (3000, 2)
    assert p["alpha"].getpixel((8, 8))[0] > 200               # alpha dropped, not composited
    assert decode_base64_image(imgs["urlsafe_nopad"]).size == (24, 16)


def test_pixel_limit_is_a_quick_bad_row(tmp_path, imgs):
    for name in ("bomb_header", "bomb_real"):
        t0 = time.time()
        with pytest.raises(BadRow, match=f"pixels is over the {MAX_IMAGE_PIXELS}-pixel limit") as e:
            decode_base64_image(imgs["bad"][name])
        assert e.value.category == "image" and time.time() - t0 < 2.0, name
    r = Rows()
    for name in ("bomb_header", "bomb_real"):
        r.add(["1", "2", "a box", "", imgs["bad"][name]], "image")
    path = r.write(tmp_path / "bombs.tsv", trailing_empty=False)
    t0 = time.time()
    got, out = validated("caption", path)
    assert got == {1: "image", 2: "image"} and time.time() - t0 < 2.0
    assert f"{path}:2: image of 9500x9500 = 90250000 pixels is over the" in out


def test_zero_size_guard(monkeypatch):
    from ofa_ds.data import images
    empty = Image.new("RGB", (0, 5))
    empty.format = "PNG"
    monkeypatch.setattr(images.Image, "open", lambda fp: empty)
    with pytest.raises(BadRow, match=r"zero size \(0x5\)"):
        decode_image(b"whatever")


def test_threshold_names_file_and_share(tmp_path, imgs, tok):
    path, expect = vqa_file(tmp_path, imgs)
    s = DataStream(DataConfig(task="vqa", data=path, batch_size=4, shuffle=False, patch_image_size=16,
                              bad_row_threshold=0.01), tokenizer=tok)
    s.counter.min_rows = 10
    with pytest.raises(TooManyBadRows) as e:
        list(s)
    assert isinstance(e.value, RuntimeError) and e.value.where.startswith(f"{path}:")
    assert str(e.value).startswith("too many bad rows: ") and f"last one {e.value.where}: " in str(e.value)
    assert f"({e.value.share:.2%})" in str(e.value) and "\n" not in str(e.value)
    assert sum(e.value.reasons.values()) == s.counter.bad


def test_counter_reasons_and_pickling():
    c = BadRowCounter(0.5, min_rows=1000)
    c.ok(10)
    c.report("f.tsv:3", "undecodable image (x)", "image")
    c.report("f.tsv:4", "empty line", "columns")
    c.report("f.tsv:3", "undecodable image (x)", "image")
    assert c.bad == 3 and c.rows == 13 and c.reasons == {"image": 2, "columns": 1}
    assert c.by_reason() == "image 2, columns 1" and c.seen == {"f.tsv:3", "f.tsv:4"}
    e = pickle.loads(pickle.dumps(BadRow("bad box '1'", "box")))
    assert str(e) == "bad box '1'" and e.category == "box"
    t = pickle.loads(pickle.dumps(TooManyBadRows("m", "f.tsv:3", 0.2, c.reasons)))
    assert (str(t), t.where, t.share, t.reasons) == ("m", "f.tsv:3", 0.2, c.reasons)


def test_split_line():
    assert split_line(b"\xef\xbb\xbfa\tb\r\n", first=True) == ["a", "b"]
    assert split_line(b"\xef\xbb\xbfa\tb\n") == ["\ufeffa", "b"]
    assert split_line(b"a\t\n") == ["a", ""] and split_line(b"") == [""]
    with pytest.raises(BadRow, match="not UTF-8 \\(byte 0xe9 at offset 3") as e:
        split_line(BAD_UTF8)
    assert e.value.category == "encoding"


def test_cli_output(tmp_path, imgs, capsys):
    path, expect = imagenet_file(tmp_path, imgs)
    assert main(["validate", "--task", "imagenet", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(expect) + 2
    assert out[-2] == f"{path}: {sum(1 for _ in open(path, 'rb'))} rows, {len(expect)} bad"
    assert out[-1].startswith(f"{path}: bad rows by reason: image 10, columns 7, label 6, encoding 1")
