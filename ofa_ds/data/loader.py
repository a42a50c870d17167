"""Sharded, resumable streaming of task batches: `TaskStream` (a torch IterableDataset for one epoch of one rank)
and `DataStream` (the object a trainer holds: epochs, file cycling, state_dict, bad-row accounting).

Unusual points:
* Batches are formed inside the dataset (DataLoader(batch_size=None)), so batch b of a rank is always the same rows
  whatever the number of workers; worker w makes batches start+w, start+w+W, ... and PyTorch's DataLoader returns
  worker outputs round-robin, hence in batch order. Resume state = (epoch, batches done).
* Every random choice of a sample uses numpy Generator([seed, epoch, row, position]): resumed and uninterrupted
  runs produce bit-identical batches.
* Pretraining extras hang off every 8th row of each rank's own sequence (so all ranks see them at the same
  steps, as OFA's per-process counter does), with a slot number that is unique over ranks and epochs.
* Files per epoch (docs/ofa.md#sample-layout): finetuning tasks train on path (e-1) mod (n-1) and validate on the last
  path; pretraining cycles all paths. A missing or empty file fails at construction, not mid-run.
* A row is read by `task.read(fields)`, the rule `validate` applies (docs/data.md#bad-rows): a row it rejects
  (BadRow) is skipped and its batch is smaller; no other exception is caught. An all-bad batch is yielded as
  {"skip": True, ...} so the batch count stays aligned, and DataStream drops it. DataStream counts rows read and bad
  rows per category over all workers (`counter`, a tsv.BadRowCounter) and raises tsv.TooManyBadRows past
  `bad_row_threshold`.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .tsv import BadRow, BadRowCounter, TSVFile, epoch_order, num_batches, rank_positions, worker_batches


class TaskStream(IterableDataset):
    """One epoch of one rank over one TSV file, as collated batches."""

    def __init__(self, task, tsv: TSVFile, cfg: DataConfig, rank: int = 0, world: int = 1, epoch: int = 1,
                 start_batch: int = 0, shuffle: Optional[bool] = None):
        self.task, self.tsv, self.cfg = task, tsv, cfg
        self.rank, self.world, self.epoch, self.start = rank, world, epoch, start_batch
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        self.positions = rank_positions(len(tsv), rank, world, cfg.equalize_shards)
        self.n_batches = num_batches(len(self.positions), cfg.batch_size, cfg.drop_last)

    def __len__(self) -> int:
        return max(self.n_batches - self.start, 0)

    def batch_rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the epoch order, row indices) of batch b."""
        order = epoch_order(len(self.tsv), self.cfg.seed, self.epoch, self.shuffle)
        pos = self.positions[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
        return pos, order[pos]

    def make_batch(self, b: int, order: np.ndarray) -> Any:
        bs = self.cfg.batch_size
        pos = self.positions[b * bs:(b + 1) * bs]
        samples, bad = [], []  # bad: (file:line, category, reason)
        n_read = len(pos)
        extra_fn = getattr(self.task, "v2_samples", None)
        for k, p in enumerate(pos):
            ridx = int(order[p])
            rng = np.random.default_rng([self.cfg.seed, self.epoch, ridx, int(p)])
            try:
                parsed = self.task.read(self.tsv.fields(ridx))
            except BadRow as e:
                bad.append((self.tsv.where(ridx), e.category, str(e)))
            else:
                out = self.task.make(parsed, ridx, rng)
                samples.extend(out if isinstance(out, list) else [out])
            j = b * bs + k  # index of this row in the rank's sequence: OFA's per-process row counter
            if extra_fn is not None and j % 8 == 0:
                slot = (j // 8 + (self.epoch - 1) * (-(-len(self.positions) // 8))) * self.world + self.rank
                more, more_bad = extra_fn(slot, np.random.default_rng([self.cfg.seed, self.epoch, slot, 0xE7, 1]))
                samples.extend(more)
                bad.extend(more_bad)
                n_read += len(more) + len(more_bad)
        meta = {"bad_rows": bad, "rows": n_read, "batch_index": b, "epoch": self.epoch}
        if not samples:
            return {"skip": True, **meta}
        batch = self.task.collate(samples)
        first = batch[0] if isinstance(batch, tuple) else batch
        first.update(meta)
        return batch

    def __iter__(self) -> Iterator[Any]:
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        order = epoch_order(len(self.tsv), self.cfg.seed, self.epoch, self.shuffle)
        for b in worker_batches(self.n_batches, self.start, wid, nw):
            yield self.make_batch(b, order)


def _identity(x):
    return x


class DataStream:
    """Epoch-cycling loader of one task for one rank, with a tiny resumable state."""

    def __init__(self, cfg: DataConfig, split: str = "train", rank: int = 0, world: int = 1, task=None,
                 tokenizer=None):
        from .tasks import make_task
        self.cfg, self.split, self.rank, self.world = cfg, split, rank, world
        self.task = task if task is not None else make_task(cfg, split, tokenizer)
        paths = cfg.paths()
        if not paths:
            raise ValueError(f"DataConfig.data is empty for task {cfg.task!r}")
        pretrain = cfg.task == "pretrain"
        if split == "train":
            paths = paths if (pretrain or len(paths) == 1) else paths[:-1]
        else:
            paths = paths[-1:]
        self.files = [TSVFile(p, cfg.index_cache_dir) for p in paths]  # fails now if missing/empty
        self.epoch, self.batch = 1, 0
        self.counter = BadRowCounter(cfg.bad_row_threshold)

    def file_for_epoch(self, epoch: int) -> TSVFile:
        return self.files[(epoch - 1) % len(self.files)]

    def stream(self) -> TaskStream:
        return TaskStream(self.task, self.file_for_epoch(self.epoch), self.cfg, self.rank, self.world, self.epoch,
                          self.batch, shuffle=self.cfg.shuffle and self.split == "train")

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.stream())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "rows": self.counter.rows, "bad": self.counter.bad,
                "reasons": dict(self.counter.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.counter.rows, self.counter.bad = int(state.get("rows", 0)), int(state.get("bad", 0))
        self.counter.reasons = Counter({str(k): int(v) for k, v in state.get("reasons", {}).items()})

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; afterwards the stream points at the start of the next epoch."""
        ts = self.stream()
        loader = DataLoader(ts, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity,
                            persistent_workers=False, pin_memory=False)
        for batch in loader:
            first = batch[0] if isinstance(batch, tuple) else batch
            self.batch += 1
            bad = first.pop("bad_rows", [])
            self.counter.ok(max(first.pop("rows", 0) - len(bad), 0))
            for where, category, reason in bad:
                self.counter.report(where, reason, category)
            first.pop("batch_index", None)
            first.pop("epoch", None)
            if first.get("skip"):
                continue
            yield batch
        self.epoch += 1
        self.batch = 0
