"""Triton kernels against their torch references (interpreter on CPU, compiled on CUDA)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gear_dist import kernels
from gear_dist.cache import GEARCache, GearLayer, PagePool, use_gear_attention
from gear_dist.codec import compress, decompress
from gear_dist.config import CompressionConfig
from gear_dist.evals.synthetic import synthetic_kv
from gear_dist.kernels.compress import compress_into_pool
from gear_dist.kernels.decode_attention import PagedKV, decode_attention_reference, gear_decode_attention
from gear_dist.models import random_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
SMALL = dict(block_size=32, prefill_block_size=64, group_size=32)
CONFIGS = [("kivi", {}), ("gear_l", {}), ("gear", {}), ("gear", dict(bits=3)), ("gear", dict(bits=4)),
           ("gear", dict(bits=8, outlier_ratio=0.1, rank=4)), ("gear", dict(group_size=16))]
IDS = [f"{n}-{o.get('bits', 2)}" + (f"-g{o['group_size']}" if "group_size" in o else "") for n, o in CONFIGS]
ATTN_TOL = 3e-3  # the decode kernel multiplies in fp16 on the tensor cores whatever the input dtype


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _filled_layer(cfg, batch, heads, tokens, d, pad):
    layer = GearLayer(cfg)
    k = synthetic_kv(batch, heads, tokens=tokens, head_dim=d, kind="key").to(DEVICE, DTYPE)
    v = synthetic_kv(batch, heads, tokens=tokens, head_dim=d, kind="value").to(DEVICE, DTYPE)
    layer.update(k, v)
    mask = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool, device=DEVICE)
    for b, p in enumerate(pad):
        mask[b, ..., :p] = False
    layer.commit(mask)
    return layer


@pytest.mark.parametrize("name, overrides", CONFIGS, ids=IDS)
def test_decode_attention_matches_reference(seed, name, overrides):
    cfg = CompressionConfig.preset(name, **{**SMALL, **overrides})
    layer = _filled_layer(cfg, batch=3, heads=2, tokens=150, d=64, pad=[0, 37, 70])  # GQA 4, two pools, tail
    kv = layer.paged()
    assert [int(n[0]) for _, _, _, n in kv.pools] == [2, 0] and int(kv.tail_len[0]) == 22
    q = torch.randn(3, 8, 64, device=DEVICE, dtype=DTYPE)
    out = gear_decode_attention(q, kv, 0.125)
    ref = decode_attention_reference(q, kv, 0.125)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= ATTN_TOL


def test_rows_beyond_sixteen_and_any_warps(seed):
    """Eight query heads per KV head x four value groups (d=128, groups of 32) need 32 rows of p:
    the padded-rows path, not just the 16 that padding gives for free; with 1, 2 (default), 4 and
    8 warps (on the GPU each is its own compiled layout), while other warp counts are refused."""
    cfg = CompressionConfig.preset("gear_l", **SMALL)
    layer = _filled_layer(cfg, batch=1, heads=1, tokens=100, d=128, pad=[5])
    q = torch.randn(1, 8, 128, device=DEVICE, dtype=DTYPE)
    kv = layer.paged()
    ref = decode_attention_reference(q, kv, 0.088)
    for warps in (1, 2, 4, 8):
        assert _rel(gear_decode_attention(q, kv, 0.088, num_warps=warps), ref) <= ATTN_TOL, warps
    with pytest.raises(ValueError, match="num_warps"):
        gear_decode_attention(q, kv, 0.088, num_warps=3)


GLUON = [("kivi", {}, 4), ("gear_l", {}, 4), ("gear_l", dict(bits=4), 4), ("gear_l", dict(group_size=32, rank=3), 4),
         ("gear_l", dict(rank=3, rank_prefill=3), 4),  # odd rank in 64-token pages: factor rows not 4-byte aligned
         ("gear", {}, 4), ("gear", dict(bits=4, outlier_ratio=0.05), 4),  # outliers: 2 or 6 per row
         ("gear", dict(rank=3, rank_prefill=3, outlier_ratio=0.05), 4),
         ("gear", dict(group_size=32), 2)]  # 4 value groups: a lane's row pair may hold neither outlier's


@pytest.mark.skipif(DEVICE != "cuda", reason="Gluon has no interpreter: its page loop runs on CUDA only "
                    "(on a CPU test_kernels_compile_for_hopper compiles it)")
@pytest.mark.parametrize("name, overrides, gqa", GLUON, ids=[f"{n}-{o}-gqa{g}" for n, o, g in GLUON])
def test_gluon_page_loop_matches_reference(seed, name, overrides, gqa):
    """Gluon's page loop (64-token pages, d=128: the formats it takes) against the reference, with
    left padding, two pools and a tail, for every warp count and tile it covers, and equal to
    Triton's loop."""
    from gear_dist.kernels.decode_attention import gluon_takes

    cfg = CompressionConfig.preset(name, **overrides)
    layer = _filled_layer(cfg, batch=3, heads=2, tokens=420, d=128, pad=[0, 37, 130])
    kv = layer.paged()
    q = torch.randn(3, 2 * gqa, 128, device=DEVICE, dtype=DTYPE)
    ref = decode_attention_reference(q, kv, 0.088)
    triton_out = gear_decode_attention(q, kv, 0.088, page_kernel="triton")
    specs = kv.pools[0][0].specs
    shapes = [(w, t) for w in (1, 2, 4) for t in (64, 32) if gluon_takes(specs["key"], specs["value"], gqa, w, t)]
    assert shapes
    for w, t in shapes:
        out = gear_decode_attention(q, kv, 0.088, num_warps=w, tile_tokens=t, page_kernel="gluon")
        assert torch.isfinite(out).all()
        assert _rel(out, ref) <= ATTN_TOL, (w, t)
        assert _rel(out, triton_out) <= ATTN_TOL, (w, t)


def test_reg_bits_refuses_bits_that_registers_and_lanes_share():
    """The Gluon loop's offsets add a lane part and a register part of each index (lane_reg): exact
    only where registers and lanes own different bits of it, which reg_bits checks at compile time."""
    from types import SimpleNamespace

    gluon_loop = pytest.importorskip("gear_dist.kernels.decode_pages_gluon")
    apart = SimpleNamespace(reg_bases=[[0, 1], [0, 8]], lane_bases=[[0, 2], [0, 4]], warp_bases=[[1, 0]])
    assert gluon_loop.reg_bits(apart, 1) == 9 and gluon_loop.reg_bits(apart, 0) == 0
    shared = SimpleNamespace(reg_bases=[[0, 1], [0, 2]], lane_bases=[[0, 2]], warp_bases=[])
    with pytest.raises(AssertionError, match="share index bits 0x2"):
        gluon_loop.reg_bits(shared, 1)


def test_page_kernel_choice_is_checked(seed):
    cfg = CompressionConfig.preset("gear", **SMALL)  # d=64: too few code words per row for Gluon's loop
    kv = _filled_layer(cfg, batch=1, heads=1, tokens=70, d=64, pad=[0]).paged()
    q = torch.randn(1, 4, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="^page_kernel: 'gluon'"):
        gear_decode_attention(q, kv, 0.125, page_kernel="gluon")
    with pytest.raises(ValueError, match="^page_kernel:"):
        gear_decode_attention(q, kv, 0.125, page_kernel="cuda")


def test_reference_equals_sdpa_on_decompressed_layer(seed):
    cfg = CompressionConfig.preset("gear", **SMALL)
    layer = _filled_layer(cfg, batch=2, heads=2, tokens=100, d=64, pad=[0, 11])
    q = torch.randn(2, 4, 64, device=DEVICE, dtype=DTYPE)
    keys, values = layer.materialize()
    mask = (torch.arange(100, device=DEVICE)[None, :] >= layer.valid_from[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=0.125,
                                                            enable_gqa=True)[:, :, 0]
    assert _rel(decode_attention_reference(q, layer.paged(), 0.125), want) < 1e-3


def test_variable_lengths_per_sequence(seed):
    """The engine's case: sequences with different page counts and tail lengths in one batch."""
    cfg = CompressionConfig.preset("gear", **SMALL)
    pool = PagePool(cfg, 32, cfg.rank, 2, 64, DEVICE)
    pages = [3, 0, 1]
    ids = pool.allocate(sum(pages))
    x = {kind: synthetic_kv(sum(pages), 2, tokens=32, head_dim=64, kind=kind).to(DEVICE) for kind in ("key", "value")}
    pool.write(ids, {kind: compress(x[kind], kind, cfg, cfg.rank) for kind in x})
    table = torch.zeros(3, 3, dtype=torch.int32, device=DEVICE)
    table[0, :3], table[2, :1] = ids[:3].int(), ids[3:].int()
    pos = (torch.arange(3, device=DEVICE) * 32).int().expand(3, 3).contiguous()
    tails = [5, 17, 0]
    tk = torch.randn(3, 2, 31, 64, device=DEVICE, dtype=DTYPE)
    tv = torch.randn_like(tk)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    kv = PagedKV([(pool, table, pos, i32(pages))], tk, tv, i32(tails), i32([p * 32 for p in pages]), i32([0, 0, 0]))
    q = torch.randn(3, 4, 64, device=DEVICE, dtype=DTYPE)
    out = gear_decode_attention(q, kv, 0.125)
    assert _rel(out, decode_attention_reference(q, kv, 0.125)) <= ATTN_TOL


KINDS = ("key", "value")


@pytest.mark.parametrize("name, overrides", CONFIGS, ids=IDS)
def test_compress_kernel_matches_codec(seed, name, overrides):
    """Keys and values in one launch. Codes and statistics as the codec's; the decompressed block as
    close to the input as the codec's (on the GPU the low rank's fp16 products may pick another
    subspace where singular values nearly tie at the rank's cut: one seed in tens, gear_l's values on
    the H100, 2026-11-24; the interpreter keeps the codec's fp32, so on a CPU the two agree)."""
    cfg = CompressionConfig.preset(name, **{**SMALL, **overrides})
    x = {kind: synthetic_kv(3, 2, tokens=32, head_dim=64, kind=kind).to(DEVICE, DTYPE) for kind in KINDS}
    valid = torch.ones(3, 32, dtype=torch.bool, device=DEVICE)
    valid[1, :9] = False
    ref_pool, ker_pool = (PagePool(cfg, 32, cfg.rank, 2, 64, DEVICE, capacity=4) for _ in range(2))
    ids = torch.tensor([2, 0, 3], device=DEVICE)
    ref_pool.write(ids, {kind: compress(x[kind], kind, cfg, cfg.rank, valid[:, None, :]) for kind in KINDS})
    compress_into_pool(x["key"], x["value"], ker_pool, ids, valid)
    real = valid[:, None, :, None].expand(3, 2, 32, 64)
    for kind in KINDS:
        ref, got = ref_pool.read(ids)[kind], ker_pool.read(ids)[kind]
        for part in ("codes", "scale", "zero"):  # the same function: identical codes and statistics
            assert (ref.tensors()[part] != got.tensors()[part]).float().mean() < 0.005, (kind, part)
        got_err = _rel(decompress(got)[real], x[kind][real])
        ref_err = _rel(decompress(ref)[real], x[kind][real])
        assert got_err <= ref_err + 2e-3 and got_err < 1.0, (kind, got_err, ref_err)
        if DEVICE == "cpu":
            assert _rel(decompress(got)[real], decompress(ref)[real]) < 2e-3, kind


def test_compress_kernel_at_any_scale(seed):
    """The kernel scales the residual by a power of two before its products (in fp16 on the GPU):
    a block reaching fp16's largest values is as close to the input as the codec's, as an
    ordinary block is, and a constant block (residual exactly zero, so no scale to find)
    decompresses exactly, no NaN. (Closeness to the input, not to the codec's factors: where two
    singular values nearly tie, fp16 products may pick another basis of the same subspace, as
    good but not equal; one seed in some tens did on the H100.)"""
    cfg = CompressionConfig.preset("gear_l", **SMALL)
    x = {kind: synthetic_kv(3, 2, tokens=32, head_dim=64, kind=kind).to(DEVICE, DTYPE) for kind in KINDS}
    for t in x.values():
        t[0] *= 6e4 / t[0].abs().max()
        t[1] = 0.5
    ref_pool, ker_pool = (PagePool(cfg, 32, cfg.rank, 2, 64, DEVICE, capacity=3) for _ in range(2))
    ids = torch.tensor([1, 2, 0], device=DEVICE)
    ref_pool.write(ids, {kind: compress(x[kind], kind, cfg, cfg.rank) for kind in KINDS})
    compress_into_pool(x["key"], x["value"], ker_pool, ids)
    for kind in KINDS:
        ref = decompress(ref_pool.read(ids)[kind]).float()
        got = decompress(ker_pool.read(ids)[kind]).float()
        assert not got.isnan().any(), kind
        assert torch.equal(got[1], x[kind][1].float()), kind
        for i in (0, 2):
            assert _rel(got[i], x[kind][i].float()) <= _rel(ref[i], x[kind][i].float()) + 2e-3, (kind, i)


def _tiny_model():
    """A two-layer random Llama (4 heads, 2 KV heads, d=64) with gear attention, seeded."""
    torch.manual_seed(0)
    cfg = random_config("llama3-8b", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=256)
    model = AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    use_gear_attention(model)
    return model


def test_the_switch_changes_the_path_taken():
    model = _tiny_model()
    ids = torch.randint(3, 256, (2, 80), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    comp = CompressionConfig.preset("gear", block_size=32, prefill_block_size=64, group_size=32)
    outs, counts = {}, {}
    for mode in ("off", "on"):
        kernels.launches.clear()
        with kernels.kernels_mode(mode):
            outs[mode] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                        pad_token_id=0, past_key_values=GEARCache(model.config, comp))
        counts[mode] = dict(kernels.launches)
    assert counts["off"] == {}
    assert counts["on"]["decode_attention"] == 2 * 11 and counts["on"]["compress"] > 0
    assert (outs["on"] == outs["off"]).float().mean() > 0.95


def test_switch_rejects_unknown_modes():
    with pytest.raises(ValueError, match="^kernels:"):
        kernels.use_kernels("fast")


_COMPILE_SCRIPT = """
import json, sys, torch
from gear_dist.cache import GearLayer
from gear_dist.config import CompressionConfig
from gear_dist.kernels.decode_attention import gear_decode_attention
from gear_dist.kernels.launch import compile_only
out = {}
for name, overrides, dtype in json.loads(sys.argv[1]):
    layer = GearLayer(CompressionConfig.preset(name, **overrides))
    k = torch.randn(2, 2, 330, 128, dtype=getattr(torch, dtype))  # five 64-token pages and a tail
    with compile_only() as compiled:
        before = len(compiled)
        layer.update(k, k.clone())
        layer.commit(None)
        gear_decode_attention(torch.randn(2, 8, 128, dtype=k.dtype), layer.paged(), 0.1)
        out[f"{name}-{overrides}-{dtype}"] = [kernel.name for kernel in compiled[before:]]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """What the interpreter does not check: the compiler's own rules, for sm_90, without a GPU
    (in a fresh process, since kernels defined under TRITON_INTERPRET cannot be compiled)."""
    import json
    import os
    import subprocess
    import sys

    # every branch once: outliers + low rank, 3-bit codes that straddle bytes in bf16 (Triton's page
    # loop); outliers, low rank, codes only, 2 and 4 bits (Gluon's, whose layout assertions hold only if it
    # compiles), 6 value outliers per token (not a power of two: Gluon's loop pads them to 8)
    variants = [("gear", {}, "float16"), ("gear", {"bits": 3}, "bfloat16"), ("kivi", {"bits": 4}, "float16"),
                ("gear_l", {}, "bfloat16"), ("gear", {"bits": 4, "outlier_ratio": 0.05}, "float16")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"GEAR_DIST_KERNELS": "on"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(variants)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(compiled) == len(variants)
    # K and V of the prompt's pages (one launch, or one each with low rank), the page loop, the merge
    for (name, overrides, _), names in zip(variants, compiled.values()):
        pages = "_pages_kernel" if overrides.get("bits") == 3 else "pages_kernel"
        compress = ["_compress_kernel"] * (1 if name == "kivi" else 2)
        assert names == compress + [pages, "_combine_kernel"], names


def test_sass_report_counts_the_widest_loop():
    """The report's parsing on a listing shaped like cuobjdump's: predicates stripped, the loop is
    the span of the widest backward branch (not a short inner one, not a forward branch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sass_report import instructions, main_loop

    listing = "\n".join(f"        /*{addr:04x}*/                   {text} ;  /* 0x0 */" for addr, text in [
        (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "@P0 BRA 0x60"), (0x20, "LOP3.LUT R2, R3, 0x64006400, R4, 0xec, !PT"),
        (0x30, "HMMA.16816.F32 R8, R4, R6, R8"), (0x40, "@!P1 BRA 0x30"), (0x50, "IADD3 R0, R0, 0x1, RZ"),
        (0x60, "@P2 BRA 0x20"), (0x70, "EXIT")])
    code = instructions(listing)
    assert [op for _, op, _ in code] == ["MOV", "BRA", "LOP3.LUT", "HMMA.16816.F32", "BRA", "IADD3", "BRA", "EXIT"]
    assert [addr for addr, _, _ in main_loop(code)] == [0x20, 0x30, 0x40, 0x50, 0x60]
    assert main_loop(code[:2]) == []


def test_compression_profile_attributes_instructions_to_phases():
    """bench/profile_compress.py's bookkeeping: every ``# --`` section of the compression kernel is a
    phase, in source order; an instruction of a helper (no phase of its own) counts towards the phase
    before it; shares of instructions and stall samples sum to 100 per kernel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from profile_compress import SOURCE, phase_of_line, per_phase, phases

    of_line = phase_of_line()
    order = list(dict.fromkeys(of_line[n] for n in sorted(of_line)))
    assert order == ["load", "outliers S", "D", "planar packing", "L", "L, Rayleigh-Ritz", "S, corrections", "launch"]
    helper = SOURCE.read_text().splitlines().index("def _orthonormalize(q, M_PAD: tl.constexpr, COLS: tl.constexpr):")
    assert helper + 2 not in of_line
    ritz = min(n for n, p in of_line.items() if p == "L, Rayleigh-Ritz")
    listing = "\n".join([
        f'\t//## File "{SOURCE}", line {ritz - 1}', "        /*0000*/                   HMMA.16816.F32 R8, R4, R6, R8 ;",
        f'\t//## File "{SOURCE}", line {helper + 2}', "        /*0010*/                   SHFL.BFLY PT, R1, R2, 0x1, 0x1f ;",
        '\t//## File "/x/triton/language/standard.py", line 263', "        /*0020*/                   FADD R1, R1, R2 ;",
        f'\t//## File "{SOURCE}", line {ritz + 1}', "        /*0030*/                   FMUL R1, R1, R2 ;"])
    at = phases(listing, of_line)
    assert at == {0x00: "L", 0x10: "L", 0x20: "L", 0x30: "L, Rayleigh-Ritz"}
    rows = [{"Address": hex(0x7F00 + a), "Instructions Executed": e, "Warp Stall Sampling (All Samples)": s,
             "stall_short_sb": s, "stall_short_sb (Not Issued)": "9"} for a, e, s in
            [(0x00, "2,048", "3"), (0x10, "6144", "5"), (0x20, "0", "0"), (0x30, "8192", "12")]]
    shares = per_phase(rows, at)
    assert [p["phase"] for p in shares] == ["L, Rayleigh-Ritz", "L"]  # most stall samples first
    assert [p["instructions_pct"] for p in shares] == [50.0, 50.0]
    assert [p["samples_pct"] for p in shares] == [60.0, 40.0] and shares[0]["stalls"] == {"short_sb": 100}


@pytest.mark.slow
def test_sass_report_on_the_decode_kernel(tmp_path):
    """bench/sass_report.py end to end for kivi (compiled here for sm_90): the (Gluon) page loop holds the
    tensor-core products and the in-register unpacking (LOP3), and nothing spills to local memory."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "sass_report.py"), "--methods", "kivi",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200, cwd=root)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(next(tmp_path.glob("sass-*.json")).read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["_compress_kernel (keys and values)", "pages_kernel",
                                           "_combine_kernel"]  # kivi: one compression launch; Gluon's page loop
    pages = rows[1]
    assert 0 < pages["loop_instructions"] < pages["instructions"]
    assert {"HMMA", "LOP3"} <= set(pages["loop_top_ops"])
    assert all(r["local_bytes"] == 0 for r in rows)


def test_engine_takes_the_kernel_path_with_the_same_tokens():
    """The engine's decode batch (variable lengths, tails by row) through the kernels."""
    from gear_dist.config import EngineConfig
    from gear_dist.engine import LLMEngine, SamplingParams

    model = _tiny_model()
    comp = CompressionConfig.preset("gear", block_size=32, prefill_block_size=32, group_size=32)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (20, 45, 7)]
    outs, counts = {}, {}
    for mode in ("off", "on"):
        kernels.launches.clear()
        with kernels.kernels_mode(mode):
            engine = LLMEngine(model, None, comp, EngineConfig(max_num_seqs=4, kv_cache_gib=0.01, prefill_chunk=32))
            done = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        outs[mode], counts[mode] = [o.outputs[0].token_ids for o in done], dict(kernels.launches)
    assert counts["off"] == {} and counts["on"]["decode_attention"] > 0 and counts["on"]["compress"] > 0
    agree = sum(a == b for x, y in zip(outs["on"], outs["off"]) for a, b in zip(x, y)) / 90
    assert agree > 0.95


def test_decode_kernel_takes_value_groups_of_any_width():
    """Rows of p carry the value groups, so groups narrower than a run of the tile's columns
    (16 channels at d=64, 2 bits) take the kernel path too; other backbones still fall back."""
    narrow = CompressionConfig.preset("gear", block_size=32, prefill_block_size=32, group_size=16)
    assert kernels.supports(narrow, 32, 64) and kernels.supports(narrow.replace(bits=3), 32, 64)
    assert kernels.supports_compress(narrow, 32, 64)
    assert not kernels.supports(narrow.replace(backbone="kcvt"), 32, 64)


def test_launch_key_tells_apart_what_triton_compiles_for():
    """Launches reuse a compiled kernel under this key, so it must separate every argument property
    Triton specialises on: a tensor's dtype and 16-byte alignment, an int's being 1, a multiple of
    16, or beyond 32 bits."""
    from gear_dist.kernels.launch import specialization

    x = torch.zeros(64, dtype=torch.float16)
    assert specialization((x,)) != specialization((x[1:],))  # 2 bytes off
    assert specialization((x,)) == specialization((x[8:],))  # 16 bytes off: the same code is valid
    assert specialization((x,)) != specialization((torch.zeros(64, dtype=torch.bfloat16),))
    keys = specialization((1, 2, 16, 17, 2**31, True, 1.0))
    assert len(set(keys)) == 6 and keys[1] == keys[3]  # 2 and 17: neither 1 nor a multiple of 16
    assert keys[5] != keys[0] and keys[6] != keys[0]  # a bool or a float is not the int 1


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels are kept only on CUDA (the interpreter has none)")
def test_repeated_launches_reuse_the_compiled_kernel(seed):
    """The second call of the same shapes launches the kept kernels directly, with the same output;
    a misaligned query (another specialisation) gets its own entry and is still right."""
    from gear_dist.kernels import launch as launch_mod

    cfg = CompressionConfig.preset("gear_l", **SMALL)
    layer = _filled_layer(cfg, batch=2, heads=2, tokens=150, d=64, pad=[0, 9])
    kv = layer.paged()
    q = torch.randn(2, 8, 64, device=DEVICE, dtype=DTYPE)
    first = gear_decode_attention(q, kv, 0.125)
    kept = dict(launch_mod._ready)
    assert torch.equal(gear_decode_attention(q, kv, 0.125), first) and launch_mod._ready == kept
    shifted = torch.empty(2 * 8 * 64 + 1, device=DEVICE, dtype=DTYPE)[1:].view(2, 8, 64)  # 2 bytes off
    shifted.copy_(q)
    assert _rel(gear_decode_attention(shifted, kv, 0.125), first) < 1e-6
    assert len(launch_mod._ready) > len(kept)
