"""OFA finetuning on DeepSpeed: one recipe per task with the hyperparameters of OFA's run scripts.

    deepspeed launch/finetune.py --recipe vqa --init ofa_large.pt --out runs/vqa
    deepspeed launch/finetune.py --recipe caption --init runs/default --steps 100 --ds-config ds_configs/cpu_fp32.json
    deepspeed launch/finetune.py --recipe glue_rte --init ofa_base.pt --set data.data=rte_train.tsv,rte_dev.tsv

Recipes: caption[_base], vqa[_base], refcoco[plus|g][_base], snli_ve[_base], imagenet, gigaword, glue_<task>.
Options: --recipe, --ds-config, --out, --steps, --init, --resume, --set key=value (see docs/training.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from ofa_ds.training.cli import main  # noqa: E402
from ofa_ds.training.shutdown import exit_process  # noqa: E402

if __name__ == "__main__":
    exit_process(main(sys.argv[1:], default_recipe="caption", description=__doc__.splitlines()[0]))
