"""Worker for the pipeline tests (started with `deepspeed --num_gpus 2 tests/training/pipe_worker.py --out DIR`).

Every rank builds the same small dense OFAModel (fixed seed) and, independently, a 2-stage pipeline initialised from
its weights. Then:
  1. one optimizer step over two micro-batches of different shapes (image + padding, text-only + code masks):
     the pipeline's loss and the gradients seen by its optimizer vs. the dense model's (same loss function);
  2. three more steps with AdamW: per-step losses of both;
  3. the pipeline's DeepSpeed checkpoint is saved, converted offline to the official layout and an HF-style folder,
     and compared with the dense model trained alongside; a fresh pipeline built from a dense state dict
     (dense → pipeline) must give the dense model's eval loss.
Rank 0 writes DIR/result.json with the largest differences; the pytest file asserts on them.
"""
import argparse
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ofa_ds.config import preset  # noqa: E402
from ofa_ds.model import OFAModel  # noqa: E402
from ofa_ds.training.pipeline import (PipeLoss, batch_to_pipe, build_pipeline, gather_dense_state,  # noqa: E402
                                      load_dense_into_pipeline, pipe_to_dense_names)


def small_cfg(**kw):
    return preset("tiny", d_model=64, ffn_dim=128, num_heads=4, encoder_layers=2, decoder_layers=2,
                  resnet_layers=(3, 4, 6), vocab_size=400, **kw)


def make_batches(seed: int, n: int):
    """n micro-batch dicts of batch 2 with varying shapes: images (one sample image-less), padding, text-only,
    code masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ls, lt = 5 + (i * 3) % 7, 4 + (i * 2) % 5
        src = torch.randint(4, 400, (2, ls), generator=g)
        src[1, ls - 2:] = 1
        prev = torch.randint(4, 400, (2, lt), generator=g)
        prev[:, 0] = 0
        tgt = torch.cat([prev[:, 1:], torch.full((2, 1), 2)], 1)
        tgt[1, -1] = 1
        b = {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "code_masks": None,
             "patch_images": None, "patch_masks": None}
        if i % 2 == 0:
            b["patch_images"] = torch.randn(2, 3, 32, 32, generator=g)
            b["patch_masks"] = torch.tensor([True, i % 4 == 0])
        else:
            b["code_masks"] = torch.tensor([False, True])
        out.append(b)
    return out


class Recording(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it is about to apply."""

    def step(self, closure=None):
        self.seen = [[p.grad.detach().clone() for p in g["params"]] for g in self.param_groups]
        return super().step(closure)


def dense_loss(model, loss_fn, mbs):
    total = 0.0
    for b in mbs:
        logits = model(b["src_tokens"], b["patch_images"], b["patch_masks"], b["prev_output_tokens"],
                       code_masks=b["code_masks"])
        loss = loss_fn(logits, b["target"]) / len(mbs)
        if torch.is_grad_enabled():
            loss.backward()
        total += float(loss)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = small_cfg()
    dense = OFAModel(cfg).train()
    init = {k: v.clone() for k, v in dense.state_dict().items()}
    loss_fn = PipeLoss(eps=0.1)

    pipe = build_pipeline(cfg, num_stages=2, loss_fn=loss_fn, partition_method="type:EncoderLayerPipe|DecoderLayerPipe")
    load_dense_into_pipeline(pipe, init, cfg)
    names = pipe_to_dense_names(cfg)
    opt = Recording([p for p in pipe.parameters()], lr=1e-3, weight_decay=0.01)
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 0},
              "gradient_clipping": 0.0}    # DeepSpeed 0.19's default is 1.0, which would clip here
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=opt, config=ds_cfg)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-3, weight_decay=0.01)

    batches = make_batches(7, 8)
    res = {"stage": engine.stage_id, "parts": pipe.parts, "steps": []}
    grad_err, n_grads = 0.0, 0
    for step in range(4):
        mbs = batches[2 * step: 2 * step + 2]
        it = iter([batch_to_pipe(b) for b in mbs])
        p_loss = float(engine.train_batch(it))
        dense_opt.zero_grad()
        d_loss = dense_loss(dense, loss_fn, mbs)
        if step == 0:
            dgrads = {n: p.grad.clone() for n, p in dense.named_parameters()}
            pnames = {id(p): n for n, p in pipe.named_parameters()}
            for group, seen in zip(opt.param_groups, opt.seen):
                for p, gr in zip(group["params"], seen):
                    dn = names[pnames[id(p)]]
                    ref = dgrads[dn]
                    e = float((gr - ref).abs().max())
                    if e > 1e-5:
                        res.setdefault("bad_grads", []).append([dn, e, float((gr * ref).sum() / (ref * ref).sum())])
                    grad_err = max(grad_err, e)
                    n_grads += 1
        dense_opt.step()
        res["steps"].append({"pipe": p_loss, "dense": d_loss})
    res["grad_max_abs_err"], res["grads_compared"] = grad_err, n_grads
    res["local_params"] = sum(p.numel() for p in pipe.parameters())

    # -- checkpoint: pipeline → dense/official/folder, compared with the dense model trained alongside ---------------
    ck = os.path.join(args.out, "pipe_ckpt")
    engine.save_checkpoint(ck, tag="step4")
    gathered = gather_dense_state(pipe, cfg)
    dist.barrier()
    if rank == 0:
        from ofa_ds.checkpoint import load_any
        from ofa_ds.training.universal import pipeline_checkpoint_to_dense
        state = pipeline_checkpoint_to_dense(ck, cfg)
        ref = dense.state_dict()
        res["ckpt_keys_missing"] = sorted(set(ref) - set(state) - {"encoder.version", "decoder.version",
                                                                 "encoder.token_rp_bucket", "encoder.image_rp_bucket",
                                                                 "decoder.token_rp_bucket", "decoder.image_rp_bucket",
                                                                 "decoder.image_position_idx"})
        res["ckpt_vs_gather_max_abs_err"] = max(float((state[k].float() - gathered[k].float()).abs().max())
                                                 for k in gathered)
        res["ckpt_keys_equal_gather"] = sorted(state) == sorted(gathered)
        # Adam turns 1e-8 gradient differences of near-zero gradients into ~lr-sized steps: informational only
        res["pipe_vs_dense_weights_max_abs_err"] = max(float((state[k].float() - ref[k].float()).abs().max())
                                                       for k in state)
        res["trained_vs_init_max_abs_diff"] = max(float((state[k].float() - init[k].float()).abs().max())
                                                  for k in state)
        from ofa_ds.training.universal import export_pipeline_checkpoint
        export_pipeline_checkpoint(ck, cfg, folder=os.path.join(args.out, "folder"),
                                   official=os.path.join(args.out, "official.pt"))
        errs = []
        for path in (os.path.join(args.out, "folder"), os.path.join(args.out, "official.pt")):
            m = load_any(path)
            errs.append(max(float((v.float() - state[k].float()).abs().max()) for k, v in m.state_dict().items()
                            if k in state))
        res["export_max_abs_err"] = max(errs)

    # -- the same first step with per-layer activation checkpointing in the pipeline ----------------------------------
    pipe3 = build_pipeline(cfg, num_stages=2, loss_fn=loss_fn, activation_checkpointing=True,
                           partition_method="type:EncoderLayerPipe|DecoderLayerPipe")
    load_dense_into_pipeline(pipe3, init, cfg)
    opt3 = Recording(list(pipe3.parameters()), lr=1e-3, weight_decay=0.01)
    e3, _, _, _ = deepspeed.initialize(model=pipe3, optimizer=opt3, config=ds_cfg)
    ac_loss = float(e3.train_batch(iter([batch_to_pipe(b) for b in batches[:2]])))
    pnames3 = {id(p): n for n, p in pipe3.named_parameters()}
    ac_err = 0.0
    for group, seen in zip(opt3.param_groups, opt3.seen):
        for p, gr in zip(group["params"], seen):
            ac_err = max(ac_err, float((gr - dgrads[names[pnames3[id(p)]]]).abs().max()))
    res["ac_pipe"] = {"loss": ac_loss, "dense_loss": res["steps"][0]["dense"], "grad_max_abs_err": ac_err,
                      "checkpointed_blocks": sum(bool(x) for x in pipe3.is_checkpointable_results),
                      "layers_on_stage": len(pipe3.forward_funcs)}

    # -- dense → pipeline: a pipeline initialised from the trained dense weights evaluates like the dense model ------
    dense.eval()
    pipe2 = build_pipeline(cfg, num_stages=2, loss_fn=loss_fn, partition_method="parameters")
    load_dense_into_pipeline(pipe2, dense.state_dict(), cfg)
    e2, _, _, _ = deepspeed.initialize(model=pipe2, config=dict(ds_cfg, optimizer={"type": "SGD",
                                                                                    "params": {"lr": 0.0}}))
    mbs = batches[:2]
    ev = float(e2.eval_batch(iter([batch_to_pipe(b) for b in mbs])))
    with torch.no_grad():
        res["d2p_eval"] = {"pipe": ev, "dense": dense_loss(dense, loss_fn, mbs), "parts": pipe2.parts}
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f, indent=1, default=int)
    dist.barrier()


if __name__ == "__main__":
    from ofa_ds.training.shutdown import exit_process
    main()
    exit_process(0)   # not a plain return: see ofa_ds.training.shutdown
