"""SCST (self-critical sequence training, caption stage 2) as OFA's `scst_reward_criterion` does it
(docs/ofa.md#scst).

One call of `scst_loss(model, batch, tokenizer, reward)`:
  1. generates with the `--scst-args` beam search (beam 5, max_len_b 16, no_repeat_ngram 3) in eval mode, under
     no_grad; **all `beam` finished hypotheses** of each image are the samples (`sync=True` keeps ZeRO-3 ranks in
     lockstep during generation);
  2. decodes them, strips punctuation and a trailing '.', appends " <eos>" (the convention of OFA's cached
     document frequencies, `coco-train-words.p`); references (the `&&`-split targets, `batch["captions"]`)
     get the same treatment;
  3. reward = CIDEr-D (n 4, σ 6) of each sample against its image's references with the cached df (corpus df of
     the batch's references when no cache is given); baseline = mean reward of the *other* beams of the same image
     (leave-one-out); advantage = reward − baseline, in float64;
  4. teacher-forces the samples in the model's current (train) mode: prev = bos + tokens[:-1], target = tokens
     incl. eos; the encoder input is repeated per sample;
  5. loss = Σ_tokens −log p(token) · advantage over non-pad target tokens, returned as a *sum* together with the
     token count (`sample_size`), so the caller normalises per token over the global batch like its other losses.
     No label smoothing, no entropy term.

Recipe (OFA's caption stage 2, docs/ofa.md#scst): start from the stage-1 checkpoint, lr 1e-5 → 2e-7 (Base: → 0),
warmup 6 %, 3 epochs, 2 images × 4 update_freq × 8 GPUs, dropout 0 and drop path 0, clip 1.0, 480 px, frozen token
embeddings, data columns 1,4,2 with '&&'-joined references (the caption task's valid layout).
"""
from __future__ import annotations

import string
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ofa_ds.generation import BOS, EOS, PAD, GenerationConfig, generate, task_config
from ofa_ds.metrics.cider import CiderD, load_df

_PUNCT = str.maketrans("", "", string.punctuation)


def clean_caption(text: str, add_eos: bool = True) -> str:
    """OFA's SCST text processing: punctuation stripped, trailing '.' dropped, ' <eos>' appended."""
    t = " ".join(text.strip().translate(_PUNCT).split())
    if t.endswith("."):
        t = t[:-1].rstrip()
    return t + " <eos>" if add_eos else t


class CiderReward:
    """Per-sample CIDEr-D rewards. `df_path`: our JSON cache or OFA's pickle (`python -m ofa_ds.metrics.cider
    build-df --add-eos ...` builds one); None = document frequencies of each batch's own references."""

    def __init__(self, df_path: Optional[str] = None, add_eos: bool = True):
        self.add_eos = add_eos
        if df_path is None:
            self.scorer = CiderD()
        else:
            df, n_docs = load_df(df_path)
            self.scorer = CiderD(df=df, ref_len=n_docs)

    def __call__(self, samples: list[list[str]], refs: list[list[str]]) -> torch.Tensor:
        """samples[i]: the K decoded hypotheses of image i; refs[i]: its references -> rewards [B, K] float64."""
        hyps, rr = [], []
        for hs, rs in zip(samples, refs):
            cleaned = [clean_caption(r, self.add_eos) for r in rs]
            for h in hs:
                hyps.append(clean_caption(h, self.add_eos))
                rr.append(cleaned)
        _, scores = self.scorer.compute(hyps, rr)
        return torch.tensor(scores, dtype=torch.float64).view(len(samples), -1)


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """[B, K] rewards -> advantages: each reward minus the mean of the other K-1 rewards of the same image."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def _sample_tokens(hyps: list[list[dict]], k: int) -> list[list[torch.Tensor]]:
    out = []
    for hh in hyps:
        toks = [h["tokens"] for h in hh[:k]]
        if not toks:
            toks = [torch.tensor([EOS])]
        while len(toks) < k:                     # a sentence with fewer finished beams: repeat its best
            toks.append(toks[0])
        out.append(toks)
    return out


class Samples(NamedTuple):
    """One batch's SCST samples, ready for the teacher-forced forward."""
    target: torch.Tensor          # [B*K, T] sample tokens incl. eos, right-padded
    prev: torch.Tensor            # [B*K, T] bos + target[:, :-1]
    rep: torch.Tensor             # [B*K] row of the batch each sample belongs to
    adv: torch.Tensor             # [B*K] advantages, float64
    rewards: torch.Tensor         # [B, K] CIDEr-D rewards, float64
    flat: list                    # the B*K token tensors
    ntokens: int                  # non-pad target tokens (fairseq's sample_size)


def scst_samples(model, batch: dict, tokenizer, reward: CiderReward, cfg: Optional[GenerationConfig] = None,
                 sync: bool = False) -> Samples:
    """Steps 1-3 of the module docstring: generate (eval mode, no_grad), decode, reward, leave-one-out."""
    cfg = cfg or task_config("scst")
    k = cfg.beam
    if k < 2:
        raise ValueError("SCST's leave-one-out baseline needs at least 2 samples per image (beam >= 2)")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hyps = generate(model, batch, cfg, sync=sync)
    model.train(was_training)
    toks = _sample_tokens(hyps, k)
    texts = [[tokenizer.decode(t) for t in ts] for ts in toks]
    rewards = reward(texts, [list(r) for r in batch["captions"]])                     # [B, K] float64
    adv = leave_one_out(rewards).view(-1)
    flat = [t for ts in toks for t in ts]
    dev = batch["src_tokens"].device
    T = max(len(t) for t in flat)
    target = torch.full((len(flat), T), PAD, dtype=torch.long, device=dev)
    for i, t in enumerate(flat):
        target[i, : len(t)] = t.to(dev)
    prev = torch.cat([torch.full((len(flat), 1), BOS, dtype=torch.long, device=dev), target[:, :-1]], 1)
    rep = torch.arange(len(toks), device=dev).repeat_interleave(k)
    return Samples(target, prev, rep, adv, rewards, flat, int(target.ne(PAD).sum()))


def scst_forward(fwd, batch: dict, s: Samples, code_masks: bool = False) -> torch.Tensor:
    """Steps 4-5: the teacher-forced forward of the samples in the current mode -> Σ −log p · advantage.
    `code_masks=True` passes an all-False code mask (ZeRO-3: every rank then runs the same decoder modules)."""
    imgs, masks = batch.get("patch_images"), batch.get("patch_masks")
    kw = {}
    if code_masks:
        kw["code_masks"] = torch.zeros(len(s.flat), dtype=torch.bool, device=s.target.device)
    logits = fwd(batch["src_tokens"].index_select(0, s.rep), None if imgs is None else imgs.index_select(0, s.rep),
                 None if masks is None else masks.index_select(0, s.rep), s.prev, **kw)
    lp = F.log_softmax(logits.float(), -1).gather(-1, s.target[..., None]).squeeze(-1)
    keep = s.target.ne(PAD)
    return -(lp * s.adv.to(lp.dtype)[:, None] * keep).sum()


def scst_loss(model, batch: dict, tokenizer, reward: CiderReward, cfg: Optional[GenerationConfig] = None,
              sync: bool = False, forward: Any = None) -> tuple[torch.Tensor, dict]:
    """(loss sum, stats) for one batch of the caption task (needs batch["captions"]). `model`: the nn.Module used
    for generation (a DeepSpeed engine's `.module`); `forward`: what runs the training forward (the engine itself;
    default `model`)."""
    s = scst_samples(model, batch, tokenizer, reward, cfg, sync)
    loss = scst_forward(forward if forward is not None else model, batch, s)
    stats = {"loss": float(loss.detach()), "ntokens": s.ntokens, "sample_size": s.ntokens,
             "nsentences": len(s.flat), "reward": float(s.rewards.mean()),
             "best_reward": float(s.rewards.max(1).values.mean()), "advantages": s.adv, "samples": s.flat}
    return loss, stats


# ---- the training step of train.loss = "scst" (called by the Trainer instead of its strategy's step) -----------------
def reward_for_run(run) -> CiderReward:
    """CIDEr-D with document frequencies from train.scst_df, or built from the training references (the first data
    file; rows sharing an image id are one image), with OFA's ' <eos>' convention."""
    if run.train.scst_df:
        return CiderReward(run.train.scst_df)
    from ofa_ds.metrics.cider import build_df_from_tsv
    train_file = run.data.paths()[0]
    df, n_docs = build_df_from_tsv(train_file, col=2, add_eos=True, group_col=1)
    r = CiderReward()
    r.scorer = CiderD(df=df, ref_len=n_docs)
    return r


def train_step(tr, micro: list[dict], sizes=None) -> tuple[float, float, float, int]:
    """One optimizer step of SCST on the dense strategy: generate every micro-batch's samples first, so that the
    step's global token count (fairseq's sample size) is known before the first backward, then forward/backward
    each with weight world * accum / total, as the CE step does. Returns (loss sum, mean reward sum, tokens, bad)."""
    import torch.distributed as dist
    from ofa_ds.training.engine import all_reduce
    from ofa_ds.training.evaluate import to_device
    if tr.strategy.name != "dense":
        from ofa_ds.training.faults import RunFault
        raise RunFault("train.loss = scst runs on the dense strategy (ZeRO 0-3); remove the ds_config's \"pipeline\" "
                       "block", status=2, every_rank=True)
    if getattr(tr, "_scst_reward", None) is None:
        tr._scst_reward = reward_for_run(tr.run_cfg)
    cfg = task_config("scst", beam=tr.run_cfg.train.scst_samples)
    batches = [to_device(b, tr.device, tr.dtype) for b in micro]
    samples = [scst_samples(tr.engine.module, b, tr.tok, tr._scst_reward, cfg, sync=tr.zero == 3) for b in batches]
    total, = all_reduce([float(sum(s.ntokens for s in samples))])
    gas, world = len(micro), tr.world
    loss_sum, reward_sum, bad = 0.0, 0.0, 0
    tr.grad_norm = None
    for i, (b, s) in enumerate(zip(batches, samples)):
        out = scst_forward(tr.engine, b, s, code_masks=True)
        finite, = all_reduce([float(torch.isfinite(out).item())], dist.ReduceOp.MIN)
        if finite:
            loss = out * (world * gas / max(total, 1e-9))
            loss_sum += float(out.detach())
        else:
            loss, bad = out * 0.0, bad + 1
            loss = torch.nan_to_num(loss)
        reward_sum += float(s.rewards.mean())
        tr.engine.backward(loss)
        if i == gas - 1 and tr.zero == 0:        # DeepSpeed reports no norm without ZeRO: measure it
            gs = [p.grad.detach().float() for p in tr.engine.module.parameters() if p.grad is not None]
            tr.grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))) if gs else 0.0
        tr.engine.step()
    loss_sum, reward_sum = all_reduce([loss_sum, reward_sum / gas / world])
    return loss_sum, reward_sum, total, bad
