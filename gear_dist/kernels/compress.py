"""GEAR block compression on the GPU: one program per (block, head), everything in registers.

Computes what ``codec.compress`` computes (its torch reference), for the KIVI backbone:
outlier selection by iterated arg-max/arg-min, fp16 statistics with directed rounding, codes
(by each group's reciprocal scale) packed into the planar layout — all identical to the
reference — then the low rank of the residual by subspace iteration with classical Gram-Schmidt
(twice) on ``r + oversample`` columns and Rayleigh-Ritz by power steps on the square of the small
Gram matrix, and last the outlier corrections ``X - D - L`` of what is stored (so outliers stay
exact). On the GPU the subspace iteration multiplies the residual in fp16, scaled by a power of
two, with fp32 sums (the 10 mantissa bits TF32 keeps; 3xTF32 cost 40% more time), and the Gram
matrix in TF32: the factors are stored in fp16 anyway, and the decompressed block stays within
~8e-4 of the reference's (H100, 2026-11-23); Triton's interpreter keeps the codec's fp32. Results
are written straight into a page pool, so compressing a layer's new blocks is one launch per kind.

Why not torch: cuSOLVER's small batched QR made naive GEAR compression 67 ms per layer-block
against 0.39 ms of decode attention (DESIGN §3); here the rank-2..8 factors are orthonormalised
with a few vector ops per column.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gear_dist.codec.lowrank import B_TOP, RITZ_STEPS, init_basis
from gear_dist.kernels.launch import launch

if TYPE_CHECKING:
    from gear_dist.cache.pool import PagePool


@triton.jit
def _orthonormalize(q, M_PAD: tl.constexpr, COLS: tl.constexpr):
    """CGS2 on the first COLS columns of q [rows, M_PAD] (the rest stay as they are, zero);
    a column that keeps under 1e-5 of its norm becomes zero (as codec.lowrank.orthonormalize).

    Each pass takes one reduction over the rows (across warps, for the basis) for the
    coefficients and the squared norm of the vector it projects, together; the final norm
    follows by Pythagoras (|v2|^2 = |v1|^2 - |c2|^2: the second pass's coefficients are at
    rounding level)."""
    cols = tl.arange(0, M_PAD)
    for j in range(COLS):  # runtime loops throughout: unrolling them made compiles take minutes
        is_j = (cols == j)[None, :]
        done = tl.where((cols < j)[None, :], q, 0.0)
        v = tl.sum(tl.where(is_j, q, 0.0), axis=1)
        c = tl.sum(tl.where(is_j, v[:, None], done) * v[:, None], axis=0)  # coefficients | |v|^2 at j
        before = tl.sqrt(tl.sum(tl.where(cols == j, c, 0.0), axis=0))
        v = v - tl.sum(done * tl.where(cols < j, c, 0.0)[None, :], axis=1)
        c = tl.sum(tl.where(is_j, v[:, None], done) * v[:, None], axis=0)
        coef = tl.where(cols < j, c, 0.0)
        v = v - tl.sum(done * coef[None, :], axis=1)
        norm = tl.sqrt(tl.maximum(tl.sum(tl.where(cols == j, c, 0.0) - coef * coef, axis=0), 0.0))
        keep = (norm > 1e-5 * before) & (norm > 1.1754943508222875e-38)
        v = tl.where(keep, v / tl.maximum(norm, 1.1754943508222875e-38), 0.0)
        q = tl.where(is_j, v[:, None], q)
    return q


@triton.jit
def _corner(t, S: tl.constexpr):
    """``t[:S, :S]`` of a square ``t`` of side S or 2S."""
    if S == t.shape[0]:
        return t
    quarters = tl.permute(tl.reshape(t, (2, S, 2, S)), (1, 3, 0, 2))  # [S, S, row half, column half]
    left, _ = tl.split(quarters)
    top, _ = tl.split(left)
    return top


@triton.jit
def _fp16_down(x):
    """Largest fp16 <= x."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    lower = tl.where(h > 0, bits - 1, tl.where(h < 0, bits + 1, -32767))  # 0 -> -smallest subnormal
    return tl.where(h.to(tl.float32) > x, lower.to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _fp16_up(x):
    """Smallest fp16 >= x, for x > 0."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    return tl.where(h.to(tl.float32) < x, (bits + 1).to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _code_grid(zero, scale):
    """``zero - scale/2`` and ``1/scale`` (fp32), from which :func:`_codes` rounds half up as
    codec.quant does: one IEEE division per group, and no product that feeds a sum (the compiler
    would fuse it, rounding once where torch rounds twice)."""
    return zero - 0.5 * scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _codes(x, base, inv, LEVELS: tl.constexpr):
    return tl.minimum(tl.maximum(tl.floor((x - base) * inv), 0.0), LEVELS)


@triton.jit
def _factor_rows(F, rows, RANK: tl.constexpr, R2: tl.constexpr):
    """Rows ``rows`` (any shape) of a stored factor ``F [rows, RANK]`` (fp16) as fp32 ``[..., R2]``."""
    r = tl.arange(0, R2)
    return tl.load(F + tl.expand_dims(rows, len(rows.shape)) * RANK + r, mask=r < RANK, other=0.0).to(tl.float32)


@triton.jit
def _compress_block(
    X, stride_xt, VALID, P0, CODES, SCALE, ZERO, LRA, LRB, OV, OI, ph,
    N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    IS_KEY: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr, COLS: tl.constexpr, M_PAD: tl.constexpr,
    R2: tl.constexpr, ITERS: tl.constexpr, RITZ: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
    TOP_B: tl.constexpr,
):
    """One head of one block, ``X [N, D]`` (rows ``stride_xt`` apart), into page-head ``ph``."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = N // G  # key groups along tokens
    DG: tl.constexpr = D // G  # value groups along channels
    KO: tl.constexpr = 2 * K

    offs_t = tl.arange(0, N)
    offs_d = tl.arange(0, D)
    x_at = X + offs_t[:, None] * stride_xt + offs_d[None, :]
    x = tl.load(x_at).to(tl.float32)
    if HAS_VALID:
        tok_ok = tl.load(VALID + offs_t).to(tl.int1)
    else:
        tok_ok = offs_t >= 0
    ok = tok_ok[:, None] & (offs_d >= 0)[None, :]
    x = tl.where(ok, x, 0.0)  # padding may hold anything

    # -- outliers S: K largest, then K smallest per row by signed value (rows along tokens of a
    #    group for keys, along channels for values); positions are stored at once. The picks run on
    #    a score tensor that marks padding and taken entries by values below any data (a boolean
    #    mask cost bit operations at every access), and x is read again after them (from L2: kept
    #    beside the score, it spilled)
    PAD: tl.constexpr = -3.4e38  # padding: picked only after every valid entry of its row
    use = ok
    if K > 0:
        score = tl.where(ok, x, PAD)
        for j in range(KO):
            if j == K:  # the top K are taken: the bottom K are the top of -x
                score = tl.where(score > PAD, -score, score)
            if IS_KEY:
                pos = tl.argmax(tl.reshape(score, (NG, G, D)), axis=1)  # [NG, D]: token within the group
                hit = tl.reshape(tl.arange(0, G)[None, :, None] == pos[:, None, :], (N, D))
                rows = tl.arange(0, NG)[:, None] * D + offs_d[None, :]
                tl.store(OI + ph * (NG * D * KO) + rows * KO + j, pos.to(tl.uint8))
            else:
                pos = tl.argmax(score, axis=1)  # [N]: channel
                hit = offs_d[None, :] == pos[:, None]
                tl.store(OI + ph * (N * KO) + offs_t * KO + j, pos.to(tl.uint8))
            score = tl.where(hit, float("-inf"), score)
        use = score > PAD
        x = tl.where(ok, tl.load(x_at).to(tl.float32), 0.0)

    # -- D: statistics over valid non-outliers, fp16 with directed rounding, codes
    if IS_KEY:
        x3 = tl.reshape(x, (NG, G, D))
        u3 = tl.reshape(use, (NG, G, D))
        lo = tl.min(tl.where(u3, x3, float("inf")), axis=1)  # [NG, D]
        hi = tl.max(tl.where(u3, x3, float("-inf")), axis=1)
    else:
        x3 = tl.reshape(x, (N, DG, G))
        u3 = tl.reshape(use, (N, DG, G))
        lo = tl.min(tl.where(u3, x3, float("inf")), axis=2)  # [N, DG]
        hi = tl.max(tl.where(u3, x3, float("-inf")), axis=2)
    empty = lo == float("inf")
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    zero = _fp16_down(lo)
    span = hi - zero.to(tl.float32)
    scale = _fp16_up(tl.where(span > 0, tl.math.div_rn(span, tl.full(span.shape, LEVELS, tl.float32)), 1.0))
    zf = zero.to(tl.float32)
    sf = scale.to(tl.float32)
    base, inv = _code_grid(zf, sf)
    if IS_KEY:
        stat = tl.arange(0, NG)[:, None] * D + offs_d[None, :]
        tl.store(SCALE + ph * (NG * D) + stat, scale)
        tl.store(ZERO + ph * (NG * D) + stat, zero)
        codes3 = _codes(x3, base[:, None, :], inv[:, None, :], LEVELS)
        dq = tl.reshape(codes3 * sf[:, None, :] + zf[:, None, :], (N, D))
    else:
        stat = offs_t[:, None] * DG + tl.arange(0, DG)[None, :]
        tl.store(SCALE + ph * (N * DG) + stat, scale)
        tl.store(ZERO + ph * (N * DG) + stat, zero)
        codes3 = _codes(x3, base[:, :, None], inv[:, :, None], LEVELS)
        dq = tl.reshape(codes3 * sf[:, :, None] + zf[:, :, None], (N, D))
    # -- planar packing: channel plane i, column j -> bits BITS*i of column j's word (8 planes of
    #    BITS bits: int32 up to 4 bits, which halves the registers the codes take). A thread holds
    #    adjacent columns of one plane and the planes sit in other lanes: CP columns' words are
    #    summed across lanes together in one int32 where they fit (2-bit: two 16-bit words), half
    #    the shuffles
    WORD: tl.constexpr = tl.int32 if BITS <= 4 else tl.int64
    CP: tl.constexpr = 32 // (8 * BITS) if BITS <= 4 else 1
    W: tl.constexpr = D // 8
    ROW: tl.constexpr = D * BITS // 8
    at = (8 * BITS * tl.arange(0, CP)).to(WORD)  # a column's word within the int32
    planes = tl.reshape(codes3, (N, 8, W // CP, CP)).to(WORD) << (BITS * tl.arange(0, 8))[None, :, None, None].to(WORD)
    words = tl.sum(tl.sum(planes << at[None, None, None, :], axis=3), axis=1)  # [N, W / CP]
    for k in range(BITS):
        byte = tl.reshape(((words[:, :, None] >> (at + 8 * k)[None, None, :]) & 255).to(tl.uint8), (N, W))
        tl.store(CODES + ph * (N * ROW) + offs_t[:, None] * ROW + k * W + tl.arange(0, W)[None, :], byte)

    # -- L: subspace iteration on the residual, Rayleigh-Ritz on the small Gram matrix
    if RANK > 0:
        e = tl.where(use, x - dq, 0.0)
        # on the GPU the residual in fp16 times a power of two that puts its largest entry at 2^8
        # (p stays well inside fp16): TF32's 10 mantissa bits, with half its tensor-core
        # instructions (k16 instead of k8) and operands half the size; p carries the scale until
        # b is stored. The interpreter ("ieee") keeps fp32, the codec's arithmetic, so that tests
        # compare the two functions and not roundings (a rank-r subspace between close singular
        # values turns 10-bit roundings into visible differences)
        OP: tl.constexpr = tl.float32 if PREC == "ieee" else tl.float16
        top = tl.max(tl.max(tl.abs(e), axis=1), axis=0)
        up = tl.exp2(tl.minimum(8.0 - tl.ceil(tl.log2(tl.where(top > 0, top, 1.0))), 100.0))
        e_op = (e * up).to(OP)
        cols = tl.arange(0, M_PAD)
        p = tl.load(P0 + offs_d[:, None] * M_PAD + cols[None, :])  # [D, M] seeded start, zero-padded
        q = tl.zeros([N, M_PAD], tl.float32)
        for _ in range(ITERS):
            q = tl.dot(e_op, p.to(OP))  # [N, M]
            if 2 * COLS <= M_PAD:  # the real columns in half the width (the dot's least is 16): half the work
                used, zero_cols = tl.split(tl.permute(tl.reshape(q, (N, 2, M_PAD // 2)), (0, 2, 1)))
                q = tl.reshape(tl.permute(tl.join(_orthonormalize(used, M_PAD // 2, COLS), zero_cols), (0, 2, 1)), (N, M_PAD))
            else:
                q = _orthonormalize(q, M_PAD, COLS)
            p = tl.dot(tl.trans(e_op), q.to(OP))  # [D, M], times up
        # -- L, Rayleigh-Ritz: on the real columns' corner of the Gram matrix ([S, S]: S = M // 2
        #    where they fit, as in the subspace iteration), its Ritz vectors as [S, R2] (R2 = RANK
        #    rounded up to a power of two): the steps' products hold 4x fewer entries than on [M, M]
        S: tl.constexpr = M_PAD // 2 if 2 * COLS <= M_PAD else M_PAD
        gram = _corner(tl.dot(tl.trans(p), p, input_precision=PREC), S)
        square = tl.sum(gram[:, :, None] * gram[None, :, :], axis=1)  # fp32: its small eigenvalues need it
        r2 = tl.arange(0, R2)
        w = tl.where((tl.arange(0, S)[:, None] == r2[None, :]) & (r2[None, :] < RANK), 1.0, 0.0)
        for _ in range(RITZ):
            w = _orthonormalize(tl.sum(square[:, :, None] * w[None, :, :], axis=1), R2, RANK)
        # powers of two from B's columns to A's where B's would not fit fp16 (codec.lowrank.fp16_safe),
        # by B's column norms, w^T G w: from the small tensors, with no pass over B
        norm = tl.sqrt(tl.sum(w * tl.sum(gram[:, :, None] * w[None, :, :], axis=1), axis=0)) / up  # [R2]
        shift = tl.exp2(tl.maximum(tl.ceil(tl.log2(norm)) - TOP_B, 0.0))
        to_cols = (r2[:, None] == cols[None, :]).to(tl.float32)  # [R2, M]: Ritz vector j into product column j
        shift = 1.0 + tl.sum((shift - 1.0)[:, None] * to_cols, axis=0)  # [M]: 1 where no Ritz vector
        w = tl.sum(w[:, :, None] * to_cols[None, :, :], axis=1)  # [S, M]
        if S < M_PAD:  # rows S.. are zero
            w = tl.reshape(tl.permute(tl.join(w, tl.zeros_like(w)), (2, 0, 1)), (M_PAD, M_PAD))
        a = (tl.dot(q, w, input_precision=PREC) * shift[None, :]).to(tl.float16)  # [N, M], columns >= RANK: 0
        b = (tl.dot(p, w, input_precision=PREC) / up / shift[None, :]).to(tl.float16)  # [D, M]
        rmask = (cols < RANK)[None, :]
        tl.store(LRA + ph * (N * RANK) + offs_t[:, None] * RANK + cols[None, :], a, mask=rmask)
        tl.store(LRB + ph * (D * RANK) + offs_d[:, None] * RANK + cols[None, :], b, mask=rmask)

    # -- S, corrections: X - D - L at each outlier. Nothing of the picks or the factors is kept
    #    through the low rank (the block's residual, then the picks' X - D, spilled there):
    #    positions, statistics, the factors' rows at the pick and X are read back (this program's
    #    own stores, behind a barrier; X from L2), and X - D computed again as above
    if K > 0:
        tl.debug_barrier()
        for j in range(KO):
            if IS_KEY:
                rows = tl.arange(0, NG)[:, None] * D + offs_d[None, :]
                pos = tl.load(OI + ph * (NG * D * KO) + rows * KO + j).to(tl.int32)  # [NG, D]
                tok = tl.arange(0, NG)[:, None] * G + pos
                xp = tl.load(X + tok * stride_xt + offs_d[None, :]).to(tl.float32)
                sp = tl.load(SCALE + ph * (NG * D) + rows).to(tl.float32)
                zp = tl.load(ZERO + ph * (NG * D) + rows).to(tl.float32)
            else:
                pos = tl.load(OI + ph * (N * KO) + offs_t * KO + j).to(tl.int32)  # [N]
                tok = offs_t
                xp = tl.load(X + offs_t * stride_xt + pos).to(tl.float32)
                sp = tl.load(SCALE + ph * (N * DG) + offs_t * DG + pos // G).to(tl.float32)
                zp = tl.load(ZERO + ph * (N * DG) + offs_t * DG + pos // G).to(tl.float32)
            if HAS_VALID:
                xp = tl.where(tl.load(VALID + tok).to(tl.int1), xp, 0.0)
            pbase, pinv = _code_grid(zp, sp)
            corr = xp - (_codes(xp, pbase, pinv, LEVELS) * sp + zp)
            if IS_KEY:
                if RANK > 0:  # A's row of each channel's pick, B's row of each channel
                    a_rows = _factor_rows(LRA + ph * (N * RANK), tok, RANK, R2)  # [NG, D, R2]
                    b_rows = _factor_rows(LRB + ph * (D * RANK), offs_d, RANK, R2)  # [D, R2]
                    corr = corr - tl.sum(a_rows * b_rows[None, :, :], axis=2)
                tl.store(OV + ph * (NG * D * KO) + rows * KO + j, corr.to(tl.float16))
            else:
                if RANK > 0:  # A's row of each token, B's row of each token's pick
                    a_rows = _factor_rows(LRA + ph * (N * RANK), offs_t, RANK, R2)  # [N, R2]
                    b_rows = _factor_rows(LRB + ph * (D * RANK), pos, RANK, R2)
                    corr = corr - tl.sum(a_rows * b_rows, axis=1)
                tl.store(OV + ph * (N * KO) + offs_t * KO + j, corr.to(tl.float16))


@triton.jit
def _compress_kernel(
    XK, XV, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, VALID, stride_valid, IDS, NB, P0,
    K_CODES, K_SCALE, K_ZERO, K_LRA, K_LRB, K_OV, K_OI, V_CODES, V_SCALE, V_ZERO, V_LRA, V_LRB, V_OV, V_OI,
    H: tl.constexpr, N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    K_KEY: tl.constexpr, K_VALUE: tl.constexpr,
    RANK: tl.constexpr, COLS: tl.constexpr, M_PAD: tl.constexpr, R2: tl.constexpr, ITERS: tl.constexpr,
    RITZ: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr, TOP_B: tl.constexpr, KINDS: tl.constexpr,
):
    """The ``NB`` blocks' keys (``KINDS`` "key"), values ("value") or both ("both": programs
    0..NB-1 take the keys, the next NB the values; only the compiled paths are in the binary)."""
    pid = tl.program_id(0)
    blk = pid % NB
    h = tl.program_id(1)
    ph = tl.load(IDS + blk).to(tl.int64) * H + h
    valid = VALID + blk * stride_valid
    if KINDS == "both":
        keys = pid < NB
    else:
        keys: tl.constexpr = KINDS == "key"
    if keys:
        _compress_block(XK + blk * stride_kb + h * stride_kh, stride_kt, valid, P0,
                        K_CODES, K_SCALE, K_ZERO, K_LRA, K_LRB, K_OV, K_OI, ph, N, D, G, BITS, True, K_KEY, RANK, COLS,
                        M_PAD, R2, ITERS, RITZ, HAS_VALID, PREC, TOP_B)
    else:
        _compress_block(XV + blk * stride_vb + h * stride_vh, stride_vt, valid, P0,
                        V_CODES, V_SCALE, V_ZERO, V_LRA, V_LRB, V_OV, V_OI, ph, N, D, G, BITS, False, K_VALUE, RANK,
                        COLS, M_PAD, R2, ITERS, RITZ, HAS_VALID, PREC, TOP_B)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@functools.lru_cache(maxsize=64)
def _start(d: int, cols: int, m_pad: int, seed: int, device: torch.device) -> torch.Tensor:
    """The power iteration's seeded start, zero-padded to ``m_pad`` columns: made once per shape
    (read-only; a fresh one per call was two more host operations per launch)."""
    p0 = torch.zeros(d, m_pad, device=device, dtype=torch.float32)
    p0[:, :cols] = init_basis(d, cols, seed, device)
    return p0


def compress_into_pool(keys: torch.Tensor, values: torch.Tensor, pool: "PagePool", ids: torch.Tensor,
                       valid: torch.Tensor | None = None, *, maxnreg: int | None = None, num_warps: int = 4) -> None:
    """Compress ``keys`` and ``values [blocks, H, N, D]`` into ``pool``'s pages ``ids [blocks]``.

    ``valid [blocks, N]`` marks real tokens. Same result as ``codec.compress`` then
    ``pool.write`` (its reference), in one launch (one per kind where there is low rank).
    ``maxnreg`` caps the registers per thread and ``num_warps`` sets a program's warps (tuning
    knobs, bench/kernel_bench.py tries them): None picks 128 for low rank, 0 leaves it to the
    compiler.
    """
    cfg = pool.config
    if cfg.backbone != "kivi" or cfg.bits == 16:
        raise ValueError("compress_into_pool: the GPU kernel implements the KIVI backbone")
    key, value = pool.specs["key"], pool.specs["value"]
    nb, h, n, d = keys.shape
    if values.shape != keys.shape or (n, d) != (key.tokens, key.head_dim) or h != pool.heads \
            or (key.tile[0], value.tile[1]) != (cfg.group_size, cfg.group_size):
        raise ValueError(f"compress_into_pool: blocks {tuple(keys.shape)} and {tuple(values.shape)} "
                         "do not match the pool's pages")
    keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys, values))
    cols = min(key.rank + cfg.oversample, n, d)
    m_pad = max(16, _next_pow2(cols))
    if maxnreg is None:  # low rank fits 4 programs per SM (a batch-64 layer in one wave) at 128
        # registers, spilling ~0.5 KB per thread. H100, K and V of a batch-64 block, GPU ms (2026-11-24):
        # gear_l 0.143 -> 0.112, gear 0.201 -> 0.184 (gear was exempt after one earlier measurement, though
        # every bench since 11-23 showed the cap faster); kivi (no low rank) needs fewer. 4 warps: 8 take
        # 0.147 / 0.188 capped, 2 take 0.130 / 0.198 uncapped
        maxnreg = 128 if key.rank else 0
    p0 = _start(d, cols if key.rank else 0, m_pad, cfg.seed, keys.device)
    dummy = pool.storage["key"]["codes"]
    valid_t = valid.contiguous() if valid is not None else dummy  # ids and valid as given: a cast is a launch
    parts = [pool.storage[kind].get(name, dummy) for kind in ("key", "value")
             for name in ("codes", "scale", "zero", "lowrank_a", "lowrank_b", "outlier_values", "outlier_index")]
    args = (keys, values, *keys.stride()[:3], *values.stride()[:3], valid_t, valid_t.stride(0) if valid is not None else 0,
            ids.contiguous(), nb, p0, *parts)
    meta = dict(
        H=h, N=n, D=d, G=cfg.group_size, BITS=cfg.bits,
        K_KEY=key.outliers_per_side, K_VALUE=value.outliers_per_side,
        RANK=key.rank, COLS=cols, M_PAD=m_pad, R2=_next_pow2(key.rank), ITERS=cfg.iters, RITZ=RITZ_STEPS, TOP_B=B_TOP,
        HAS_VALID=valid is not None, PREC="ieee" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32",
        num_warps=num_warps, maxnreg=maxnreg or None,
    )
    # one launch for both kinds where there is no low rank; H100, K and V of a batch-64 block, GPU ms
    # (2026-11-24): kivi 0.0314 -> 0.0241, but gear_l 0.0861 -> 0.0956 and gear 0.150 -> 0.161 (a
    # binary with both low-rank paths spills more; programs alternating K and V: 0.098 / 0.167)
    for kinds in ("key", "value") if key.rank else ("both",):
        launch(_compress_kernel, (nb * (2 if kinds == "both" else 1), h), args, KINDS=kinds, **meta)
