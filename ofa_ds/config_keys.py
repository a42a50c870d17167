"""`check_keys`: the unknown-key check shared by every JSON config dataclass (ModelConfig and RunConfig in
ofa_ds/config.py, DataConfig in ofa_ds/data/config.py).

A module of its own, standard library only, so that ofa_ds/data/config.py need not import ofa_ds/config.py (which
imports the data config for RunConfig).
"""
from __future__ import annotations

import dataclasses
from typing import Any


def check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    """Raise naming every key of `data` that is not a field of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
