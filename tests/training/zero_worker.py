"""Worker for the universal-checkpoint test: ZeRO-3 on 2 ranks → DeepSpeed universal checkpoint → resume elsewhere.

    deepspeed --num_gpus 2 tests/training/zero_worker.py --out DIR --phase train          # 4 steps, save after step 2
    python -m ofa_ds.training.universal to-universal DIR/ckpt --tag step2               # (the test does this)
    deepspeed --num_gpus 1 tests/training/zero_worker.py --out DIR --phase resume --stage 1 --tag step2_universal

Every step uses the same global batch of 4 samples whatever the layout: 2 ranks take 2 samples each, 1 rank takes
two micro-batches of 2 (gradient accumulation 2), so the averaged gradient, hence the trajectory, is the same.
Each phase writes DIR/<phase>.json with the global mean loss per step (written by rank 0).
"""
import argparse
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ofa_ds.model import OFAModel  # noqa: E402
from ofa_ds.training.pipeline import PipeLoss  # noqa: E402
from pipe_worker import small_cfg  # noqa: E402

GLOBAL = 4


def batch_for(step: int) -> dict:
    g = torch.Generator().manual_seed(500 + step)
    src = torch.randint(4, 400, (GLOBAL, 7), generator=g)
    src[1, -2:] = 1
    prev = torch.randint(4, 400, (GLOBAL, 5), generator=g)
    prev[:, 0] = 0
    target = torch.cat([prev[:, 1:], torch.full((GLOBAL, 1), 2)], 1)
    return {"src_tokens": src, "prev_output_tokens": prev, "target": target,
            "patch_images": torch.randn(GLOBAL, 3, 32, 32, generator=g),
            "patch_masks": torch.tensor([True, True, False, True])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=("train", "resume"), required=True)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--tag", default="step2_universal")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, gas = GLOBAL // 2, 2 // world
    torch.manual_seed(0)
    model = OFAModel(small_cfg()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 9,
           "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
           "checkpoint": {"load_universal": args.phase == "resume"}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss_fn = PipeLoss(eps=0.1)
    ck = os.path.join(args.out, "ckpt")
    first = 1
    if args.phase == "resume":
        engine.load_checkpoint(ck, tag=args.tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        first = 3
    losses = {}
    for step in range(first, 5):
        b = batch_for(step)
        total = torch.zeros(())
        for m in range(gas):
            lo = (rank * gas + m) * micro
            sl = {k: (v[lo:lo + micro] if torch.is_tensor(v) else v) for k, v in b.items()}
            loss = loss_fn(engine(sl["src_tokens"], sl["patch_images"], sl["patch_masks"], sl["prev_output_tokens"]),
                           sl["target"])
            engine.backward(loss)
            engine.step()
            total += loss.detach() / gas
        dist.all_reduce(total)
        losses[step] = float(total) / world
        if args.phase == "train" and step == 2:
            engine.save_checkpoint(ck, tag="step2")
    if rank == 0:
        with open(os.path.join(args.out, f"{args.phase}.json"), "w") as f:
            json.dump({"losses": losses, "world": world, "stage": args.stage,
                       "global_steps": engine.global_steps}, f)
    dist.barrier()


if __name__ == "__main__":
    from ofa_ds.training.shutdown import exit_process
    main()
    exit_process(0)   # not a plain return: see ofa_ds.training.shutdown
