"""SCST (self-critical sequence training): text processing, leave-one-out baseline, CIDEr-D rewards with a df cache,
and the loss: its value is -Σ log p · advantage, and one small SGD step raises the advantage-weighted log-likelihood
of the samples."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ofa_ds.data import DataStream
from ofa_ds.data.synthetic import data_config, generate as synth
from ofa_ds.generation import generate, task_config
from ofa_ds.metrics.cider import CiderD, build_df_from_tsv, save_df
from ofa_ds.tokenizer import get_tokenizer
from ofa_ds.training.scst import CiderReward, clean_caption, leave_one_out, scst_loss
from tests.generation.conftest import tiny_model

from .conftest import last_json, launch

pytestmark = pytest.mark.usefixtures("one_thread")   # many tiny ops: no spinning on shared cores


def test_clean_caption_and_baseline():
    assert clean_caption(" A man, riding a horse. ") == "A man riding a horse <eos>"
    assert clean_caption("dogs!", add_eos=False) == "dogs"
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    adv = leave_one_out(r)
    assert torch.allclose(adv[0], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5], dtype=torch.float64))
    assert torch.allclose(adv.sum(1), torch.zeros(2, dtype=torch.float64))


@torch.no_grad()
def _seq_logprob(model, batch, i, tokens):
    prev = torch.cat([torch.tensor([0]), tokens[:-1]])[None]
    logits = model(batch["src_tokens"][i:i + 1], batch["patch_images"][i:i + 1], batch["patch_masks"][i:i + 1], prev)
    return float(F.log_softmax(logits.float(), -1)[0].gather(1, tokens[:, None]).sum())


def test_scst_loss_and_one_step(tmp_path):
    synth(str(tmp_path), seed=4, size="tiny", image_size=64)
    cfg = data_config(str(tmp_path), "caption", patch_image_size=32, batch_size=2, shuffle=False)
    batch = next(iter(DataStream(cfg, split="valid")))
    df, n = build_df_from_tsv(str(tmp_path / "caption" / "caption_val.tsv"), 2, add_eos=True)
    save_df(str(tmp_path / "df.json"), df, n)
    reward = CiderReward(str(tmp_path / "df.json"))
    assert reward.scorer.ref_len == n and reward.scorer.df == dict(df)
    model, tok = tiny_model(sharpen=5.0), get_tokenizer()
    gen = task_config("scst", beam=4, max_len_b=6)
    # a random model's captions share nothing with the references: make one beam of each image a reference, so
    # that beam earns a high reward and the others do not
    hyps = generate(model, batch, gen)
    batch["captions"] = [[tok.decode(hyps[i][1]["tokens"])] + list(batch["captions"][i]) for i in range(2)]
    loss, st = scst_loss(model, batch, tok, reward, gen)
    adv, samples = st["advantages"], st["samples"]
    assert len(samples) == 8 and st["nsentences"] == 8 and adv.shape == (8,)
    # the rewards are CIDEr-D of the cleaned decoded samples against the cleaned references
    texts = [clean_caption(tok.decode(t)) for t in samples]
    refs = [[clean_caption(r) for r in batch["captions"][i // 4]] for i in range(8)]
    _, want = CiderD(df=df, ref_len=n).compute(texts, refs)
    want = torch.tensor(want, dtype=torch.float64).view(2, 4)
    assert torch.allclose(adv.view(2, 4), leave_one_out(want))
    # loss = -sum(log p(sample) * advantage)
    lps = [_seq_logprob(model, batch, i // 4, t) for i, t in enumerate(samples)]
    val = float(loss.detach())
    assert abs(val + sum(lp * float(a) for lp, a in zip(lps, adv))) < 1e-3 * max(1.0, abs(val))
    assert float(adv.abs().max()) > 0            # the samples are rewarded differently on this data
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    opt.zero_grad()
    (loss / st["ntokens"]).backward()
    opt.step()
    after = [_seq_logprob(model, batch, i // 4, t) for i, t in enumerate(samples)]
    gain = sum(float(a) * (x - y) for a, x, y in zip(adv, after, lps))
    assert gain > 0          # the advantage-weighted log-likelihood went up: the gradient has the right sign


@pytest.mark.slow
@pytest.mark.distributed
def test_scst_recipe_zero3_two_ranks(tmp_path, synthetic_root):
    """`launch/finetune.py --recipe caption_scst` under ZeRO-3 on two ranks (the debug preset's sizes): a few SCST
    steps (generation in lockstep, rewards from the training references' document frequencies) and the final
    held-out caption evaluation."""
    out = str(tmp_path / "scst")
    p = launch(["--recipe", "caption_scst", "--steps", "2", "--out", out, "--ds-config", "ds_configs/zero3_fp32.json"],
               synthetic_root, ranks=2, script="launch/finetune.py",
               sets=["train.grad_accum=2", "train.scst_samples=3", "train.export_final=false", "eval.max_samples=4",
                     "train.lr=1e-3"])
    rep = last_json(p)
    assert rep["zero_stage"] == 3 and rep["world_size"] == 2 and "caption_cider" in rep
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "reward" in r]
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
