"""Decode attention read straight from GEAR pages: no fp16 K/V is ever written to memory.

Flash-decoding (Dao et al., 2023) with split-K over pages, per tile of ``TILE`` tokens of a page:

    q.K^T = q.D^T + (q.B_k) A_k^T + q.S_k^T        p.V = p.D_v + (p.A_v) B_v^T + p.S_v

- D: packed codes become fp16 in registers without a conversion (:func:`_tile`); key scales and
  minima fold into q once per group, values are dequantized with packed fp16 FMAs, and both
  products run on the tensor cores;
- L: ``q.B_k`` is formed once per page, ``p.A_v`` is accumulated over the page's tiles and
  expanded through ``B_v`` at the page's end (factors padded to 16 columns: tensor-core dots);
- S: outlier rows have a fixed length, so the row of each stored entry is known from its slot;
  a tile's few entries (2 per row by default) are added as a dense tile by comparing their
  positions (packed fp16 compares), into V before its product and as one more small product for K.

One launch per page pool writes per-split partials (running max, sum, output); a second kernel
merges them with the fp16 tail (fewer than ``block_size`` tokens) and normalises.

File order as Triton's fused-attention tutorial: helpers, kernels, launcher, torch reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gear_dist.codec import decompress
from gear_dist.kernels.launch import launch

if TYPE_CHECKING:
    from gear_dist.cache.pool import PagePool


# -- helpers ---------------------------------------------------------------------------------
@triton.jit
def _tile(ptr, tok, BITS: tl.constexpr, D: tl.constexpr):
    """Rows ``tok`` of a planar-packed [tokens, D*BITS/8] page as an fp16 [len(tok), D] tile whose
    columns hold the channels :func:`_order` names.

    For BITS in {2, 4, 8} no code is converted to a float: a row is read as int32 words (four
    byte-plane columns each); masking one code plane in place and or-ing 0x6400 (fp16 1024.0)
    into both 16-bit halves gives two fp16 numbers ``1024 + code * 2**(BITS*s)`` (s: the plane's
    place in its byte) in one integer op, and the pair stays in its register: the columns follow
    the registers rather than the channels, so the tile reaches the tensor cores without a
    shuffle. BITS=3 straddles bytes and gathers per channel (value: the code itself)."""
    W: tl.constexpr = D // 8
    ROW: tl.constexpr = D * BITS // 8
    n: tl.constexpr = tok.shape[0]
    if BITS == 3:
        c = tl.arange(0, D)
        bitpos = BITS * (c // W)
        byte = (bitpos // 8) * W + c % W
        shift = bitpos % 8
        lo = tl.load(ptr + tok[:, None] * ROW + byte[None, :]).to(tl.int32) >> shift[None, :]
        spill = (shift + BITS) > 8  # planes 2 and 5 continue in the next byte plane
        hi = tl.load(ptr + tok[:, None] * ROW + byte[None, :] + W, mask=spill[None, :], other=0).to(tl.int32)
        return ((lo | (hi << (8 - shift[None, :]))) & 7).to(tl.float16)
    else:
        PER: tl.constexpr = 8 // BITS  # code planes per byte
        NW: tl.constexpr = ROW // 4
        words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + tok[:, None] * NW + tl.arange(0, NW)[None, :])
        mask = (((1 << BITS) - 1) * 0x00010001) << (BITS * tl.arange(0, PER))  # plane s of bytes 0 and 2
        half = words[:, :, None] >> (8 * tl.arange(0, 2))[None, None, :]  # bytes 0, 2 | 1, 3 at the bottom
        m = (half[:, :, None, :] & mask[None, None, :, None]) | 0x64006400  # [n, NW, PER, 2]
        x = tl.join(m.to(tl.int16), (m >> 16).to(tl.int16)).to(tl.float16, bitcast=True)  # [n, NW, PER, 2, 2]
        return tl.reshape(x, (n, D))


@triton.jit
def _order(BITS: tl.constexpr, D: tl.constexpr):
    """For each column of a :func:`_tile`: its channel, and ``bias, step`` with
    ``tile = bias + code * step``."""
    col = tl.arange(0, D)
    if BITS == 3:
        return col, 0.0, tl.full([D], 1.0, tl.float32)
    else:
        W: tl.constexpr = D // 8
        PER: tl.constexpr = 8 // BITS
        byte = 2 * (col % 2) + (col // 2) % 2  # [.., 2, 2] = (byte 0/2 or 1/3, low or high half)
        s = (col // 4) % PER
        word = col // (4 * PER)
        channel = ((word // (W // 4)) * PER + s) * W + 4 * (word % (W // 4)) + byte
        return channel, 1024.0, tl.exp2((BITS * s).to(tl.float32))


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


@triton.jit
def _pages_kernel(
    Q, stride_qb, stride_qh,
    KC, KS, KZ, KA, KB, KOV, KOI,
    VC, VS, VZ, VA, VB, VOV, VOI,
    TABLE, POS, NPAGES, VALID_FROM, stride_tb,
    M_OUT, L_OUT, ACC_OUT, split_offset, splits_total, pages_per_split,
    H_KV: tl.constexpr, GQA: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    PAGE: tl.constexpr, G: tl.constexpr, RANK: tl.constexpr, R_PAD: tl.constexpr,
    KO: tl.constexpr, VO: tl.constexpr, TILE: tl.constexpr, PTX: tl.constexpr,
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

    rows = tl.arange(0, M_PAD)
    row_ok = rows < GQA
    offs_t = tl.arange(0, TILE)
    offs_r = tl.arange(0, R_PAD)
    # every [.., D] tensor is in the tile's column order: column c holds channel chan[c]
    chan, bias, step = _order(BITS, D)
    q_ptrs = Q + b * stride_qb + (h * GQA + rows)[:, None] * stride_qh + chan[None, :]
    q16 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(f16)  # [M, D], pre-scaled by the softmax scale
    qt16 = tl.trans(q16)  # [D, M]
    valid_from = tl.load(VALID_FROM + b)
    # Keys: k = code * ks + kz and tile = bias + code * step, so
    #   q.k = (tile . w - bias * sum(w)) / top + q.kz   with w = q * ks * top / step in fp16,
    # top = max(step) keeping w clear of fp16 subnormals. Values: code = tile / step - bias / step
    # exactly in fp16, then v = code * vs + vz (vs, vz: per token and group of G channels).
    top = tl.max(step, axis=0)
    w_scale = top / step
    inv_step = (1.0 / step).to(f16)
    neg_bias = (-bias / step).to(f16)

    m_i = tl.full([M_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, D], tl.float32)

    npages = tl.load(NPAGES + b)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, npages)
    for p in range(first, last):
        page = tl.load(TABLE + b * stride_tb + p).to(tl.int64)
        pos0 = tl.load(POS + b * stride_tb + p)
        ph = page * H_KV + h
        if RANK > 0:  # factors padded to R_PAD >= 16 columns so every product is a tensor-core dot
            r_ok = (offs_r < RANK)[None, :]
            bk = tl.load(KB + ph * LRB + chan[:, None] * RANK + offs_r[None, :], mask=r_ok, other=0.0)
            qb_t = tl.trans(tl.dot(q16, bk).to(f16))  # [R, M]
            bv_t = tl.trans(tl.load(VB + ph * LRB + chan[:, None] * RANK + offs_r[None, :], mask=r_ok, other=0.0))
            pa = tl.zeros([M_PAD, R_PAD], tl.float32)
        for i in range(PAGE // TILE):  # tiles of TILE tokens; statistics per group of G
            tok = i * TILE + offs_t
            g = i * TILE // G
            # -- scores of this tile, transposed ([TILE, M]) so the big operand needs no transpose
            ks = tl.load(KS + ph * KSTAT + g * D + chan).to(tl.float32)
            kz = tl.load(KZ + ph * KSTAT + g * D + chan).to(tl.float32)
            w = q16 * (ks * w_scale).to(f16)[None, :]  # exact scaling by a power of two, one rounding
            k_bias = tl.sum(q16.to(tl.float32) * kz[None, :] - bias / top * w.to(tl.float32), axis=1)
            st = tl.dot(_tile(KC + ph * CODES, tok, BITS, D), tl.trans(w)) / top + k_bias[None, :]
            if RANK > 0:
                ak = tl.load(KA + ph * LRA + tok[:, None] * RANK + offs_r[None, :], mask=r_ok, other=0.0)
                st += tl.dot(ak, qb_t)
            if KO > 0:  # row c of group g holds KO entries: the token is the index, add them densely
                sk = tl.zeros([TILE, D], f16)
                for j in tl.static_range(KO):
                    slot = ph * KOUT + (g * D + chan) * KO + j
                    hit = _hit((tok - g * G).to(f16)[:, None], tl.load(KOI + slot).to(f16)[None, :], PTX)
                    sk += hit * tl.load(KOV + slot)[None, :]
                st += tl.dot(sk, qt16)
            s = tl.trans(st)  # [M, TILE]
            pos = pos0 + tok
            s = tl.where((pos >= valid_from)[None, :], s, float("-inf"))
            # -- online softmax
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            prob = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
            # -- p.V of this tile: values per token and group of G channels; outliers added densely
            #    (row t of the tile holds VO entries whose index is the channel)
            code = _tile(VC + ph * CODES, tok, BITS, D) * inv_step[None, :] + neg_bias[None, :]
            vstat = ph * VSTAT + tok[:, None] * NG + tl.arange(0, NG)[None, :]
            vs, vz = tl.load(VS + vstat)[:, :, None], tl.load(VZ + vstat)[:, :, None]  # [TILE, NG, 1]
            v = tl.reshape(tl.reshape(code, (TILE, NG, G)) * vs + vz, (TILE, D))  # a group: G columns in a row
            if VO > 0:
                for j in tl.static_range(VO):
                    slot = ph * VOUT + tok * VO + j
                    hit = _hit(chan.to(f16)[None, :], tl.load(VOI + slot).to(f16)[:, None], PTX)
                    v += hit * tl.load(VOV + slot)[:, None]
            pd = prob.to(f16)
            acc += tl.dot(pd, v)
            if RANK > 0:
                av = tl.load(VA + ph * LRA + tok[:, None] * RANK + offs_r[None, :], mask=r_ok, other=0.0)
                pa = pa * alpha[:, None] + tl.dot(pd, av)
        if RANK > 0:  # the page's low-rank part of p.V: (p.A_v) B_v^T
            acc += tl.dot(pa.to(f16), bv_t)

    out = (b * (H_KV * GQA) + h * GQA + rows) * splits_total + split_offset + split
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(ACC_OUT + out[:, None] * D + chan[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    Q, stride_qb, stride_qh, M_IN, L_IN, ACC_IN, splits_total,
    TK, TV, stride_tb, stride_th, TAIL_ROW, TAIL_LEN, TAIL_POS, VALID_FROM, OUT,
    H_Q: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, S_BLOCK: tl.constexpr, T_PAD: tl.constexpr,
):
    """Merge the split partials (S_BLOCK at a time) with the fp16 tail, normalise, write [B, H_Q, D]."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // GQA
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq * stride_qh + offs_d).to(tl.float32)
    offs_t = tl.arange(0, T_PAD)
    t_ok = (offs_t < tl.load(TAIL_LEN + b)) & (tl.load(TAIL_POS + b) + offs_t >= tl.load(VALID_FROM + b))
    tail = tl.load(TAIL_ROW + b).to(tl.int64) * stride_tb + h * stride_th + offs_t[:, None] * D + offs_d[None, :]
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


def _num_splits(work: int, max_pages: int, device: torch.device, per_sm: int) -> int:
    """Enough (sequence, head, split) programs for ``per_sm`` per SM: a program walks its pages
    one dependent load after another, so latency is hidden by having many of them resident."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(max_pages, -(-per_sm * sms // max(work, 1))))


def gear_decode_attention(q: torch.Tensor, kv: PagedKV, scale: float, *, programs_per_sm: int = 16,
                          num_warps: int = 2, tile_tokens: int = 64, num_stages: int | None = None,
                          maxnreg: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence, ``q [B, H_q, D]``, over a layer's GEAR
    pages and fp16 tail. Returns ``[B, H_q, D]`` in ``q``'s dtype. The keyword arguments are
    tuning knobs (bench/kernel_bench.py sweeps them); ``tile_tokens`` is capped by the group size."""
    bsz, hq, d = q.shape
    h_kv = kv.tail_k.shape[1]
    if hq % h_kv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {h_kv}")
    gqa = hq // h_kv
    qs = (q * scale).contiguous()
    plans = []
    for pool, table, pos, npages in kv.pools:
        maxp = table.shape[1]
        if maxp == 0:
            continue
        if pos.stride() != table.stride():
            raise ValueError("gear_decode_attention: pos and table are read with one stride; make both contiguous")
        plans.append((pool, table, pos, npages, _num_splits(bsz * h_kv, maxp, q.device, programs_per_sm), maxp))
    splits_total = max(1, sum(p[4] for p in plans))
    m = torch.empty(bsz, hq, splits_total, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(bsz, hq, splits_total, d, device=q.device, dtype=torch.float32)
    if not plans:  # tail only: the combine kernel reads one empty split
        m.fill_(float("-inf"))
        lsum.zero_()
        acc.zero_()
    offset = 0
    for pool, table, pos, npages, splits, maxp in plans:
        spec_k, spec_v = pool.specs["key"], pool.specs["value"]
        if spec_k.tile[1] != 1 or spec_v.tile[0] != 1 or spec_k.tile[0] != spec_v.tile[1]:
            raise ValueError("gear_decode_attention needs the KIVI backbone (keys per channel, values per token)")
        sk, sv = pool.storage["key"], pool.storage["value"]
        dummy = sk["codes"]
        ko, vo = 2 * spec_k.outliers_per_side, 2 * spec_v.outliers_per_side
        rank = spec_k.rank
        args = (qs, qs.stride(0), qs.stride(1),
                sk["codes"], sk["scale"], sk["zero"], sk.get("lowrank_a", dummy), sk.get("lowrank_b", dummy),
                sk.get("outlier_values", dummy), sk.get("outlier_index", dummy),
                sv["codes"], sv["scale"], sv["zero"], sv.get("lowrank_a", dummy), sv.get("lowrank_b", dummy),
                sv.get("outlier_values", dummy), sv.get("outlier_index", dummy),
                table, pos, npages, kv.valid_from, table.stride(0),
                m, lsum, acc, offset, splits_total, -(-maxp // splits))  # a runtime value: no compile per length
        launch(_pages_kernel, (bsz * h_kv, splits), args,
            H_KV=h_kv, GQA=gqa, M_PAD=max(16, _next_pow2(gqa)), D=d, BITS=spec_k.bits,
            PAGE=spec_k.tokens, G=spec_k.tile[0], RANK=rank, R_PAD=max(16, _next_pow2(rank)),
            KO=ko, VO=vo, TILE=min(tile_tokens, spec_k.tile[0]),
            PTX=os.environ.get("TRITON_INTERPRET") != "1", num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
        )
        offset += splits
    out = torch.empty_like(q)
    tk, tv = kv.tail_k, kv.tail_v
    args = (qs, qs.stride(0), qs.stride(1), m, lsum, acc, splits_total,
            tk, tv, tk.stride(0), tk.stride(1), kv.tail_rows(), kv.tail_len, kv.tail_pos, kv.valid_from, out)
    launch(_combine_kernel, (bsz, hq), args,
        H_Q=hq, GQA=gqa, D=d, S_BLOCK=16, T_PAD=max(2, _next_pow2(tk.shape[2])),
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
