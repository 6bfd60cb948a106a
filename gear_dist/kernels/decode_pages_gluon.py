"""The decode page loop in Gluon (Triton's explicit-layout dialect) for pages without outliers
(kivi, gear_l; 2 or 4 bits): every tensor-core operand is built in registers in its operand layout,
so a page goes from memory to the tensor cores with no shared memory and no barrier.

Same arithmetic as :func:`gear_dist.kernels.decode_attention._pages_kernel` (whose docstring gives
the algebra), arranged around mma_v2's register layouts:

- the warps are the batch dimension of every product: each warp takes ``PAGE / warps`` tokens of
  each page, ``T`` at a time, and keeps its own running max and sums, merged once at the
  program's end (no reduction crosses warps per page; one warp per program is the fastest);
- scores are transposed, ``s^T [16, T] = w [16, D] . key tile [D, T]``: their accumulator *is* the
  A-operand layout of ``p [16, T]`` for ``p . V`` (FlashAttention-2's register reuse,
  ``convert_layout(..., assert_trivial=True)`` proves it at compile time);
- the packed codes are loaded straight into the layouts whose unpacking (:func:`key_unpack_layout`,
  :func:`value_unpack_layout`) yields the B operands: one integer op makes an fp16 pair
  ``1024 + code * step`` and the pair is what mma_v2 holds in one register (adjacent channels for
  keys, adjacent tokens for values). The channel order along the tiles is whatever that makes it
  (:func:`key_channel`, :func:`value_channel`); the query, statistics and output follow it;
- every load's offsets are a lane part plus a register part (:func:`lane_reg`), so the register
  part is an immediate of the load instruction (H100, 16 x 16k gear_l: 1,790 -> 1,427
  instructions per page, 255 -> 245 registers, 0.146 -> 0.125 ms);
- value minima ride with the low-rank factors as extra rank (``A = [A_v | vz]``,
  ``B = [B_v | group indicator]``), ``sum p`` as a ones column beside them.

Gluon has no interpreter: CPU tests compile this kernel for sm_90 (every trivial-layout assertion is
checked then); what it computes is tested on CUDA.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


# -- layouts (evaluated at compile time) ------------------------------------------------------
@triton.constexpr_function
def _pow2s(n):
    """The powers of two below ``n``: the bases of a dimension of size ``n``."""
    return [1 << i for i in range(max(n, 1).bit_length() - 1)]


@triton.constexpr_function
def _basis(rank, dim, v):
    b = [0] * rank
    b[dim] = v
    return b


@triton.constexpr_function
def key_unpack_layout(NW, NWLO, PER, T):
    """[warp, word // NWLO, word % NWLO, byte pair, plane, token]."""
    reg = ([_basis(6, 2, v) for v in _pow2s(NWLO)] + [_basis(6, 3, 1)] + [_basis(6, 4, v) for v in _pow2s(PER)]
           + [_basis(6, 5, v) for v in _pow2s(T) if v >= 8])
    lane = [_basis(6, 1, 1), _basis(6, 1, 2)] + [_basis(6, 5, v) for v in (1, 2, 4)]
    warp = [_basis(6, 0, v) for v in _pow2s(NW)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [NW, 4, NWLO, 2, PER, T])


@triton.constexpr_function
def value_unpack_layout(NW, TP, NWORDS, PER):
    """[warp, token pair, word, half word, byte, plane]."""
    reg = ([_basis(6, 1, v) for v in _pow2s(TP) if v >= 4] + [_basis(6, 2, v) for v in _pow2s(NWORDS) if v >= 8]
           + [_basis(6, 3, 1), _basis(6, 4, 1)] + [_basis(6, 5, v) for v in _pow2s(PER)])
    lane = [_basis(6, 1, 1), _basis(6, 1, 2)] + [_basis(6, 2, v) for v in (1, 2, 4)]
    warp = [_basis(6, 0, v) for v in _pow2s(NW)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [NW, TP, NWORDS, 2, 2, PER])


@triton.constexpr_function
def sliced(parent, keep, rank):
    """``parent`` sliced at every dimension but ``keep``: the layout of a 1-D index along it."""
    layout = parent
    for d in reversed(range(rank)):
        if d != keep:
            layout = gl.SliceLayout(d, layout)
    return layout


@triton.constexpr_function
def log2(n):
    return n.bit_length() - 1


@triton.constexpr_function
def without(layout, dim, value):
    """A linear layout with the register basis that moves ``dim`` by ``value`` dropped (that half of the dim gone)."""
    reg = [b for b in layout.reg_bases if not (b[dim] == value and sum(b) == value)]
    shape = list(layout.shape)
    shape[dim] //= 2
    return gl.DistributedLinearLayout(reg, layout.lane_bases, layout.warp_bases, layout.block_bases, shape)


@triton.constexpr_function
def reg_bits(layout, dim):
    """The bits of an index along ``dim`` that a linear layout takes from registers (checked to be
    apart from those lanes and warps give it, as :func:`lane_reg` needs)."""
    reg = 0
    others = 0
    for b in layout.reg_bases:
        reg |= b[dim]
    for b in list(layout.lane_bases) + list(layout.warp_bases):
        others |= b[dim]
    assert reg & others == 0, f"dim {dim}: registers and lanes share index bits {reg & others:#x}"
    return reg


# -- helpers ---------------------------------------------------------------------------------
@gluon.jit
def along(n: gl.constexpr, dim: gl.constexpr, parent: gl.constexpr, rank: gl.constexpr):
    """``arange(n)`` along ``dim`` of a rank-``rank`` tensor in layout ``parent`` (size 1 elsewhere)."""
    x = gl.arange(0, n, layout=sliced(parent, dim, rank))
    for d in gl.static_range(rank):
        if d != dim:
            x = gl.expand_dims(x, d)
    return x


@gluon.jit
def stack(lo, hi, AXIS: gl.constexpr):
    """[.., n, ..] and [.., n, ..] -> [.., 2n, ..] along AXIS (of 3): lo first."""
    x = gl.join(lo, hi)
    if AXIS == 1:
        x = gl.permute(x, (0, 3, 1, 2))
        return gl.reshape(x, (x.shape[0], 2 * x.shape[2], x.shape[3]))
    else:
        x = gl.permute(x, (0, 1, 3, 2))
        return gl.reshape(x, (x.shape[0], x.shape[1], 2 * x.shape[3]))


@gluon.jit
def _as_pairs(x, RANK2: gl.constexpr, AXIS: gl.constexpr):
    """[a, b, c] (or [b, c]) -> the even elements along AXIS, as [a, b, c / 2] with the pairs last."""
    if RANK2:  # as [1, .., ..]
        x = gl.reshape(x, (1, x.shape[0], x.shape[1]))
    elif AXIS == 1:  # pairs along axis 1: moved last
        x = gl.permute(x, (0, 2, 1))
    even, _ = gl.split(gl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return even


@gluon.jit
def load_pairs(ptr, lane, reg, mask, AXIS: gl.constexpr, ALIGNED: gl.constexpr = True):
    """fp16 ``ptr[lane + reg]`` (offsets as :func:`lane_reg` leaves them) where the offsets of
    [.., 2i + 1, ..] are those of [.., 2i, ..] plus one along AXIS (2-D: the last axis; 3-D: 1 or
    2): one 32-bit load per pair where the pairs start at even offsets (``ALIGNED``), else one load
    per element. Returns the tensor in a layout equal to the offsets' up to register order."""
    lane, reg = gl.broadcast(lane, reg)
    mask = mask & (reg >= 0)  # to the offsets' shape
    if not ALIGNED:
        return gl.load(ptr + lane + reg, mask=mask, other=0.0)
    RANK2: gl.constexpr = len(reg.shape) == 2
    ok = _as_pairs(mask, RANK2, AXIS)
    at = ptr + _as_pairs(lane, RANK2, AXIS) + _as_pairs(reg, RANK2, AXIS)
    w = gl.load(at.to(gl.pointer_type(gl.int32)), mask=ok, other=0)
    pairs = gl.join(w.to(gl.int16), (w >> 16).to(gl.int16)).to(gl.float16, bitcast=True)
    x = gl.reshape(pairs, (ok.shape[0], ok.shape[1], 2 * ok.shape[2]))
    if RANK2:
        x = gl.reshape(x, (x.shape[1], x.shape[2]))
    elif AXIS == 1:
        x = gl.permute(x, (0, 2, 1))
    return x


@gluon.jit
def lane_reg(x, layout: gl.constexpr, dim: gl.constexpr):
    """An index tensor along ``dim`` of a linear ``layout`` as its lane and warp part and its register
    part (:func:`reg_bits`). Offsets built from each part apart and added keep the register part a constant per
    register, which the compiler folds into the load's immediate offset; built from the whole
    index (``lane | constant`` per register) each is an address computed per load and a register
    held across the page loop."""
    R: gl.constexpr = reg_bits(layout, dim)
    return x & ~R, x & R


@gluon.jit
def _bytes(lo, hi, selector):
    """PTX ``prmt``: the bytes of ``lo`` (0-3) and ``hi`` (4-7) that each nibble of ``selector`` names,
    one instruction (shifts and masks take two to four)."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, selector], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _fp16_pairs(x, mask):
    """``(x & mask) | 0x64006400`` in one ``lop3`` (the compiler issues an AND and an OR), as the two
    fp16 halves ``1024 + code * step`` joined along a new last axis."""
    m = gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x64006400, 0xEA;", "=r,r,r", [x, mask], dtype=gl.int32,
                                  is_pure=True, pack=1)
    return gl.join(m.to(gl.int16), (m >> 16).to(gl.int16)).to(gl.float16, bitcast=True)


@gluon.jit
def _prefetch(ptr, ph, NBYTES: gl.constexpr, lane):
    """PTX ``prefetch.global.L2`` of every 128-byte line of block ``ph`` of ``NBYTES`` bytes at
    ``ptr``, a line per lane; the asm's dummy result keeps it in the program (an asm statement
    without outputs cannot be written here)."""
    n: gl.constexpr = lane.shape[0]
    base = ptr.to(gl.pointer_type(gl.int8)) + ph * NBYTES
    for i in gl.static_range(triton.cdiv(NBYTES, 128 * n)):
        line = (i * n + lane) * 128
        gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                                  "=r,l,r", [base + line, (line < NBYTES).to(gl.int32)], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _prefetch_page(lane, ph, KC, VC, KS, KZ, KA, KB, VS, VZ, VA, VB, CODES: gl.constexpr, KSTAT: gl.constexpr,
                   VSTAT: gl.constexpr, LRA: gl.constexpr, LRB: gl.constexpr, RANK: gl.constexpr):
    """Every line of one page (codes, statistics, factors) asked into L2 a page ahead of its use:
    the page loop's loads then wait for L2, not for memory. H100, 2026-11-23: gear_l 16 x 16k
    0.173 -> 0.154 ms, 64 x 4k 0.209 -> 0.177; kivi 0.131 -> 0.126 (into L1: the same)."""
    _prefetch(KC, ph, CODES, lane)
    _prefetch(VC, ph, CODES, lane)
    _prefetch(KS, ph, 2 * KSTAT, lane)  # fp16 statistics and factors
    _prefetch(KZ, ph, 2 * KSTAT, lane)
    _prefetch(VS, ph, 2 * VSTAT, lane)
    _prefetch(VZ, ph, 2 * VSTAT, lane)
    if RANK > 0:
        _prefetch(KA, ph, 2 * LRA, lane)
        _prefetch(VA, ph, 2 * LRA, lane)
        _prefetch(KB, ph, 2 * LRB, lane)
        _prefetch(VB, ph, 2 * LRB, lane)


@gluon.jit
def _channel(byte, s, D: gl.constexpr, PER: gl.constexpr):
    W: gl.constexpr = D // 8
    return ((byte // W) * PER + s) * W + byte % W


@gluon.jit
def key_channel(k, D: gl.constexpr, BITS: gl.constexpr):
    """Channel and plane of place k of the key tile's reduction axis (see key_unpack_layout)."""
    PER: gl.constexpr = 8 // BITS
    NWLO: gl.constexpr = D * BITS // 128
    LW: gl.constexpr = log2(NWLO)
    half = k % 2
    whi = (k // 2) % 4
    wlo = (k // 8) % NWLO
    sel = (k >> (3 + LW)) % 2
    s = k >> (4 + LW)
    byte = 4 * (whi * NWLO + wlo) + 2 * sel + half
    return _channel(byte, s, D, PER), s


@gluon.jit
def value_channel(n, D: gl.constexpr, BITS: gl.constexpr):
    PER: gl.constexpr = 8 // BITS
    NWORDS: gl.constexpr = D * BITS // 32
    LWD: gl.constexpr = log2(NWORDS)
    word = n % NWORDS
    lohi = (n >> LWD) % 2
    sel = (n >> (LWD + 1)) % 2
    s = n >> (LWD + 2)
    byte = 4 * word + 2 * lohi + sel
    return _channel(byte, s, D, PER), s


# -- kernel ----------------------------------------------------------------------------------
@gluon.jit(do_not_specialize=["split_offset", "splits_total", "pages_per_split"])
def pages_kernel(
    Q, stride_qb, stride_qh, scale,
    KC, KS, KZ, KA, KB, VC, VS, VZ, VA, VB,
    TABLE, POS, NPAGES, VALID_FROM, stride_tb,
    M_OUT, L_OUT, ACC_OUT, split_offset, splits_total, pages_per_split,
    H_KV: gl.constexpr, GQA: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, PAGE: gl.constexpr,
    G: gl.constexpr, RANK: gl.constexpr, NW: gl.constexpr, T: gl.constexpr,
):
    WT: gl.constexpr = PAGE // NW  # a warp's tokens of each page, taken T at a time
    PER: gl.constexpr = 8 // BITS
    NWORDS: gl.constexpr = D * BITS // 32
    NWLO: gl.constexpr = NWORDS // 4
    NG: gl.constexpr = D // G
    TOP: gl.constexpr = float(2 ** (BITS * (PER - 1)))
    C2: gl.constexpr = 1.4426950408889634 / TOP
    GROW: gl.constexpr = 8.0 / C2  # 2^8 in p, in the units of s (TOP times the scores)
    CODESW: gl.constexpr = PAGE * NWORDS
    KSTAT: gl.constexpr = PAGE // G * D
    VSTAT: gl.constexpr = PAGE * NG
    LRA: gl.constexpr = PAGE * RANK
    LRB: gl.constexpr = D * RANK
    MASK: gl.constexpr = ((1 << BITS) - 1) * 0x00010001
    f16: gl.constexpr = gl.float16
    f32: gl.constexpr = gl.float32

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(2, mma)
    KU: gl.constexpr = key_unpack_layout(NW, NWLO, PER, T)
    VU: gl.constexpr = value_unpack_layout(NW, T // 2, NWORDS, PER)
    LB_AK: gl.constexpr = without(gl.to_linear_layout(lb, [NW, 16, T]), 1, 8)  # [NW, 8, T]: A_k^T's first 8 rows
    LB_BV: gl.constexpr = without(gl.to_linear_layout(lb, [NW, 16, D]), 1, 8)  # [NW, 8, D]
    LB_X: gl.constexpr = without(gl.to_linear_layout(lb, [NW, T, 16]), 2, 8)  # [NW, T, 8]

    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // H_KV
    h = pid % H_KV

    # query, [NW, 16, D] A operand, channels in the key tile's order, softmax-scaled
    wa = along(NW, 0, la, 3)
    ra = along(16, 1, la, 3)
    ka = along(D, 2, la, 3)
    chan_a, s_a = key_channel(ka, D, BITS)
    q = gl.load(Q + b * stride_qb + (h * GQA + ra // NG) * stride_qh + chan_a + wa * 0,
                mask=(ra < GQA * NG) & (wa >= 0), other=0.0)
    q16 = (q.to(f32) * scale).to(f16)
    wmul = (1 << (BITS * (PER - 1 - s_a))).to(f16)  # TOP / step: exact, a constant per register
    wa2 = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(1, la)))
    # offsets of every load in two parts, lanes' and registers' (see lane_reg)
    ka2_l, ka2_r = lane_reg(gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, la))),
                            gl.to_linear_layout(gl.SliceLayout(1, la), [NW, D]), 1)
    chan_a2_l, _ = key_channel(ka2_l, D, BITS)
    chan_a2_r, _ = key_channel(ka2_r, D, BITS)
    ks_lane = gl.expand_dims((wa2 * WT) // G * D, 1) + gl.expand_dims(chan_a2_l, 0)  # [NW, D]
    ks_reg = gl.expand_dims(chan_a2_r, 0)

    # key tile: [NW, 4, NWLO, 2, PER, T]
    wk = along(NW, 0, KU, 6)
    whi = along(4, 1, KU, 6)
    wlo = along(NWLO, 2, KU, 6)
    sel = along(2, 3, KU, 6)
    sk = along(PER, 4, KU, 6)
    tk_l, tk_r = lane_reg(along(T, 5, KU, 6), KU, 5)
    wlo_l, wlo_r = lane_reg(wlo, KU, 2)
    key_lane = (wk * WT + tk_l) * NWORDS + whi * NWLO + wlo_l  # whi: lanes only
    key_reg = tk_r * NWORDS + wlo_r
    key_mask = MASK << (BITS * sk)
    key_bytes = 0x3110 + 0x0212 * sel  # bytes (0, 1) | (2, 3) of a word into the low bytes of its halves
    # value tile: [NW, T/2, NWORDS, 2, 2, PER]
    wv = along(NW, 0, VU, 6)
    tpv = along(T // 2, 1, VU, 6)
    wordv = along(NWORDS, 2, VU, 6)
    lohi = along(2, 3, VU, 6)
    selv = along(2, 4, VU, 6)
    sv = along(PER, 5, VU, 6)
    tpv_l, tpv_r = lane_reg(tpv, VU, 1)
    wordv_l, wordv_r = lane_reg(wordv, VU, 2)
    val_lane = (wv * WT + 2 * tpv_l) * NWORDS + wordv_l
    val_reg = 2 * tpv_r * NWORDS + wordv_r
    val_mask = MASK << (BITS * sv)
    vb = 2 * lohi + selv
    val_bytes = vb * 0x0011 + (vb + 4) * 0x1100  # byte vb of the even token's word | of the odd one's

    # key bias: [NW, D, 8] B operands
    wb = along(NW, 0, lb, 3)
    kb_ = along(D, 1, lb, 3)
    nb8 = along(8, 2, lb, 3)
    kb_l, kb_r = lane_reg(kb_, gl.to_linear_layout(lb, [NW, D, 8]), 1)
    chan_b_l, _ = key_channel(kb_l, D, BITS)
    chan_b_r, _ = key_channel(kb_r, D, BITS)
    kz_lane = ((wb * WT) // G) * D + chan_b_l + nb8 * 0  # nb8: lanes only
    neg_bias = gl.full([NW, D, 8], -1024.0 / TOP, f16, layout=lb)
    ones = gl.full([NW, T, 8], 1.0, f16, layout=lb)
    # low rank, key side: B_k [NW, D, 8] (columns < RANK), A_k^T [NW, 8, T] (rows < RANK)
    bk_lane = chan_b_l * RANK + nb8 + wb * 0
    bk_ok = (nb8 < RANK) & (kb_ >= 0)
    wak = along(NW, 0, LB_AK, 3)
    jak = along(8, 1, LB_AK, 3)
    tak = along(T, 2, LB_AK, 3)
    jak_l, jak_r = lane_reg(jak, LB_AK, 1)
    tak_l, tak_r = lane_reg(tak, LB_AK, 2)
    ak_lane = (wak * WT + tak_l) * RANK + jak_l
    ak_reg = tak_r * RANK + jak_r
    ak_ok = (jak < RANK) & (tak >= 0)
    # value side: X [NW, T, 16] = [A_v | minima of the NG groups | 0 .. ; 1 | 0 ..] against p, and
    # B_v^T [NW, 16, D] = [B_v * step ; group indicator * step ; 0]
    wx = along(NW, 0, LB_X, 3)
    tx = along(T, 1, LB_X, 3)
    cx = along(8, 2, LB_X, 3)
    tx_l, tx_r = lane_reg(tx, LB_X, 1)  # cx: lanes only
    x_lane = gl.where(cx < RANK, (wx * WT + tx_l) * RANK + cx, (wx * WT + tx_l) * NG + (cx - RANK))
    x_reg = tx_r * gl.where(cx < RANK, RANK, NG)  # constants where RANK == NG or RANK == 0
    x_ok = cx < RANK + NG
    x_hi = gl.where((cx == 0) & (tx >= 0) & (wx >= 0), 1.0, 0.0).to(f16)
    wbv = along(NW, 0, LB_BV, 3)
    jbv = along(8, 1, LB_BV, 3)
    nbv = along(D, 2, LB_BV, 3)
    chan_bv, s_bv = value_channel(nbv, D, BITS)
    step_bv = (1 << (BITS * s_bv)).to(f16)  # exact: a power of two
    nbv_l, nbv_r = lane_reg(nbv, LB_BV, 2)
    jbv_l, jbv_r = lane_reg(jbv, LB_BV, 1)
    chan_bv_l, _ = value_channel(nbv_l, D, BITS)
    chan_bv_r, _ = value_channel(nbv_r, D, BITS)
    bv_lane = chan_bv_l * RANK + jbv_l + wbv * 0
    bv_reg = chan_bv_r * RANK + jbv_r
    bv_ok = (jbv < RANK) & (nbv >= 0)
    bv_grp = gl.where(chan_bv // G == jbv - RANK, step_bv, 0.0).to(f16)  # rows RANK + g: pz of group g

    # softmax side, [NW, 16, T] accumulator layout
    wm = along(NW, 0, mma, 3)
    rm = along(16, 1, mma, 3)
    tm = along(T, 2, mma, 3)
    tok_m = wm * WT + tm
    tok_m_l, tok_m_r = lane_reg(tok_m, gl.to_linear_layout(mma, [NW, 16, T]), 2)
    rm_l, rm_r = lane_reg(rm, gl.to_linear_layout(mma, [NW, 16, T]), 1)
    vs_lane = tok_m_l * NG + rm_l % NG
    vs_reg = tok_m_r * NG + rm_r % NG
    col16 = along(16, 2, mma, 3)

    valid_from = gl.load(VALID_FROM + b)
    npages = gl.load(NPAGES + b)
    first = split * pages_per_split
    last = gl.minimum(first + pages_per_split, npages)

    m_i = gl.full([NW, 16], float("-inf"), f32, layout=rows_l)
    acc = gl.zeros([NW, 16, D], f32, layout=mma)
    ps8 = gl.zeros([NW, 16, 8], f32, layout=mma)
    y = gl.zeros([NW, 16, 16], f32, layout=mma)
    KCw = KC.to(gl.pointer_type(gl.int32))
    VCw = VC.to(gl.pointer_type(gl.int32))
    lane = gl.arange(0, 32 * NW, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    ph_next = gl.load(TABLE + b * stride_tb + first, mask=first < last, other=0).to(gl.int64) * H_KV + h
    for p in range(first, last):
        ph = ph_next
        ph_next = gl.load(TABLE + b * stride_tb + p + 1, mask=p + 1 < last, other=0).to(gl.int64) * H_KV + h
        _prefetch_page(lane, ph_next, KC, VC, KS, KZ, KA, KB, VS, VZ, VA, VB, CODESW * 4, KSTAT, VSTAT, LRA, LRB, RANK)
        pos0 = gl.load(POS + b * stride_tb + p)
        # -- per page: w = q * ks * TOP / step, the key bias q.kz - 1024 / TOP sum(w), q.B_k
        ks = load_pairs(KS + ph * KSTAT, ks_lane, ks_reg, ks_reg >= 0, 1)
        ks = gl.expand_dims(gl.convert_layout(ks, gl.SliceLayout(1, la), assert_trivial=True), 1)
        w16 = q16 * (ks * wmul)
        kz = load_pairs(KZ + ph * KSTAT, kz_lane, chan_b_r, chan_b_r >= 0, 1)
        kz = gl.convert_layout(kz, lb, assert_trivial=True)
        kbias = mma_v2(w16, neg_bias, mma_v2(q16, kz, gl.zeros([NW, 16, 8], f32, layout=mma)))
        kbias = gl.expand_dims(gl.max(kbias, axis=2) * TOP, 2) + gl.zeros([NW, 16, T], f32, layout=mma)
        if RANK > 0:
            bk = gl.load(KB + ph * LRB + bk_lane + chan_b_r * RANK, mask=bk_ok, other=0.0)
            qb = (mma_v2(q16, bk, gl.zeros([NW, 16, 8], f32, layout=mma)) * TOP).to(f16)
            qb = gl.convert_layout(stack(qb, gl.zeros_like(qb), 2), la, assert_trivial=True)
        for i in gl.static_range(WT // T):  # tiles of T tokens (fewer live registers than the whole page)
            # -- scores, transposed: s^T [16, T] = w [16, D] . key tile [D, T] (+ q B_k A_k^T)
            c = kbias
            if RANK > 0:
                akt = load_pairs(KA + ph * LRA + i * T * RANK, ak_lane, ak_reg, ak_ok, 1, RANK % 2 == 0)
                akt = gl.convert_layout(stack(akt, gl.zeros_like(akt), 1), lb, assert_trivial=True)
                c = mma_v2(qb, akt, c)
            kw = gl.load(KCw + ph * CODESW + i * T * NWORDS + key_lane + key_reg)
            kt = _fp16_pairs(_bytes(kw, kw, key_bytes), key_mask)
            kt = gl.convert_layout(gl.reshape(gl.permute(kt, (0, 4, 3, 2, 1, 6, 5)), (NW, D, T)), lb,
                                   assert_trivial=True)
            s = mma_v2(w16, kt, c)  # TOP times the scores
            if pos0 < valid_from:  # a page that holds left padding (a branch the whole program takes or skips)
                s = gl.where(pos0 + i * T + tok_m >= valid_from, s, float("-inf"))
            # -- online softmax, per warp. The running max moves only when a row's grows by more
            # than 2^8 (FlashAttention-4's lazy rescaling): p stays <= 256, exact in fp16, and most
            # tiles leave the accumulators as they are.
            m_tile = gl.max(s, axis=2)
            if gl.max(gl.max(gl.where(m_tile > m_i + GROW, 1, 0), axis=1), axis=0) > 0:
                m_new = gl.maximum(m_i, m_tile)
                alpha = gl.expand_dims(gl.exp2((m_i - gl.where(m_new == float("-inf"), 0.0, m_new)) * C2), 2)
                acc = acc * alpha
                ps8 = ps8 * alpha
                y = y * alpha
                m_i = m_new
            m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
            p16 = gl.exp2(s * C2 - gl.expand_dims(m_safe * C2, 2)).to(f16)
            vs = gl.load(VS + ph * VSTAT + i * T * NG + vs_lane + vs_reg)
            pv16 = gl.convert_layout(p16 * vs, la, assert_trivial=True)
            p16 = gl.convert_layout(p16, la, assert_trivial=True)
            # -- p.V: value tile [T, D], pairs along tokens
            we = gl.load(VCw + ph * CODESW + i * T * NWORDS + val_lane + val_reg)
            wo = gl.load(VCw + ph * CODESW + i * T * NWORDS + val_lane + (val_reg + NWORDS))
            vt = _fp16_pairs(_bytes(we, wo, val_bytes), val_mask)
            vt = gl.convert_layout(gl.reshape(gl.permute(vt, (0, 1, 6, 5, 4, 3, 2)), (NW, T, D)), lb,
                                   assert_trivial=True)
            acc = mma_v2(pv16, vt, acc)
            ps8 = mma_v2(pv16, ones, ps8)
            x_base = gl.where(cx < RANK, VA + ph * LRA + i * T * RANK, VZ + ph * VSTAT + i * T * NG)  # per lane
            xlo = gl.load(x_base + x_lane + x_reg, mask=x_ok, other=0.0)
            xm = gl.convert_layout(stack(xlo, x_hi, 2), lb, assert_trivial=True)
            y = mma_v2(p16, xm, y)
        # the page's low-rank part and value minima: (p X)[:, :8] B^T, then those columns restart
        bv = load_pairs(VB + ph * LRB, bv_lane, bv_reg, bv_ok, 1, RANK % 2 == 0)
        bv = bv * step_bv + bv_grp  # rows < RANK: B_v; rows RANK + g: group g (each zero in the other's rows)
        bv = gl.convert_layout(stack(bv, gl.zeros_like(bv), 1), lb, assert_trivial=True)
        ylo = gl.convert_layout(gl.where(col16 < 8, y, 0.0).to(f16), la, assert_trivial=True)
        acc = mma_v2(ylo, bv, acc)
        y = gl.where(col16 < 8, 0.0, y)

    # per warp: o = (acc - 1024 sum p') / step, then the warps merge
    ps_r = gl.max(ps8, axis=2)
    l_r = gl.sum(gl.where(col16 == 8, y, 0.0), axis=2)
    nm = along(D, 2, mma, 3)
    _, s_m = value_channel(nm, D, BITS)
    o = (acc - 1024.0 * gl.expand_dims(ps_r, 2)) / gl.exp2((BITS * s_m).to(f32))
    m_all = gl.max(m_i, axis=0)
    m_all_safe = gl.where(m_all == float("-inf"), 0.0, m_all)
    sc = gl.exp2((m_i - gl.expand_dims(m_all_safe, 0)) * C2)
    o = gl.sum(o * gl.expand_dims(sc, 2), axis=0)  # [16, D]
    l_all = gl.sum(l_r * sc, axis=0)  # [16]
    out_l: gl.constexpr = gl.SliceLayout(0, mma)
    r2 = gl.arange(0, 16, layout=gl.SliceLayout(1, out_l))
    n2 = gl.arange(0, D, layout=gl.SliceLayout(0, out_l))
    chan2, _ = value_channel(n2, D, BITS)
    out2 = (b * (H_KV * GQA) + h * GQA + r2 // NG) * splits_total + split_offset + split
    ok2 = gl.expand_dims(r2 < GQA * NG, 1) & (gl.expand_dims(chan2 // G, 0) == gl.expand_dims(r2 % NG, 1))
    gl.store(ACC_OUT + gl.expand_dims(out2, 1) * D + gl.expand_dims(chan2, 0), o, mask=ok2)
    r1 = gl.arange(0, 16, layout=gl.SliceLayout(0, rows_l))
    out1 = (b * (H_KV * GQA) + h * GQA + r1 // NG) * splits_total + split_offset + split
    ok1 = (r1 < GQA * NG) & (r1 % NG == 0)
    gl.store(M_OUT + out1, m_all / TOP, mask=ok1)
    gl.store(L_OUT + out1, l_all, mask=ok1)
