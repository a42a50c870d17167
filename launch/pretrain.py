"""OFA pretraining on DeepSpeed. With no arguments: OFA-Tiny on the built-in synthetic multitask mixture (generated
on first use), ~8 minutes on two CPU cores, ending with one JSON line of held-out metrics.

    deepspeed launch/pretrain.py
    deepspeed --num_gpus 2 launch/pretrain.py --ds-config ds_configs/zero3_fp32.json --out runs/z3
    deepspeed --hostfile hosts launch/pretrain.py --recipe pretrain_base --set data.data=/data/vl.tsv

Options: --recipe, --ds-config, --out, --steps, --init, --resume, --set key=value (see docs/training.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from ofa_ds.training.cli import main  # noqa: E402
from ofa_ds.training.shutdown import exit_process  # noqa: E402

if __name__ == "__main__":
    exit_process(main(sys.argv[1:], default_recipe="default", description=__doc__.splitlines()[0]))
