"""Command line shared by launch/pretrain.py and launch/finetune.py (kept here so the launch scripts stay thin).

    deepspeed [--num_gpus N] launch/pretrain.py [--recipe NAME] [--ds-config PATH] [--out DIR] [--steps N]
        [--init CKPT] [--resume] [--set section.field=value ...]

The last JSON line rank 0 prints is the final report (held-out metrics and run facts), also written to
<out>/report.json; readers take the last line that parses as JSON (`last_json_line`). Bad input (unknown recipe,
unknown --set field, a ds_config that disagrees with the run, a missing or unreadable file, a checkpoint of another
model for --resume, a run folder that is not writable) exits with status 2 and one line `error: ...`; a fault met
while running (a full disk while saving, a master port in use, more bad data rows than data.bad_row_threshold) with
status 1 and one such line, the last complete checkpoint left as it was (`training/faults.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ofa_ds.config import RunConfig


def parse(argv: list[str] | None, default_recipe: str, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--recipe", default=default_recipe, help="a name from ofa_ds.recipes.RECIPES")
    p.add_argument("--ds-config", dest="ds_config", help="DeepSpeed JSON (engine choices; 'auto' fields filled)")
    p.add_argument("--out", help="run folder (config.json, metrics.jsonl, tb/, checkpoints/, final/)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--init", help="initial weights: official .pt, exported folder, or one of our run folders")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.lr=1e-5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved RunConfig and exit")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)   # appended by the deepspeed launcher
    return p.parse_args(argv)


def build_run(a: argparse.Namespace) -> RunConfig:
    from ofa_ds.recipes import get_recipe
    run = get_recipe(a.recipe)
    sets = list(a.sets)
    if a.steps is not None:
        sets += [f"train.max_steps={a.steps}", "train.epochs=0"]
    if a.init:
        sets.append(f"train.init={json.dumps(a.init)}")
    if a.out:
        sets.append(f"out_dir={json.dumps(a.out)}")
    if a.ds_config:
        sets.append(f"ds_config={json.dumps(a.ds_config)}")
    return run.override(sets) if sets else run


def main(argv: list[str] | None = None, default_recipe: str = "default", description: str = "") -> int:
    a = parse(argv, default_recipe, description)
    try:
        run = build_run(a)
    except (KeyError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(run.to_json())
        return 0
    from ofa_ds.training import faults
    from ofa_ds.training.trainer import Trainer
    try:
        trainer = Trainer(run, resume=a.resume)            # reads the ds_config: its faults are reported too
        report = trainer.run()                             # a "pipeline" block in the ds_config picks the pipeline
    except Exception as e:                                 # noqa: BLE001 (unknown ones are re-raised)
        return faults.report(e)
    from ofa_ds.training.shutdown import release_distributed
    release_distributed(getattr(trainer, "engine", None))   # every rank done before rank 0 reports
    del trainer
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, sort_keys=True), flush=True)
    return 0


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object: the report in a job's output. (Under the deepspeed
    launcher the launcher's own "exits successfully" log lines follow it.)"""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no line of the output parses as a JSON object")
