"""The GEAR codec: ``X ~= D + L + S`` for a batch of (sequence, head) blocks (DESIGN §1).

``compress`` turns ``x [..., n, d]`` into a :class:`GearBlock` holding packed codes, fp16
statistics, fp16 low-rank factors and fp16 outlier corrections with compact indices; nothing is
kept in dequantized form. ``decompress`` is the torch reference that kernels are tested against.

Order of operations (per matrix):
1. outliers: k top and k bottom entries of each row by signed value (keys: a channel along the
   tokens of one quantization group; values: a token along the head's channels);
2. D: min-max statistics over each group tile, taken over valid non-outlier entries only (the
   same statistics as replacing outliers by their row mean, which lies inside the range);
3. L: rank-r power iteration on the residual ``E = X - D``, zero at outliers and padding;
4. S: the correction ``X - D - L`` at each outlier, in fp16, so that the decode kernel adds S
   with one gather (``q.S^T``) and reconstruction at outliers is exact to fp16 rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gear_dist.codec import lowrank, outliers, quant
from gear_dist.codec.spec import GearBlockSpec
from gear_dist.config import CompressionConfig


@dataclass
class GearBlock:
    """Compressed ``[..., n, d]`` blocks: every field has the leading dims of the input.

    Optional components are ``None`` when the config turns them off (no bytes held).
    """

    spec: GearBlockSpec
    codes: torch.Tensor  # uint8 [..., n, d*b/8], planar packed (quant.pack)
    scale: torch.Tensor  # fp16 [..., n/tn, d/tc]
    zero: torch.Tensor  # fp16 [..., n/tn, d/tc]
    outlier_values: torch.Tensor | None = None  # fp16 [..., rows, 2k]: X - D - L there
    outlier_index: torch.Tensor | None = None  # uint8/int16 [..., rows, 2k]: position in row
    lowrank_a: torch.Tensor | None = None  # fp16 [..., n, r]
    lowrank_b: torch.Tensor | None = None  # fp16 [..., d, r]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in dataclasses.fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    @property
    def lead_shape(self) -> torch.Size:
        return self.codes.shape[:-2]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this block really holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / (self.lead_shape.numel() * self.spec.tokens * self.spec.head_dim)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "GearBlock":
        """The same block with ``fn`` applied to every tensor (reorder, select, move device)."""
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def decompress(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return decompress(self, dtype)


def compress(
    x: torch.Tensor,
    kind: str,
    config: CompressionConfig,
    rank: int,
    valid: torch.Tensor | None = None,
) -> GearBlock:
    """Compress ``x [..., n, d]`` (keys or values of some heads) into a :class:`GearBlock`.

    ``valid`` (bool, broadcastable to ``[..., n]``) marks real tokens: padding never enters the
    statistics, outlier selection or the low-rank fit.
    """
    *lead, n, d = x.shape
    spec = GearBlockSpec.of(config, kind, n, d, rank)
    xf = x.float()
    token_valid = None if valid is None else valid[..., :, None].expand(*lead, n, d)
    keep = token_valid  # entries that count for statistics and for the residual
    if token_valid is not None:
        xf = xf.masked_fill(~token_valid, 0.0)  # padding may hold anything, NaN included

    idx = None
    if spec.outliers_per_side:
        rows_valid = None if token_valid is None else spec.to_rows(token_valid)
        idx = outliers.select(spec.to_rows(xf), spec.outliers_per_side, rows_valid)
        is_outlier = spec.from_rows(outliers.mask_of(idx, spec.rows[1]))
        keep = ~is_outlier if keep is None else keep & ~is_outlier

    codes, scale, zero = quant.quantize(xf, config.bits, spec.tile, keep)
    approx = quant.dequantize(codes, scale, zero, spec.tile)
    block = GearBlock(spec, quant.pack(codes, config.bits), scale, zero)

    if rank:
        resid = xf - approx
        if keep is not None:
            resid = resid.masked_fill(~keep, 0.0)
        a, b = lowrank.fp16_safe(*lowrank.power_iteration(resid, rank, config.iters, config.seed, config.oversample))
        block.lowrank_a, block.lowrank_b = a.half(), b.half()
        approx = approx + _lowrank(block)  # as stored (fp16 factors), so S corrects exactly that

    if idx is not None:
        correction = spec.to_rows(xf - approx).gather(-1, idx)
        block.outlier_values = correction.half()
        block.outlier_index = idx.to(outliers.index_dtype(spec.rows[1]))
    return block


def decompress(block: GearBlock, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reference reconstruction ``D + L + S`` as ``[..., n, d]`` in ``dtype``."""
    spec = block.spec
    out = quant.dequantize(quant.unpack(block.codes, spec.bits), block.scale, block.zero, spec.tile)
    if block.lowrank_a is not None:
        out = out + _lowrank(block)
    if block.outlier_values is not None:
        rows = spec.to_rows(out).contiguous()
        rows.scatter_add_(-1, block.outlier_index.long(), block.outlier_values.float())
        out = spec.from_rows(rows)
    return out.to(dtype)


def _lowrank(block: GearBlock) -> torch.Tensor:
    return block.lowrank_a.float() @ block.lowrank_b.float().transpose(-1, -2)


class GearCodec:
    """A config bound to the pure functions above; what caches and benchmarks hold."""

    def __init__(self, config: CompressionConfig):
        if not config.compressed:
            raise ValueError("bits: 16 (fp16) is not a compression config; keep fp16 tensors instead")
        self.config = config

    def compress(self, x: torch.Tensor, kind: str, *, prefill: bool = False, valid: torch.Tensor | None = None) -> GearBlock:
        rank = self.config.rank_prefill if prefill else self.config.rank
        return compress(x, kind, self.config, rank, valid)

    def spec(self, kind: str, tokens: int, head_dim: int, *, prefill: bool = False) -> GearBlockSpec:
        rank = self.config.rank_prefill if prefill else self.config.rank
        return GearBlockSpec.of(self.config, kind, tokens, head_dim, rank)
