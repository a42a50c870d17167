"""ZeRO-3 lockstep: with sync=True two gloo ranks holding different batches (one finishes much earlier) make the
same number of decoder calls, and their results equal the unsynchronised ones."""
import os

import pytest
import torch
import torch.distributed as dist

from ofa_ds.generation import GenerationConfig, generate, sample

from tests.ranks import run_ranks

from .conftest import tiny_model


def _worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_model()
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    src = torch.tensor([[0, 100, 200, 2]]) if rank == 0 else torch.tensor([[0, 5, 2], [0, 6, 2]])
    batch = {"src_tokens": src}
    out = {}
    for name, fn, cfg in (("beam", generate, GenerationConfig(beam=3, max_len_b=2 if rank == 0 else 9, min_len=0)),
                          ("sample", sample, GenerationConfig(beam=2, max_len_b=2 if rank == 0 else 9,
                                                              sampling=True, sampling_topk=1))):
        ref = fn(model, batch, cfg)
        calls.clear()
        got = fn(model, batch, cfg, sync=True)
        out[name] = (len(calls), [[h["tokens"].tolist() for h in hh] for hh in got] ==
                     [[h["tokens"].tolist() for h in hh] for hh in ref])
    q.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_make_the_same_number_of_decoder_calls():
    res = run_ranks(_worker)
    for name in ("beam", "sample"):
        (n0, same0), (n1, same1) = res[0][name], res[1][name]
        assert same0 and same1
        assert n0 == n1 > 3, (name, n0, n1)
