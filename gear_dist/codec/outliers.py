"""Outlier selection S (DESIGN §1.1): a fixed count per row, top and bottom by *signed* value.

Rows run along the last dim of the tensor given (the codec transposes keys so that a row is a
channel along the block's tokens; a value row is a token along the head's channels). Values
outliers are chosen within one head, never across heads as the reference code does, so tensor
parallel shards compress independently. The fixed count makes S's size a function of the block
shape alone, so blocks are pageable.
"""

from __future__ import annotations

import torch


def outliers_per_side(ratio: float, length: int) -> int:
    """k = max(1, round(ratio * length / 2)) per side, 0 when ratio is 0, never overlapping."""
    if ratio <= 0:
        return 0
    return min(max(1, round(ratio * length / 2)), length // 2)


def index_dtype(length: int) -> torch.dtype:
    """Compact positions: a row of <= 256 entries needs one byte per index (DESIGN §1.7)."""
    return torch.uint8 if length <= 256 else torch.int16


_PAD = -1e300  # sort key of padding: below any real value, above taken positions


def select(x: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest and k smallest entries of each row of ``x [..., rows, len]``.

    Returns int64 ``[..., rows, 2k]`` (top first, then bottom). Invalid entries (padding) are
    picked only when a row has fewer than 2k valid ones; top and bottom never share a position.
    """
    # float64 keys order: data (any fp32 value) > padding > already taken (-inf).
    invalid = None if valid is None else ~valid.expand_as(x)
    top_key = x.double() if invalid is None else x.double().masked_fill(invalid, _PAD)
    top = top_key.topk(k, dim=-1).indices
    low_key = -x.double() if invalid is None else (-x.double()).masked_fill(invalid, _PAD)
    bottom = low_key.scatter(-1, top, -torch.inf).topk(k, dim=-1).indices
    return torch.cat([top, bottom], dim=-1)


def mask_of(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean [..., rows, length] that is True at the positions ``idx [..., rows, m]``."""
    out = torch.zeros(*idx.shape[:-1], length, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, idx.long(), True)
