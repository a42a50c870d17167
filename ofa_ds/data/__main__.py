"""`python -m ofa_ds.data {synthetic,convert,validate,import}` — see docs/data.md."""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofa_ds.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="write the built-in synthetic multitask dataset",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The defaults write the 1-4-object world; the default run's world is\n"
                                   "  --max-objects 1 --object-size 0.34,0.44 --vqa-types color,shape,position")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    s.add_argument("--image-size", type=int, default=256)
    s.add_argument("--max-objects", type=int, default=4, help="1-4 shapes per scene")
    s.add_argument("--vqa-types", default="color,shape,count,position",
                   help="comma-separated question types to draw from (a subset of the default)")
    s.add_argument("--object-size", default="0.16,0.36", help="shape side range as fractions of the image")
    c = sub.add_parser("convert", help="image folder + JSONL/CSV annotations -> TSV")
    c.add_argument("--task", required=True)
    c.add_argument("--images", required=True)
    c.add_argument("--annotations", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--max-side", type=int, default=None)
    v = sub.add_parser("validate", help="check a TSV against its task's format")
    v.add_argument("--task", required=True)
    v.add_argument("--selected-cols", default=None)
    v.add_argument("--limit", type=int, default=None, help="check only the first N rows")
    v.add_argument("file")
    from .importers import formats
    imp = sub.add_parser("import", help="a public dataset as its authors ship it -> OFA TSVs")
    isub = imp.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, fmt in sorted(formats().items()):
        f = isub.add_parser(name, help=fmt.help, description=fmt.help)
        f.add_argument("--out", required=True, help="output folder (created; files are written whole or not at all)")
        f.add_argument("--max-side", type=int, default=None,
                       help="shrink larger images to this longest side (boxes scaled with them)")
        fmt.add_arguments(f)
    a = p.parse_args(argv)
    if a.cmd == "import":
        return _import(formats()[a.format], a)
    if a.cmd == "synthetic":
        from .synthetic import generate
        m = generate(a.out, seed=a.seed, size=a.size, image_size=a.image_size, max_objects=a.max_objects,
                     vqa_types=tuple(t for t in a.vqa_types.split(",") if t),
                     object_size=tuple(float(v) for v in a.object_size.split(",")))
        print(json.dumps({"out": a.out, "seconds": m["seconds"], "rows": m["rows"]}, indent=1))
        return 0
    if a.cmd == "convert":
        from .convert import CONVERT_TASKS, convert
        if a.task not in CONVERT_TASKS:
            print(f"convert supports --task {', '.join(CONVERT_TASKS)}; got {a.task!r}", file=sys.stderr)
            return 2
        if not os.path.isfile(a.annotations) or not os.path.isdir(a.images):
            print(f"need an annotations file and an images folder: {a.annotations}, {a.images}", file=sys.stderr)
            return 2
        written, _ = convert(a.task, a.images, a.annotations, a.out, a.max_side)
        return 0 if written else 1
    from .convert import EXTRA_VALIDATE, validate
    from .tasks import TASKS
    if a.task not in TASKS and a.task not in EXTRA_VALIDATE:
        print(f"unknown task {a.task!r}; choose one of {sorted(set(TASKS) | set(EXTRA_VALIDATE))}", file=sys.stderr)
        return 2
    if not os.path.isfile(a.file) or os.path.getsize(a.file) == 0:
        print(f"{a.file}: missing or empty", file=sys.stderr)
        return 2
    _, bad = validate(a.task, a.file, a.selected_cols, limit=a.limit)
    return 1 if bad else 0


def _import(fmt, a) -> int:
    """Run one importer: a one-line error (exit 2) for a missing or malformed source, else the summary line."""
    from .importers.common import ImportStats
    stats = ImportStats()
    try:
        fmt.run(a, stats)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:          # malformed source file (bad JSON, wrong layout): the importer names it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stats.summary(), file=sys.stderr)
    return 0 if sum(stats.written.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
