"""Built-in synthetic multitask dataset (the zero-setup default), written in the *official* TSV formats.

Scenes are 1-4 coloured shapes on a pale background, each in its own cell of a 2x2 grid (jittered), with every
colour and every kind used at most once per scene, so that captions, questions and referring expressions are
unambiguous and learnable. Ground truth:
* captions "a red circle and a blue square" (objects left to right; eval rows carry two '&&' references);
* VQA, one question per row, question type uniform over colour / shape / count / left-right, so the most frequent
  answer stays near 1/8 of the rows (vqa_answers.json holds answer -> label, like trainval_ans2label.pkl);
* referring expressions with the exact drawn box; SNLI-VE hypotheses balanced over yes / no / maybe;
* image codes from a deterministic quantiser of the central 128x128 region: 16x16 grid of 8x8 patches, mean colour
  quantised to 5+4+4 bits = 8192 codes (there is no VQGAN here).
Two worlds are used: `generate`'s defaults (1-4 objects; what `python -m ofa_ds.data synthetic` writes) and
DEFAULT_RUN_WORLD, which the zero-setup default run writes when its data folder is missing: one large shape per
scene and no count questions, because with 1-4 objects OFA-Tiny does not learn colour or shape within the run's
10 CPU minutes (docs/experiments.md).
Images are written at `image_size` (default 256) px; the task builders resize them to whatever the run uses.
Everything is a function of (seed, split, scene index), so two runs with the same seed write identical files.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .images import encode_base64_image

COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30),
          "purple": (135, 55, 170), "orange": (240, 130, 25)}
KINDS = ["circle", "square", "triangle", "diamond"]
BACKGROUNDS = [(245, 245, 245), (225, 225, 225), (240, 232, 215), (220, 232, 242), (228, 240, 226), (242, 226, 232)]
NEUTRAL = ["made of wood", "made of plastic", "very heavy", "brand new", "hot", "expensive"]
SIZES = {"tiny": (24, 8, 2), "small": (1200, 200, 3), "medium": (6000, 500, 3)}  # train scenes, valid scenes, q/scene


@dataclass
class Obj:
    color: str
    kind: str
    box: tuple[int, int, int, int]
    cell: tuple[int, int]  # (row, col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def a_name(self) -> str:
        return ("an " if self.color[0] in "aeiou" else "a ") + self.name


def draw_scene(rng: np.random.Generator, size: int = 256, max_objects: int = 4,
               object_size: tuple[float, float] = (0.16, 0.36)) -> tuple[Image.Image, list[Obj]]:
    """One scene of 1..max_objects shapes, sorted left to right; `object_size` is the side range as a fraction of
    the image (at most 0.44: objects stay inside their 2x2-grid cell)."""
    if not 0.05 <= object_size[0] <= object_size[1] <= 0.44:
        raise ValueError(f"object_size must satisfy 0.05 <= low <= high <= 0.44, got {object_size}")
    n = int(rng.integers(1, max_objects + 1))
    cells = [(r, c) for r in range(2) for c in range(2)]
    chosen = [cells[i] for i in rng.permutation(4)[:n]]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:n]]
    kinds = [KINDS[i] for i in rng.permutation(len(KINDS))[:n]]
    img = _background(rng, size)
    d = ImageDraw.Draw(img)
    half = size // 2
    objs = []
    for (r, c), col, kind in zip(chosen, colors, kinds):
        s = min(int(rng.integers(int(size * object_size[0]), int(size * object_size[1]))), half - 8)
        x0 = c * half + int(rng.integers(4, half - s - 3))
        y0 = r * half + int(rng.integers(4, half - s - 3))
        objs.append(Obj(col, kind, _draw(d, kind, x0, y0, s, COLORS[col]), (r, c)))
    objs.sort(key=lambda o: (o.box[0] + o.box[2], o.box[1]))
    return img, objs


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """One of BACKGROUNDS with a vertical gradient of +-12 levels, brightening downwards or upwards."""
    bg = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    grad = np.linspace(-12, 12, size, dtype=np.float32)[:, None, None] * (1 if rng.random() < 0.5 else -1)
    return Image.fromarray(np.clip(bg[None, None, :] + grad + np.zeros((size, size, 3), np.float32), 0, 255)
                           .astype(np.uint8))


def _draw(d: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, s: int, fill) -> tuple[int, int, int, int]:
    """Draw one shape of side s at (x0, y0); returns its box (x0, y0, x1, y1), end-exclusive."""
    x1, y1 = x0 + s, y0 + s
    if kind == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "triangle":
        d.polygon([(x0 + s / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x1, y0 + s / 2), (x0 + s / 2, y1), (x0, y0 + s / 2)], fill=fill)
    return x0, y0, x1 + 1, y1 + 1


def caption_of(objs: list[Obj], reverse: bool = False) -> str:
    names = [o.a_name for o in (objs[::-1] if reverse else objs)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


QUESTION_TYPES = ("color", "shape", "count", "position")
# What the default run (`deepspeed launch/pretrain.py`) generates when its data folder is missing: one shape per
# scene filling most of its grid cell, questions about its colour, shape and side (count would always be "1").
DEFAULT_RUN_WORLD = {"max_objects": 1, "object_size": (0.34, 0.44), "vqa_types": ("color", "shape", "position")}


def world_differences(manifest: dict) -> dict:
    """The DEFAULT_RUN_WORLD settings that a manifest.json's content does not match, with the manifest's values
    (tuples compare equal to the manifest's JSON lists)."""
    return {k: manifest.get(k) for k, v in DEFAULT_RUN_WORLD.items()
            if manifest.get(k) != (list(v) if isinstance(v, tuple) else v)}


def question_of(objs: list[Obj], rng: np.random.Generator, types=QUESTION_TYPES) -> tuple[str, str, str]:
    """(question, answer, answer type) about one random object, with the type drawn uniformly from `types`."""
    qt = types[int(rng.integers(len(types)))]
    if qt not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qt!r}; known: {QUESTION_TYPES}")
    o = objs[int(rng.integers(len(objs)))]
    if qt == "color":
        return f"what color is the {o.kind}?", o.color, "color"
    if qt == "shape":
        return f"what shape is the {o.color} object?", o.kind, "shape"
    if qt == "count":
        return "how many shapes are there?", str(len(objs)), "how many"
    return f"is the {o.name} on the left or the right?", ("left" if o.cell[1] == 0 else "right"), "position"


def expression_of(o: Obj, rng: np.random.Generator) -> str:
    k = int(rng.integers(4))
    if k == 0:
        return f"the {o.name}"
    if k == 1:
        return f"the {o.kind}"
    if k == 2:
        return f"the {o.color} object"
    return f"the {o.kind} at the {'top' if o.cell[0] == 0 else 'bottom'} {'left' if o.cell[1] == 0 else 'right'}"


def hypothesis_of(objs: list[Obj], rng: np.random.Generator) -> tuple[str, str]:
    label = ["entailment", "contradiction", "neutral"][int(rng.integers(3))]
    o = objs[int(rng.integers(len(objs)))]
    if label == "entailment":
        return (f"there is {o.a_name}." if rng.random() < 0.6 else f"there are {len(objs)} shapes."), label
    if label == "contradiction":
        if rng.random() < 0.6:
            wrong = [c for c in COLORS if c != o.color]
            c = wrong[int(rng.integers(len(wrong)))]
            return f"there is {'an' if c[0] in 'aeiou' else 'a'} {c} {o.kind}.", label
        m = [k for k in range(1, 6) if k != len(objs)]
        return f"there are {m[int(rng.integers(len(m)))]} shapes.", label
    return f"the {o.name} is {NEUTRAL[int(rng.integers(len(NEUTRAL)))]}.", label


def image_codes(img: Image.Image) -> list[int]:
    """Deterministic 'VQGAN': the central half of the image at 128 px, 16x16 patches, mean RGB -> 13-bit code."""
    w, h = img.size
    centre = img.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).resize((128, 128), Image.BICUBIC)
    a = np.asarray(centre, dtype=np.float32).reshape(16, 8, 16, 8, 3).mean(axis=(1, 3))
    q = np.clip(a, 0, 255).astype(np.int64)
    return ((q[..., 0] >> 3) << 8 | (q[..., 1] >> 4) << 4 | (q[..., 2] >> 4)).reshape(-1).tolist()


def _scene(seed: int, split: str, i: int, size: int, max_objects: int = 4, object_size=(0.16, 0.36)):
    rng = np.random.default_rng([seed, {"train": 1, "valid": 2}[split], i])
    img, objs = draw_scene(rng, size, max_objects, tuple(object_size))
    return rng, img, objs, encode_base64_image(img, quality=90)


def generate(out: str, seed: int = 1, size: str = "small", image_size: int = 256, max_objects: int = 4,
             vqa_types=QUESTION_TYPES, object_size: tuple[float, float] = (0.16, 0.36)) -> dict:
    """Write the dataset into `out`; returns the manifest (also written as manifest.json).
    `max_objects` (1-4), `object_size` (draw_scene's) and `vqa_types` (a subset of QUESTION_TYPES, used by the VQA
    files and the pretraining file's qa rows) choose the world; DEFAULT_RUN_WORLD is the default run's."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    if not 1 <= max_objects <= 4 or not vqa_types or set(vqa_types) - set(QUESTION_TYPES):
        raise ValueError(f"max_objects must be 1..4 and vqa_types a subset of {QUESTION_TYPES}")
    t0 = time.time()
    n_train, n_valid, q_per = SIZES[size]
    dirs = {k: os.path.join(out, k) for k in ("pretrain", "caption", "vqa", "refcoco", "snli_ve")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    neg_dir = os.path.join(dirs["pretrain"], "negative_sample")
    os.makedirs(neg_dir, exist_ok=True)
    P = lambda k, f: os.path.join(dirs[k], f)  # noqa: E731
    files = {
        "caption_train": P("caption", "caption_stage1_train.tsv"), "caption_valid": P("caption", "caption_val.tsv"),
        "vqa_train": P("vqa", "vqa_train.tsv"), "vqa_valid": P("vqa", "vqa_val.tsv"),
        "refcoco_train": P("refcoco", "refcoco_train.tsv"), "refcoco_valid": P("refcoco", "refcoco_val.tsv"),
        "snli_ve_train": P("snli_ve", "snli_ve_train.tsv"), "snli_ve_valid": P("snli_ve", "snli_ve_dev.tsv"),
        "vision_language": P("pretrain", "vision_language_examples.tsv"),
        "text": P("pretrain", "text_examples.tsv"), "image": P("pretrain", "image_examples.tsv"),
        "detection": P("pretrain", "detection_examples.tsv"),
    }
    fh = {k: open(v, "w", encoding="utf-8", newline="\n") for k, v in files.items()}
    answers: dict[str, str] = {}  # VQA-file answers -> type (vqa_answers.json)
    all_answers: dict[str, str] = {}  # + pretraining qa answers (type2ans.json)
    captions: list[str] = []
    counts = {k: 0 for k in files}

    def w(key: str, *cols) -> None:
        fh[key].write("\t".join(str(c) for c in cols) + "\n")
        counts[key] += 1

    try:
        for split, n in (("train", n_train), ("valid", n_valid)):
            for i in range(n):
                rng, img, objs, b64 = _scene(seed, split, i, image_size, max_objects, object_size)
                sid = f"{split}{i}"
                iid = (0 if split == "train" else 10_000_000) + i
                cap = caption_of(objs)
                kinds = "&&".join(o.kind for o in objs)
                if split == "train":
                    w("caption_train", sid, iid, cap, kinds, b64)
                else:
                    w("caption_valid", sid, iid, cap + "&&" + caption_of(objs, reverse=True), kinds, b64)
                for k in range(q_per if split == "train" else 2):
                    q, a, at = question_of(objs, rng, vqa_types)
                    answers.setdefault(a, at)
                    w(f"vqa_{split}", f"{sid}_{k}", iid, q, f"1.0|!+{a}", kinds, b64)
                for k in range(2):
                    o = objs[int(rng.integers(len(objs)))]
                    w(f"refcoco_{split}", f"{sid}_{k}", iid, expression_of(o, rng), ",".join(map(str, o.box)), b64)
                for k in range(2):
                    hyp, lab = hypothesis_of(objs, rng)
                    w(f"snli_ve_{split}", f"{sid}_{k}", iid, b64, hyp, cap, lab)
                if split != "train":
                    continue
                captions.append(cap)
                gt = "&&".join(o.kind for o in objs)
                w("vision_language", f"{sid}_c", b64, cap, "", "", gt, "synthetic", "caption")
                q, a, at = question_of(objs, rng, vqa_types)
                all_answers.setdefault(a, at)
                w("vision_language", f"{sid}_q", b64, cap, q, f"1.0|!+{a}", gt, "synthetic", "qa")
                o = objs[int(rng.integers(len(objs)))]
                w("vision_language", f"{sid}_g", b64, expression_of(o, rng), "", ",".join(map(str, o.box)),
                  o.kind, "synthetic", "visual_grounding")
                w("text", f"{sid}_t", cap + ". " + " ".join(f"the {o.name} is on the "
                                                             f"{'left' if o.cell[1] == 0 else 'right'}."
                                                             for o in objs))
                w("image", f"{sid}_i", b64, " ".join(map(str, image_codes(img))))
                w("detection", f"{sid}_d", b64, "&&".join(
                    f"{o.box[0]},{o.box[1]},{o.box[2]},{o.box[3]},{KINDS.index(o.kind) + 1},{o.kind}" for o in objs))
    finally:
        for f in fh.values():
            f.close()
    with open(os.path.join(neg_dir, "all_captions.txt"), "w") as f:
        f.write("\n".join(sorted(set(captions))) + "\n")
    with open(os.path.join(neg_dir, "object.txt"), "w") as f:
        f.write("\n".join(KINDS) + "\n")
    all_answers.update(answers)
    type2ans: dict[str, list[str]] = {}
    for a, t in sorted(all_answers.items()):
        type2ans.setdefault(t, []).append(a)
    type2ans["other"] = sorted(all_answers)
    with open(os.path.join(neg_dir, "type2ans.json"), "w") as f:
        json.dump(type2ans, f, indent=1, sort_keys=True)
    ans_file = os.path.join(dirs["vqa"], "vqa_answers.json")
    with open(ans_file, "w") as f:
        json.dump({a: i for i, a in enumerate(sorted(answers))}, f, indent=1)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    # vl_qa_rows / plain / closeup: the fixed values of switches that earlier versions had, kept so that manifests
    # stay comparable across versions
    manifest = {
        "seed": seed, "size": size, "image_size": image_size, "max_objects": max_objects,
        "vqa_types": list(vqa_types), "train_scenes": n_train, "vl_qa_rows": 1,
        "object_size": list(object_size), "plain": False, "closeup": 0.0, "seconds": round(time.time() - t0, 2),
        "rows": {k: counts[k] for k in files}, "files": {k: rel(v) for k, v in files.items()},
        "vqa_answers": rel(ans_file), "negative_sample": rel(neg_dir),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def data_config(root: str, task: str, **overrides):
    """A DataConfig pointing at the synthetic files of `task` under `root` (train file, then valid file)."""
    from .config import DataConfig
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    paths = {
        "caption": (j("caption", "caption_stage1_train.tsv"), j("caption", "caption_val.tsv")),
        "vqa": (j("vqa", "vqa_train.tsv"), j("vqa", "vqa_val.tsv")),
        "refcoco": (j("refcoco", "refcoco_train.tsv"), j("refcoco", "refcoco_val.tsv")),
        "snli_ve": (j("snli_ve", "snli_ve_train.tsv"), j("snli_ve", "snli_ve_dev.tsv")),
    }
    if task == "pretrain":
        kw = dict(task="pretrain", data=j("pretrain", "vision_language_examples.tsv"),
                  text_data=j("pretrain", "text_examples.tsv"), image_data=j("pretrain", "image_examples.tsv"),
                  detection_data=j("pretrain", "detection_examples.tsv"),
                  neg_sample_dir=j("pretrain", "negative_sample"))
    elif task in paths:
        kw = dict(task=task, data=",".join(paths[task]))
        if task == "vqa":
            kw["ans2label_file"] = j("vqa", "vqa_answers.json")
    else:
        raise ValueError(f"the synthetic dataset has no files for task {task!r}")
    kw.update(overrides)
    return DataConfig(**kw)
