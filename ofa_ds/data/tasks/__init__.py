"""Registry of task builders: TASKS maps a task name (DataConfig.task, `validate --task`) to its class."""
from __future__ import annotations

from .base import Task
from .caption import CaptionTask
from .pretrain import PretrainTask
from .refcoco import RefcocoTask
from .snli_ve import SnliVeTask
from .vqa import VQATask

TASKS: dict[str, type[Task]] = {
    "caption": CaptionTask,
    "vqa": VQATask,
    "refcoco": RefcocoTask,
    "snli_ve": SnliVeTask,
    "pretrain": PretrainTask,
}

try:  # tasks written after the first drop
    from .imagenet import ImageNetTask
    from .gigaword import GigawordTask
    from .glue import GLUE_TASKS
    from .image_gen import ImageGenTask
    TASKS.update({"imagenet": ImageNetTask, "gigaword": GigawordTask, "image_gen": ImageGenTask, **GLUE_TASKS})
except ImportError:  # pragma: no cover
    pass


def make_task(cfg, split: str = "train", tokenizer=None) -> Task:
    if cfg.task not in TASKS:
        raise KeyError(f"unknown task {cfg.task!r}; choose one of {sorted(TASKS)}")
    return TASKS[cfg.task](cfg, split, tokenizer)
