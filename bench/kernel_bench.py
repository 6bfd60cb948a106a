"""GPU kernel benchmark: GEAR decode attention vs fp16 SDPA, and block compression speed.

One device call: (1) correctness of both kernels against their torch references on fresh random
inputs (relative error <= 1e-2 in fp16, never NaN); (2) decode attention timings (CUDA events
via triton.testing.do_bench, median, L2 flushed) for GQA 32q/8kv, d=128, over batch x context
cases, for 2-bit gear / gear_l / kivi and 4-bit gear, against
``torch.nn.functional.scaled_dot_product_attention`` on fp16 K/V: ``ms`` per call as a caller
sees it (host launch time included: at short contexts the host is slower than the GPU) and
``kernel_ms``, the GPU time of the kernels (CUDA events, median, L2 flushed, the host's launch time
hidden behind the flush), with the bandwidth achieved over the bytes really held next to the
measured device-to-device copy bandwidth; (3) the launcher's knobs on 16 x 16k; (4) compression:
one 64-token block for all heads of a layer at batch 64, and a 16k-token prompt.

    python bench/kernel_bench.py --out bench/results   # prints a table, writes kernels-<device>-<date>.json

(Not named kernels.py: transformers imports any module called ``kernels`` it can find, probing
for the Hugging Face kernels package, and bench/ is on the path of scripts run from it.)
"""

from __future__ import annotations

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from gear_dist import results  # noqa: E402
from gear_dist.cache import GearLayer, PagePool  # noqa: E402
from gear_dist.codec import compress  # noqa: E402
from gear_dist.config import CompressionConfig  # noqa: E402
from gear_dist.evals.synthetic import synthetic_kv  # noqa: E402
from gear_dist.kernels.compress import compress_into_pool  # noqa: E402
from gear_dist.kernels.decode_attention import PagedKV, decode_attention_reference, gear_decode_attention  # noqa: E402,E501

HQ, HKV, D = 32, 8, 128
CASES = [(16, 1024), (16, 4096), (16, 16384), (8, 32768), (64, 4096)]
METHODS = {
    "gear": CompressionConfig.preset("gear"),
    "gear_l": CompressionConfig.preset("gear_l"),
    "kivi": CompressionConfig.preset("kivi"),
    "gear_4bit": CompressionConfig.preset("gear", bits=4).replace(name="gear_4bit"),
}
TAIL = 32  # fp16 tokens not yet compressed (a decode block fills to 64)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.empty(1 << 30, dtype=torch.uint8, device="cuda")


def device_ms(fn, calls: int = 50) -> float:
    """GPU time of what one call launches, median over calls, L2 flushed before each as ``do_bench``
    does. The flush (zeroing 1 GiB, ~0.35 ms) outlasts the host's share of a call, so the call's
    kernels queue up behind it and the CUDA events around them time the GPU alone, from a cold L2."""
    flush = _flush_buffer()
    fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(calls):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (GB/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


def random_pages(cfg: CompressionConfig, pages: int) -> PagePool:
    """A prefill-page pool with random contents of the right format (timing needs no real K/V)."""
    pool = PagePool(cfg, cfg.prefill_block_size, cfg.rank_prefill, HKV, D, "cuda", capacity=pages)
    for kind, parts in pool.storage.items():
        spec = pool.specs[kind]
        for name, t in parts.items():
            if name == "codes":
                t.random_(0, 256)
            elif name == "outlier_index":
                t.random_(0, spec.rows[1])
            elif name == "scale":
                t.uniform_(1e-3, 2e-2)
            else:
                t.normal_(0, 0.1)
    return pool


def paged_cache(cfg: CompressionConfig, batch: int, context: int) -> tuple[PagedKV, int]:
    """A cache of ``context`` tokens per sequence in prefill pages plus an fp16 tail; its bytes."""
    per_seq = context // cfg.prefill_block_size
    pool = random_pages(cfg, batch * per_seq)
    i32 = dict(dtype=torch.int32, device="cuda")
    table = torch.arange(batch * per_seq, **i32).reshape(batch, per_seq)
    pos = (torch.arange(per_seq, **i32) * cfg.prefill_block_size).expand(batch, per_seq).contiguous()
    tk = torch.randn(batch, HKV, TAIL, D, dtype=torch.float16, device="cuda")
    kv = PagedKV([(pool, table, pos, torch.full((batch,), per_seq, **i32))], tk, torch.randn_like(tk),
                 torch.full((batch,), TAIL, **i32), torch.full((batch,), context, **i32), torch.zeros(batch, **i32))
    return kv, pool.nbytes + 2 * tk.numel() * tk.element_size()


def correctness() -> list[dict]:
    """Both kernels against their torch references on real compression of fresh random K/V."""
    rows = []
    for name, cfg in METHODS.items():
        layer = GearLayer(cfg)
        k = synthetic_kv(4, HKV, tokens=2048 + 37, head_dim=D, kind="key").cuda().half()
        v = synthetic_kv(4, HKV, tokens=2048 + 37, head_dim=D, kind="value").cuda().half()
        layer.update(k, v)
        mask = torch.ones(4, 1, 1, 2048 + 37, dtype=torch.bool, device="cuda")
        mask[1, ..., :100] = False  # left padding of one sequence
        layer.commit(mask)  # prefill pages through the compression kernel
        kv = layer.paged()
        q = torch.randn(4, HQ, D, dtype=torch.float16, device="cuda")
        out = gear_decode_attention(q, kv, D**-0.5)
        ref = decode_attention_reference(q, kv, D**-0.5)
        attn_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        x = {"key": k[:, :, :64], "value": v[:, :, :64]}  # compression kernel vs codec on the same decode blocks
        pools = [PagePool(cfg, 64, cfg.rank, HKV, D, "cuda", capacity=4) for _ in range(2)]
        ids = torch.arange(4, device="cuda")
        pools[0].write(ids, {kind: compress(t, kind, cfg, cfg.rank) for kind, t in x.items()})
        compress_into_pool(x["key"], x["value"], pools[1], ids)
        comp_err = 0.0
        for kind in x:
            a, b = (p.read(ids)[kind].decompress(torch.float32) for p in pools)
            comp_err = max(comp_err, ((a - b).norm() / a.norm()).item())
        rows.append(dict(method=name, bits=cfg.bits, check="decode_attention", rel_err=attn_err,
                         nan=bool(torch.isnan(out).any())))
        rows.append(dict(method=name, bits=cfg.bits, check="compress", rel_err=comp_err,
                         nan=bool(torch.isnan(b).any())))
    return rows


def decode_timings(copy_gbps: float) -> list[dict]:
    rows = []
    for batch, context in CASES:
        k = torch.randn(batch, HKV, context + TAIL, D, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(batch, HQ, 1, D, dtype=torch.float16, device="cuda")
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        fp16_ms, fp16_kernel = bench_ms(sdpa), device_ms(sdpa)
        fp16_bytes = 2 * k.numel() * k.element_size()
        rows.append(dict(method="fp16", bits=16, batch=batch, context=context, ms=fp16_ms, kernel_ms=fp16_kernel,
                         fp16_ms=fp16_ms, speedup=1.0, kernel_speedup=1.0, gbps=fp16_bytes / fp16_kernel / 1e6,
                         bytes=fp16_bytes, bits_per_element=16.0,
                         copy_fraction=fp16_bytes / fp16_kernel / 1e6 / copy_gbps))
        for name, cfg in METHODS.items():
            kv, nbytes = paged_cache(cfg, batch, context)
            qd = q[:, :, 0]
            call = lambda: gear_decode_attention(qd, kv, D**-0.5)  # noqa: E731
            ms, kernel = bench_ms(call), device_ms(call)
            gbps = nbytes / kernel / 1e6  # what the kernels achieve; ms also counts the host's launch time
            rows.append(dict(method=name, bits=cfg.bits, batch=batch, context=context, ms=ms, kernel_ms=kernel,
                             fp16_ms=fp16_ms, speedup=fp16_ms / ms, kernel_speedup=fp16_kernel / kernel, gbps=gbps,
                             bytes=nbytes, copy_fraction=gbps / copy_gbps,
                             bits_per_element=8 * nbytes / (2 * batch * HKV * (context + TAIL) * D)))

        torch.cuda.empty_cache()
    return rows


KNOBS = [  # gear_decode_attention's tuning knobs, tried on the 16 x 16k case (the first is the default: Gluon's
    # page loop for both gear_l and gear, with its own warps and programs per SM; page_kernel="triton" the other)
    {}, dict(page_kernel="triton"), dict(programs_per_sm=4), dict(programs_per_sm=8), dict(programs_per_sm=16),
    dict(programs_per_sm=64), dict(num_warps=1), dict(num_warps=2), dict(num_warps=4), dict(tile_tokens=32),
    dict(tile_tokens=64), dict(num_stages=1), dict(num_stages=2), dict(maxnreg=128), dict(maxnreg=168),
    dict(maxnreg=152, programs_per_sm=13), dict(maxnreg=128, programs_per_sm=16),  # more one-warp programs per SM
]


def tuning() -> list[dict]:
    """The launcher's knobs on the 16 x 16k case (register use caps how many programs an SM holds)."""
    rows = []
    for name in ("gear_l", "gear"):
        kv, nbytes = paged_cache(METHODS[name], 16, 16384)
        q = torch.randn(16, HQ, D, dtype=torch.float16, device="cuda")
        for knobs in KNOBS:
            call = lambda: gear_decode_attention(q, kv, D**-0.5, **knobs)  # noqa: E731,B023
            ms, kernel = bench_ms(call), device_ms(call)
            rows.append(dict(method=name, batch=16, context=16384, knobs=json.dumps(knobs), ms=ms,
                             kernel_ms=kernel, gbps=nbytes / kernel / 1e6))
    return rows


KNOBS_COMPRESS = [dict(maxnreg=0), dict(maxnreg=128), dict(num_warps=8), dict(num_warps=2)]  # maxnreg 0: the compiler's


def compression_timings(decode_rows: list[dict]) -> list[dict]:
    """One decode block (64 tokens) for all heads of a layer at batch 64 through the kernel, vs
    that layer's decode attention at 64 x 4k; and a 16k-token prompt into prefill pages (torch
    codec on the GPU: a 256 x 128 page does not fit the kernel's registers and shared memory)."""
    rows = []
    attn = {r["method"]: r["ms"] for r in decode_rows if (r["batch"], r["context"]) == (64, 4096)}
    kernel_attn = {r["method"]: r["kernel_ms"] for r in decode_rows if (r["batch"], r["context"]) == (64, 4096)}
    for name, cfg in METHODS.items():
        x = {kind: synthetic_kv(64, HKV, tokens=cfg.block_size, head_dim=D, kind=kind).cuda().half()
             for kind in ("key", "value")}
        pool = PagePool(cfg, cfg.block_size, cfg.rank, HKV, D, "cuda", capacity=64)
        ids = torch.arange(64, device="cuda")
        call = lambda: compress_into_pool(x["key"], x["value"], pool, ids)  # noqa: E731
        ms, kernel = bench_ms(call), device_ms(call)
        torch_ms = bench_ms(lambda: [compress(x[kind], kind, cfg, cfg.rank) for kind in x])
        rows.append(dict(method=name, bits=cfg.bits, case="decode_block", batch=64, new_tokens=cfg.block_size, ms=ms,
                         kernel_ms=kernel, torch_ms=torch_ms, tok_s=64 * cfg.block_size / ms * 1e3,
                         attention_ms=attn[name], fraction_of_attention=ms / attn[name],
                         kernel_fraction_of_attention=kernel / kernel_attn[name],
                         fraction_of_fp16_attention=ms / attn["fp16"]))
        for knobs in KNOBS_COMPRESS:  # GPU time only
            kernel = device_ms(lambda: compress_into_pool(x["key"], x["value"], pool, ids, **knobs))  # noqa: B023
            rows.append(dict(method=name, bits=cfg.bits, case=f"decode_block {json.dumps(knobs)}", batch=64,
                             new_tokens=cfg.block_size, kernel_ms=kernel,
                             kernel_fraction_of_attention=kernel / kernel_attn[name]))
        pages = 16384 // cfg.prefill_block_size
        xp = {kind: synthetic_kv(pages, HKV, tokens=cfg.prefill_block_size, head_dim=D, kind=kind).cuda().half()
              for kind in ("key", "value")}
        torch_ms = bench_ms(lambda: [compress(xp[kind], kind, cfg, cfg.rank_prefill) for kind in xp])
        rows.append(dict(method=name, bits=cfg.bits, case="prefill_16k", batch=1, new_tokens=16384, ms=torch_ms,
                         torch_ms=torch_ms, tok_s=16384 / torch_ms * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="decode timings only (a kernel change's first look)")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth()
    checks = [] if args.quick else correctness()
    decode = decode_timings(copy_gbps)
    tune = [] if args.quick else tuning()
    comp = [] if args.quick else compression_timings(decode)
    for r in decode:
        r["kind_of_row"] = "decode"
    for r in comp:
        r["kind_of_row"] = "compress"
    for r in checks:
        r["kind_of_row"] = "check"
    for r in tune:
        r["kind_of_row"] = "tuning"
    result = results.record("kernels", checks + decode + tune + comp, copy_gbps=copy_gbps,
                            config={n: vars(c) for n, c in METHODS.items()})
    path = results.write(result, args.out)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s\n")
    print(results.markdown(checks, ["method", "bits", "check", "rel_err", "nan"]))
    print()
    print(results.markdown(decode, ["method", "bits", "batch", "context", "ms", "speedup", "kernel_ms",
                                    "kernel_speedup", "gbps", "copy_fraction", "bits_per_element"]))
    print()
    print(results.markdown(tune, ["method", "knobs", "ms", "kernel_ms", "gbps"]))
    print()
    print(results.markdown(comp, ["method", "case", "batch", "new_tokens", "ms", "kernel_ms", "torch_ms", "tok_s",
                                  "fraction_of_attention", "kernel_fraction_of_attention",
                                  "fraction_of_fp16_attention"]))
    print(f"\nwrote {path}")
    ok = all(r["rel_err"] <= 1e-2 and not r["nan"] for r in checks)
    print(json.dumps({"correct": ok, "path": str(path)}))
    if not ok or any(math.isnan(r["ms"]) for r in decode):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
