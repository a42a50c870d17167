"""`python -m ofa_ds.predict TASK --checkpoint C [task options] INPUT...`: one JSON line per input, in input order.

INPUT is an image file, a folder (its image files, subfolders included, sorted by path), or a JSONL file of requests
(one JSON object per line with the task's fields: image, question, text, hypothesis, premise, objects, and an
optional id that is copied to the record; relative image paths are relative to the JSONL file; `-` reads JSONL from
stdin). Text tasks (summarize) also take `.txt` files, one text per line. Options such as --question or --text fill
the field for every input that does not carry its own.

What is unusual:
  * A bad input (missing file, unreadable image, empty question, a JSONL line that is not an object) is a record
    with "error" set to one line naming the reason; the run goes on. Exit status: 0 when every input was
    answered, 1 when some were not, 2 when nothing could start (bad checkpoint, bad option), with one `error:` line.
  * Records stream to stdout (or --out) as they are made; a progress bar with ETA goes to stderr for more than one
    input (--no-progress turns it off).
  * --draw DIR (grounding): each image with its box drawn, as DIR/<image name>.png.
  * text_to_image: captions from .jsonl / .txt / --text; --vqgan (required) decodes the sampled codes, --clip
    reranks; the images go to --out-dir as <n>.png (<n>_<k>.png with --num-return > 1), the records name them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Optional

from .inputs import IMAGE_SUFFIXES, list_folder
from .tasks import ALIASES, SPECS

T2I = ("text_to_image", "image_gen")
TASKS = sorted(SPECS) + sorted(ALIASES) + list(T2I)
FIELD_OPTIONS = ("question", "text", "hypothesis", "premise", "objects")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ofa_ds.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS, metavar="TASK", help=f"one of {', '.join(TASKS)}")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, .jsonl requests (- = stdin)")
    p.add_argument("--checkpoint", required=True, help="official .pt, exported folder, or a training checkpoint")
    p.add_argument("--out", default=None, help="JSONL output file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--image-size", type=int, default=None, help="image side (default: 480, grounding 512)")
    p.add_argument("--no-exif", action="store_true", help="keep images as stored (no EXIF rotation)")
    p.add_argument("--ema", action="store_true", help="official .pt: the EMA weights (VQA finetunes)")
    p.add_argument("--preset", default=None, help="model preset when a training checkpoint has no config.json")
    g = p.add_argument_group("task fields (for every input without its own)")
    g.add_argument("--question", help="vqa: the question")
    g.add_argument("--text", help="grounding: the expression; summarize: the text")
    g.add_argument("--hypothesis", help="entailment: the hypothesis")
    g.add_argument("--premise", help="entailment: the premise text (released finetunes use one)")
    g.add_argument("--objects", help="vqa: object tags joined by &&")
    o = p.add_argument_group("task options")
    o.add_argument("--answers", help="vqa: candidate answers (.json / .pkl answer list, .txt one per line, or a,b,c)"
                                     "; scores them all instead of generating")
    o.add_argument("--zero-shot", action="store_true", help="vqa with a pretrained (not VQA-finetuned) checkpoint")
    o.add_argument("--classes", help="classify: class names (.json / .pkl, .txt one per line, or a,b,c)")
    o.add_argument("--restrict-bins", action="store_true", help="grounding: only location bins may be generated")
    o.add_argument("--beam", type=int, default=None, help="beam size (default: the task's)")
    o.add_argument("--gen", default=None, help='decoding overrides as JSON, OFA --eval-args keys ({"max_len_b": 8})')
    o.add_argument("--draw", default=None, metavar="DIR", help="grounding: write the images with their boxes here")
    t = p.add_argument_group("text_to_image")
    t.add_argument("--vqgan", help="the official VQGAN file (OFA's vqgan/last.ckpt)")
    t.add_argument("--clip", help="a local CLIP weights file for reranking (OpenAI's ViT-B-16.pt or open_clip's)")
    t.add_argument("--clip-arch", default=None, help="open_clip architecture of --clip (default ViT-B-16-quickgelu)")
    t.add_argument("--num-samples", type=int, default=24, help="code grids sampled per caption (OFA: 24)")
    t.add_argument("--num-return", type=int, default=1, help="images kept per caption, best first")
    t.add_argument("--top-k", type=int, default=256)
    t.add_argument("--top-p", type=float, default=None, help="nucleus sampling instead of top-k")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out-dir", default="generated", help="where the PNGs go (default ./generated)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)      # INPUTs may come before, between and after options


def read_list(value: str) -> list[str]:
    """A candidate list: a .json / .pkl file (OFA's ans2label, a dict or a list), a .txt (one per line), or a,b,c."""
    from ofa_ds.data.text import load_candidates
    if os.path.isfile(value):
        if value.endswith((".json", ".pkl")):
            a2l = load_candidates(value)
            return [a for a, _ in sorted(a2l.items(), key=lambda kv: (kv[1], kv[0]))]
        with open(value, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


class Requests:
    """The requests of the INPUT arguments, made lazily; `count()` reads the inputs' sizes without decoding."""

    def __init__(self, inputs: list[str], text_task: bool, fields: dict[str, Any]):
        self.inputs, self.text_task, self.fields = inputs, text_task, fields

    def _items(self) -> Iterator[tuple[str, Any]]:
        """('image', path) | ('text', (name, text)) | ('jsonl', (name, line, folder)) | ('bad', (name, why))."""
        for inp in self.inputs:
            if inp == "-":
                yield from self._jsonl(sys.stdin, "<stdin>", os.getcwd())
            elif inp.endswith(".jsonl") and os.path.isfile(inp):
                with open(inp, encoding="utf-8") as f:
                    yield from self._jsonl(f, inp, os.path.dirname(os.path.abspath(inp)))
            elif self.text_task and inp.endswith(".txt") and os.path.isfile(inp):
                with open(inp, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            yield "text", (f"{inp}:{n}", line.rstrip("\n"))
            elif os.path.isdir(inp):
                files = list_folder(inp)
                if not files:
                    yield "bad", (inp, f"folder has no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
                for f in files:
                    yield "image", f
            elif self.text_task:
                yield "bad", (inp, "no such .jsonl or .txt file" if not os.path.exists(inp) else
                              "not a .jsonl or .txt file")
            else:
                yield "image", inp

    @staticmethod
    def _jsonl(f, name: str, folder: str):
        for n, line in enumerate(f, 1):
            if line.strip():
                yield "jsonl", (f"{name}:{n}", line, folder)

    def count(self) -> Optional[int]:
        """Number of requests (None when one input is stdin, which can be read only once)."""
        if "-" in self.inputs:
            return None
        if not self.inputs:
            return 1
        return sum(1 for _ in self._items())

    def __iter__(self) -> Iterator[dict]:
        if not self.inputs:                          # a text task given only --text
            yield dict(text=self.fields["text"])
            return
        for kind, item in self._items():
            if kind == "image":
                req: dict[str, Any] = {"image": item}
            elif kind == "text":
                req = {"name": item[0], "text": item[1]}
            elif kind == "bad":
                req = {"name": item[0], "_error": item[1]}
            else:
                name, line, folder = item
                try:
                    req = json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"name": name, "_error": f"not JSON ({e.msg} at column {e.colno})"}
                    continue
                if not isinstance(req, dict):
                    yield {"name": name, "_error": f"a request must be a JSON object, got {type(req).__name__}"}
                    continue
                req["name"] = name
                img = req.get("image")
                if isinstance(img, str) and img and not os.path.isabs(img):
                    req["image"] = os.path.join(folder, img)
            for k, v in self.fields.items():
                if v is not None and k not in req:
                    req[k] = v
            yield req


def draw_box(image_source: Any, box: list[float], folder: str, used: set, exif: bool) -> Optional[str]:
    """Write the image with `box` outlined into `folder`; returns the file written."""
    from PIL import ImageDraw

    from .inputs import load_image
    img = load_image(image_source, exif=exif)
    d = ImageDraw.Draw(img)
    d.rectangle([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])],
                outline=(255, 0, 0), width=max(2, round(max(img.size) / 200)))
    stem = os.path.splitext(os.path.basename(str(image_source)))[0] or "image"
    name, k = f"{stem}.png", 1
    while name in used:
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    path = os.path.join(folder, name)
    img.save(path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from ofa_ds.training.faults import report
    try:
        return run(args)
    except Exception as e:                       # noqa: BLE001 (unknown ones are re-raised by report)
        return report(e)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ofa_ds.training.faults import RunFault

    from .api import Predictor
    task = ALIASES.get(args.task, args.task)
    text_task = task in T2I or not SPECS[task].has_image
    if not args.inputs and not (text_task and args.text):
        raise RunFault("no INPUT given (image files, folders, or .jsonl requests; --text for a text task)", status=2)
    gen = {}
    if args.gen:
        try:
            gen = json.loads(args.gen)
        except json.JSONDecodeError as e:
            raise RunFault(f"--gen is not JSON: {e.msg}", status=2) from None
    if args.beam is not None:
        gen["beam"] = args.beam
    options: dict[str, Any] = {}
    if task == "vqa":
        options = {"answers": read_list(args.answers) if args.answers else None, "zero_shot": args.zero_shot}
    elif task == "classify":
        if not args.classes:
            raise RunFault("classify needs --classes (a file or a,b,c)", status=2)
        options = {"classes": read_list(args.classes)}
    elif task == "grounding":
        options = {"restrict_bins": args.restrict_bins}
    if task in T2I:
        return run_text_to_image(args, gen)
    predictor = Predictor(args.checkpoint, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          image_size=args.image_size, ema=args.ema, preset=args.preset, exif=not args.no_exif)
    try:
        predictor.spec(task, gen, **options)      # refuse bad options before reading any input
    except (ValueError, KeyError) as e:
        raise RunFault(str(e).strip("'\""), status=2) from None
    fields = {k: getattr(args, k) for k in FIELD_OPTIONS}
    reqs = Requests(args.inputs, text_task=text_task, fields=fields)
    total = reqs.count()
    if args.draw:
        os.makedirs(args.draw, exist_ok=True)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    images: dict[int, Any] = {}

    def remember():
        for i, r in enumerate(reqs):
            if args.draw and "image" in r:
                images[i] = r["image"]
            yield r

    failed, answered, used = 0, 0, set()
    quiet = args.no_progress or (total is not None and total < 2)
    bar = tqdm(total=total, file=sys.stderr, unit="input", disable=quiet, dynamic_ncols=True)
    try:
        for i, rec in enumerate(predictor.predict(task, remember(), options=options, **gen)):
            d = rec.to_dict()
            if args.draw and rec.box is not None and rec.error is None and i in images:
                d["drawn"] = draw_box(images.pop(i), rec.box, args.draw, used, exif=not args.no_exif)
            images.pop(i, None)
            failed += rec.error is not None
            answered += rec.error is None
            out.write(json.dumps(d, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if failed:
        n = total if total is not None else failed + answered
        print(f"[predict] {failed} of {n} inputs not answered (see their \"error\")", file=sys.stderr)
    return 1 if failed else 0


def run_text_to_image(args: argparse.Namespace, gen: dict) -> int:
    """text_to_image: one record per caption with the PNG files written (OUT_DIR/<n>.png, <n>_<k>.png for more)."""
    from tqdm import tqdm

    from ofa_ds.training.faults import RunFault

    from .api import Predictor
    if not args.vqgan:
        raise RunFault("text_to_image needs --vqgan (the official VQGAN file)", status=2)
    if gen:
        raise RunFault("--beam / --gen do not apply to text_to_image (it samples: --top-k, --top-p, --temperature)",
                       status=2)
    if not 1 <= args.num_return <= args.num_samples:
        raise RunFault(f"need 1 <= --num-return ({args.num_return}) <= --num-samples ({args.num_samples})", status=2)
    fields = {k: getattr(args, k) for k in FIELD_OPTIONS}
    reqs = Requests(args.inputs, text_task=True, fields=fields)
    total = reqs.count()
    predictor = Predictor(args.checkpoint, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          ema=args.ema, preset=args.preset)
    try:
        vqgan = predictor._vqgan(args.vqgan)
        clip = predictor._clip(args.clip, args.clip_arch) if args.clip else None
    except (ValueError, KeyError) as e:
        raise RunFault(str(e).strip("'\""), status=2) from None
    os.makedirs(args.out_dir, exist_ok=True)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    quiet = args.no_progress or (total is not None and total < 2)
    bar = tqdm(total=total, file=sys.stderr, unit="caption", disable=quiet, dynamic_ncols=True)
    failed = 0
    try:
        stream = predictor.predict_images(reqs, vqgan=vqgan, clip=clip, num_samples=args.num_samples,
                                          num_return=args.num_return, top_k=args.top_k, top_p=args.top_p,
                                          temperature=args.temperature, seed=args.seed)
        for i, rec in enumerate(stream):
            for k, g in enumerate(rec.images):
                path = os.path.join(args.out_dir, f"{i:05d}.png" if args.num_return == 1 else f"{i:05d}_{k}.png")
                g.image.save(path)
                rec.files.append(path)
            failed += rec.error is not None
            out.write(rec.to_json() + "\n")
            out.flush()
            bar.update(1)
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"[predict] {failed} captions without images (see their \"error\")", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
