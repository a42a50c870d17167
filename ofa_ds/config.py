"""Typed configuration for ofa_ds.

`ModelConfig` describes one OFA network; `PRESETS` holds the five released sizes (`RELEASED_PRESETS`) with the
NormFormer extras switched on, as in every released checkpoint (`--scale-attn --scale-fc --scale-heads`), and
`debug`: not an OFA release, a 2+2-layer, 64-wide model with one block per ResNet stage (same vocabulary) for tests
and quick runs.
Configs are plain dataclasses that round-trip through JSON (`to_json` / `from_json`); unknown keys are an error
that names them, so a typo in a config file never silently falls back to a default.

Training-side configs (train, eval, run) live below `ModelConfig` in this file and follow the same rules; the data
config a RunConfig embeds is `DataConfig` (ofa_ds/data/config.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ofa_ds.config_keys import check_keys

KernelBackend = Literal["torch", "triton", "auto"]


@dataclass
class ModelConfig:
    """One OFA network. Defaults are OFA-Tiny; use `PRESETS[name]` for the released sizes."""

    name: str = "tiny"
    """Preset name (informational; 'custom' when built by hand)."""
    vocab_size: int = 59457
    """Rows of the shared token table: 4 specials + 50260 BPE + <mask> + 8192 codes + 1000 bins (EN); 30325 for CN."""
    d_model: int = 256
    """Hidden width C of encoder and decoder (decoder dims always equal encoder dims in OFA)."""
    ffn_dim: int = 1024
    """Inner width F of the feed-forward blocks."""
    num_heads: int = 4
    """Attention heads H; head_dim = d_model / num_heads (80 for Huge)."""
    encoder_layers: int = 4
    """Number of encoder layers."""
    decoder_layers: int = 4
    """Number of decoder layers."""
    resnet_layers: tuple[int, int, int] = (3, 4, 6)
    """Bottleneck blocks in the three ResNet stages used: [3,4,6] 'resnet50', [3,4,23] 'resnet101',
    [3,8,36] 'resnet152'."""
    max_source_positions: int = 1024
    """Text positions of the encoder (the position table has this + 2 rows)."""
    max_target_positions: int = 1024
    """Text positions of the decoder (the position table has this + 2 rows)."""
    token_bucket_size: int = 256
    """1-D relative-position bucket size (table rows = 2*size - 1)."""
    image_bucket_size: int = 42
    """Side of the 2-D image position raster (42x42 ids; table rows = (2*size-1)^2 + 3)."""
    attn_scale_factor: float = 2.0
    """Attention logits are scaled by (head_dim * attn_scale_factor) ** -0.5 (OFA: 1/sqrt(2d))."""
    code_image_size: int = 128
    """Image side whose VQGAN codes (f=8) the decoder generates; sets the decoder image_position_idx length."""
    num_bins: int = 1000
    """Location bins <bin_0..num_bins-1> at the end of the vocabulary."""
    code_dict_size: int = 8192
    """Image-code tokens <code_0..> before the bins."""
    scale_attn: bool = True
    """NormFormer: LayerNorm after self/cross attention (attn_ln, self_attn_ln, cross_attn_ln)."""
    scale_fc: bool = True
    """NormFormer: LayerNorm inside the FFN (ffn_layernorm)."""
    scale_heads: bool = True
    """NormFormer: one learnable scale per head on the attention output (c_attn)."""
    normformer_init: float = 1.0
    """Initial weight of the NormFormer LayerNorms (attn_ln, self_attn_ln, cross_attn_ln, ffn_layernorm) in a
    fresh model; OFA: 1. Smaller values start each attention/FFN branch small next to the residual stream (the
    default CPU run uses 0.1, docs/experiments.md#conclusions). Loaded weights replace it."""
    entangle_position_embedding: bool = False
    """OFA's --entangle-position-embedding (off in every released config): the encoder also *adds* the raw
    position embeddings to its token and image-patch embeddings (before their LayerNorms), besides the attention
    biases. No new parameters; the decoder is unchanged (disable_entangle)."""
    resnet_zero_init_residual: bool = False
    """Start the last BatchNorm of every ResNet bottleneck (bn3) at weight 0, so each block begins as its shortcut
    (Goyal et al. 2017; torchvision's zero_init_residual). OFA: off (its ResNet starts from ImageNet weights), and
    off in every recipe; docs/experiments.md#conclusions has what it changes. Loaded weights replace it."""
    dedup_images: bool = True
    """Run the ResNet once per *distinct* image of a batch and share its features (OFA's pretraining gives every
    image-text row two samples with the same image, so this halves the ResNet work there). Outputs are unchanged in
    eval mode; in training mode BatchNorm's batch statistics count each distinct image once instead of once per
    sample. False = OFA's per-sample ResNet."""
    frozen_bn: bool = False
    """Use FrozenBatchNorm2d in the ResNet (OFA's --freeze-resnet); plain BatchNorm2d otherwise."""
    dropout: float = 0.0
    """Residual/embedding dropout (OFA scripts use 0.1 when training)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation."""
    encoder_drop_path_rate: float = 0.0
    """Maximum drop-path rate of the encoder (linear over layers from 0)."""
    decoder_drop_path_rate: float = 0.0
    """Maximum drop-path rate of the decoder (linear over layers from 0)."""
    resnet_drop_path_rate: float = 0.0
    """Maximum drop-path rate inside ResNet stages."""
    kernel_backend: KernelBackend = "torch"
    """Attention/LayerNorm implementation: 'torch', 'triton', or 'auto' (Triton on CUDA with compute capability
    >= 8)."""
    encoder_prompt_length: int = 0
    """Prompt tuning (OFA's --encoder-prompt, type prefix): this many trainable prefix keys and values in the
    self-attention of every encoder layer, parameters `encoder.encoder_prompt_encoder.*`; 0 = none
    (ofa_ds/model/prompt.py, docs/ofa.md#prompt-tuning)."""
    decoder_prompt_length: int = 0
    """Prompt tuning (OFA's --decoder-prompt): prefix keys/values in every decoder self-attention; 0 = none."""
    prompt_projection: bool = False
    """OFA's --encoder/decoder-prompt-projection: the prompts come from a [P, C] table through an MLP
    (Linear(C, prompt_dim), ReLU, Linear(prompt_dim, layers·2·C)) instead of one [P, layers·2·C] table."""
    prompt_dim: int = 0
    """Hidden width of that MLP (OFA's --encoder/decoder-prompt-dim); 0 = 2·d_model (OFA's default)."""
    prompt_dropout: float = 0.2
    """Dropout on the prompt keys/values before they enter attention (OFA: 0.2, fixed)."""

    def __post_init__(self) -> None:
        self.resnet_layers = tuple(self.resnet_layers)  # JSON gives a list
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.kernel_backend not in ("torch", "triton", "auto"):
            raise ValueError(f"kernel_backend must be 'torch', 'triton' or 'auto', got {self.kernel_backend!r}")
        if not self.normformer_init >= 0:
            raise ValueError(f"normformer_init must be >= 0, got {self.normformer_init}")
        if len(self.resnet_layers) != 3:
            raise ValueError(f"resnet_layers needs three stage depths, got {self.resnet_layers}")
        if min(self.encoder_prompt_length, self.decoder_prompt_length, self.prompt_dim) < 0:
            raise ValueError(f"prompt lengths and prompt_dim must be >= 0, got encoder_prompt_length "
                             f"{self.encoder_prompt_length}, decoder_prompt_length {self.decoder_prompt_length}, "
                             f"prompt_dim {self.prompt_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ModelConfig") -> "ModelConfig":
        check_keys(cls, data, where)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, where: str = "ModelConfig") -> "ModelConfig":
        return cls.from_dict(json.loads(text), where)


def _preset(name: str, d: int, f: int, h: int, enc: int, dec: int, resnet: tuple[int, int, int]) -> ModelConfig:
    return ModelConfig(name=name, d_model=d, ffn_dim=f, num_heads=h, encoder_layers=enc, decoder_layers=dec,
                       resnet_layers=resnet)


PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset("tiny", 256, 1024, 4, 4, 4, (3, 4, 6)),
    "medium": _preset("medium", 512, 2048, 8, 4, 4, (3, 4, 23)),
    "base": _preset("base", 768, 3072, 12, 6, 6, (3, 4, 23)),
    "large": _preset("large", 1024, 4096, 16, 12, 12, (3, 8, 36)),
    "huge": _preset("huge", 1280, 5120, 16, 24, 12, (3, 8, 36)),
    "debug": _preset("debug", 64, 256, 4, 2, 2, (1, 1, 1)),
}
RELEASED_PRESETS: tuple[str, ...] = ("tiny", "medium", "base", "large", "huge")
"""The presets that are OFA releases (an official checkpoint's arch is `ofa_<name>`); `debug` is not one."""


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a preset with optional field overrides (`preset("base", dropout=0.1)`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ====================================================================================================================
# Training side (owned by the training code): TrainConfig, EvalConfig, RunConfig. Recipes in ofa_ds/recipes.py
# return a RunConfig; `--set train.lr=1e-5` style overrides go through `RunConfig.override`.
# ====================================================================================================================
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LossName = Literal["ce", "encouraging", "scst"]


@dataclass
class PromptTuningConfig:
    """Prompt tuning (OFA-prompt): trainable prefix keys/values in every encoder and/or decoder self-attention, the
    rest of the model frozen. On when either length is > 0; the run then builds the model with these prompts
    (ModelConfig.encoder_prompt_length ...), trains only `*_prompt_encoder.*` and writes them on their own to
    <out>/prompts.safetensors (docs/training.md#prompt-tuning)."""

    encoder_length: int = 0
    """Prefix length P in every encoder layer (OFA's --encoder-prompt-length; its script: 100); 0 = none."""
    decoder_length: int = 0
    """Prefix length in every decoder layer (OFA's --decoder-prompt-length; its script: 100); 0 = none."""
    projection: bool = False
    """Reparameterise the prompts through an MLP (OFA's --*-prompt-projection; its script: off)."""
    prompt_dim: int = 0
    """Hidden width of that MLP; 0 = 2·d_model (OFA's default)."""
    dropout: float = 0.2
    """Dropout on the prompt keys/values (OFA: 0.2)."""
    prompts: str = ""
    """Start from the prompts in this file (a prompts.safetensors written by a prompt-tuning run) instead of
    N(0, 0.02); its lengths and projection must match the ones above."""

    def __post_init__(self) -> None:
        if min(self.encoder_length, self.decoder_length, self.prompt_dim) < 0:
            raise ValueError(f"train.prompt_tuning lengths and prompt_dim must be >= 0, got {self}")

    @property
    def enabled(self) -> bool:
        return self.encoder_length > 0 or self.decoder_length > 0


@dataclass
class TrainConfig:
    """Optimisation, schedule, loss and bookkeeping of one run."""

    max_steps: int = 1000
    """Optimizer updates to run (each = grad_accum micro-batches per rank); replaced when epochs > 0."""
    epochs: int = 0
    """When > 0: max_steps = epochs · ceil(batches per epoch per rank / grad_accum), as OFA's --max-epoch."""
    grad_accum: int = 1
    """Micro-batches per update per rank (fairseq --update-freq)."""
    lr: float = 1e-4
    """Peak learning rate (reached after warmup)."""
    end_lr: float = 0.0
    """Learning rate at max_steps (polynomial decay, power 1 = linear)."""
    lr_power: float = 1.0
    """Power of the polynomial decay (OFA: 1)."""
    warmup_steps: int = -1
    """Linear warmup from 0; -1 = derive from warmup_ratio."""
    warmup_ratio: float = 0.06
    """Warmup as a fraction of max_steps when warmup_steps is -1 (int(ratio · max_steps), as OFA)."""
    weight_decay: float = 0.01
    """Decoupled weight decay on all parameters (OFA applies it to every parameter)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float = 1.0
    """Gradient clipping by global norm (0 = off; pretraining uses 5.0)."""
    precision: Precision = "auto"
    """'auto' (whatever the ds_config enables; fp32 when it enables neither), fp32, bf16 (A100/H100) or fp16 with
    dynamic loss scaling (V100). An explicit value must agree with the ds_config."""
    loss: LossName = "ce"
    """'ce' = OFA's adjust_label_smoothed_cross_entropy; 'encouraging' = OFA's encouraging loss (both in
    ofa_ds/losses.py)."""
    label_smoothing: float = 0.1
    """ε of the label-smoothed cross entropy (pretraining 0.0)."""
    token_weighting: Literal["token", "sample"] = "token"
    """'token' (OFA): every target token weighs the same, so long targets (captions, boxes) dominate the gradient;
    'sample': each sample's tokens share one sample's weight (token weight = mean tokens per sample / the sample's
    tokens, via the per-sample `conf`), so a one-word answer counts as much as a caption. Sums are unchanged."""
    drop_worst_ratio: float = 0.0
    """Drop this fraction of the highest-loss tokens once step > drop_worst_after."""
    drop_worst_after: int = 0
    """Step after which drop_worst applies."""
    drop_best_ratio: float = 0.0
    """Encouraging loss only: drop this fraction of the lowest-loss tokens once step > drop_best_after."""
    drop_best_after: int = 0
    """Step after which drop_best applies."""
    log_end: float = 0.75
    """Encouraging loss: where the bonus turns linear."""
    constraint_range: str = ""
    """'a,b' restricts the loss to ids 0-3 and a..b-1 (text-to-image: '50265,58457'); empty = off."""
    sample_patch_num: int = 196
    """Pretraining pairs: image tokens kept per v1 sample (OFA 196); 0 = all."""
    freeze_embeddings: bool = False
    """Freeze the shared token table (OFA's --freeze-encoder-embedding --freeze-decoder-embedding)."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder layer in the backward pass instead of keeping its activations."""
    compile: bool = False
    """Run the ResNet and every encoder/decoder layer through torch.compile (inductor; dense strategy, ZeRO 0-3;
    ofa_ds/training/compile.py). Same losses as eager within fp32 round-off; pays a compile time at the first steps
    and at the first new shapes (docs/training.md#compiled-training). Without a C++ compiler on a CPU machine the run
    says so and stays eager."""
    init: str = ""
    """Initial weights: an official .pt, a converted folder (config.json + weights) or one of our run folders."""
    seed: int = 1
    """Seed of parameter init, dropout and patch sampling (data has its own seed in DataConfig)."""
    log_every: int = 10
    """Console line + JSONL + TensorBoard record every this many steps (and at the last step)."""
    eval_every: int = 0
    """Held-out evaluation every this many steps (0 = only at the end)."""
    save_every: int = 0
    """DeepSpeed checkpoint every this many steps (0 = only at the end when save_final)."""
    save_final: bool = True
    """Checkpoint after the last step."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    export_final: bool = True
    """After training, consolidate to <out>/final/ (config.json + model.safetensors, loadable by from_pretrained)."""
    progress: bool = True
    """Progress bar with ETA on rank 0 (stderr)."""
    record_ids: bool = False
    """Append the sample ids of every step to <out>/ids_rank<r>.jsonl (resume checks, data debugging)."""
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    """Prompt tuning: prefix prompts trained, everything else frozen (off unless a length is > 0)."""
    scst_samples: int = 5
    """train.loss = 'scst' (caption stage 2, training/scst.py): beam size of the sample search; all its finished beams
    are the samples of an image (OFA: 5)."""
    scst_df: str = ""
    """train.loss = 'scst': CIDEr-D document frequencies (`python -m ofa_ds.metrics.cider build-df --add-eos` JSON or
    OFA's coco-train-words.p); empty = built at start from the training file's references."""
    ema_decay: float = 0.0
    """When > 0: keep an exponential moving average of the weights in float32, updated after every applied
    optimizer step (OFA's VQA recipe: 0.9999 from the first update, no bias correction; training/ema.py). Saved in
    checkpoints and exported to <out>/final/ema/. 0 = off."""
    ema_start_update: int = 0
    """The EMA copies the weights (decay 0) until this many updates, then averages with ema_decay (OFA: 0)."""
    ema_eval: bool = False
    """Held-out evaluations during and after training use the EMA weights (OFA's --uses-ema)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if isinstance(self.prompt_tuning, dict):                       # from JSON / --set
            check_keys(PromptTuningConfig, self.prompt_tuning, "train.prompt_tuning")
            self.prompt_tuning = PromptTuningConfig(**self.prompt_tuning)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.token_weighting not in ("token", "sample"):
            raise ValueError(f"train.token_weighting must be 'token' or 'sample', got {self.token_weighting!r}")
        if self.loss not in ("ce", "encouraging", "scst"):
            raise ValueError(f"train.loss must be 'ce', 'encouraging' or 'scst', got {self.loss!r}")
        if self.loss == "scst" and self.scst_samples < 2:
            raise ValueError(f"train.scst_samples must be >= 2 (leave-one-out baseline), got {self.scst_samples}")
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError(f"train.max_steps ({self.max_steps}) and train.grad_accum ({self.grad_accum}) "
                             "must be >= 1")
        if not 0 <= self.ema_decay < 1 or (self.ema_eval and self.ema_decay == 0):
            raise ValueError(f"train.ema_decay must be in [0, 1) and > 0 when train.ema_eval is on, got "
                             f"{self.ema_decay} (ema_eval {self.ema_eval})")
        if not 0 <= self.drop_worst_ratio < 1 or not 0 <= self.drop_best_ratio < 1:
            raise ValueError("train.drop_worst_ratio / drop_best_ratio must be in [0, 1)")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else int(self.warmup_ratio * self.max_steps)

    def range_tuple(self) -> tuple[int, int] | None:
        if not self.constraint_range:
            return None
        a, b = (int(x) for x in self.constraint_range.split(","))
        return a, b


@dataclass
class EvalConfig:
    """Held-out evaluation. Pretraining evaluates the tasks in `data` (task -> validation TSV); a finetuning run
    evaluates its own task on the last file of DataConfig.data when `data` is empty."""

    data: dict[str, str] = field(default_factory=dict)
    """task -> validation TSV (caption, vqa, refcoco, snli_ve); answers for vqa come from `vqa_answers`."""
    vqa_answers: str = ""
    """Candidate answers of the VQA evaluation (json answer -> label); empty = DataConfig.ans2label_file."""
    max_samples: int = 256
    """Samples per task and evaluation (0 = all)."""
    batch_size: int = 32
    """Samples per evaluation batch per rank."""
    max_len: int = 20
    """Greedy caption decoding length (grounding decodes exactly 4 bins)."""
    reference_stats: dict[str, str] = field(default_factory=dict)
    """task -> training TSV (in that task's format) the trivial baselines come from: most frequent VQA answer, most
    frequent caption, mean box. Tasks without an entry get no baseline."""
    vqa_answer_types: str = ""
    """JSON of answer type -> answers (OFA's negative_sample/type2ans.json format; "other" is skipped): the report
    then adds VQA accuracy per type of each question's best reference answer, `vqa_acc_<type>` (e.g.
    vqa_acc_color, vqa_acc_how_many). Needs reference_stats["vqa"]. Empty = no per-type accuracy."""


@dataclass
class RunConfig:
    """One run: model + data + train + eval, plus where it writes. `to_dict()` is what config.json in the run folder
    holds; `from_dict` rebuilds it exactly."""

    name: str = "run"
    """Recipe name (informational)."""
    out_dir: str = "runs/default"
    """Run folder: config.json, ds_config.json, metrics.jsonl, tb/, checkpoints/, final/, report.json."""
    ds_config: str = "ds_configs/cpu_fp32.json"
    """DeepSpeed JSON with engine choices; "auto" fields are filled from this config."""
    synthetic_root: str = ""
    """When set, generate the built-in synthetic dataset here if it is missing (the default run)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None
    """An ofa_ds.data.DataConfig (imported lazily so that config.py does not import the data package)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.data is None:
            from ofa_ds.data.config import DataConfig
            self.data = DataConfig()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out_dir": self.out_dir, "ds_config": self.ds_config,
                "synthetic_root": self.synthetic_root, "model": self.model.to_dict(), "data": self.data.to_dict(),
                "train": {**dataclasses.asdict(self.train), "betas": list(self.train.betas)},
                "eval": dataclasses.asdict(self.eval)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "RunConfig") -> "RunConfig":
        from ofa_ds.data.config import DataConfig
        check_keys(cls, d, where)
        for key, sub in (("train", TrainConfig), ("eval", EvalConfig)):
            check_keys(sub, d.get(key, {}), f"{where}.{key}")
        return cls(name=d.get("name", "run"), out_dir=d.get("out_dir", "runs/default"),
                   ds_config=d.get("ds_config", "ds_configs/cpu_fp32.json"),
                   synthetic_root=d.get("synthetic_root", ""),
                   model=ModelConfig.from_dict(d.get("model", {}), f"{where}.model"),
                   data=DataConfig.from_dict(d.get("data", {}), f"{where}.data"),
                   train=TrainConfig(**d.get("train", {})), eval=EvalConfig(**d.get("eval", {})))

    @classmethod
    def from_json(cls, text: str, where: str = "RunConfig") -> "RunConfig":
        return cls.from_dict(json.loads(text), where)

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply `section.field=value` strings (value parsed as JSON when it parses, else taken as a string).
        Unknown sections or fields are an error naming the known ones. Returns a new RunConfig."""
        d = self.to_dict()
        for a in assignments:
            key, sep, raw = a.partition("=")
            if not sep:
                raise ValueError(f"--set expects key=value, got {a!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            parts = key.strip().split(".")
            node = d
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ValueError(f"--set {key}: no config section {p!r}; sections: "
                                     f"{sorted(k for k, v in node.items() if isinstance(v, dict))}")
                node = node[p]
            if parts[-1] not in node and not (len(parts) == 3 and parts[1] in ("data", "reference_stats")):
                raise ValueError(f"--set {key}: unknown field {parts[-1]!r}; known: {sorted(node)}")
            node[parts[-1]] = value
        return RunConfig.from_dict(d, "--set")
