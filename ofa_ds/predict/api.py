"""`Predictor`: one OFA checkpoint answering every task, with OFA's prompts and decoding settings as defaults.

    p = Predictor("ofa_base.pt")                          # official .pt, exported folder, or a run's checkpoint
    p.caption("cat.jpg").text
    p.vqa(["a.jpg", pil_image], "what color is the car?")  # one question for every image, or one per image
    p.ground("street.jpg", "the man in red").box           # (x0, y0, x1, y1) in the input image's pixels

Every task method takes one input or a list (or any iterable) of them and returns one `Prediction` or a list;
`predict(task, requests)` is the streaming form behind them (and the CLI): it reads the requests lazily, one batch of
`batch_size` at a time, so a list of 1,000 paths never holds more than one batch of decoded images, and yields the
records in input order. A bad input (missing file, unreadable image, empty question) becomes a record with `error`
set to a one-line reason; the other inputs go on.

Records are plain dataclasses: `text` (caption, answer, class, summary), `score` (see ofa_ds.predict.tasks),
`box` (grounding), `error`, `input` (the path or a name like "<PIL image #3>") and `id` (a request's own id).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from .inputs import InputError, describe, need
from .loading import load_model, pick_device, pick_dtype, vocabulary
from .tasks import ALIASES, SPECS, Spec


@dataclass
class Prediction:
    """The answer to one input."""

    input: str
    """What was asked about: the image path, "<PIL image #i>", "<text #i>", or the name the caller gave."""
    text: Optional[str] = None
    """Caption, answer, class name, entailment answer (yes / no / maybe) or summary; None for grounding."""
    score: Optional[float] = None
    """Generation: the best hypothesis' length-normalised log-prob; candidate scoring: the chosen one's log-prob."""
    box: Optional[list[float]] = None
    """Grounding: (x0, y0, x1, y1) in pixels of the input image (after its EXIF rotation)."""
    error: Optional[str] = None
    """Why there is no answer (one line), or None."""
    id: Any = None
    """The request's own "id", when it had one."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass
class ImagesPrediction:
    """The images generated for one caption (text-to-image), best first."""

    input: str
    """The caption's name: "<text #i>" or the name the caller gave."""
    text: Optional[str] = None
    """The caption as given."""
    images: list = dataclasses.field(default_factory=list)
    """`ofa_ds.text_to_image.GeneratedImage`s: `.image` (PIL RGB, 256 x 256 for OFA's 32 x 32 code grid),
    `.score` (CLIP cosine similarity with the caption, None without CLIP), `.codes` (the VQGAN codes, row-major)."""
    error: Optional[str] = None
    """Why there are no images (one line), or None."""
    id: Any = None
    """The request's own "id", when it had one."""
    files: list = dataclasses.field(default_factory=list)
    """Where the images were written (the CLI's --out-dir); empty otherwise."""

    @property
    def score(self) -> Optional[float]:
        """The best image's CLIP score (None without CLIP or without images)."""
        return self.images[0].score if self.images else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the images as their files and scores (pixels and codes are left out)."""
        return {"input": self.input, "text": self.text, "score": self.score,
                "scores": [g.score for g in self.images], "files": list(self.files), "error": self.error,
                "id": self.id}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


Inputs = Union[Any, Iterable[Any]]


def _is_many(x: Any) -> bool:
    """A list/tuple/iterator of inputs, as opposed to one input (a path, a PIL image, an array, a text)."""
    import numpy as np
    from PIL import Image
    return not isinstance(x, (str, bytes, os.PathLike, Image.Image, np.ndarray, dict)) and hasattr(x, "__iter__")


class Predictor:
    """Load a checkpoint once; answer any task. `device`: 'auto' (CUDA when present), 'cpu', 'cuda:1', ...;
    `dtype`: 'auto' (fp16 on CUDA, fp32 on CPU), 'fp32', 'fp16', 'bf16'. `checkpoint` may also be an OFAModel
    (used as it is, moved to the device and dtype).
    `image_size` replaces each task's image side (480; 512 for grounding); `exif=False` keeps images as stored."""

    def __init__(self, checkpoint: Any, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 image_size: Optional[int] = None, ema: bool = False, preset: Optional[str] = None,
                 exif: bool = True):
        from ofa_ds.tokenizer import get_tokenizer
        if isinstance(checkpoint, torch.nn.Module):
            model, self.checkpoint = checkpoint, None
        else:
            self.checkpoint = os.fspath(checkpoint)
            model = load_model(self.checkpoint, ema=ema, preset_name=preset)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.lang = vocabulary(self.model)
        self.tok = get_tokenizer(self.lang)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.image_size, self.exif = batch_size, image_size, exif
        self._cache: dict = {}                       # VQGAN / CLIP models loaded from files, by path

    # ---- the tasks ---------------------------------------------------------------------------------------------------
    def caption(self, images: Inputs, **gen: Any):
        """What the image shows (OFA's caption prompt, beam 5, at most 16 tokens, no repeated trigrams)."""
        return self._answer("caption", images, {}, gen)

    def vqa(self, images: Inputs, questions: Union[str, Iterable[str]], answers: Optional[Iterable[str]] = None,
            zero_shot: bool = False, **gen: Any):
        """Answer a question per image (one question is asked of every image). Open-ended beam search by
        default; with `answers` the best of that list by all-candidate scoring; `zero_shot` for pretrained
        (not VQA-finetuned) checkpoints."""
        return self._answer("vqa", images, {"question": questions}, gen,
                            answers=list(answers) if answers is not None else None, zero_shot=zero_shot)

    def ground(self, images: Inputs, texts: Union[str, Iterable[str]], restrict_bins: bool = False, **gen: Any):
        """The box of the region a text describes, in the input image's pixels. `restrict_bins` forces the 4
        generated tokens to be location bins (off by default, like OFA)."""
        return self._answer("grounding", images, {"text": texts}, gen, restrict_bins=restrict_bins)

    def entail(self, images: Inputs, hypotheses: Union[str, Iterable[str]],
               premises: Union[None, str, Iterable[str]] = None, **gen: Any):
        """Does the image (and the premise text, when given) imply the hypothesis: "yes", "no" or "maybe"."""
        fields: dict[str, Any] = {"hypothesis": hypotheses}
        if premises is not None:
            fields["premise"] = premises
        return self._answer("entailment", images, fields, gen)

    def classify(self, images: Inputs, classes: Iterable[str], **gen: Any):
        """The best of the given class names for each image (all-candidate scoring over their trie)."""
        return self._answer("classify", images, {}, gen, classes=list(classes))

    def summarize(self, texts: Union[str, Iterable[str]], **gen: Any):
        """A one-sentence summary (Gigaword finetunes: beam 6, at most 32 tokens, length penalty 0.7)."""
        many = _is_many(texts)
        reqs = ({"text": t} for t in texts) if many else [{"text": texts}]
        out = list(self.predict("summarize", reqs, **gen))
        return out if many else out[0]

    def text_to_image(self, texts: Union[str, Iterable[str]], *, vqgan: Any, clip: Any = None,
                      clip_arch: Optional[str] = None, num_samples: int = 24, num_return: int = 1, top_k: int = 256,
                      top_p: Optional[float] = None, temperature: float = 1.0, seed: Optional[int] = None,
                      batch_size: Optional[int] = None):
        """Images for each caption, from an OFA text-to-image checkpoint: `num_samples` code grids sampled (top-k
        256, as OFA), decoded by the VQGAN (`vqgan`: the official VQGAN file or a loaded decoder), reranked by CLIP
        when `clip` (a local CLIP weights file or a loaded scorer) is given; the best `num_return`, best first.
        Returns an `ImagesPrediction` (a list of them for a list of captions)."""
        many = _is_many(texts)
        reqs = ({"text": t} for t in texts) if many else [{"text": texts}]
        out = list(self.predict_images(reqs, vqgan=vqgan, clip=clip, clip_arch=clip_arch, num_samples=num_samples,
                                       num_return=num_return, top_k=top_k, top_p=top_p, temperature=temperature,
                                       seed=seed, batch_size=batch_size))
        return out if many else out[0]

    def predict_images(self, requests: Iterable[dict], *, vqgan: Any, clip: Any = None,
                       clip_arch: Optional[str] = None, batch_size: Optional[int] = None,
                       **sampling: Any) -> Iterator[ImagesPrediction]:
        """The streaming form of `text_to_image` over requests ({"text": caption, optional id / name}), in order.
        Captions are checked first (a bad one is an error record); images are made `batch_size` captions at a
        time and only each caption's kept images outlive its batch."""
        from ofa_ds.text_to_image import caption_tokens, iter_text_to_image
        if self.lang == "zh":
            raise ValueError("OFA-CN checkpoints have no text-to-image prompt")
        vq, scorer = self._vqgan(vqgan), self._clip(clip, clip_arch)
        records, good = [], []
        for i, req in enumerate(requests):
            rec = ImagesPrediction(input=self._name(req, i, None), id=req.get("id") if isinstance(req, dict) else None)
            try:
                if not isinstance(req, dict):
                    raise InputError(f"a request must be a dict of fields, got {type(req).__name__}")
                if req.get("_error"):
                    raise InputError(str(req["_error"]))
                rec.text = req.get("text") if isinstance(req.get("text"), str) else None
                need(req.get("text"), "text")
                caption_tokens(self.tok, rec.text)
                good.append(len(records))
            except (InputError, ValueError) as e:
                rec.error = str(e)
            records.append(rec)
        done = 0
        stream = iter_text_to_image(self.model, self.tok, [records[j].text for j in good], vqgan=vq, clip=scorer,
                                    batch_size=batch_size or self.batch_size, **sampling)
        for j in good:
            records[j].images = next(stream)
            while done <= j:
                yield records[done]
                records[done] = None
                done += 1
        while done < len(records):
            yield records[done]
            done += 1

    def _vqgan(self, vqgan: Any):
        if isinstance(vqgan, (str, os.PathLike)):
            from ofa_ds.text_to_image import load_vqgan
            key = ("vqgan", os.fspath(vqgan))
            if key not in self._cache:
                self._cache[key] = load_vqgan(os.fspath(vqgan), device=self.device)
            return self._cache[key]
        if vqgan is None:
            raise ValueError("text-to-image needs the VQGAN decoder (the official VQGAN file)")
        return vqgan

    def _clip(self, clip: Any, arch: Optional[str]):
        if isinstance(clip, (str, os.PathLike)):
            from ofa_ds.text_to_image import load_clip
            key = ("clip", os.fspath(clip), arch)
            if key not in self._cache:
                self._cache[key] = load_clip(os.fspath(clip), **({"arch": arch} if arch else {}), device=self.device)
            return self._cache[key]
        return clip

    # ---- the engine ----------------------------------------------------------------------------------------------
    def spec(self, task: str, gen: Optional[dict] = None, **options: Any) -> Spec:
        """The task spec (prompts, transforms, decoding settings) this predictor uses for `task`."""
        name = ALIASES.get(task, task)
        if name not in SPECS:
            raise ValueError(f"unknown task {task!r}; choose one of {sorted(SPECS)}")
        if name == "caption":
            options.setdefault("huge", self.model.cfg.name == "huge")
        return SPECS[name](self.tok, gen, self.image_size, self.exif, **options)

    def predict(self, task: str, requests: Iterable[dict], batch_size: Optional[int] = None,
                options: Optional[dict] = None, **gen: Any) -> Iterator[Prediction]:
        """Stream the records of `requests` (dicts with the task's fields: image, question, text, hypothesis,
        premise, objects; optional id and name; `_error` marks a request that already failed), in order.
        `options` go to the task spec (answers, zero_shot, classes, restrict_bins), `gen` overrides decoding
        settings (beam, max_len_b, ...)."""
        spec = self.spec(task, gen, **(options or {}))
        bs = batch_size or self.batch_size
        pending: list[tuple[Prediction, Any]] = []
        n_ok = 0
        for i, req in enumerate(requests):
            rec = Prediction(input=self._name(req, i, spec), id=req.get("id") if isinstance(req, dict) else None)
            try:
                if not isinstance(req, dict):
                    raise InputError(f"a request must be a dict of fields, got {type(req).__name__}")
                if req.get("_error"):                 # failed before it got here (the CLI: a bad JSONL line)
                    raise InputError(str(req["_error"]))
                sample = spec.prepare(req, i)
                n_ok += 1
            except InputError as e:
                rec.error, sample = str(e), None
            pending.append((rec, sample))
            if n_ok >= bs:
                yield from self._flush(spec, pending)
                pending, n_ok = [], 0
        if pending:
            yield from self._flush(spec, pending)

    def _flush(self, spec: Spec, pending: list) -> Iterator[Prediction]:
        from ofa_ds.training.evaluate import to_device
        samples = [s for _, s in pending if s is not None]
        if samples:
            batch = to_device(spec.builder.collate(samples), self.device, self.dtype)
            with torch.no_grad():
                results = iter(spec.run(self.model, batch))
            for rec, s in pending:
                if s is not None:
                    rec.text, rec.score, rec.box = next(results)
        for rec, _ in pending:
            yield rec

    @staticmethod
    def _name(req: Any, i: int, spec: Optional[Spec]) -> str:
        """The record's `input`: the request's name, its image's path / kind, or its position."""
        has_image = spec is not None and spec.has_image
        if isinstance(req, dict):
            if req.get("name") is not None:
                return str(req["name"])
            if has_image and "image" in req:
                return describe(req["image"], i)
        return f"<request #{i}>" if has_image else f"<text #{i}>"

    def _answer(self, task: str, images: Inputs, fields: dict, gen: dict, **options: Any):
        """Zip images with per-image fields (a single value is used for every image) and run `predict`."""
        many = _is_many(images)
        imgs = images if many else [images]
        per = {k: (v if _is_many(v) else None) for k, v in fields.items()}
        its = {k: iter(v) for k, v in per.items() if v is not None}
        missing = object()

        def requests():
            for img in imgs:
                req = {"image": img}
                for k, v in fields.items():
                    req[k] = next(its[k], missing) if k in its else v
                    if req[k] is missing:
                        raise ValueError(f"fewer {k}s than images")
                yield req
            for k, it in its.items():
                if next(it, missing) is not missing:
                    raise ValueError(f"more {k}s than images")

        out = list(self.predict(task, requests(), options=options, **gen))
        return out if many else out[0]
