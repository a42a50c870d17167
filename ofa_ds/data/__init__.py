"""ofa_ds data path: TSV reading, transforms, per-task sample builders, collation, synthetic data, converter.
See docs/data.md. Main entry points: DataConfig, DataStream, TASKS / make_task, synthetic.generate."""
from .config import DataConfig
from .loader import DataStream, TaskStream
from .tasks import TASKS, make_task

__all__ = ["DataConfig", "DataStream", "TaskStream", "TASKS", "make_task"]
