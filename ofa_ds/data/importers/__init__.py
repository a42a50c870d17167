"""Importers: public datasets, in the layout their authors ship, into OFA's TSVs (`python -m ofa_ds.data import
FORMAT ...`). One module per family; each module defines `FORMATS = {name: Format(...)}`. Shared rules (atomic
output, skip accounting, progress, image embedding): `common.py`. Commands and formats: docs/data.md#importers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

MODULES = ("captions", "vqa", "refcoco", "snli_ve", "imagenet", "glue", "gigaword", "pretrain")


@dataclass(frozen=True)
class Format:
    help: str
    add_arguments: Callable            # (argparse parser) -> None: the format's own options
    run: Callable                      # (args, stats: ImportStats) -> None: writes under args.out


def formats() -> dict[str, Format]:
    """Every importable format by name (modules not written yet are skipped)."""
    out: dict[str, Format] = {}
    for m in MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{m}":
                continue
            raise
        out.update(mod.FORMATS)
    return out
