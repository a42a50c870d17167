"""Data configuration (`DataConfig`), embedded by the training side in its RunConfig.

Every field is JSON-able and documented; `from_dict` rejects unknown keys by name. Paths are plain strings;
`data` is OFA's comma-separated file list (for finetuning tasks the *last* path is the validation file, as in OFA's
finetuning scripts).
Image sizes are parameters of the task builders, never of the files, so a 256 px synthetic file can feed a
128 px tiny run.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from ofa_ds.config_keys import check_keys


@dataclass
class DataConfig:
    """Everything the data path needs for one task."""

    task: str = "caption"
    """Task name, a key of `ofa_ds.data.tasks.TASKS` (caption, vqa, refcoco, snli_ve, imagenet, gigaword, cola, sst2,
    mrpc, qqp, mnli, rte, qnli, image_gen, pretrain)."""
    data: str = ""
    """Comma-separated TSV paths. Finetuning: all but the last are per-epoch training files, the last is validation.
    Pretraining: the vision-language files, one per epoch cycle."""
    selected_cols: Optional[str] = None
    """Comma list of 0-based column indices (picks and reorders); None = the task's official default."""
    text_data: str = ""
    """Pretraining: text_examples.tsv (text infilling); empty disables text v2 samples."""
    image_data: str = ""
    """Pretraining: image_examples.tsv (image infilling); empty disables."""
    detection_data: str = ""
    """Pretraining: detection_examples.tsv; empty disables."""
    neg_sample_dir: str = ""
    """Pretraining: folder with all_captions.txt, object.txt, type2ans.json (ITM negatives)."""
    ans2label_file: str = ""
    """VQA/ImageNet candidate answers: .json (answer -> label) or .pkl (restricted unpickler); empty = no trie."""
    batch_size: int = 8
    """Rows per batch per rank (pretraining rows expand to several samples)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 1
    """Seed of the per-epoch shuffle and of every random transform (derived per sample, so resume is exact)."""
    shuffle: bool = True
    """Shuffle rows each epoch (seeded by seed and epoch). OFA itself reads rows in file order."""
    equalize_shards: bool = True
    """Pad every rank's share to the same length by wrapping round (so ranks run the same number of steps);
    False gives each row exactly once overall."""
    drop_last: bool = False
    """Drop the final short batch of each rank."""
    patch_image_size: int = 480
    """Side of the square image fed to the encoder (pretraining v1 crop size)."""
    max_image_size: int = 512
    """Boxes are quantised into num_bins relative to this size (as OFA does), not to the image side."""
    v2_image_size: int = 256
    """Pretraining image-infilling / detection image side."""
    num_bins: int = 1000
    """Location bins."""
    max_src_length: int = 80
    """Word limit of questions/captions/expressions in the source."""
    max_tgt_length: int = 30
    """Target word limit (caption finetuning uses 20)."""
    max_object_length: int = 30
    """VQA: number of object tags appended with add_object."""
    prompt_type: str = "prev_output"
    """VQA / SNLI-VE / GLUE decoder prompt: 'none', 'src' or 'prev_output' (GLUE recipes use 'src')."""
    add_object: bool = False
    """VQA: append ' object: tag1 tag2 ...' to the question."""
    add_caption: bool = False
    """SNLI-VE: include the premise caption in the prompt."""
    constraint_masks: str = "dense"
    """'dense' gives Bool[B,T,V] constraint_masks; 'compact' gives constraint_rows Bool[R,V] + constraint_index
    Long[B,T]."""
    imagenet_default_mean_and_std: bool = False
    """ImageNet task: use ImageNet mean/std instead of 0.5/0.5."""
    noise_ratio: float = 0.0
    """Gigaword: probability of replacing each prev_output token by a random text token (OFA: 0.2)."""
    mask_ratio: float = 0.3
    """Pretraining text infilling: fraction of word starts masked."""
    poisson_lambda: float = 3.0
    """Pretraining text infilling: span length distribution."""
    code_image_size: int = 128
    """Image-gen / infilling code grid side in pixels of VQGAN input (codes per side = size / 8)."""
    bad_row_threshold: float = 0.01
    """Raise when more than this fraction of the rows read so far (after 100 rows) were malformed."""
    index_cache_dir: str = ""
    """Where to keep .idx byte-offset caches; empty = next to each file (falls back to ~/.cache/ofa_ds if read-only)."""
    augment: bool = True
    """Random augmentation in training splits (pretraining crops/RandomAugment, ImageNet train transform)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "DataConfig") -> "DataConfig":
        check_keys(cls, data, where)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, where: str = "DataConfig") -> "DataConfig":
        return cls.from_dict(json.loads(text), where)

    def paths(self) -> list[str]:
        return [p for p in (s.strip() for s in self.data.split(",")) if p]

    def cols(self) -> Optional[list[int]]:
        if self.selected_cols is None or self.selected_cols == "":
            return None
        return [int(c) for c in self.selected_cols.split(",")]
