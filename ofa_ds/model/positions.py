"""OFA's relative-position bucket tables (1-D for text, 2-D for image patches and image codes).

Both tables depend only on constants, are stored in the official checkpoints as int64 buffers, and are
recomputed here bit-exactly:
  * 1-D text buckets: log-spaced beyond |rel| > bucket_size/2, indices 0 … 2·bucket_size−2;
  * 2-D image buckets over a 42×42 raster whose ids are r·42+c+1, with id 0 a "cls" slot (used by the decoder
    when it generates image codes) that gets three extra buckets.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def token_rel_bucket(rel: Tensor, bucket_size: int = 256, max_position: int = 1024) -> Tensor:
    """Bucket index (0 … 2·bucket_size−2) for relative offsets rel = query − key."""
    mid = bucket_size // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos.double() / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    log_pos = log_pos.long()
    bucket = torch.where(abs_pos.le(mid), rel, log_pos * sign)
    return bucket + bucket_size - 1


def make_token_rp_bucket(bucket_size: int = 256, max_position: int = 1024) -> Tensor:
    """[max_position, max_position] int64 table indexed [query position, key position]."""
    pos = torch.arange(max_position, dtype=torch.long)
    rel = pos[:, None] - pos[None, :]
    return token_rel_bucket(rel, bucket_size, max_position)


def make_image_rp_bucket(bucket_size: int = 42) -> Tensor:
    """[(n²+1), (n²+1)] int64 table indexed [query pid, key pid], pid = r·n + c + 1 and pid 0 = cls."""
    n = bucket_size
    num_rel = (2 * n - 1) ** 2
    rows = torch.arange(n).repeat_interleave(n)            # r of pid-1
    cols = torch.arange(n).repeat(n)                       # c of pid-1
    dr = rows[:, None] - rows[None, :] + (n - 1)
    dc = cols[:, None] - cols[None, :] + (n - 1)
    table = torch.empty(n * n + 1, n * n + 1, dtype=torch.long)
    table[1:, 1:] = dr * (2 * n - 1) + dc
    table[0, :] = num_rel          # cls query row
    table[:, 0] = num_rel + 1      # cls key column
    table[0, 0] = num_rel + 2
    return table


def image_position_ids(h: int, w: int, bucket_size: int = 42, device: torch.device | None = None) -> Tensor:
    """Position ids r·bucket_size + c + 1 of an h×w patch grid, row-major: [h·w]."""
    r = torch.arange(h, device=device)[:, None] * bucket_size
    c = torch.arange(w, device=device)[None, :]
    return (r + c + 1).flatten()


def make_decoder_image_position_idx(code_image_size: int, bucket_size: int = 42) -> Tensor:
    """Decoder position ids for image-code generation: [0] + grid ids of the (size/8)² codes + [1024]·769."""
    w = code_image_size // 8
    grid = image_position_ids(w, w, bucket_size)
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, torch.full((769,), 1024, dtype=torch.long)])
