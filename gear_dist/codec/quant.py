"""Quantization primitives: asymmetric min-max quantization over group tiles, and bit packing.

All functions are pure and batched over any leading dims: ``x`` is ``[..., n, d]`` (tokens x
channels of one head). A backbone is a *group tile* ``(tokens, channels)``: every tile of ``x``
gets one fp16 scale and one fp16 minimum (DESIGN §1.2).

Deliberate deviations from the GEAR reference code: ``levels = 2**b - 1`` (not ``b**2 - 1``), a
guard for constant tiles, and real packed codes (the reference dequantizes at once and saves
nothing).
"""

from __future__ import annotations

import torch

Tile = tuple[int, int]


def group_tile(backbone: str, kind: str, n: int, d: int, group_size: int) -> Tile:
    """The (tokens, channels) extent of one quantization group.

    KIVI: keys per channel over ``group_size`` tokens, values per token over ``group_size``
    channels. KCVT: keys per channel over the block, values per token over the head.
    Uniform: one group per block. Groups never cross heads, so TP shards compress alone.
    """
    if backbone == "uniform":
        return (n, d)
    if backbone == "kcvt":
        return (n, 1) if kind == "key" else (1, d)
    if backbone == "kivi":
        if kind == "key":
            if n % group_size:
                raise ValueError(f"group_size: {group_size} does not divide the block's {n} tokens")
            return (group_size, 1)
        if d % group_size:
            raise ValueError(f"group_size: {group_size} does not divide head_dim={d}")
        return (1, group_size)
    raise ValueError(f"backbone: unknown backbone {backbone!r}")


def _tiles(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """[..., n, d] -> [..., n/tn, d/tc, tn*tc]: one row per group."""
    tn, tc = tile
    *lead, n, d = x.shape
    x = x.reshape(*lead, n // tn, tn, d // tc, tc).transpose(-3, -2)
    return x.reshape(*lead, n // tn, d // tc, tn * tc)


def _untiles(t: torch.Tensor, tile: Tile) -> torch.Tensor:
    """Inverse of :func:`_tiles`."""
    tn, tc = tile
    *lead, gn, gc, _ = t.shape
    t = t.reshape(*lead, gn, gc, tn, tc).transpose(-3, -2)
    return t.reshape(*lead, gn * tn, gc * tc)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= x (x fp32), so the stored minimum never exceeds the data."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (x fp32), so the stored scale always covers the range."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def quantize(
    x: torch.Tensor, bits: int, tile: Tile, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of ``x [..., n, d]`` over ``tile`` groups.

    ``valid`` (bool, broadcastable to x) excludes entries from the statistics: padding tokens
    and outliers must not widen the range. Returns ``codes`` (uint8, [..., n, d], unpacked),
    ``scale`` and ``zero`` (fp16, [..., n/tn, d/tc]). The stored scale is rounded up and the
    minimum down, so every valid entry is within ``scale / 2`` of its dequantized value.
    """
    levels = 2**bits - 1
    xf = x.float()
    t = _tiles(xf, tile)
    if valid is None:
        lo, hi = t.amin(-1), t.amax(-1)
    else:
        m = _tiles(valid.expand_as(x).float(), tile).bool()
        lo = torch.where(m, t, torch.inf).amin(-1)
        hi = torch.where(m, t, -torch.inf).amax(-1)
        empty = ~m.any(-1)  # a tile of padding only: any finite stats will do
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    zero = _fp16_down(lo)
    span = hi - zero.float()
    # a tensor divisor: CUDA torch turns division by a Python scalar into a multiply by its
    # reciprocal, one ulp off IEEE division, which moves the rounded-up scale when the quotient is
    # an fp16 value; the GPU kernel divides exactly (div_rn), and so must its reference
    scale = _fp16_up(torch.where(span > 0, span / torch.full_like(span, levels), torch.ones_like(span)))  # max == min
    # floor((x - (zero - scale/2)) * (1/scale)): half-up rounding by one division per group, not per
    # entry (IEEE division was a fifth of the GPU kernel's instructions), and no product that feeds a
    # sum, which a GPU compiler would fuse (rounding once where torch rounds twice): the kernel's codes
    sf = scale.float()[..., None]
    base, inv = zero.float()[..., None] - 0.5 * sf, torch.ones_like(sf) / sf
    codes = ((t - base) * inv).floor_().clamp_(0, levels)
    return _untiles(codes.to(torch.uint8), tile), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tile: Tile) -> torch.Tensor:
    """fp32 values of unpacked ``codes [..., n, d]``."""
    t = _tiles(codes.float(), tile)
    return _untiles(t * scale.float()[..., None] + zero.float()[..., None], tile)


# -- bit packing ---------------------------------------------------------------------------
# Planar layout, one mechanism for every b: the d channels of a token are split into 8 planes
# of d/8 (plane i = channels [i*d/8, (i+1)*d/8)). Column j's 8 codes form a word of 8*b bits,
# code i at bit b*i, stored as b byte planes of d/8 bytes (byte plane k = bits [8k, 8k+8)).
# For b in {2, 4, 8} code plane i sits whole in byte plane b*i//8 at shift b*i%8, so a kernel
# unpacks a [tokens, d/8] tile per plane with one shift and mask: no interleaving.

def packed_dim(d: int, bits: int) -> int:
    if d % 8:
        raise ValueError(f"head_dim: {d} is not a multiple of 8, which bit packing needs")
    return d * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] (each < 2**bits) -> packed uint8 [..., d*bits/8]."""
    d = codes.shape[-1]
    packed_dim(d, bits)
    if bits == 8:
        return codes.contiguous()
    planes = codes.reshape(*codes.shape[:-1], 8, d // 8).long()  # [..., 8, d/8]
    shifts = torch.arange(8, device=codes.device).mul_(bits)[:, None]
    word = (planes << shifts).sum(-2, keepdim=True)  # [..., 1, d/8], 8*bits <= 32 bits
    byte_shifts = torch.arange(bits, device=codes.device).mul_(8)[:, None]
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., bits, d/8]
    return out.reshape(*codes.shape[:-1], d * bits // 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed uint8 [..., d*bits/8] -> uint8 codes [..., d]."""
    if bits == 8:
        return packed
    d = packed.shape[-1] * 8 // bits
    planes = packed.reshape(*packed.shape[:-1], bits, d // 8).long()
    byte_shifts = torch.arange(bits, device=packed.device).mul_(8)[:, None]
    word = (planes << byte_shifts).sum(-2, keepdim=True)  # [..., 1, d/8]
    shifts = torch.arange(8, device=packed.device).mul_(bits)[:, None]
    codes = (word >> shifts) & (2**bits - 1)  # [..., 8, d/8]
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], d)
