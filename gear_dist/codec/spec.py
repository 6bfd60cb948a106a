"""The declared format of a compressed block: component shapes and dtypes, and its bytes.

Bytes are counted where the format is defined (as vLLM's ``KVCacheSpec.page_size_bytes``):
``GearBlock.nbytes`` sums the tensors it really holds and must equal ``GearBlockSpec.nbytes``
times the number of (sequence, head) matrices; caches, the engine's memory budget and the kernels
all read the layout from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gear_dist.codec.outliers import index_dtype, outliers_per_side
from gear_dist.codec.quant import Tile, group_tile, packed_dim
from gear_dist.config import CompressionConfig

KINDS = ("key", "value")


@dataclass(frozen=True)
class GearBlockSpec:
    """Layout of one compressed ``tokens x head_dim`` matrix (one head, one block)."""

    kind: str  # "key": outlier rows are channels along a group's tokens; "value": tokens along channels
    bits: int
    tile: Tile  # quantization group extent (tokens, channels)
    tokens: int  # n
    head_dim: int  # d
    rank: int  # r
    outliers_per_side: int  # k

    @classmethod
    def of(cls, config: CompressionConfig, kind: str, tokens: int, head_dim: int, rank: int) -> "GearBlockSpec":
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
        if not config.compressed:
            raise ValueError("bits: 16 (fp16) has no compressed block format")
        if rank > min(tokens, head_dim):
            raise ValueError(f"rank: {rank} exceeds min(tokens={tokens}, head_dim={head_dim})")
        packed_dim(head_dim, config.bits)  # validates head_dim
        tile = group_tile(config.backbone, kind, tokens, head_dim, config.group_size)
        k = outliers_per_side(config.outlier_ratio, tile[0] if kind == "key" else head_dim)
        return cls(kind, config.bits, tile, tokens, head_dim, rank, k)

    @property
    def rows(self) -> tuple[int, int]:
        """(number of outlier rows, row length). A key row is one channel along the tokens of
        one quantization group (all the block's tokens for KCVT/uniform), so a page's outliers
        split into the same token tiles as its statistics and a kernel handles each tile alone;
        a value row is one token along its head's channels."""
        if self.kind == "key":
            return (self.tokens // self.tile[0] * self.head_dim, self.tile[0])
        return (self.tokens, self.head_dim)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n, d] -> [..., rows, row length] (see :attr:`rows`)."""
        if self.kind == "value":
            return t
        *lead, n, d = t.shape
        tn = self.tile[0]
        return t.reshape(*lead, n // tn, tn, d).transpose(-1, -2).reshape(*lead, n // tn * d, tn)

    def from_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_rows`."""
        if self.kind == "value":
            return t
        *lead, _, tn = t.shape
        n, d = self.tokens, self.head_dim
        return t.reshape(*lead, n // tn, d, tn).transpose(-1, -2).reshape(*lead, n, d)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored component of one matrix: name -> (shape, dtype). Empty ones are omitted."""
        n, d, r = self.tokens, self.head_dim, self.rank
        tn, tc = self.tile
        out = {
            "codes": ((n, packed_dim(d, self.bits)), torch.uint8),
            "scale": ((n // tn, d // tc), torch.float16),
            "zero": ((n // tn, d // tc), torch.float16),
        }
        if self.outliers_per_side:
            rows, length = self.rows
            out["outlier_values"] = ((rows, 2 * self.outliers_per_side), torch.float16)
            out["outlier_index"] = ((rows, 2 * self.outliers_per_side), index_dtype(length))
        if r:
            out["lowrank_a"] = ((n, r), torch.float16)
            out["lowrank_b"] = ((d, r), torch.float16)
        return out

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.shapes().values())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / (self.tokens * self.head_dim)


def formula_bits_per_element(config: CompressionConfig, kind: str, tokens: int, head_dim: int, rank: int) -> float:
    """DESIGN §1.6 in closed form: ``b + 32/|group| + s'(16 + index bits) + 16 r (n + d)/(n d)``.

    ``s'`` is the realised outlier fraction (2k per row, k rounded as in outliers_per_side), so
    this agrees exactly with :attr:`GearBlockSpec.bits_per_element`; a test holds them together.
    """
    n, d = tokens, head_dim
    tn, tc = group_tile(config.backbone, kind, n, d, config.group_size)
    rows, length = (n // tn * d, tn) if kind == "key" else (n, d)
    k = outliers_per_side(config.outlier_ratio, length)
    index_bits = 8 * index_dtype(length).itemsize
    outlier_fraction = 2 * k * rows / (n * d)
    return config.bits + 32 / (tn * tc) + outlier_fraction * (16 + index_bits) + 16 * rank * (n + d) / (n * d)
