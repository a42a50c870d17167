"""OFA's sequence generation on our model's KV cache: beam search, trie-constrained decoding, sampling, all-candidate
scoring and RefCOCO box decoding, as OFA's evaluation does them (its settings are listed in docs/ofa.md).

What is unusual, and what this file does about it:
  * Decoding starts from bos=0 (fairseq's default would be eos). Hypotheses exclude bos and end with eos; at step
    `max_len` only eos is allowed; `max_len = max_len_a · src_len + max_len_b` with src_len = padded text length.
  * The search itself is fairseq's: top 2·beam candidates over beam×V cumulative scores, only beam 0 expanded at
    step 0, eos candidates among the top `beam` finalised (score / len^lenpen unless `normalize_scores=False`),
    `cands_to_ignore` bookkeeping, and finished sentences removed from the batch (batch reduction).
  * Beams (and samples) of one sentence share its encoder output: the encoder output is not repeated per beam,
    the decoder runs grouped cross-attention (`ofa_ds.model.layers.MultiheadAttention`), so cross-attention K/V
    (the big part: image tokens × layers) are projected, stored and read once per sentence. The cache is reordered
    here, not with `ofa_ds.model.reorder_cache`: self-attention K/V by beam row every step, cross-attention K/V
    by sentence when the batch shrinks.
  * Temperature divides logits, then the trie / constraint range / bin restriction masks the *logits* (so the
    log-softmax renormalises over the allowed set, as OFA does outside zero-shot), then pad (and bos with
    `ban_bos`) → −inf, unk penalty, min_len, prefix forcing (real log-prob kept) and n-gram blocking act on the
    log-probs.
  * Trie constraint with a forced prefix (VQA beam): after the row's own prefix length P, allowed tokens are the
    trie children of [bos] + tokens generated after the prefix (P varies per sample).
  * All-candidate scoring never builds OFA's dense [rows, T, V] constraint masks: the decoder runs
    features-only, only the answer positions are projected to the vocabulary, and the trie-restricted log-softmax is
    computed as logit − logsumexp(allowed logits). Scores are sums of log-probs (no length normalisation).
  * `bin_steps` (our option, off by default like OFA): the first N tokens may only be location bins, then eos.
  * ZeRO-3 gathers parameters collectively at every module call, so every rank must make the same calls. With
    `sync=True` generation keeps ranks in lockstep (a rank whose sentences are done makes dummy one-row decoder
    calls until all are done); all-candidate scoring needs no flag: its calls depend only on the batch size and
    the candidates, and it calls the output projection as a module (never reads its partitioned weight).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ofa_ds.data.text import Trie, build_trie  # noqa: F401  (re-exported: the trie the data path builds)

BOS, PAD, EOS, UNK = 0, 1, 2, 3


@dataclass
class GenerationConfig:
    """Generator options, named after OFA's `--eval-args` keys (`from_eval_args` accepts those JSON strings)."""

    beam: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    lenpen: float = 1.0
    """Length penalty exponent: final score = sum log-prob / length**lenpen (when normalize_scores)."""
    unk_penalty: float = 0.0
    temperature: float = 1.0
    no_repeat_ngram_size: int = 0
    normalize_scores: bool = True
    """False = OFA's --unnormalized (raw sum of log-probs; VQA beam evaluation)."""
    sampling: bool = False
    """Sample `beam` independent sequences per input instead of beam search (top-k when sampling_topk > 0)."""
    sampling_topk: int = -1
    sampling_topp: float = -1.0
    """>0: nucleus sampling, drawing from the smallest set of most likely tokens whose probability reaches it
    (fairseq's rule: takes precedence over sampling_topk)."""
    constraint_range: Optional[tuple[int, int]] = None
    """(a, b): ids 4..a-1 and >= b banned (specials 0-3 stay allowed), OFA's constraint_range."""
    bin_steps: int = 0
    """>0: the first bin_steps tokens are restricted to location bins and the next one to eos (our option)."""
    ban_bos: bool = False
    """Never emit bos (our option; OFA only bans pad). An early-training model can rank bos first, and bos tokens
    decode to nothing: the training-time evaluation bans it."""

    @classmethod
    def from_eval_args(cls, text_or_dict: Any, **overrides: Any) -> "GenerationConfig":
        d = json.loads(text_or_dict) if isinstance(text_or_dict, str) else dict(text_or_dict or {})
        d.update(overrides)
        alias = {"unkpen": "unk_penalty", "unnormalized": None, "len_penalty": "lenpen"}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k == "unnormalized":
                out["normalize_scores"] = not v
            elif k in alias:
                out[alias[k]] = v
            else:
                out[k] = v
        if (out.get("sampling_topk", -1) > 0 or out.get("sampling_topp", -1) > 0) and "sampling" not in out:
            out["sampling"] = True
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(out) - known)
        if bad:
            raise ValueError(f"unknown generation option(s) {bad}; known: {sorted(known)}")
        if out.get("constraint_range") is not None:
            cr = out["constraint_range"]
            out["constraint_range"] = tuple(int(x) for x in (cr.split(",") if isinstance(cr, str) else cr))
        return cls(**out)


# Per-task settings of OFA's official evaluation scripts. "search" = beam | allcand | box.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "caption": {"search": "beam", "beam": 5, "max_len_a": 0, "max_len_b": 16, "min_len": 1,
                "no_repeat_ngram_size": 3, "lenpen": 1.0},
    "caption_huge": {"search": "beam", "beam": 10, "max_len_a": 0, "max_len_b": 16, "min_len": 1,
                     "no_repeat_ngram_size": 3, "lenpen": 0.98, "temperature": 0.98},
    "caption_cn": {"search": "beam", "beam": 8, "max_len_a": 0, "max_len_b": 128, "min_len": 1,
                   "no_repeat_ngram_size": 3},
    "refcoco": {"search": "box", "beam": 5, "max_len_a": 0, "max_len_b": 4, "min_len": 4,
                "no_repeat_ngram_size": 3},
    "vqa": {"search": "allcand"},
    "vqa_beam": {"search": "beam", "beam": 5, "max_len_a": 0, "max_len_b": 200, "min_len": 1,
                 "no_repeat_ngram_size": 0, "normalize_scores": False},
    "vqa_zero_shot": {"search": "beam", "beam": 20, "max_len_a": 0, "max_len_b": 200, "min_len": 1,
                      "normalize_scores": False},
    "snli_ve": {"search": "allcand"},
    "imagenet": {"search": "allcand"},
    "gigaword": {"search": "beam", "beam": 6, "max_len_a": 0, "max_len_b": 32, "min_len": 1,
                 "no_repeat_ngram_size": 3, "lenpen": 0.7},
    "scst": {"search": "beam", "beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3},
}


def task_config(task: str, **overrides: Any) -> GenerationConfig:
    """GenerationConfig of a TASK_DEFAULTS entry (without its 'search' key), with overrides."""
    if task not in TASK_DEFAULTS:
        raise KeyError(f"no generation defaults for {task!r}; known: {sorted(TASK_DEFAULTS)}")
    d = {k: v for k, v in TASK_DEFAULTS[task].items() if k != "search"}
    d.update(overrides)
    return GenerationConfig.from_eval_args(d)


# ---- helpers -------------------------------------------------------------------------------------------------------
def _reorder(cache: dict, order: Tensor, sentences: Optional[Tensor]) -> None:
    """Reorder cached self-attention K/V by row `order`, and cross-attention K/V (one row per sentence) by
    `sentences` when given (the batch shrank)."""
    for key, layer in cache.items():
        if key == "length":
            continue
        for kind, kv in layer.items():
            idx = sentences if kind == "cross" else order
            if idx is None:
                continue
            for n in ("k", "v"):
                if n in kv:
                    kv[n] = kv[n].index_select(0, idx)


def _vocab_size(model) -> int:
    return model.cfg.vocab_size


def _max_len(cfg: GenerationConfig, src_len: int, model, code_masks: Optional[Tensor] = None) -> int:
    """max_len_a · src_len + max_len_b, capped so that bos + max_len tokens fit the decoder's position tables: text
    rows at max_target_positions − 1; when every row generates image codes, at the code grid ((code_image_size/8)²,
    1,024 at 256 px, as OFA's min_len = max_len_b = 1024 needs) but never past max_target_positions."""
    m = int(cfg.max_len_a * src_len + cfg.max_len_b)
    cap = model.cfg.max_target_positions - 1
    if code_masks is not None and code_masks.numel() and bool(code_masks.all()):
        cap = min((model.cfg.code_image_size // 8) ** 2, model.cfg.max_target_positions)
    return max(0, min(m, cap))


def _block_ngrams(lprobs: Tensor, tokens: Tensor, step: int, n: int) -> None:
    """fairseq n-gram blocking on tokens[:, :step+1] (bos included): ban a token that would repeat an n-gram."""
    if n <= 0 or step + 2 - n < 1:
        return
    seq = tokens[:, : step + 1]
    windows = seq.unfold(1, n, 1)                                         # [R, step+2-n, n]
    suffix = seq[:, step + 2 - n:]                                          # [R, n-1]
    match = (windows[:, :, :-1] == suffix[:, None, :]).all(-1)            # [R, W]
    rows, cols = match.nonzero(as_tuple=True)
    if rows.numel():
        lprobs[rows, windows[rows, cols, -1]] = -math.inf


def _logit_mask(logits: Tensor, tokens: Tensor, step: int, cfg: GenerationConfig, trie: Optional[Trie],
                prefix_len: Optional[Tensor], bin_offset: Optional[int]) -> Tensor:
    """Apply trie / constraint_range / bin restriction to the logits of step `step` (before the softmax)."""
    V = logits.shape[-1]
    if cfg.constraint_range is not None:
        a, b = cfg.constraint_range
        logits[:, 4:a] = -math.inf
        logits[:, b:] = -math.inf
    if cfg.bin_steps > 0:
        off = bin_offset if bin_offset is not None else V - 1000
        if step < cfg.bin_steps:
            logits[:, :off] = -math.inf
        elif step == cfg.bin_steps:
            keep = logits[:, EOS].clone()
            logits.fill_(-math.inf)
            logits[:, EOS] = keep
    if trie is not None:
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        memo: dict[tuple, list[int]] = {}
        rows = tokens[:, : step + 1].tolist()
        plens = prefix_len.tolist() if prefix_len is not None else [0] * len(rows)
        for r, (row, p) in enumerate(zip(rows, plens)):
            if step < p:                     # still inside the forced prefix: everything allowed
                allowed[r] = True
                continue
            key = tuple(row[p + 1:])
            nxt = memo.get(key)
            if nxt is None:
                nxt = memo[key] = trie.next_tokens([BOS, *key])
            if nxt:
                allowed[r, nxt] = True
        logits.masked_fill_(~allowed, -math.inf)
    return logits


def _step_lprobs(model, tokens: Tensor, step: int, enc, cache: dict, cfg: GenerationConfig, trie, prefix_len,
                 bin_offset, code_masks=None) -> Tensor:
    logits = model.decode(tokens[:, : step + 1], enc, code_masks, cache)[:, -1].float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    logits = _logit_mask(logits, tokens, step, cfg, trie, prefix_len, bin_offset)
    lprobs = F.log_softmax(logits, dim=-1)
    lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    lprobs[:, PAD] = -math.inf
    if cfg.ban_bos:
        lprobs[:, BOS] = -math.inf
    if cfg.unk_penalty:
        lprobs[:, UNK] -= cfg.unk_penalty
    return lprobs


def _all_ranks(flag: bool, sync: bool, dev, op: str = "min") -> bool:
    """With `sync` and an initialised process group: the flag reduced over ranks (min = all, max = any)."""
    if not sync:
        return flag
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return bool(t.item())


def _select_cache(cache: dict, order: Tensor) -> dict:
    out: dict = {"length": cache.get("length", 0)}
    for key, layer in cache.items():
        if key != "length":
            out[key] = {kind: {n: t.index_select(0, order) for n, t in kv.items()} for kind, kv in layer.items()}
    return out


def _idle_until_all_done(model, tokens: Tensor, length: int, enc, cache: dict, code_masks, dev) -> None:
    """ZeRO-3 lockstep: this rank is done; keep making one-row decoder calls shaped like a normal step (cached
    cross-attention, one new position) until every rank reports done, so parameter gathers stay matched."""
    d_tokens = tokens[:1, :length]
    d_enc = enc.index_select(torch.zeros(1, dtype=torch.long, device=dev))
    d_cache = _select_cache(cache, torch.zeros(1, dtype=torch.long, device=dev))
    d_code = None if code_masks is None else code_masks[:1]
    while not _all_ranks(True, True, dev):
        d_tokens = torch.cat([d_tokens, d_tokens.new_full((1, 1), BOS)], 1)
        model.decode(d_tokens, d_enc, d_code, d_cache)


def _encode(model, batch: dict):
    return model.encode(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"))


def _pad_prefix(prefix_tokens: Any, device) -> Optional[Tensor]:
    if prefix_tokens is None:
        return None
    if isinstance(prefix_tokens, Tensor):
        return prefix_tokens.to(device)
    n = max((len(p) for p in prefix_tokens), default=0)
    out = torch.full((len(prefix_tokens), max(n, 1)), PAD, dtype=torch.long, device=device)
    for i, p in enumerate(prefix_tokens):
        if len(p):
            out[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return out


# ---- beam search ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, batch: dict, cfg: GenerationConfig | None = None, prefix_tokens: Any = None,
             trie: Optional[Trie] = None, enc=None, code_masks: Optional[Tensor] = None,
             bin_offset: Optional[int] = None, sync: bool = False) -> list[list[dict]]:
    """Beam search (or sampling when cfg.sampling) for every sample of `batch` (needs src_tokens; patch_images and
    patch_masks when the task has images). Returns, per sample, hypotheses sorted best first, each a dict with
    `tokens` (LongTensor, no bos, ends with eos; a forced prefix included), `score` and `positional_scores`.

    `sync=True` (ZeRO-3: parameters are gathered collectively at every module call): every rank makes the same
    number of decoder calls; a rank that finishes early makes dummy one-row calls until all ranks are done.

    `prefix_tokens`: [B, P] (pad-padded) or a list of token lists, forced at the first steps (VQA beam eval).
    `enc`: a precomputed EncoderOut for the batch (skips the encoder)."""
    cfg = cfg or GenerationConfig()
    if cfg.sampling:
        return sample(model, batch, cfg, trie=trie, enc=enc, code_masks=code_masks, bin_offset=bin_offset,
                      sync=sync)
    if enc is None:
        enc = _encode(model, batch)
    src = batch["src_tokens"]
    B, K, dev = src.shape[0], cfg.beam, enc.hidden.device
    V = _vocab_size(model)
    max_len = _max_len(cfg, src.shape[1], model, code_masks)
    prefix = _pad_prefix(prefix_tokens, dev)
    if code_masks is not None:
        code_masks = code_masks.to(dev).repeat_interleave(K)
    tokens = torch.full((B * K, max_len + 2), PAD, dtype=torch.long, device=dev)
    tokens[:, 0] = BOS
    scores = torch.zeros(B * K, max_len + 1, dtype=torch.float32, device=dev)
    finalized: list[list[dict]] = [[] for _ in range(B)]
    finished = [False] * B
    orig = list(range(B))                        # current sentence -> original sample index
    cands_to_ignore = torch.zeros(B, K, dtype=torch.bool, device=dev)
    cache: dict = {}
    reorder, kept_sentences = None, None
    bsz = B
    for step in range(max_len + 1):
        _all_ranks(False, sync, dev)             # lockstep: "not done yet" (pairs with idle ranks' "done")
        if reorder is not None:
            _reorder(cache, reorder, kept_sentences)
            if kept_sentences is not None:
                enc = enc.index_select(kept_sentences)
                if code_masks is not None:
                    code_masks = code_masks.index_select(0, reorder)
        rows_prefix = prefix.repeat_interleave(K, 0) if prefix is not None else None
        plen = rows_prefix.ne(PAD).sum(1) if rows_prefix is not None else None
        lprobs = _step_lprobs(model, tokens, step, enc, cache, cfg, trie, plen, bin_offset, code_masks)
        if step >= max_len:
            eos_col = lprobs[:, EOS].clone()
            lprobs.fill_(-math.inf)
            lprobs[:, EOS] = eos_col
        if rows_prefix is not None and step < rows_prefix.shape[1] and step < max_len:
            ptok = rows_prefix[:, step]
            forced = ptok.ne(PAD)
            if forced.any():
                kept = lprobs.gather(1, ptok[:, None])
                sub = torch.full_like(lprobs[forced], -math.inf)
                sub.scatter_(1, ptok[forced][:, None], kept[forced])
                lprobs[forced] = sub
        elif step < cfg.min_len:
            lprobs[:, EOS] = -math.inf
        _block_ngrams(lprobs, tokens, step, cfg.no_repeat_ngram_size)

        # fairseq's top 2·beam of beam×V cumulative scores, in two stages: each beam's top 2·beam tokens (adding the
        # beam's score keeps a row's order), then the top 2·beam of those; no [bsz, beam·V] sum is materialised
        lp = lprobs.view(bsz, K, V)
        if step == 0:
            lp = lp[:, :1]
        kr = min(2 * K, V)
        row_lp, row_tok = torch.topk(lp, kr, dim=-1)                          # [bsz, beams, kr]
        if step > 0:
            row_lp = row_lp + scores[:, step - 1].view(bsz, K, 1)
        k = min(2 * K, lp.shape[1] * V - 1)
        cand_scores, idx = torch.topk(row_lp.reshape(bsz, -1), k)
        cand_beams, cand_tok = idx // kr, row_tok.reshape(bsz, -1).gather(1, idx)
        if k < 2 * K:                            # tiny vocabularies: pad with dead (-inf) candidates
            fill = 2 * K - k
            cand_scores = torch.cat([cand_scores, cand_scores.new_full((bsz, fill), -math.inf)], 1)
            cand_beams = torch.cat([cand_beams, cand_beams.new_zeros((bsz, fill))], 1)
            cand_tok = torch.cat([cand_tok, cand_tok.new_full((bsz, fill), PAD)], 1)
        cand_bbsz = cand_beams + (torch.arange(bsz, device=dev) * K)[:, None]
        eos_mask = cand_tok.eq(EOS) & cand_scores.ne(-math.inf)
        eos_mask[:, :K] &= ~cands_to_ignore

        newly: list[int] = []
        hits = eos_mask[:, :K].nonzero().tolist()
        for i, c in hits:
            s = orig[i]
            if finished[s] or len(finalized[s]) >= K:
                continue
            bb = int(cand_bbsz[i, c])
            sc = float(cand_scores[i, c])
            pos = torch.cat([scores[bb, :step], cand_scores[i, c:c + 1]])
            pos = torch.cat([pos[:1], pos[1:] - pos[:-1]])
            final = sc / (step + 1) ** cfg.lenpen if cfg.normalize_scores else sc
            finalized[s].append({"tokens": torch.cat([tokens[bb, 1: step + 1], tokens.new_tensor([EOS])]),
                                 "score": final, "positional_scores": pos})
        for i in range(bsz):
            s = orig[i]
            if not finished[s] and (len(finalized[s]) >= K or step >= max_len):
                finished[s] = True
                newly.append(i)
        if all(finished[s] for s in orig):
            if sync:
                _idle_until_all_done(model, tokens, step + 1, enc, cache, code_masks, dev)
            break
        keep = [i for i in range(bsz) if not finished[orig[i]]]
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
        kept_sentences = keep_t if len(keep) < bsz else None
        if kept_sentences is not None:
            eos_mask, cand_beams, cand_scores, cand_tok = (t[keep_t] for t in (eos_mask, cand_beams, cand_scores,
                                                                                 cand_tok))
            cands_to_ignore = cands_to_ignore[keep_t]
            orig = [orig[i] for i in keep]
            if prefix is not None:
                prefix = prefix[keep_t]
            bsz = len(keep)
        old_bbsz = cand_beams + (keep_t * K)[:, None]       # row indices before the reduction
        eos_mask[:, :K] |= cands_to_ignore
        cand_size = eos_mask.shape[1]
        active_mask = eos_mask.long() * cand_size + torch.arange(cand_size, device=dev)[None]
        new_ignore, active = torch.topk(active_mask, K, dim=1, largest=False)
        cands_to_ignore = new_ignore >= cand_size
        reorder = old_bbsz.gather(1, active).view(-1)
        tokens = tokens.index_select(0, reorder)
        tokens[:, step + 1] = cand_tok.gather(1, active).view(-1)
        scores = scores.index_select(0, reorder)
        scores[:, step] = cand_scores.gather(1, active).view(-1)
    for hyps in finalized:
        hyps.sort(key=lambda h: -h["score"])
    return finalized


# ---- sampling / greedy ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, batch: dict, cfg: GenerationConfig, trie: Optional[Trie] = None, enc=None,
           code_masks: Optional[Tensor] = None, bin_offset: Optional[int] = None,
           generator: Optional[torch.Generator] = None, sync: bool = False) -> list[list[dict]]:
    """`cfg.beam` independent samples per input (top-k when cfg.sampling_topk > 0, full softmax otherwise); with
    cfg.sampling False this is greedy decoding of one sequence per input. Same hypothesis dicts as `generate`,
    score = sum of log-probs (of the masked, temperature-scaled distribution)."""
    if enc is None:
        enc = _encode(model, batch)
    src = batch["src_tokens"]
    n = cfg.beam if cfg.sampling else 1
    B, dev = src.shape[0], enc.hidden.device
    max_len = _max_len(cfg, src.shape[1], model, code_masks)
    if code_masks is not None:
        code_masks = code_masks.to(dev).repeat_interleave(n)
    R = B * n
    tokens = torch.full((R, max_len + 2), PAD, dtype=torch.long, device=dev)
    tokens[:, 0] = BOS
    pos_scores = torch.zeros(R, max_len + 1, device=dev)
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    lengths = torch.zeros(R, dtype=torch.long, device=dev)
    cache: dict = {}
    step = 0
    for step in range(max_len + 1):
        _all_ranks(False, sync, dev)
        lprobs = _step_lprobs(model, tokens, step, enc, cache, cfg, trie, None, bin_offset, code_masks)
        if step >= max_len:
            eos_col = lprobs[:, EOS].clone()
            lprobs.fill_(-math.inf)
            lprobs[:, EOS] = eos_col
        elif step < cfg.min_len:
            lprobs[:, EOS] = -math.inf
        _block_ngrams(lprobs, tokens, step, cfg.no_repeat_ngram_size)
        if bool(done.any()):                     # finished rows: a dummy valid distribution (output is pad)
            lprobs[done] = -math.inf
            lprobs[done, EOS] = 0.0
        if cfg.sampling:
            if cfg.sampling_topp > 0:
                sp, si = lprobs.exp().sort(dim=-1, descending=True)
                sp = sp.masked_fill(sp.cumsum(-1) - sp >= cfg.sampling_topp, 0.0)   # keep up to the one reaching p
                tok = si.gather(1, torch.multinomial(sp, 1, generator=generator)).squeeze(1)
            elif cfg.sampling_topk > 0:
                top_lp, top_i = lprobs.topk(min(cfg.sampling_topk, lprobs.shape[-1]), dim=-1)
                pick = torch.multinomial(top_lp.exp(), 1, generator=generator)
                tok = top_i.gather(1, pick).squeeze(1)
            else:
                tok = torch.multinomial(lprobs.exp(), 1, generator=generator).squeeze(1)
        else:
            tok = lprobs.argmax(-1)
        lp = lprobs.gather(1, tok[:, None]).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        tokens[:, step + 1] = tok
        pos_scores[:, step] = torch.where(done, torch.zeros_like(lp), lp)
        lengths += (~done).long()
        done |= tok.eq(EOS)
        if bool(done.all()):
            break
    if sync:
        _idle_until_all_done(model, tokens, step + 1, enc, cache, code_masks, dev)
    out: list[list[dict]] = []
    for b in range(B):
        hyps = []
        for r in range(b * n, (b + 1) * n):
            L = int(lengths[r])
            ps = pos_scores[r, :L]
            hyps.append({"tokens": tokens[r, 1: L + 1].clone(), "score": float(ps.sum()), "positional_scores": ps})
        out.append(hyps)
    return out


# ---- all-candidate scoring -----------------------------------------------------------------------------------------
def _row_logprobs(h: Tensor, proj: torch.nn.Module, W: Optional[Tensor], tgt: Sequence[int],
                  allowed: Optional[Sequence[Sequence[int]]], max_floats: int = 32_000_000) -> Tensor:
    """log p(tgt[i] | h[i]) with the softmax over allowed[i] (the whole vocabulary when allowed is None): [n] float32.
    Full-vocabulary logits come from calling `proj` (the output projection module), in chunks of at most
    `max_floats` logits. When `W` (proj's weight) is given, narrow allowed sets (<= 64 tokens) are scored on gathered
    rows of W instead of the full [n, V] logits."""
    n, V = h.shape[0], proj.out_features
    dev = h.device
    out = torch.empty(n, dtype=torch.float32, device=dev)
    tgt_t = torch.as_tensor(list(tgt), dtype=torch.long, device=dev)
    narrow = allowed is not None and W is not None
    wide = [i for i in range(n) if len(allowed[i]) > 64] if narrow else list(range(n))
    step = max(1, max_floats // V)
    for s in range(0, len(wide), step):
        rows = torch.as_tensor(wide[s: s + step], dtype=torch.long, device=dev)
        logits = proj(h[rows]).float()                                              # [r, V]
        if allowed is None:
            lse = torch.logsumexp(logits, -1)
        else:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            for r, i in enumerate(rows.tolist()):
                keep[r, list(allowed[i])] = True
            lse = torch.logsumexp(logits.masked_fill(~keep, -math.inf), -1)
        out[rows] = logits.gather(1, tgt_t[rows, None]).squeeze(1) - lse
    if narrow:
        buckets: dict[int, list[int]] = {}
        for i, a in enumerate(allowed):
            if 0 < len(a) <= 64:
                buckets.setdefault(1 << (len(a) - 1).bit_length(), []).append(i)
        for w, rows_l in buckets.items():
            rows = torch.as_tensor(rows_l, dtype=torch.long, device=dev)
            idx = torch.zeros(len(rows_l), w, dtype=torch.long, device=dev)
            valid = torch.zeros(len(rows_l), w, dtype=torch.bool, device=dev)
            for r, i in enumerate(rows_l):
                idx[r, : len(allowed[i])] = torch.as_tensor(list(allowed[i]), dtype=torch.long)
                valid[r, : len(allowed[i])] = True
            logits = torch.bmm(W[idx], h[rows, :, None]).squeeze(-1).float()         # [r, w]
            lse = torch.logsumexp(logits.masked_fill(~valid, -math.inf), -1)
            t = (W[tgt_t[rows]] * h[rows]).sum(-1).float()
            out[rows] = t - lse
    if allowed is not None:      # a target outside its allowed set (an empty set included) is impossible
        bad = [i for i in range(n) if tgt[i] not in allowed[i]]
        if bad:
            out[torch.as_tensor(bad, dtype=torch.long, device=dev)] = -math.inf
    return out


def _expand_cache(cache: dict, n: int) -> dict:
    """Fresh cache dict whose self-attention tensors are stride-0 views of `cache`'s (batch 1) repeated n times;
    cross-attention entries stay one row (the decoder folds the n rows into one grouped cross-attention)."""
    out: dict = {"length": cache["length"]}
    for key, layer in cache.items():
        if key != "length":
            out[key] = {kind: {name: t if kind == "cross" else t.expand(n, *t.shape[1:]) for name, t in kv.items()}
                        for kind, kv in layer.items()}
    return out


@torch.no_grad()
def score_candidates(model, enc, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                     trie: Optional[Trie] = None, chunk_rows: int = 512, first_token_only: bool = False) -> Tensor:
    """Score every candidate answer (token lists without eos) for every sample by teacher forcing.

    prompts[b] = sample b's decoder prompt starting with bos (VQA/SNLI-VE prev_output: bos + question; ImageNet:
    [bos]). Returns [B, N] float scores = sum over the answer tokens and eos of log p, with the log-softmax taken
    over the trie children of [bos] + answer prefix when `trie` is given (over the vocabulary otherwise); a
    candidate the trie does not contain scores -inf. `first_token_only`: only the log-prob of each candidate's first
    token after the prompt (GLUE: argmax at the last position under the label constraint).

    Each sample's prompt is decoded once into a KV cache (its cross-attention K/V included); every chunk of
    `chunk_rows` candidates then decodes only its answer tokens on stride-0 views of the self-attention cache, and
    against the one-row cross-attention K/V as one grouped query block — the encoder output and its K/V are never
    copied per candidate."""
    B, N = len(prompts), len(candidates)
    dev = enc.hidden.device
    proj = model.decoder.output_projection
    # Under ZeRO-3 the weight is a partitioned placeholder (DeepSpeed marks it with `ds_id`) outside a call of its
    # module: then every logit comes from calling the module, which gathers it on every rank alike.
    W = None if hasattr(proj.weight, "ds_id") else proj.weight
    out = torch.empty(B, N, dtype=torch.float32, device=dev)
    cands = [list(map(int, c)) for c in candidates]
    if any(not c for c in cands):
        raise ValueError("empty candidate answer")
    first_tok = [c[0] for c in cands]
    first_allowed = trie.next_tokens([BOS]) if trie is not None else None
    # later positions k = 1..L of candidate j: target (c[k] or eos) and the trie children of [bos] + c[:k]
    later_tgt = [[*c[1:], EOS] for c in cands]
    later_allowed = None
    if trie is not None:
        later_allowed = [[trie.next_tokens([BOS, *c[:k]]) for k in range(1, len(c) + 1)] for c in cands]
    groups: dict[int, list[int]] = {}                             # chunks of equal-length candidates: no padding
    for j in range(N):
        groups.setdefault(len(cands[j]), []).append(j)
    chunks = [g[s: s + chunk_rows] for _, g in sorted(groups.items()) for s in range(0, len(g), chunk_rows)]
    for b in range(B):
        p = [int(t) for t in prompts[b]]
        P = len(p)
        enc_b = enc.index_select(torch.tensor([b], device=dev))
        cache: dict = {}
        h_last = model.decoder(torch.tensor([p], device=dev), enc_b, None, cache, features_only=True)[:, -1]
        logits = proj(h_last).float()[0]                                          # one row: the full vocabulary
        if trie is None:
            lse = torch.logsumexp(logits, -1)
        else:
            lse = torch.logsumexp(logits[torch.tensor(first_allowed, dtype=torch.long, device=dev)], -1)
        lp_first = logits[torch.tensor(first_tok, device=dev)] - lse
        if trie is not None:
            ok = set(first_allowed)
            lp_first = lp_first.masked_fill(torch.tensor([t not in ok for t in first_tok], device=dev), -math.inf)
        if first_token_only:
            out[b] = lp_first
            continue
        for js in chunks:
            c = len(js)
            A = max(len(cands[j]) for j in js)
            prev = torch.full((c, P + A), PAD, dtype=torch.long, device=dev)
            prev[:, :P] = torch.tensor(p, device=dev)
            for r, j in enumerate(js):
                prev[r, P: P + len(cands[j])] = torch.tensor(cands[j], device=dev)
            h = model.decoder(prev, enc_b, None, _expand_cache(cache, c), features_only=True)     # [c, A, C]
            ri, ki, tg, al = [], [], [], []
            for r, j in enumerate(js):
                for k in range(len(cands[j])):
                    ri.append(r)
                    ki.append(k)
                    tg.append(later_tgt[j][k])
                    if later_allowed is not None:
                        al.append(later_allowed[j][k])
            r_t = torch.tensor(ri, dtype=torch.long, device=dev)
            lp = _row_logprobs(h[r_t, torch.tensor(ki, dtype=torch.long, device=dev)], proj, W, tg,
                               al if later_allowed is not None else None)
            sums = torch.zeros(c, dtype=torch.float32, device=dev).index_add_(0, r_t, lp)
            js_t = torch.tensor(js, dtype=torch.long, device=dev)
            out[b, js_t] = lp_first[js_t] + sums
    return out


# ---- task-level helpers ---------------------------------------------------------------------------------------------
def boxes_from_hypos(hypos: list[list[dict]], tok, w_ratios: Sequence[float], h_ratios: Sequence[float],
                     max_image_size: float = 512) -> list[list[float]]:
    """The first 4 tokens of each best hypothesis → (x0, y0, x1, y1) in original-image pixels. Like OFA,
    non-bin tokens are not rejected (junk boxes); fewer than 4 tokens give a zero box."""
    out = []
    for h, wr, hr in zip(hypos, w_ratios, h_ratios):
        ids = h[0]["tokens"][:4].tolist() if h else []
        if len(ids) < 4:
            out.append([0.0, 0.0, 0.0, 0.0])
            continue
        out.append(tok.ids_to_box(ids, max_image_size, float(wr), float(hr)))
    return out


def strip_prefix(hypo: dict, prefix_len: int) -> Tensor:
    """Answer tokens of a prefix-forced hypothesis (prefix and eos removed)."""
    t = hypo["tokens"][prefix_len:]
    return t[:-1] if t.numel() and int(t[-1]) == EOS else t
