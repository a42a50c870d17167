"""Named experiments: plain functions returning a RunConfig (`RECIPES[name]()`), with OFA's hyperparameters
(docs/ofa.md#hyperparameters).

* `default` is the zero-setup run of `deepspeed launch/pretrain.py`: OFA-Tiny (full architecture) pretrained on the
  built-in synthetic multitask mixture at 64 px images, sized to finish in under 10 minutes on two CPU cores and
  to learn visibly (held-out VQA / caption / grounding metrics against their trivial baselines).
* `debug` runs the same code path in seconds (the `debug` model preset, 32 px, 10 steps); tests use it.
* `pretrain_{tiny,medium,base,large,huge}` follow OFA's pretraining script (lr 1e-4, 4 rows per GPU, warmup 1%,
  no label smoothing, drop path 0.1, dropout 0.1, clip 5.0, 384 px, 196 sampled patches, max_src 80, max_tgt 30).
  Their data default to the synthetic files; point `data.data` / `data.text_data` / ... at real TSVs.
* Finetuning recipes use the Large scripts' values, `*_base` variants the Base scripts' where they differ (both in
  docs/ofa.md#hyperparameters). Epoch-based scripts set `train.epochs` (steps derived from the data size, as OFA's
  --max-epoch). Recipes for tasks with synthetic files (caption, vqa, refcoco*, snli_ve) point there by default;
  imagenet, gigaword and GLUE need `--set data.data=train.tsv,valid.tsv`.
* `<task>_prompt` (vqa, caption, refcoco, snli_ve) are prompt tuning on top of the task's recipe, with the values
  of OFA's only prompt-tuning script (RefCOCO): prefix length 100 in every encoder and decoder layer, no projection,
  100 epochs, lr 0.03 (the largest value of its grid; measured on the default run's model,
  docs/training.md#prompt-tuning); everything but the prompts frozen.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ofa_ds.config import EvalConfig, PromptTuningConfig, RunConfig, TrainConfig, preset
from ofa_ds.data.config import DataConfig

SYNTHETIC_ROOT = os.environ.get("OFA_DS_SYNTHETIC", "data/synthetic")


def _syn(*parts: str) -> str:
    return os.path.join(SYNTHETIC_ROOT, *parts)


def _synthetic_data(task: str, **kw) -> DataConfig:
    from ofa_ds.data.synthetic import data_config
    return data_config(SYNTHETIC_ROOT, task, **kw)


def _pretrain_eval(image_size: int, max_samples: int = 256) -> EvalConfig:
    return EvalConfig(
        data={"vqa": _syn("vqa", "vqa_val.tsv"), "caption": _syn("caption", "caption_val.tsv"),
              "refcoco": _syn("refcoco", "refcoco_val.tsv")},
        vqa_answers=_syn("vqa", "vqa_answers.json"), max_samples=max_samples, batch_size=32, max_len=16,
        reference_stats={"vqa": _syn("vqa", "vqa_train.tsv"), "caption": _syn("caption", "caption_stage1_train.tsv"),
                         "refcoco": _syn("refcoco", "refcoco_train.tsv")},
        vqa_answer_types=_syn("pretrain", "negative_sample", "type2ans.json"))


# ---- pretraining ----------------------------------------------------------------------------------------------------
NORMFORMER_INIT = 0.1   # the default run's NormFormer LayerNorm start weight (OFA: 1); see default()


def default() -> RunConfig:
    """The headline CPU run: OFA-Tiny on the synthetic vision-language mixture (captioning, VQA, grounding, grounded
    captioning, two kinds of image-text matching), 64 px, 550 steps of 8 rows (16 samples), fp32. The step count is
    set by the budget of ten minutes on the slowest 2-core machines (docs/benchmarks.md#the-default-runs-wall-time):
    held-out VQA 0.637 / 0.711 with seeds 1 / 2 at 550 steps, 0.730 at 850 (docs/experiments.md). The "v2" extras
    (text/image infilling, detection) are off: each would add a second forward per step and, through OFA's pair loss,
    take half of every gradient; pretrain_* recipes keep them. Augmentation is off:
    RandomAugment's Equalize/AutoContrast/Brightness change the colours the questions ask about, and without it the
    training crops equal the evaluation images. lr 5e-4 with a 100-step warmup: with lr 1e-3 and a short warmup the
    model learns to ignore the image in its first steps (measured; docs/experiments.md#conclusions). The NormFormer
    LayerNorm weights start at 0.1 instead of 1 (`model.normformer_init`; weights only, the architecture is OFA's):
    with 1 each attention/FFN branch adds a full-size, mostly image-independent vector to every token from step 0
    and the image signal is learned far more slowly (measured; docs/experiments.md). The ResNet starts each bottleneck
    as its shortcut (`model.resnet_zero_init_residual`, Goyal et al. 2017; OFA loads ImageNet weights instead), which
    keeps colour in the image features, and Adam's beta2 is 0.98; the data folder, when missing, is generated as the
    one-object world `synthetic.DEFAULT_RUN_WORLD` (docs/experiments.md#conclusions: with 1-4 objects per scene the
    model does not learn colour or shape within the budget, held-out VQA 0.49-0.57)."""
    size = 64
    data = _synthetic_data("pretrain", patch_image_size=size, v2_image_size=size, batch_size=8, image_data="",
                           text_data="", detection_data="", max_src_length=80, max_tgt_length=30, augment=False)
    train = TrainConfig(max_steps=550, lr=5e-4, end_lr=0.0, warmup_steps=100, label_smoothing=0.0, clip_norm=5.0,
                        weight_decay=0.01, sample_patch_num=0, log_every=25, save_every=0, progress=True,
                        betas=(0.9, 0.98))
    model = preset("tiny", normformer_init=NORMFORMER_INIT, resnet_zero_init_residual=True)
    return RunConfig(name="default", out_dir="runs/default", ds_config="ds_configs/cpu_fp32.json",
                     synthetic_root=SYNTHETIC_ROOT, model=model, data=data,
                     train=train, eval=_pretrain_eval(size))


def debug() -> RunConfig:
    """Seconds-long run of the whole training path, for tests and debugging: the `debug` model preset on the
    synthetic pretraining mixture with OFA's v2 extras (text infilling, image infilling, detection), so that with 2
    rows per batch every 4th batch is a (v1, v2) pair; 32 px images, 10 steps with a record each step, fp32, 8
    held-out samples per task. tests/training/test_golden_loss.py pins its first 10 losses."""
    size = 32
    data = _synthetic_data("pretrain", patch_image_size=size, v2_image_size=size, batch_size=2, max_src_length=80,
                           max_tgt_length=30, augment=False)
    train = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=1, sample_patch_num=0, log_every=1, progress=False)
    evaluation = _pretrain_eval(size, max_samples=8)
    evaluation.batch_size = 4
    return RunConfig(name="debug", out_dir="runs/debug", ds_config="ds_configs/cpu_fp32.json",
                     synthetic_root=SYNTHETIC_ROOT, model=preset("debug"), data=data, train=train, eval=evaluation)


def _pretrain(size: str) -> RunConfig:
    data = _synthetic_data("pretrain", patch_image_size=384, v2_image_size=256, batch_size=4, max_src_length=80,
                           max_tgt_length=30, max_image_size=512, code_image_size=128)
    model = preset(size, dropout=0.1, encoder_drop_path_rate=0.1, decoder_drop_path_rate=0.1)
    train = TrainConfig(max_steps=100_000, lr=1e-4, warmup_ratio=0.01, label_smoothing=0.0, clip_norm=5.0,
                        sample_patch_num=196, log_every=100, eval_every=5000, save_every=5000)
    return RunConfig(name=f"pretrain_{size}", out_dir=f"runs/pretrain_{size}", ds_config="ds_configs/zero2_bf16.json",
                     synthetic_root=SYNTHETIC_ROOT, model=model, data=data, train=train,
                     eval=_pretrain_eval(384, max_samples=512))


# ---- finetuning -----------------------------------------------------------------------------------------------------
def _finetune(name: str, data: DataConfig, *, lr: float, grad_accum: int, drop_path: float, ls: float,
              epochs: int = 0, max_steps: int = 1000, warmup_steps: int = -1, warmup_ratio: float = 0.06,
              size: str = "large",
              ds: str = "ds_configs/zero2_bf16.json", **train_kw) -> RunConfig:
    model = preset(size, dropout=0.1, encoder_drop_path_rate=drop_path, decoder_drop_path_rate=drop_path)
    train = TrainConfig(lr=lr, grad_accum=grad_accum, label_smoothing=ls, clip_norm=1.0, epochs=epochs,
                        max_steps=max_steps, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, sample_patch_num=0,
                        log_every=50, eval_every=1000, save_every=1000, **train_kw)
    syn = SYNTHETIC_ROOT if data.data.startswith(SYNTHETIC_ROOT) else ""
    return RunConfig(name=name, out_dir=f"runs/{name}", ds_config=ds, synthetic_root=syn, model=model, data=data,
                     train=train, eval=EvalConfig(max_samples=1000))


def caption(base: bool = False) -> RunConfig:
    """Caption stage 1 (CE): lr 1e-5, 8×4 per GPU, 2 epochs (Large loop value; Base 5), LS 0.1, frozen embeddings,
    drop_worst 0.2 after 2500 (Base 6000) updates, max_tgt 20, 480 px."""
    d = _synthetic_data("caption", batch_size=8, patch_image_size=480, max_tgt_length=20)
    return _finetune("caption_base" if base else "caption", d, lr=1e-5, grad_accum=4, drop_path=0.1, ls=0.1,
                     epochs=5 if base else 2, freeze_embeddings=True, drop_worst_ratio=0.2,
                     drop_worst_after=6000 if base else 2500, size="base" if base else "large")


def caption_scst(base: bool = False) -> RunConfig:
    """Caption stage 2 (SCST, CIDEr-D optimisation; docs/training.md#caption-stage-2-scst): start from a stage-1
    model (--init), lr 1e-5 → 2e-7 (Base → 0), warmup 6%, 3 epochs, 2×4 per GPU, dropout and drop path 0, clip 1.0,
    frozen embeddings, 480 px, max_tgt 20; samples = the 5 finished beams (max_len_b 16, no-repeat 3) of each image,
    reward CIDEr-D with document frequencies of the training references, leave-one-out baseline."""
    d = _synthetic_data("caption", batch_size=2, patch_image_size=480, max_tgt_length=20)
    r = _finetune("caption_scst_base" if base else "caption_scst", d, lr=1e-5, grad_accum=4, drop_path=0.0, ls=0.0,
                  epochs=3, freeze_embeddings=True, size="base" if base else "large", loss="scst",
                  end_lr=0.0 if base else 2e-7)
    r.model = dataclasses.replace(r.model, dropout=0.0)
    return r


def vqa(base: bool = False) -> RunConfig:
    """VQA: lr 5e-5, 4×4 per GPU, 40k updates / 1000 warmup (Base: 15 epochs, warmup 4%), LS 0.1, drop path 0.2
    (Base 0.1), frozen embeddings, prompt prev_output, add_object, 480 px; EMA weights (decay 0.9999 from the first
    update, fp32) used for the held-out evaluation, as OFA's --store-ema --ema-fp32 --uses-ema."""
    d = _synthetic_data("vqa", batch_size=4, patch_image_size=480, prompt_type="prev_output", add_object=True)
    if base:
        return _finetune("vqa_base", d, lr=5e-5, grad_accum=4, drop_path=0.1, ls=0.1, epochs=15, size="base",
                         freeze_embeddings=True, warmup_ratio=0.04, ema_decay=0.9999, ema_eval=True)
    return _finetune("vqa", d, lr=5e-5, grad_accum=4, drop_path=0.2, ls=0.1, max_steps=40_000, warmup_steps=1000,
                     freeze_embeddings=True, ema_decay=0.9999, ema_eval=True)


def refcoco(variant: str = "refcoco", base: bool = False) -> RunConfig:
    """RefCOCO / RefCOCO+ / RefCOCOg: lr 3e-5 (Base 5e-5), 4×8 per GPU, 10 epochs (Base RefCOCOg 12), LS 0.1,
    drop path 0.2 (Base 0.1), 512 px."""
    d = _synthetic_data("refcoco", batch_size=4, patch_image_size=512, max_image_size=512)
    epochs = 12 if (base and variant == "refcocog") else 10
    return _finetune(f"{variant}_base" if base else variant, d, lr=5e-5 if base else 3e-5, grad_accum=8,
                     drop_path=0.1 if base else 0.2, ls=0.1, epochs=epochs, size="base" if base else "large")


def snli_ve(base: bool = False) -> RunConfig:
    """SNLI-VE: lr 2e-5 (Base 5e-5), 4×8 per GPU, 6 epochs (Base 5), LS 0, drop path 0.2 (Base 0.1), add_caption,
    prompt prev_output, 480 px."""
    d = _synthetic_data("snli_ve", batch_size=4, patch_image_size=480, add_caption=True, prompt_type="prev_output")
    return _finetune("snli_ve_base" if base else "snli_ve", d, lr=5e-5 if base else 2e-5, grad_accum=8,
                     drop_path=0.1 if base else 0.2, ls=0.0, epochs=5 if base else 6, size="base" if base else "large")


def imagenet() -> RunConfig:
    """ImageNet-1K: lr 5e-5, 4×4 per GPU, 160k updates / 1000 warmup, LS 0.1, drop path 0.1, ImageNet mean/std,
    frozen embeddings, 480 px. Needs --set data.data=train.tsv,valid.tsv data.ans2label_file=..."""
    d = DataConfig(task="imagenet", batch_size=4, patch_image_size=480, imagenet_default_mean_and_std=True)
    return _finetune("imagenet", d, lr=5e-5, grad_accum=4, drop_path=0.1, ls=0.1, max_steps=160_000,
                     warmup_steps=1000, freeze_embeddings=True)


def gigaword() -> RunConfig:
    """Gigaword: lr 1e-4, 64×2 per GPU, 6 epochs, LS 0.1, drop path 0.1, max_src 512, max_tgt 64, noise 0.2."""
    d = DataConfig(task="gigaword", batch_size=64, max_src_length=512, max_tgt_length=64, noise_ratio=0.2)
    return _finetune("gigaword", d, lr=1e-4, grad_accum=2, drop_path=0.1, ls=0.1, epochs=6)


def glue(task: str) -> RunConfig:
    """GLUE (cola, sst2, mrpc, qqp, mnli, rte, qnli): lr 1e-4 (grid 1e-4…3e-5), bs 16 (CoLA/MRPC/SST-2) else 8,
    update_freq 1, 5 epochs (grid 5/7/10), LS 0, drop path 0.1, prompt src, max_src 512."""
    bs = 16 if task in ("cola", "mrpc", "sst2") else 8
    d = DataConfig(task=task, batch_size=bs, max_src_length=512, prompt_type="src")
    return _finetune(f"glue_{task}", d, lr=1e-4, grad_accum=1, drop_path=0.1, ls=0.0, epochs=5)


def prompt_recipe(task: str) -> RunConfig:
    """Prompt tuning of `task` (caption, vqa, refcoco, snli_ve) as OFA's train_refcoco_prefix.sh: the task recipe with
    prefix prompts of length 100 in every encoder and decoder layer (no projection), lr 0.03 (of its grid {0.03,
    5e-5, 1e-4}), 100 epochs, warmup 6%; only the prompts train. Start from a trained model: --init."""
    run = RECIPES[task]()
    run.name, run.out_dir = f"{task}_prompt", f"runs/{task}_prompt"
    run.train.prompt_tuning = PromptTuningConfig(encoder_length=100, decoder_length=100)
    run.train.lr, run.train.epochs, run.train.warmup_steps, run.train.warmup_ratio = 0.03, 100, -1, 0.06
    run.train.freeze_embeddings = False                     # everything but the prompts is frozen anyway
    run.train.ema_decay, run.train.ema_eval = 0.0, False    # OFA's prefix script keeps no EMA (VQA's recipe does)
    return run


def _with(fn: Callable[..., RunConfig], *a, **kw) -> Callable[[], RunConfig]:
    return lambda: fn(*a, **kw)


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "default": default,
    "debug": debug,
    **{f"pretrain_{s}": _with(_pretrain, s) for s in ("tiny", "medium", "base", "large", "huge")},
    "caption": caption, "caption_base": _with(caption, base=True),
    "caption_scst": caption_scst, "caption_scst_base": _with(caption_scst, base=True),
    "vqa": vqa, "vqa_base": _with(vqa, base=True),
    "refcoco": refcoco, "refcocoplus": _with(refcoco, "refcocoplus"), "refcocog": _with(refcoco, "refcocog"),
    "refcoco_base": _with(refcoco, base=True), "refcocoplus_base": _with(refcoco, "refcocoplus", base=True),
    "refcocog_base": _with(refcoco, "refcocog", base=True),
    "snli_ve": snli_ve, "snli_ve_base": _with(snli_ve, base=True),
    "imagenet": imagenet, "gigaword": gigaword,
    **{f"glue_{t}": _with(glue, t) for t in ("cola", "sst2", "mrpc", "qqp", "mnli", "rte", "qnli")},
}
RECIPES.update({f"{t}_prompt": _with(prompt_recipe, t) for t in ("caption", "vqa", "refcoco", "snli_ve")})


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()


