"""Decode attention read straight from GEAR pages: no fp16 K/V is ever written to memory.

Flash-decoding (Dao et al., 2023) with split-K over pages, per tile of ``TILE`` tokens of a page:

    q.K^T = q.D^T + (q.B_k) A_k^T + q.S_k^T        p.V = p.D_v + (p.A_v) B_v^T + p.S_v

- D: packed codes become fp16 in registers without a conversion (:func:`_tile`), arranged so
  that both products take the tile from registers as it is (no shared-memory round trip): the
  key tile is ``[tokens, D]`` against ``q`` with key scales and minima folded into ``q`` once per
  group; the value tile is transposed, ``[D, tokens]`` against ``p``, and is never dequantized:
  each row of ``p`` is a (query head, value group) pair scaled by that group's per-token scale
  (the rows that padding to 16 would waste carry the groups), minima and the codes' offset are
  per-row sums (``sum p`` and ``p . vz`` on the tensor cores too, as rows of a small matrix against
  ``p``), and a column keeps its own group's row at the end;
- L: ``q.B_k`` is formed once per page, ``A_v^T p`` is accumulated over the page's tiles and
  expanded through ``B_v`` at the page's end (factors padded to 16 columns: tensor-core dots);
- S: outlier rows have a fixed length, so the row of each stored entry is known from its slot;
  a tile's few entries (2 per row by default) are added as a dense tile by comparing their
  positions (packed fp16 compares), as one more small product each for K and V;
- a page's scales and minima are read a page ahead into registers.

One launch per page pool writes per-split partials (running max, sum, output); a second kernel
merges them with the fp16 tail (fewer than ``block_size`` tokens) and normalises. On CUDA, pools
of 2 or 4 bits take the same page loop written in Gluon instead (``decode_pages_gluon``,
:func:`gluon_takes`): 2.7x as fast for gear_l, 2.9x for gear (H100, 16 x 16k, 2026-11-24); this
one covers every format and Triton's interpreter.

File order as Triton's fused-attention tutorial: helpers, kernels, launcher, torch reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gear_dist.codec import decompress
from gear_dist.kernels.launch import compiling, launch

try:  # Triton's Gluon dialect (3.5+): the page loop for 2- and 4-bit pages (decode_pages_gluon)
    from gear_dist.kernels import decode_pages_gluon
except ImportError:
    decode_pages_gluon = None

if TYPE_CHECKING:
    from gear_dist.cache.pool import PagePool


# -- helpers ---------------------------------------------------------------------------------
@triton.jit
def _planes(words, BITS: tl.constexpr, LAST_AXIS_KEPT: tl.constexpr):
    """Int32 ``words`` -> fp16 pairs, one integer op per pair and no conversion to float: for
    bytes (0, 2) and then (1, 3) of each word, every code plane s is masked in place and 0x6400
    (fp16 1024.0) or-ed into both 16-bit halves, giving ``1024 + code * 2**(BITS*s)`` for the byte
    of each half. Shape ``[.., 2, PER, 2]`` (byte pair, plane, half), or with ``LAST_AXIS_KEPT``
    ``[.., 2, PER, w, 2]`` for words ``[.., w]``."""
    PER: tl.constexpr = 8 // BITS  # code planes per byte
    mask = (((1 << BITS) - 1) * 0x00010001) << (BITS * tl.arange(0, PER))  # plane s of bytes 0 and 2
    shift = 8 * tl.arange(0, 2)  # bytes 0, 2 | 1, 3 at the bottom
    if LAST_AXIS_KEPT:
        half = tl.expand_dims(words, -2) >> shift[:, None]
        m = (tl.expand_dims(half, -2) & mask[:, None]) | 0x64006400  # [.., 2, PER, w]
    else:
        half = tl.expand_dims(words, -1) >> shift
        m = (tl.expand_dims(half, -1) & mask) | 0x64006400  # [.., 2, PER]
    return tl.join(m.to(tl.int16), (m >> 16).to(tl.int16)).to(tl.float16, bitcast=True)


@triton.jit
def _tile(ptr, tok, BITS: tl.constexpr, D: tl.constexpr, ALONG_TOKENS: tl.constexpr):
    """Rows ``tok`` of a planar-packed [tokens, D*BITS/8] page as an fp16 tile, ``[len(tok), D]``
    (or ``[D, len(tok)]`` with ``ALONG_TOKENS``), whose channel axis is in the order
    :func:`_order` names and whose entries are ``bias + code * step``.

    For BITS in {2, 4, 8} rows are read as int32 words and unpacked by :func:`_planes`; the two
    numbers one integer op makes stay in their register, and the tile is arranged around them
    so that it reaches the tensor cores without a shuffle: a tensor-core operand holds pairs
    along its reduction dimension, which is the channels for ``q.K^T`` and the tokens for
    ``p.V``. For the latter (``ALONG_TOKENS``) the words of two consecutive tokens are first
    interleaved by halves, so each half of a word holds one token's byte. BITS=3 straddles bytes
    and gathers per channel (value: the code itself)."""
    W: tl.constexpr = D // 8
    ROW: tl.constexpr = D * BITS // 8
    NW: tl.constexpr = ROW // 4
    n: tl.constexpr = tok.shape[0]
    if BITS == 3:
        c = tl.arange(0, D)
        bitpos = BITS * (c // W)
        byte = (bitpos // 8) * W + c % W
        shift = bitpos % 8
        lo = tl.load(ptr + tok[:, None] * ROW + byte[None, :]).to(tl.int32) >> shift[None, :]
        spill = (shift + BITS) > 8  # planes 2 and 5 continue in the next byte plane
        hi = tl.load(ptr + tok[:, None] * ROW + byte[None, :] + W, mask=spill[None, :], other=0).to(tl.int32)
        codes = ((lo | (hi << (8 - shift[None, :]))) & 7).to(tl.float16)
        return tl.trans(codes) if ALONG_TOKENS else codes
    elif ALONG_TOKENS:  # transposed, [D, n]: consecutive tokens pair up in the registers
        words = ptr.to(tl.pointer_type(tl.int32)) + tl.arange(0, NW)[:, None]
        even, odd = tl.split(tl.reshape(tok, (n // 2, 2)))
        we = tl.load(words + even[None, :] * NW)  # [NW, n/2]
        wo = tl.load(words + odd[None, :] * NW)
        lo = (we & 0xFFFF) | (wo << 16)  # bytes 0, 1 of the even token | of the odd one
        hi = ((we >> 16) & 0xFFFF) | ((wo >> 16) << 16)  # bytes 2, 3
        pairs = tl.permute(tl.join(lo, hi), (0, 2, 1))  # [NW, 2, n/2]
        x = _planes(pairs, BITS, True)  # [NW, 2, 2, PER, n/2, 2]: the last dims are the tokens
        return tl.reshape(x, (D, n))
    else:
        words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + tok[:, None] * NW + tl.arange(0, NW)[None, :])
        return tl.reshape(_planes(words, BITS, False), (n, D))  # [n, NW, 2, PER, 2]: the last dim is bytes 0 | 2


@triton.jit
def _order(BITS: tl.constexpr, D: tl.constexpr, ALONG_TOKENS: tl.constexpr):
    """For each place along a :func:`_tile`'s channel axis: its channel, and ``bias, step`` with
    ``tile = bias + code * step``."""
    col = tl.arange(0, D)
    if BITS == 3:
        return col, 0.0, tl.full([D], 1.0, tl.float32)
    else:
        W: tl.constexpr = D // 8
        PER: tl.constexpr = 8 // BITS
        if ALONG_TOKENS:  # column (word, bytes 0/1 | 2/3, byte 0 | 1, plane)
            byte = col // PER
            s = col % PER
        else:  # column (word, byte 0/2 | 1/3, plane, byte 0 | 2)
            byte = 4 * (col // (4 * PER)) + 2 * (col % 2) + (col // (2 * PER)) % 2
            s = (col // 2) % PER
        channel = ((byte // W) * PER + s) * W + byte % W  # planar packing: plane k of channel c = k*W + byte
        return channel, 1024.0, tl.exp2((BITS * s).to(tl.float32))


@triton.jit
def _factor(ptr, rows, RANK: tl.constexpr, R_PAD: tl.constexpr):
    """Rows ``rows`` of a low-rank factor stored ``[.., RANK]``, as ``[len(rows), R_PAD]`` for the
    tensor cores: each row is read whole (one word for rank 2), then zero columns are interleaved
    (column j lands at ``j * R_PAD / next_pow2(RANK)``). Both factors of a product are widened
    alike, so it is unchanged; masked loads of the padded width cost an instruction per element."""
    R2: tl.constexpr = 1 << (RANK - 1).bit_length() if RANK > 1 else 1
    DOUBLINGS: tl.constexpr = (R_PAD // R2).bit_length() - 1
    n: tl.constexpr = rows.shape[0]
    r = tl.arange(0, R2)
    x = tl.load(ptr + rows[:, None] * RANK + r[None, :], mask=(r < RANK)[None, :], other=0.0)
    for _ in tl.static_range(DOUBLINGS):  # unrolled: each pass doubles the width
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (n, 2 * x.shape[1]))
    return x


@triton.jit
def _pick(x, i, AXIS: tl.constexpr):
    """``x`` indexed at ``i`` along ``AXIS`` (register tensors have no dynamic indexing; for a
    length-1 axis this is free)."""
    n: tl.constexpr = x.shape[AXIS]
    idx = tl.arange(0, n)
    idx = idx[:, None] if AXIS == 0 else idx[None, :]
    return tl.sum(tl.where(idx == i, x, 0.0), axis=AXIS)


@triton.jit
def _hit(a, b, PTX: tl.constexpr):
    """fp16 1.0 where a == b, else 0.0: one PTX ``set.eq.f16x2`` per two positions, where a
    compare and a select take two instructions per position (the interpreter runs no PTX)."""
    if PTX:
        a, b = tl.broadcast(a, b)
        return tl.inline_asm_elementwise("set.eq.f16x2.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float16,
                                         is_pure=True, pack=2)
    else:
        return tl.where(a == b, 1.0, 0.0).to(tl.float16)


# run-time values that vary from call to call: no specialisation (and recompile) when one is 1
@triton.jit(do_not_specialize=["split_offset", "splits_total", "pages_per_split"])
def _pages_kernel(
    Q, stride_qb, stride_qh, scale,
    KC, KS, KZ, KA, KB, KOV, KOI,
    VC, VS, VZ, VA, VB, VOV, VOI,
    TABLE, POS, NPAGES, VALID_FROM, stride_tb,
    M_OUT, L_OUT, ACC_OUT, split_offset, splits_total, pages_per_split,
    H_KV: tl.constexpr, GQA: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    PAGE: tl.constexpr, G: tl.constexpr, RANK: tl.constexpr, R_PAD: tl.constexpr,
    KO: tl.constexpr, VO: tl.constexpr, TILE: tl.constexpr, E_PAD: tl.constexpr, PTX: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H_KV
    h = pid % H_KV
    f16 = tl.float16  # every product runs in fp16 on the tensor cores, whatever the model's dtype

    # per-head strides inside a page (pool tensors are contiguous [pages, H_KV, ...])
    CODES: tl.constexpr = PAGE * D * BITS // 8
    KSTAT: tl.constexpr = PAGE // G * D
    NG: tl.constexpr = D // G  # value groups per token
    VSTAT: tl.constexpr = PAGE * NG
    LRA: tl.constexpr = PAGE * RANK
    LRB: tl.constexpr = D * RANK
    KOUT: tl.constexpr = PAGE // G * D * KO
    VOUT: tl.constexpr = PAGE * VO

    # Row r of every [M, ..] tensor is query head r // NG of this KV head, paired with value group
    # r % NG: a value's scale and minimum then act on the probabilities of its own rows, and the
    # tensor-core rows that padding to 16 would waste carry the groups instead.
    rows = tl.arange(0, M_PAD)
    row_ok = rows < GQA * NG
    grp = rows % NG
    offs_t = tl.arange(0, TILE)
    # the [.., D] tensors of keys / values are in their tile's column order (see _order)
    chan_k, bias_k, step_k = _order(BITS, D, False)
    chan_v, bias_v, step_v = _order(BITS, D, True)
    q_ptrs = Q + b * stride_qb + (h * GQA + rows // NG)[:, None] * stride_qh + chan_k[None, :]
    q16 = (tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32) * scale).to(f16)  # [M, D], softmax-scaled
    qt16 = tl.trans(q16)  # [D, M]
    valid_from = tl.load(VALID_FROM + b)
    # Keys: k = code * ks + kz and tile = bias + code * step, so
    #   q.k = (tile . w - bias * sum(w)) / top + q.kz   with w = q * ks * top / step in fp16,
    # top = max(step) keeping w clear of fp16 subnormals.
    top = tl.max(step_k, axis=0)
    w_scale = top / step_k
    neg_bias = tl.full([D, 16], -bias_k / top, f16)  # exact: a power of two
    # Values: v = code * vs + vz per token and group, tile = bias + code * step per column, so
    #   p.v = ((p * vs) . tile - bias * sum(p * vs)) / step + p . vz
    # the tile goes to the tensor cores as it is, and so do sum p and p . vz (rows of a small
    # per-token matrix against p), saving two reductions across warps per tile.
    step_v16 = step_v.to(f16)
    erow = tl.arange(0, E_PAD)[:, None]  # rows g < NG: the group's minima; row NG: ones

    m_i = tl.full([M_PAD], float("-inf"), tl.float32)
    sums_p = tl.zeros([E_PAD, M_PAD], tl.float32)  # vz^T . p (rows < NG) and sum p (row NG)
    ps = tl.zeros([16, M_PAD], tl.float32)  # sum of p * vs (in fp16, as the product saw it), in every row
    ones = tl.full([16, TILE], 1.0, f16)
    acc = tl.zeros([D, M_PAD], tl.float32)  # tile^T . (p * vs) (+ low-rank and outlier parts, times step)

    npages = tl.load(NPAGES + b)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, npages)
    # A page's statistics are read one page ahead (into registers): they are too small for the
    # compiler's pipelining of the codes, and a load per page on the critical path is a full
    # memory latency per page for every program.
    kstat = tl.arange(0, PAGE // G)[:, None] * D + chan_k[None, :]  # [groups of the page, D]
    vstat = tl.arange(0, PAGE)[:, None] * NG + tl.arange(0, NG)[None, :]  # [PAGE, NG]
    per_tile: tl.constexpr = (PAGE // TILE, TILE * NG)  # the page's value statistics, a row per tile
    ph_next = tl.load(TABLE + b * stride_tb + first, mask=first < last, other=0).to(tl.int64) * H_KV + h
    ks_next, kz_next = tl.load(KS + ph_next * KSTAT + kstat), tl.load(KZ + ph_next * KSTAT + kstat)
    vs_next, vz_next = tl.load(VS + ph_next * VSTAT + vstat), tl.load(VZ + ph_next * VSTAT + vstat)
    for p in range(first, last):
        pos0 = tl.load(POS + b * stride_tb + p)
        ph, ks_page, kz_page, vs_page, vz_page = ph_next, ks_next, kz_next, vs_next, vz_next
        ph_next = tl.load(TABLE + b * stride_tb + p + 1, mask=p + 1 < last, other=0).to(tl.int64) * H_KV + h
        ks_next, kz_next = tl.load(KS + ph_next * KSTAT + kstat), tl.load(KZ + ph_next * KSTAT + kstat)
        vs_next, vz_next = tl.load(VS + ph_next * VSTAT + vstat), tl.load(VZ + ph_next * VSTAT + vstat)
        if RANK > 0:  # factors padded to R_PAD >= 16 columns so every product is a tensor-core dot
            bk = _factor(KB + ph * LRB, chan_k, RANK, R_PAD)
            qb_t = tl.trans(tl.dot(q16, bk).to(f16))  # [R, M]
            bv = _factor(VB + ph * LRB, chan_v, RANK, R_PAD)
            bv = bv * step_v16[:, None]  # [D, R], in the tile's scale
            pa = tl.zeros([R_PAD, M_PAD], tl.float32)
        for i in tl.static_range(PAGE // TILE):  # tiles of TILE tokens; key statistics per group of G
            tok = i * TILE + offs_t
            g = i * TILE // G
            # -- scores of this tile, transposed ([TILE, M]) as every [.., M] product below
            ks = _pick(ks_page.to(tl.float32), g, 0)
            kz = _pick(kz_page.to(tl.float32), g, 0)
            w = q16 * (ks * w_scale).to(f16)[None, :]  # exact scaling by a power of two, one rounding
            # q.kz - bias / top * sum(w) on the tensor cores: every column of [M, 16] holds it
            kzm = tl.broadcast_to(kz.to(f16)[:, None], (D, 16))
            k_bias = tl.max(tl.dot(w, neg_bias, tl.dot(q16, kzm)), axis=1)
            s = tl.dot(_tile(KC + ph * CODES, tok, BITS, D, False), tl.trans(w)) / top + k_bias[None, :]
            if RANK > 0:
                ak = _factor(KA + ph * LRA, tok, RANK, R_PAD)
                s += tl.dot(ak, qb_t)
            if KO > 0:  # row c of group g holds KO entries: the token is the index, add them densely
                sk = tl.zeros([TILE, D], f16)
                for j in tl.static_range(KO):
                    slot = ph * KOUT + (g * D + chan_k) * KO + j
                    hit = _hit((tok - g * G).to(f16)[:, None], tl.load(KOI + slot).to(f16)[None, :], PTX)
                    sk += hit * tl.load(KOV + slot)[None, :]
                s += tl.dot(sk, qt16)
            s = tl.where((pos0 + tok >= valid_from)[:, None], s, float("-inf"))
            # -- online softmax
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            prob = tl.exp(s - m_safe[None, :])
            m_i = m_new
            # -- p.V of this tile
            # this tile's rows of the page's per-token scales and minima ([TILE, NG])
            vs_tile = tl.reshape(_pick(tl.reshape(vs_page.to(tl.float32), per_tile), i, 0), (TILE, NG))
            vz_tile = tl.reshape(_pick(tl.reshape(vz_page.to(tl.float32), per_tile), i, 0), (TILE, NG))
            vs = tl.zeros([TILE, M_PAD], tl.float32)  # [TILE, M]: each row's group
            vz = tl.where(erow >= NG, 1.0, 0.0).to(f16) + tl.zeros([E_PAD, TILE], f16)  # [E, TILE]
            for gv in tl.static_range(NG):
                vs = tl.where(grp[None, :] == gv, _pick(vs_tile, gv, 1)[:, None], vs)
                vz = tl.where(erow == gv, _pick(vz_tile, gv, 1).to(f16)[None, :], vz)
            pv = (prob * vs).to(f16)
            pd = prob.to(f16)
            acc = tl.dot(_tile(VC + ph * CODES, tok, BITS, D, True), pv, acc * alpha[None, :])
            ps = tl.dot(ones, pv, ps * alpha[None, :])  # on the tensor cores: no reduction across warps
            sums_p = tl.dot(vz, pd, sums_p * alpha[None, :])
            if VO > 0:  # row t of the tile holds VO entries whose index is the channel: add them densely
                sv = tl.zeros([D, TILE], f16)
                for j in tl.static_range(VO):
                    slot = ph * VOUT + tok * VO + j
                    hit = _hit(chan_v.to(f16)[:, None], tl.load(VOI + slot).to(f16)[None, :], PTX)
                    sv += hit * tl.load(VOV + slot)[None, :]
                acc = tl.dot(sv * step_v16[:, None], pd, acc)
            if RANK > 0:
                av = tl.trans(_factor(VA + ph * LRA, tok, RANK, R_PAD))
                pa = tl.dot(av, pd, pa * alpha[None, :])
        if RANK > 0:  # the page's low-rank part of p.V: B_v (A_v^T p)
            acc = tl.dot(bv, pa.to(f16), acc)

    # each output channel keeps the row of its own value group; a query head's NG rows then sum to its output
    l_i = _pick(sums_p, NG, 0)
    pz = tl.sum(tl.where(erow == grp[None, :], sums_p, 0.0), axis=0)
    o = (acc - bias_v * tl.max(ps, axis=0)[None, :]) / step_v[:, None] + pz[None, :]
    o = tl.where((chan_v // G)[:, None] == grp[None, :], o, 0.0)
    o = tl.sum(tl.reshape(o, (D, M_PAD // NG, NG)), axis=2)
    m_o = tl.max(tl.reshape(m_i, (M_PAD // NG, NG)), axis=1)  # equal within a head's rows
    l_o = tl.max(tl.reshape(l_i, (M_PAD // NG, NG)), axis=1)
    heads = tl.arange(0, M_PAD // NG)
    out = (b * (H_KV * GQA) + h * GQA + heads) * splits_total + split_offset + split
    head_ok = heads < GQA
    tl.store(M_OUT + out, m_o, mask=head_ok)
    tl.store(L_OUT + out, l_o, mask=head_ok)
    tl.store(ACC_OUT + out[None, :] * D + chan_v[:, None], o, mask=head_ok[None, :])


@triton.jit
def _combine_kernel(
    Q, stride_qb, stride_qh, scale, M_IN, L_IN, ACC_IN, splits_total,
    TK, TV, stride_tb, stride_th, TAIL_ROW, TAIL_LEN, TAIL_POS, VALID_FROM, OUT,
    H_Q: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, S_BLOCK: tl.constexpr, T_PAD: tl.constexpr,
    ROW_TABLE: tl.constexpr,
):
    """Merge the split partials (S_BLOCK at a time) with the fp16 tail, normalise, write [B, H_Q, D].
    Sequence b's tail is row ``TAIL_ROW[b]`` of TK / TV with ``ROW_TABLE``, else row b."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // GQA
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq * stride_qh + offs_d).to(tl.float32) * scale
    offs_t = tl.arange(0, T_PAD)
    t_ok = (offs_t < tl.load(TAIL_LEN + b)) & (tl.load(TAIL_POS + b) + offs_t >= tl.load(VALID_FROM + b))
    row = tl.load(TAIL_ROW + b).to(tl.int64) if ROW_TABLE else b.to(tl.int64)
    tail = row * stride_tb + h * stride_th + offs_t[:, None] * D + offs_d[None, :]
    tk = tl.load(TK + tail, mask=t_ok[:, None], other=0.0).to(tl.float32)
    st = tl.where(t_ok, tl.sum(q[None, :] * tk, axis=1), float("-inf"))
    m_run = tl.max(st, axis=0)
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    pt = tl.exp(st - m_safe)
    total = tl.sum(pt, axis=0)
    o = tl.sum(pt[:, None] * tl.load(TV + tail, mask=t_ok[:, None], other=0.0).to(tl.float32), axis=0)

    base = (b * H_Q + hq) * splits_total
    for s0 in range(0, splits_total, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        s_ok = offs_s < splits_total
        m = tl.load(M_IN + base + offs_s, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_new_safe)
        w = tl.exp(m - m_new_safe)
        lsum = tl.load(L_IN + base + offs_s, mask=s_ok, other=0.0)
        acc = tl.load(ACC_IN + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        total = total * alpha + tl.sum(lsum * w, axis=0)
        o = o * alpha + tl.sum(acc * w[:, None], axis=0)
        m_run = m_new
    o = o / tl.where(total > 0, total, 1.0)
    tl.store(OUT + (b * H_Q + hq) * D + offs_d, o.to(OUT.dtype.element_ty))


# -- launcher --------------------------------------------------------------------------------
@dataclass
class PagedKV:
    """What decode attention reads for one layer: page pools with per-sequence tables, the
    fp16 tail, and where each sequence's real tokens begin (left padding)."""

    pools: list[tuple["PagePool", torch.Tensor, torch.Tensor, torch.Tensor]]  # pool, table [B, P], pos [B, P], npages [B]
    tail_k: torch.Tensor  # [rows, H_kv, T, D]: the fp16 tails (one row per sequence slot)
    tail_v: torch.Tensor
    tail_len: torch.Tensor  # [B] int32
    tail_pos: torch.Tensor  # [B] int32: absolute position of each tail's first token
    valid_from: torch.Tensor  # [B] int32: positions before this are padding
    tail_row: torch.Tensor | None = None  # [B] int32: each sequence's row of tail_k/v (None: row b)

    def tail_rows(self) -> torch.Tensor:
        if self.tail_row is not None:
            return self.tail_row
        return torch.arange(self.tail_len.shape[0], dtype=torch.int32, device=self.tail_len.device)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _tensor_cores(device: torch.device) -> bool:
    """Whether mma_v2 (sm_80+) runs where ``device`` is, or a compile-only build targets a GPU."""
    return _capability(device)[0] >= 8 if device.type == "cuda" else compiling()


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _num_splits(work: int, max_pages: int, device: torch.device, per_sm: int) -> int:
    """(sequence, head, split) programs for at most ``per_sm`` per SM: a program walks its pages
    one dependent load after another, so latency is hidden by having many of them resident; and
    no more, since a grid just over a whole number of waves leaves a last wave of a few programs
    that takes as long as a full one (rounding up gave Gluon's loop 2.06 waves at 16 x 16k)."""
    return max(1, min(max_pages, per_sm * _sm_count(device) // max(work, 1)))


PAGE_KERNELS = ("auto", "gluon", "triton")
# warps per program by default, each loop's fastest on the H100 at 16 x 16k (2026-11-23): Gluon's
# loop 1 (gear_l 0.203 ms; 2 warps 0.271, 4 warps 0.390), Triton's 2 (4 takes 1.5-1.7x as long)
GLUON_WARPS, TRITON_WARPS = 1, 2
GLUON_PROGRAMS, TRITON_PROGRAMS = 8, 16  # programs per SM (_num_splits): Gluon's, 254 registers x 32 threads, fit 8
# tokens per tile by default: 64, or 32 for Gluon's loop on pages with outliers, where half as many registers
# hold a tile's outliers across its softmax (H100, GPU ms, 2026-11-24: 2-bit gear 16 x 16k 0.1826 -> 0.181,
# 8 x 32k 0.1833 -> 0.1803, 16 x 4k 0.069 -> 0.0676; 4-bit gear within 1% either way)
TILE_TOKENS, GLUON_OUTLIER_TILE = 64, 32


def default_tile(spec_k, spec_v, gluon: bool) -> int:
    """Tokens per tile when the caller names none (see the numbers above)."""
    return GLUON_OUTLIER_TILE if gluon and spec_k.outliers_per_side + spec_v.outliers_per_side else TILE_TOKENS


@functools.cache  # asked on every call, and its scratch sums take ~7 us of the host's time
def gluon_takes(spec_k, spec_v, gqa: int, num_warps: int, tile_tokens: int | None = None) -> bool:
    """Whether the Gluon page loop covers a pool's format: 2 or 4 bits, at least 8 code words per
    row (its value layout puts words on 8 lanes), rank and value groups in the 8 extra rows, query
    rows in 16, each warp's tokens of a page inside one key group and taken in whole 16-token
    steps, outlier positions in one byte and their shared scratch within a launch's 48 KB."""
    bits, d, page = spec_k.bits, spec_k.head_dim, spec_k.tokens
    ng = d // spec_v.tile[1]
    per_warp = page // num_warps
    tile = min(tile_tokens or default_tile(spec_k, spec_v, True), per_warp)
    outliers = spec_k.outliers_per_side * 2, spec_v.outliers_per_side * 2
    return (decode_pages_gluon is not None and spec_k.rows[1] <= 256 and spec_v.rows[1] <= 256
            and decode_pages_gluon.scratch_fits(d, gqa, ng, num_warps, per_warp, *outliers)
            and bits in (2, 4) and d * bits // 32 >= 8 and spec_k.rank + ng <= 8 and gqa * ng <= 16
            and page % num_warps == 0 and spec_k.tile[0] % per_warp == 0 and tile % 16 == 0
            and per_warp % tile == 0)


def gear_decode_attention(q: torch.Tensor, kv: PagedKV, scale: float, *, programs_per_sm: int | None = None,
                          num_warps: int | None = None, tile_tokens: int | None = None, num_stages: int | None = None,
                          maxnreg: int | None = None, page_kernel: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence, ``q [B, H_q, D]``, over a layer's GEAR
    pages and fp16 tail. Returns ``[B, H_q, D]`` in ``q``'s dtype. The keyword arguments are
    tuning knobs (bench/kernel_bench.py sweeps them); ``tile_tokens`` (None: :func:`default_tile`) is capped by
    the group size (Triton's loop) or by a warp's tokens of a page (Gluon's).
    ``page_kernel``: ``auto`` takes the Gluon page loop on CUDA for the formats it covers
    (:func:`gluon_takes`; ``num_stages`` does not apply to it), else the Triton
    one; ``gluon`` or ``triton`` force one (``gluon`` on a format it does not cover is an error).
    ``num_stages`` None: 1 for codes of 4+ bits with outliers (their dense tiles and wider code
    words leave no registers for the compiler's deeper pipelining: 0.606 vs 0.632 ms for 4-bit
    gear at 16 x 16k on the H100), else Triton's default (3; 2-bit gear 0.572 vs 0.607 ms with 1,
    2026-11-23)."""
    bsz, hq, d = q.shape
    h_kv = kv.tail_k.shape[1]
    if num_warps not in (None, 1, 2, 4, 8):  # each verified on the H100
        raise ValueError(f"num_warps: 1, 2, 4 or 8, got {num_warps}")
    if page_kernel not in PAGE_KERNELS:
        raise ValueError(f"page_kernel: {page_kernel!r} is not one of {PAGE_KERNELS}")
    if hq % h_kv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {h_kv}")
    gqa = hq // h_kv
    scale = float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    plans = []
    for pool, table, pos, npages in kv.pools:
        maxp = table.shape[1]
        if maxp == 0:
            continue
        if pos.stride() != table.stride():
            raise ValueError("gear_decode_attention: pos and table are read with one stride; make both contiguous")
        spec_k, spec_v = pool.specs["key"], pool.specs["value"]
        if spec_k.tile[1] != 1 or spec_v.tile[0] != 1 or spec_k.tile[0] != spec_v.tile[1]:
            raise ValueError("gear_decode_attention needs the KIVI backbone (keys per channel, values per token)")
        gluon = (page_kernel != "triton" and _tensor_cores(q.device)
                 and gluon_takes(spec_k, spec_v, gqa, num_warps or GLUON_WARPS, tile_tokens))
        if page_kernel == "gluon" and not gluon:
            raise ValueError("page_kernel: 'gluon' needs CUDA, Triton's Gluon and a format gluon_takes() covers")
        per_sm = programs_per_sm or (GLUON_PROGRAMS if gluon else TRITON_PROGRAMS)
        tile = tile_tokens or default_tile(spec_k, spec_v, gluon)
        plans.append((pool, table, pos, npages, _num_splits(bsz * h_kv, maxp, q.device, per_sm), maxp, gluon, tile))
    splits_total = max(1, sum(p[4] for p in plans))
    n = bsz * hq * splits_total  # partial results: one per (sequence, query head, split)
    partials = torch.empty(n * (d + 2), device=q.device, dtype=torch.float32)  # one allocation
    m, lsum, acc = partials.split([n, n, n * d])
    if not plans:  # tail only: the combine kernel reads one empty split
        m.fill_(float("-inf"))
        lsum.zero_()
        acc.zero_()
    offset = 0
    for pool, table, pos, npages, splits, maxp, gluon, tile in plans:
        spec_k, spec_v = pool.specs["key"], pool.specs["value"]
        ng = d // spec_v.tile[1]  # value groups per token: rows of p per query head
        sk, sv = pool.storage["key"], pool.storage["value"]
        ko, vo = 2 * spec_k.outliers_per_side, 2 * spec_v.outliers_per_side
        rank = spec_k.rank
        warps = num_warps or (GLUON_WARPS if gluon else TRITON_WARPS)
        blank = sk["scale"]  # stands for absent parts (fp16: Gluon type-checks both sides of a where)
        key, value = ((s["codes"], s["scale"], s["zero"], s.get("lowrank_a", blank), s.get("lowrank_b", blank))
                      for s in (sk, sv))
        head = (q, q.stride(0), q.stride(1), scale)
        tail = (table, pos, npages, kv.valid_from, table.stride(0),
                m, lsum, acc, offset, splits_total, -(-maxp // splits))  # a runtime value: no compile per length
        shape = dict(H_KV=h_kv, GQA=gqa, D=d, BITS=spec_k.bits, PAGE=spec_k.tokens, G=spec_k.tile[0], RANK=rank)
        args = (*head, *key, sk.get("outlier_values", blank), sk.get("outlier_index", blank),
                *value, sv.get("outlier_values", blank), sv.get("outlier_index", blank), *tail)
        if gluon:
            launch(decode_pages_gluon.pages_kernel, (bsz * h_kv, splits), args, **shape, KO=ko, VO=vo,
                   NW=warps, T=min(tile, spec_k.tokens // warps), num_warps=warps, maxnreg=maxnreg)
        else:
            launch(_pages_kernel, (bsz * h_kv, splits), args, **shape,
                M_PAD=max(16, _next_pow2(gqa * ng)), R_PAD=max(16, _next_pow2(rank)),
                KO=ko, VO=vo, TILE=min(tile, spec_k.tile[0]), E_PAD=max(16, _next_pow2(ng + 1)),
                PTX=os.environ.get("TRITON_INTERPRET") != "1", num_warps=warps,
                num_stages=num_stages if num_stages is not None else (1 if (ko or vo) and spec_k.bits >= 4 else None),
                maxnreg=maxnreg,
            )
        offset += splits
    out = torch.empty_like(q)
    tk, tv = kv.tail_k, kv.tail_v
    rows = kv.tail_row if kv.tail_row is not None else kv.tail_len  # without a row table, not read
    args = (q, q.stride(0), q.stride(1), scale, m, lsum, acc, splits_total,
            tk, tv, tk.stride(0), tk.stride(1), rows, kv.tail_len, kv.tail_pos, kv.valid_from, out)
    launch(_combine_kernel, (bsz, hq), args,
        H_Q=hq, GQA=gqa, D=d, S_BLOCK=16, T_PAD=max(2, _next_pow2(tk.shape[2])), ROW_TABLE=kv.tail_row is not None,
        num_warps=4,
    )
    return out


# -- torch reference -------------------------------------------------------------------------
def decode_attention_reference(q: torch.Tensor, kv: PagedKV, scale: float) -> torch.Tensor:
    """The same attention by decompressing every page (codec.decompress) in fp32."""
    bsz, hq, d = q.shape
    h_kv = kv.tail_k.shape[1]
    out = torch.empty_like(q)
    for b in range(bsz):
        keys, values, positions = [], [], []
        for pool, table, pos, npages in kv.pools:
            n = int(npages[b])
            if n == 0:
                continue
            blocks = pool.read(table[b, :n].long())
            keys.append(decompress(blocks["key"], torch.float32).transpose(0, 1).reshape(h_kv, -1, d))
            values.append(decompress(blocks["value"], torch.float32).transpose(0, 1).reshape(h_kv, -1, d))
            positions.append((pos[b, :n, None] + torch.arange(pool.tokens, device=q.device)).reshape(-1))
        t, row = int(kv.tail_len[b]), int(kv.tail_rows()[b])
        keys.append(kv.tail_k[row, :, :t].float())
        values.append(kv.tail_v[row, :, :t].float())
        positions.append(kv.tail_pos[b] + torch.arange(t, device=q.device))
        k, v, p = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(positions)
        k, v = k.repeat_interleave(hq // h_kv, 0), v.repeat_interleave(hq // h_kv, 0)
        s = (q[b].float()[:, None, :] @ k.transpose(-1, -2))[:, 0] * scale  # [Hq, T]
        s = s.masked_fill(p[None, :] < kv.valid_from[b], float("-inf"))
        out[b] = (torch.softmax(s, -1)[:, None, :] @ v)[:, 0].to(q.dtype)
    return out
