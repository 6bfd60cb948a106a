"""The decode page loop in Gluon (Triton's explicit-layout dialect) for pages of 2 or 4 bits
(kivi, gear_l, gear): every tensor-core operand is built in registers in its operand layout, so a
page goes from memory to the tensor cores with no shared memory and no barrier (outliers aside).

Same arithmetic as :func:`gear_dist.kernels.decode_attention._pages_kernel` (whose docstring gives
the algebra), arranged around mma_v2's register layouts:

- the warps are the batch dimension of every product: each warp takes ``PAGE / warps`` tokens of
  each page, ``T`` at a time, and keeps its own running max and sums, merged once at the
  program's end (no reduction crosses warps per page; one warp per program is the fastest);
- the codes are the A operands (rows: a tile's tokens for keys, channels for values) and the query
  rows (heads x value groups, padded to 8 or 16) the N side: ``s [T, ROWS] = key tile [T, D] .
  w^T [D, ROWS]``, ``o^T [D, ROWS] += V^T [D, T] . p [T, ROWS]``. No mma row is padding; with the
  query as A operand (M = 16) 8 of its 16 rows were, doubling the tensor-core work, the exp2s and
  the accumulators (H100, 16 x 16k gear_l: 1,423 -> 1,112 instructions per page, 0.137 -> 0.119 ms
  GPU time per call). The price: scores come out with a lane holding one token and two rows, and ``p`` as
  the next B operand needs one row and two tokens; :func:`c_to_b` moves each 8 x 8 block with one
  PTX ``movmatrix``;
- the packed codes are loaded straight into the layouts whose unpacking (:func:`key_unpack_layout`,
  :func:`value_unpack_layout`) yields the A operands: one integer op makes an fp16 pair
  ``1024 + code * step`` and the pair is what mma_v2 holds in one register (adjacent channels for
  keys, adjacent tokens for values). The channel order along the tiles is whatever that makes it
  (:func:`key_channel`, :func:`value_channel`); the query, statistics and output follow it
  (``convert_layout(..., assert_trivial=True)`` proves at compile time that no data moves);
- every load's offsets are a lane part plus a register part (:func:`lane_reg`), so the register
  part is an immediate of the load instruction (H100, 16 x 16k gear_l: 1,790 -> 1,427
  instructions per page, 255 -> 245 registers, 0.146 -> 0.125 ms);
- value minima ride with the low-rank factors as extra rank (``A = [A_v | vz]``,
  ``B = [B_v | group indicator]``), ``sum p`` as a ones row beside them;
- every load of a tile is issued before the tile's branches (padding mask, lazy rescale), and the
  factor rows beyond the rank are loaded unmasked (finite values that meet exact zeros): a masked
  load costs a second instruction that zeroes its register first;
- outliers are added where they land, through a shared scratch that inline PTX declares
  (:func:`shared_scratch`): a key outlier adds ``TOP v q[head, c]`` to its token's score
  correction, read back after one warp barrier per page; a value outlier adds ``p v`` to its
  channel's sum for the rows whose p the lane holds, folded into ``acc`` now and then. The sums are
  integers (:func:`add_fixed`, :func:`add_split`): sm_90's only native shared atomic add. A tile's
  value outliers are loaded with its codes, held as one tensor per lane (:func:`spread`), and
  pages with outliers take 32-token tiles by default (``decode_attention.default_tile``) so that
  fewer registers hold them (H100, 16 x 16k gear: Triton's loop 0.540 ms, this one 0.181).

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
def pow2_at_least(n):
    return triton.next_power_of_2(n)


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


@triton.constexpr_function
def rows_for(n):
    """Query rows (heads x value groups) padded to an mma_v2 N: 8 or 16."""
    return 8 if n <= 8 else 16


@gluon.jit
def pack_pairs(x):
    """fp16 ``[.., N]`` as int32 ``[.., N / 2]``, each word the pair (2i, 2i + 1), low half first."""
    lo, hi = gl.split(gl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return (lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) | (hi.to(gl.int16, bitcast=True).to(gl.int32) << 16)


@gluon.jit
def f16x2(lo, hi):
    """fp32 ``lo``, ``hi`` as one fp16 pair per word: one ``cvt.rn.f16x2.f32`` (converting each
    alone and packing takes three instructions)."""
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def mul_f16x2(a, b):
    """Products of fp16 pairs, a word each: one ``mul.rn.f16x2``."""
    return gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def c_to_b(w, lb: gl.constexpr):
    """fp16 pairs ``[NW, M, N / 2]`` (:func:`pack_pairs`) in mma_v2's accumulator layout as the fp16
    ``[NW, M, N]`` in the B-operand layout ``lb`` (M the reduction axis), for the next product. The
    accumulator gives a lane one row and two columns of each 8 x 8 block, the B operand one column and
    two rows: PTX ``movmatrix`` (one instruction per block and lane) swaps which lane holds what."""
    NW: gl.constexpr = w.shape[0]
    M: gl.constexpr = w.shape[1]
    N: gl.constexpr = 2 * w.shape[2]
    w = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [w], dtype=gl.int32,
                                  is_pure=True, pack=1)
    y = gl.join(w.to(gl.int16), (w >> 16).to(gl.int16)).to(gl.float16, bitcast=True)
    # y[8i + a, 4c + b, e] is x[8i + 2b + e, 8c + a]
    y = gl.permute(gl.reshape(y, (NW, M // 8, 8, N // 8, 4, 2)), (0, 1, 4, 5, 3, 2))
    return gl.convert_layout(gl.reshape(y, (NW, M, N)), lb, assert_trivial=True)


@gluon.jit
def key_stat_offsets(layout: gl.constexpr, NW: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr,
                     WT: gl.constexpr, G: gl.constexpr):
    """Offsets of a page's per-channel key statistics as ``[NW, D]`` in ``layout`` (each warp's key
    group, channels in the key tile's order), as lane and register parts (:func:`lane_reg`)."""
    w = gl.arange(0, NW, layout=gl.SliceLayout(1, layout))
    k_l, k_r = lane_reg(gl.arange(0, D, layout=gl.SliceLayout(0, layout)), gl.to_linear_layout(layout, [NW, D]), 1)
    chan_l, _ = key_channel(k_l, D, BITS)
    chan_r, _ = key_channel(k_r, D, BITS)
    return gl.expand_dims((w * WT) // G * D, 1) + gl.expand_dims(chan_l, 0), gl.expand_dims(chan_r, 0)


@triton.constexpr_function
def scratch(D, GQA, NG, NW, WT, KO, VO):
    """Bytes of the shared scratch for outliers (0 without): q (times TOP) by channel and head; per warp 3
    rotating buffers of key corrections by token and head, p . S_v by channel and row since its last
    fold into acc (two words each, add_split); 16 bytes where lanes with nothing to add add, and read a zero. Returns
    (q's bytes, a correction buffer's, a warp's, the whole)."""
    if KO + VO == 0:
        return 0, 0, 0, 0
    qs = D * GQA * 4 if KO else 0
    corr = WT * GQA * 4 if KO else 0
    per_warp = 3 * corr + (D * rows_for(GQA * NG) * 8 if VO else 0)
    return qs, corr, per_warp, qs + NW * per_warp + 16


def scratch_fits(D, GQA, NG, NW, WT, KO, VO) -> bool:
    """Whether the scratch and, with several warps, the shared memory through which Triton merges
    their partial outputs (NW x D x rows fp32) fit the 48 KB a launch gets without opting in (H100:
    4 warps of 2-bit gear, 38 + 16 KB, fail to launch)."""
    merge = NW * D * rows_for(GQA * NG) * 4 if NW > 1 and KO + VO else 0
    return scratch(D, GQA, NG, NW, WT, KO, VO)[3] + merge <= 48 * 1024


@triton.constexpr_function
def _declare_shared(nbytes):
    return f".shared .align 16 .b8 gear_scatter[{nbytes}];\n\tmov.u32 $0, gear_scatter;"


@gluon.jit
def shared_scratch(NBYTES: gl.constexpr, lane):
    """The shared-space address of ``NBYTES`` of shared memory that PTX declares, for the per-element
    stores, loads and atomic adds below (Gluon in Triton 3.6 offers none of them, and its own
    allocations have no address to hand to PTX). ``lane``: one element per thread, so that the
    declaration is emitted once."""
    return gl.max(gl.inline_asm_elementwise(_declare_shared(NBYTES), "=r,r", [lane * 0], dtype=gl.int32,
                                            is_pure=True, pack=1), axis=0)


@gluon.jit
def st_shared(addr, x):
    return gl.inline_asm_elementwise("st.shared.f32 [$1], $2;\n\tmov.b32 $0, 0;", "=r,r,f", [addr, x],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def ld_shared(addr):
    return gl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [addr], dtype=gl.float32, is_pure=False,
                                     pack=1)


# Sums in shared memory are integers: of its atomic adds sm_90 runs only the 32-bit integer one
# natively (fp32, fp16x2, bf16x2 and 64-bit adds are compare-and-swap loops, a branch each).
KFIX = gl.constexpr(64.0)  # steps of a key's score correction (TOP times the score): 2^-6, range +-2^25
# (2^-12 of a score at 2 bits); the staged q carries the factor, so each add converts straight away


@gluon.jit
def add_fixed(addr, x):
    """``*addr += x`` atomically, ``x`` in steps of 1/KFIX already."""
    return gl.inline_asm_elementwise("{ .reg .s32 t; cvt.rni.s32.f32 t, $2; red.shared.add.u32 [$1], t; }\n\t"
                                     "mov.b32 $0, 0;", "=r,r,f", [addr, x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def get_fixed(addr):
    return gl.inline_asm_elementwise("{ .reg .s32 t; ld.shared.s32 t, [$1]; cvt.rn.f32.s32 $0, t; }", "=f,r",
                                     [addr], dtype=gl.float32, is_pure=False, pack=1) * (1.0 / KFIX)


@gluon.jit
def evens(x, ROWS: gl.constexpr):
    """The even rows of ``[NW, T, ROWS]`` (a lane's row pairs in the accumulator layout), as ``[NW, T, ROWS / 2]``
    in the layout that splitting ``p`` into its pairs gives."""
    e, o = gl.split(gl.reshape(x, (x.shape[0], x.shape[1], ROWS // 2, 2)))
    return e


@gluon.jit
def spread(x, N: gl.constexpr):
    """``x + j`` for ``j < N`` (a power of two) along log2 N trailing dims of 2 (in registers: ``gl.join``),
    bit k of j along the k-th: a few values per element held as one tensor (see :func:`pick`)."""
    for k in gl.static_range(log2(N)):
        x = gl.join(x, x + (1 << k))
    return x


@gluon.jit
def pick(x, j: gl.constexpr, like):
    """Element ``j`` of :func:`spread`'s trailing dims, in the layout of ``like`` (the tensor spread; register
    renaming only)."""
    LOG: gl.constexpr = len(x.shape) - len(like.shape)
    for k in gl.static_range(LOG):
        lo, hi = gl.split(x)
        if (j >> (LOG - 1 - k)) % 2 == 1:
            x = hi
        else:
            x = lo
    return gl.convert_layout(x, like.type.layout, assert_trivial=True)


@gluon.jit
def value_outliers(VOI, VOV, page, tok, VO: gl.constexpr):
    """The channels (int32) and values (fp32) of each ``tok``'s ``VO`` outliers (``page``: the page's first),
    as :func:`spread` holds them."""
    N: gl.constexpr = pow2_at_least(VO)
    slot = spread(tok * VO, N)
    ok = spread(gl.zeros_like(tok), N) < VO
    return (gl.load(VOI + page + slot, mask=ok, other=0).to(gl.int32),
            gl.load(VOV + page + slot, mask=ok, other=0.0).to(gl.float32))


@gluon.jit
def add_split(addr, x):
    """``*addr += x`` atomically as two integers, ``x = 16 h + l / 4096`` with h toward zero (|l| < 2^16):
    range +-2^35 and steps of 2^-12, for p . S_v, where p <= 256 meets any fp16 value."""
    return gl.inline_asm_elementwise(
        "{ .reg .s32 h, l; .reg .f32 q, r; mul.f32 q, $2, 0f3D800000; cvt.rzi.s32.f32 h, q; cvt.rn.f32.s32 q, h; "
        "fma.rn.f32 r, q, 0fC1800000, $2; mul.f32 r, r, 0f45800000; cvt.rni.s32.f32 l, r; "
        "red.shared.add.u32 [$1], h; red.shared.add.u32 [$1+4], l; }\n\tmov.b32 $0, 0;", "=r,r,f", [addr, x],
        dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def take_split(addr):
    """The sum at ``addr`` (:func:`add_split`), and zero left there."""
    return gl.inline_asm_elementwise(
        "{ .reg .s32 h, l, z; .reg .f32 a, b; ld.shared.v2.s32 {h, l}, [$1]; mov.b32 z, 0; "
        "st.shared.v2.u32 [$1], {z, z}; cvt.rn.f32.s32 a, h; cvt.rn.f32.s32 b, l; mul.f32 b, b, 0f39800000; "
        "fma.rn.f32 $0, a, 0f41800000, b; }", "=f,r", [addr], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def fold_split(acc, at, step, lane):
    """acc + the sums at ``at`` (:func:`add_split`; ``step``: acc's unit per channel), zeroing them."""
    warp_sync(lane)
    acc = acc + take_split(at) * step
    warp_sync(lane)
    return acc


@triton.constexpr_function
def fold_pages(WT):
    """Pages between folds of p . S_v into acc, so that add_split's words stay within 32 bits for
    any fp16 outlier: a page adds at most WT terms to a sum, each |h| < 256 x 65504 / 16 < 2^20."""
    return max(1, 2**30 // (WT * 2**20))


@gluon.jit
def warp_sync(lane):
    """``bar.warp.sync``: the warp's shared-memory writes before it are seen by its lanes after it."""
    return gl.inline_asm_elementwise("bar.warp.sync -1;\n\tmov.b32 $0, 0;", "=r,r", [lane], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def zero_shared(base, NWORDS: gl.constexpr, lane, sink):
    """Zero ``NWORDS`` 4-byte words at each warp's ``base`` (``lane``: the warp's lanes, one element each)."""
    for k in gl.static_range(triton.cdiv(NWORDS, 32)):
        i = k * 32 + lane % 32
        st_shared(gl.where(i < NWORDS, base + i * 4, sink), gl.zeros_like(lane).to(gl.float32))


# -- kernel ----------------------------------------------------------------------------------
@gluon.jit(do_not_specialize=["split_offset", "splits_total", "pages_per_split"])
def pages_kernel(
    Q, stride_qb, stride_qh, scale,
    KC, KS, KZ, KA, KB, KOV, KOI, VC, VS, VZ, VA, VB, VOV, VOI,
    TABLE, POS, NPAGES, VALID_FROM, stride_tb,
    M_OUT, L_OUT, ACC_OUT, split_offset, splits_total, pages_per_split,
    H_KV: gl.constexpr, GQA: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, PAGE: gl.constexpr,
    G: gl.constexpr, RANK: gl.constexpr, KO: gl.constexpr, VO: gl.constexpr, NW: gl.constexpr, T: gl.constexpr,
):
    WT: gl.constexpr = PAGE // NW  # a warp's tokens of each page, taken T at a time
    PER: gl.constexpr = 8 // BITS
    NWORDS: gl.constexpr = D * BITS // 32
    NWLO: gl.constexpr = NWORDS // 4
    NG: gl.constexpr = D // G
    ROWS: gl.constexpr = rows_for(GQA * NG)
    TOP: gl.constexpr = float(2 ** (BITS * (PER - 1)))
    C2: gl.constexpr = 1.4426950408889634 / TOP
    GROW: gl.constexpr = 8.0 / C2  # 2^8 in p, in the units of s (TOP times the scores)
    CODESW: gl.constexpr = PAGE * NWORDS
    KSTAT: gl.constexpr = PAGE // G * D
    VSTAT: gl.constexpr = PAGE * NG
    LRA: gl.constexpr = PAGE * RANK
    LRB: gl.constexpr = D * RANK
    MASK: gl.constexpr = ((1 << BITS) - 1) * 0x00010001
    # outliers (KO per key row: a channel along a key group's tokens; VO per value row: a token) go
    # through shared memory: q (times TOP) by channel and head; per warp 3 rotating buffers of key
    # corrections by token and head (added to the scores), and p . S_v by channel and row (folded
    # into acc now and then); sums as integers (add_fixed, add_split)
    KOUT: gl.constexpr = PAGE // G * D * KO
    VOUT: gl.constexpr = PAGE * VO
    SCR: gl.constexpr = scratch(D, GQA, NG, NW, WT, KO, VO)
    QS: gl.constexpr = SCR[0]
    CORR: gl.constexpr = SCR[1]
    PER_WARP: gl.constexpr = SCR[2]
    SINK: gl.constexpr = QS + NW * PER_WARP  # 8 bytes added to where a lane has nothing to add, then 8 zero ones
    f16: gl.constexpr = gl.float16
    f32: gl.constexpr = gl.float32

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)  # [NW, ROWS]: per query row
    KU: gl.constexpr = key_unpack_layout(NW, NWLO, PER, T)
    VU: gl.constexpr = value_unpack_layout(NW, T // 2, NWORDS, PER)
    LA_AK: gl.constexpr = without(gl.to_linear_layout(la, [NW, T, 16]), 2, 8)  # [NW, T, 8]: A_k's first 8 columns
    LA_BK: gl.constexpr = without(gl.to_linear_layout(la, [NW, 16, D]), 1, 8)  # [NW, 8, D]: B_k^T's first 8 rows
    LA_X: gl.constexpr = without(gl.to_linear_layout(la, [NW, 16, T]), 1, 8)  # [NW, 8, T]
    LA_BV: gl.constexpr = without(gl.to_linear_layout(la, [NW, D, 16]), 2, 8)  # [NW, D, 8]

    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // H_KV
    h = pid % H_KV

    # query, [NW, D, ROWS] B operand: channels in the key tile's order, rows (head, value group), softmax-scaled
    wq = along(NW, 0, lb, 3)
    kq = along(D, 1, lb, 3)
    rq = along(ROWS, 2, lb, 3)
    chan_q, s_q = key_channel(kq, D, BITS)
    q = gl.load(Q + b * stride_qb + (h * GQA + rq // NG) * stride_qh + chan_q + wq * 0,
                mask=(rq < GQA * NG) & (wq >= 0), other=0.0)
    q16 = (q.to(f32) * scale).to(f16)
    wmul = (1 << (BITS * (PER - 1 - s_q))).to(f16)  # TOP / step: exact, a constant per register
    # offsets of every load in two parts, lanes' and registers' (see lane_reg)
    ks_lane, ks_reg = key_stat_offsets(gl.SliceLayout(2, lb), NW, D, BITS, WT, G)

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

    # key bias q.kz - 1024 / TOP sum(w): A operands [NW, 16, D] equal in every row, so the product
    # is the bias of each query row in every row of the scores' tiles
    kz_lane, kz_reg = key_stat_offsets(gl.SliceLayout(1, la), NW, D, BITS, WT, G)
    neg_bias = gl.full([NW, 16, D], -1024.0 / TOP, f16, layout=la)
    ones = gl.full([NW, 16, T], 1.0, f16, layout=la)
    # low rank, key side: A_k [NW, T, 8] (columns < RANK), B_k^T [NW, 8, D] (rows < RANK)
    wak = along(NW, 0, LA_AK, 3)
    tak = along(T, 1, LA_AK, 3)
    jak = along(8, 2, LA_AK, 3)
    tak_l, tak_r = lane_reg(tak, LA_AK, 1)
    jak_l, jak_r = lane_reg(jak, LA_AK, 2)
    ak_lane = (wak * WT + tak_l) * RANK + jak_l
    ak_reg = tak_r * RANK + jak_r
    ak_ok = (jak < RANK) & (tak >= 0)
    wbk = along(NW, 0, LA_BK, 3)
    jbk = along(8, 1, LA_BK, 3)  # lanes only
    kbk_l, kbk_r = lane_reg(along(D, 2, LA_BK, 3), LA_BK, 2)
    chan_bk_l, _ = key_channel(kbk_l, D, BITS)
    chan_bk_r, _ = key_channel(kbk_r, D, BITS)
    bk_lane = chan_bk_l * RANK + gl.where(jbk < RANK, jbk, 0) + wbk * 0  # rows >= RANK: row 0 again, met by
    bk_reg = chan_bk_r * RANK  # A_k's zero columns (finite values: no mask, no zeroing per load)
    # value side: X^T [NW, 16, T] = [A_v^T ; minima of the NG groups ; 0 .. ; 1 ; 0 ..] against p, and
    # B_v' [NW, D, 16] = [B_v * step | group indicator * step | 0]
    wx = along(NW, 0, LA_X, 3)
    cx = along(8, 1, LA_X, 3)  # lanes only
    tx = along(T, 2, LA_X, 3)
    tx_l, tx_r = lane_reg(tx, LA_X, 2)
    x_lane = gl.where(cx < RANK, (wx * WT + tx_l) * RANK + cx, (wx * WT + tx_l) * NG + (cx - RANK) % NG)
    x_reg = tx_r * gl.where(cx < RANK, RANK, NG)  # constants where RANK == NG or RANK == 0
    # rows >= RANK + NG repeat a minimum: finite, and met by B_v''s zero columns (no mask)
    x_hi = gl.where((cx == 0) & (tx >= 0) & (wx >= 0), 1.0, 0.0).to(f16)
    wbv = along(NW, 0, LA_BV, 3)
    nbv = along(D, 1, LA_BV, 3)
    jbv = along(8, 2, LA_BV, 3)
    chan_bv, s_bv = value_channel(nbv, D, BITS)
    step_bv = (1 << (BITS * s_bv)).to(f16)  # exact: a power of two
    nbv_l, nbv_r = lane_reg(nbv, LA_BV, 1)
    jbv_l, jbv_r = lane_reg(jbv, LA_BV, 2)
    chan_bv_l, _ = value_channel(nbv_l, D, BITS)
    chan_bv_r, _ = value_channel(nbv_r, D, BITS)
    bv_lane = chan_bv_l * RANK + jbv_l + wbv * 0
    bv_reg = chan_bv_r * RANK + jbv_r
    bv_ok = (jbv < RANK) & (nbv >= 0)
    bv_grp = gl.where(chan_bv // G == jbv - RANK, step_bv, 0.0).to(f16)  # columns RANK + g: pz of group g

    # softmax side, [NW, T, ROWS] accumulator layout
    wm = along(NW, 0, mma, 3)
    tm = along(T, 1, mma, 3)
    rm = along(ROWS, 2, mma, 3)
    tok_m = wm * WT + tm
    tok_m_l, tok_m_r = lane_reg(tok_m, gl.to_linear_layout(mma, [NW, T, ROWS]), 1)
    rm_l, rm_r = lane_reg(rm, gl.to_linear_layout(mma, [NW, T, ROWS]), 2)
    vs_lane = tok_m_l * NG + rm_l % NG
    vs_reg = tok_m_r * NG + rm_r % NG
    x16 = along(16, 1, mma, 3)
    chan_o, s_o = value_channel(along(D, 1, mma, 3), D, BITS)  # acc's channels and their code planes

    valid_from = gl.load(VALID_FROM + b)
    npages = gl.load(NPAGES + b)
    first = split * pages_per_split
    last = gl.minimum(first + pages_per_split, npages)

    m_i = gl.full([NW, ROWS], float("-inf"), f32, layout=rows_l)
    acc = gl.zeros([NW, D, ROWS], f32, layout=mma)
    ps = gl.zeros([NW, 16, ROWS], f32, layout=mma)
    y = gl.zeros([NW, 16, ROWS], f32, layout=mma)
    KCw = KC.to(gl.pointer_type(gl.int32))
    VCw = VC.to(gl.pointer_type(gl.int32))
    lane = gl.arange(0, 32 * NW, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    if KO + VO > 0:
        sm = shared_scratch(SCR[3], lane)
        sink = sm + SINK
        warp_l = sm + QS + lane // 32 * PER_WARP  # each warp's own part
        zero_shared(warp_l, PER_WARP // 4, lane, sink)
        zero_shared(sink + 8 + lane * 0, 2, lane, sink)
        if KO > 0:  # q by channel and head, in the corrections' fixed-point steps
            head_q = rq // NG
            st_shared(gl.where((rq < GQA * NG) & (rq % NG == 0), sm + (chan_q * GQA + head_q) * 4, sink),
                      q16.to(f32) * (TOP * KFIX))
            ko_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])
            wo_k = gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(1, ko_l)), 1)
            eo_k = gl.expand_dims(gl.arange(0, D * KO, layout=gl.SliceLayout(0, ko_l)), 0)
            grp_k = (wo_k * WT) // G  # the warp's key group
            corr_k = sm + QS + wo_k * PER_WARP
            corr_m = sm + QS + wm * PER_WARP
            corr_row = (tm * GQA + rm // NG) * 4
        if VO > 0:
            oc_m = sm + QS + wm * PER_WARP + 3 * CORR
            oc_o = oc_m + (chan_o * ROWS + rm) * 8  # acc's entries
            full = tm * 0 + rm * 0 + wm * 0  # [NW, T, ROWS] zeros: broadcasts an index to every slot
            tok_e = evens(tok_m + full, ROWS)  # per lane's row pair: its token, even row, p . S_v's sums
            r_e = evens(rm + full, ROWS)
            oc_e = evens(oc_m + full, ROWS)
            oc_step = (1 << (BITS * s_o)).to(f32)  # acc is in units of the channel's code step
        warp_sync(lane)
    ph_next = gl.load(TABLE + b * stride_tb + first, mask=first < last, other=0).to(gl.int64) * H_KV + h
    for p in range(first, last):
        ph = ph_next
        ph_next = gl.load(TABLE + b * stride_tb + p + 1, mask=p + 1 < last, other=0).to(gl.int64) * H_KV + h
        _prefetch_page(lane, ph_next, KC, VC, KS, KZ, KA, KB, VS, VZ, VA, VB, CODESW * 4, KSTAT, VSTAT, LRA, LRB, RANK)
        pos0 = gl.load(POS + b * stride_tb + p)
        # -- per page: w = q * ks * TOP / step, the key bias, (q B_k)^T
        ks = load_pairs(KS + ph * KSTAT, ks_lane, ks_reg, ks_reg >= 0, 1)
        ks = gl.expand_dims(gl.convert_layout(ks, gl.SliceLayout(2, lb), assert_trivial=True), 2)
        w16 = q16 * (ks * wmul)
        kz = load_pairs(KZ + ph * KSTAT, kz_lane, kz_reg, kz_reg >= 0, 1)
        kz, nb = gl.broadcast(gl.expand_dims(gl.convert_layout(kz, gl.SliceLayout(1, la), assert_trivial=True), 1),
                              neg_bias)
        kbias = mma_v2(nb, w16, mma_v2(kz, q16, gl.zeros([NW, 16, ROWS], f32, layout=mma))) * TOP
        for _r in gl.static_range(log2(T // 16)):  # the same bias in every 16-token row block of the tile
            kbias = stack(kbias, kbias, 1)
        kbias = gl.convert_layout(kbias, mma, assert_trivial=True)
        bv = load_pairs(VB + ph * LRB, bv_lane, bv_reg, bv_ok, 2, RANK % 2 == 0)
        if RANK > 0:
            bk = gl.load(KB + ph * LRB + bk_lane + bk_reg)
            bk = gl.convert_layout(stack(bk, gl.zeros_like(bk), 1), la, assert_trivial=True)
            qb = c_to_b(pack_pairs((mma_v2(bk, q16, gl.zeros([NW, 16, ROWS], f32, layout=mma)) * TOP).to(f16)), lb)
        if KO > 0:  # each lane adds TOP q[head, c] v of its outliers to the corrections of their tokens
            slot = ph * KOUT + grp_k * D * KO + eo_k
            tw = grp_k * G + gl.load(KOI + slot).to(gl.int32) - wo_k * WT  # the token among the warp's
            kv_o = gl.load(KOV + slot).to(f32)
            at = gl.where((tw >= 0) & (tw < WT), corr_k + (p % 3) * CORR + tw * (GQA * 4), sink)
            for hh in gl.static_range(GQA):
                add_fixed(at + hh * 4, ld_shared(sm + ((eo_k // KO) * GQA + hh) * 4) * kv_o)
            # the buffer of the page after this one, last read two pages ago (a warp_sync since)
            zero_shared(warp_l + ((p + 1) % 3) * CORR, CORR // 4, lane, sink)
            warp_sync(lane)
        for i in gl.static_range(WT // T):  # tiles of T tokens (fewer live registers than the whole page)
            # -- scores: s [T, ROWS] = key tile [T, D] . w^T [D, ROWS] (+ A_k (q B_k)^T)
            # every load of the tile first: none waits behind the branches below
            kw = gl.load(KCw + ph * CODESW + i * T * NWORDS + key_lane + key_reg)
            we = gl.load(VCw + ph * CODESW + i * T * NWORDS + val_lane + val_reg)
            wo = gl.load(VCw + ph * CODESW + i * T * NWORDS + val_lane + (val_reg + NWORDS))
            vs = load_pairs(VS + ph * VSTAT + i * T * NG, vs_lane, vs_reg, vs_reg >= 0, 2, NG > 1)
            x_base = gl.where(cx < RANK, VA + ph * LRA + i * T * RANK, VZ + ph * VSTAT + i * T * NG)  # per lane
            xlo = gl.load(x_base + x_lane + x_reg)
            if VO > 0:  # the tile's value outliers, for p . S_v below
                chans_v, ws_v = value_outliers(VOI, VOV, ph * VOUT, i * T + tok_e, VO)
            c = kbias
            if RANK > 0:
                ak = load_pairs(KA + ph * LRA + i * T * RANK, ak_lane, ak_reg, ak_ok, 2, RANK % 2 == 0)
                ak = gl.convert_layout(stack(ak, gl.zeros_like(ak), 2), la, assert_trivial=True)
                c = mma_v2(ak, qb, c)
            kt = _fp16_pairs(_bytes(kw, kw, key_bytes), key_mask)
            kt = gl.convert_layout(gl.reshape(gl.permute(kt, (0, 5, 4, 3, 2, 1, 6)), (NW, T, D)), la,
                                   assert_trivial=True)
            s = mma_v2(kt, w16, c)  # TOP times the scores
            if KO > 0:
                s = s + get_fixed(gl.where(rm < GQA * NG, corr_m + (p % 3) * CORR + i * T * GQA * 4 + corr_row,
                                           sink + 8))  # padding rows: a zero
            if pos0 < valid_from:  # a page that holds left padding (a branch the whole program takes or skips)
                s = gl.where(pos0 + i * T + tok_m >= valid_from, s, float("-inf"))
            # -- online softmax, per warp. The running max moves only when a row's grows by more
            # than 2^8 (FlashAttention-4's lazy rescaling): p stays <= 256, exact in fp16, and most
            # tiles leave the accumulators as they are.
            m_tile = gl.max(s, axis=1)
            if gl.max(gl.max(gl.where(m_tile > m_i + GROW, 1, 0), axis=1), axis=0) > 0:
                m_new = gl.maximum(m_i, m_tile)
                alpha = gl.expand_dims(gl.exp2((m_i - gl.where(m_new == float("-inf"), 0.0, m_new)) * C2), 1)
                acc = acc * alpha
                ps = ps * alpha
                y = y * alpha
                m_i = m_new
                if VO > 0:  # the sums so far are in the old units, as acc was
                    acc = fold_split(acc, oc_o, oc_step * alpha, lane)
            m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
            p32 = gl.exp2(s * C2 - gl.expand_dims(m_safe * C2, 1))
            pe, po = gl.split(gl.reshape(p32, (NW, T, ROWS // 2, 2)))
            if VO > 0:  # p . S_v: each lane adds p of its (token, row) slots times the token's outliers
                for j in gl.static_range(VO):
                    chan_v = pick(chans_v, j, tok_e)
                    w_v = pick(ws_v, j, tok_e)
                    at_v = oc_e + (chan_v * ROWS + r_e) * 8
                    if NG == 1:  # the pair's rows are two heads: each keeps it
                        add_split(at_v, pe * w_v)
                        add_split(at_v + 8, po * w_v)
                    else:  # only the row of the channel's group keeps it: of a pair (one head's groups
                        # 2k, 2k + 1) one at most, so one add per pair (of 0 where neither)
                        g_v = chan_v // G
                        p_v = gl.where(g_v % 2 == 0, pe, po)
                        if NG > 2:
                            p_v = gl.where(g_v // 2 == (r_e % NG) // 2, p_v, 0.0)
                        add_split(at_v + (g_v % 2) * 8, p_v * w_v)
            pk = f16x2(pe, po)
            pv16 = c_to_b(mul_f16x2(pk, pack_pairs(vs)), lb)
            p16 = c_to_b(pk, lb)
            # -- V^T p: value tile [D, T], pairs along tokens
            vt = _fp16_pairs(_bytes(we, wo, val_bytes), val_mask)
            vt = gl.convert_layout(gl.reshape(gl.permute(vt, (0, 5, 4, 3, 2, 1, 6)), (NW, D, T)), la,
                                   assert_trivial=True)
            acc = mma_v2(vt, pv16, acc)
            ps = mma_v2(ones, pv16, ps)
            xm = gl.convert_layout(stack(xlo, x_hi, 1), la, assert_trivial=True)
            y = mma_v2(xm, p16, y)
        # the page's low-rank part and value minima: B_v' (X^T p)[:8], then those rows restart
        bv = bv * step_bv + bv_grp  # columns < RANK: B_v; columns RANK + g: group g (each zero in the other's)
        bv = gl.convert_layout(stack(bv, gl.zeros_like(bv), 2), la, assert_trivial=True)
        acc = mma_v2(bv, c_to_b(pack_pairs(gl.where(x16 < 8, y, 0.0).to(f16)), lb), acc)
        y = gl.where(x16 < 8, 0.0, y)
        if VO > 0:
            if (p - first) % fold_pages(WT) == fold_pages(WT) - 1:
                acc = fold_split(acc, oc_o, oc_step, lane)
    if VO > 0:
        acc = fold_split(acc, oc_o, oc_step, lane)

    # per warp: o = (acc - 1024 sum p') / step, then the warps merge
    ps_r = gl.max(ps, axis=1)
    l_r = gl.sum(gl.where(x16 == 8, y, 0.0), axis=1)
    o = (acc - 1024.0 * gl.expand_dims(ps_r, 1)) / gl.exp2((BITS * s_o).to(f32))
    m_all = gl.max(m_i, axis=0)
    m_all_safe = gl.where(m_all == float("-inf"), 0.0, m_all)
    sc = gl.exp2((m_i - gl.expand_dims(m_all_safe, 0)) * C2)
    o = gl.sum(o * gl.expand_dims(sc, 1), axis=0)  # [D, ROWS]
    l_all = gl.sum(l_r * sc, axis=0)  # [ROWS]
    out_l: gl.constexpr = gl.SliceLayout(0, mma)
    n2 = gl.arange(0, D, layout=gl.SliceLayout(1, out_l))
    r2 = gl.arange(0, ROWS, layout=gl.SliceLayout(0, out_l))
    chan2, _ = value_channel(n2, D, BITS)
    out2 = (b * (H_KV * GQA) + h * GQA + r2 // NG) * splits_total + split_offset + split
    ok2 = gl.expand_dims(r2 < GQA * NG, 0) & (gl.expand_dims(chan2 // G, 1) == gl.expand_dims(r2 % NG, 0))
    gl.store(ACC_OUT + gl.expand_dims(out2, 0) * D + gl.expand_dims(chan2, 1), o, mask=ok2)
    r1 = gl.arange(0, ROWS, layout=gl.SliceLayout(0, rows_l))
    out1 = (b * (H_KV * GQA) + h * GQA + r1 // NG) * splits_total + split_offset + split
    ok1 = (r1 < GQA * NG) & (r1 % NG == 0)
    gl.store(M_OUT + out1, m_all / TOP, mask=ok1)
    gl.store(L_OUT + out1, l_all, mask=ok1)
