"""Where decode attention's time goes, from committed results: the two floors of the device tool's
METHOD.md (bytes over the measured copy bandwidth, FLOPs over the units' rates), the time the SMs
need just to issue the page loop's instructions (bench/sass_report.py), and the measured kernel.

    python bench/roofline.py bench/results/kernels-h100-2026-11-24.json \\
        bench/results/sass-cpu-2026-11-24-sm90-triton3.6.0.json

FLOPs: q.K^T and p.V on the tensor cores (4 B Hq T D), dequantisation as one FMA per K and V
element on the CUDA cores (4 B Hkv T D), the rank-r products (4 B Hq T r). Issue time: every page
(B Hkv T / page tokens) runs the loop once on each of the kernel's warps, and an SM issues at most
one instruction per clock on each of its 4 schedulers. The rates are the H100 SXM datasheet's
(989 TFLOP/s dense fp16 tensor, 67 TFLOP/s fp32, 132 SMs at up to 1.98 GHz): leads, not measurements,
so the issue time is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import math

from kernel_bench import HKV, HQ, D

from gear_dist import results


def floors(row: dict, config: dict, loop: dict, copy_gbps: float, args: argparse.Namespace) -> dict:
    """The floors and the issue time of one decode-timing row, next to its measured kernel time."""
    b, t = row["batch"], row["context"]
    rank = config.get("rank", 0)
    tensor_flops = 4 * b * HQ * t * D
    scalar_flops = 4 * b * HKV * t * D if row["method"] != "fp16" else 0
    lowrank_flops = 4 * b * HQ * t * rank
    flop_ms = (tensor_flops + lowrank_flops) / args.tensor_tflops / 1e9 + scalar_flops / args.fp32_tflops / 1e9
    byte_ms = row["bytes"] / copy_gbps / 1e6
    out = dict(method=row["method"], batch=b, context=t, bytes=row["bytes"],
               gflop=(tensor_flops + scalar_flops + lowrank_flops) / 1e9, byte_floor_ms=byte_ms, flop_floor_ms=flop_ms,
               kernel_ms=row["kernel_ms"], kernel_over_floor=row["kernel_ms"] / max(byte_ms, flop_ms))
    if loop:
        pages = b * HKV * math.ceil(t / config["prefill_block_size"])
        issue_ms = pages * loop["num_warps"] * loop["loop_instructions"] / (args.sms * 4 * args.clock_ghz * 1e6)
        out.update(loop_instructions=loop["loop_instructions"], issue_ms=issue_ms,
                   kernel_over_issue=row["kernel_ms"] / issue_ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", help="a kernels-<device>-<date>.json of bench/kernel_bench.py")
    ap.add_argument("sass", help="a sass-*.json of bench/sass_report.py made with the same Triton")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-ghz", type=float, default=1.98)
    ap.add_argument("--tensor-tflops", type=float, default=989.0)
    ap.add_argument("--fp32-tflops", type=float, default=67.0)
    args = ap.parse_args()
    bench = json.load(open(args.kernels))
    sass = json.load(open(args.sass))
    if bench["versions"].get("triton") != sass["versions"].get("triton"):
        raise SystemExit(f"Triton {bench['versions'].get('triton')} timed, {sass['versions'].get('triton')} "
                         "counted: the code differs between versions")
    loops = {r["method"]: r for r in sass["rows"] if r["kernel"] in ("_pages_kernel", "pages_kernel")}  # Triton | Gluon
    rows = [floors(r, bench["config"].get(r["method"], {}), loops.get(r["method"], {}), bench["copy_gbps"], args)
            for r in bench["rows"] if r.get("kind_of_row") == "decode"]
    print(f"{bench['device']} {bench['date']}, copy {bench['copy_gbps']:.0f} GB/s, "
          f"Triton {sass['versions']['triton']}\n")
    print(results.markdown(rows, ["method", "batch", "context", "bytes", "gflop", "byte_floor_ms", "flop_floor_ms",
                                  "loop_instructions", "issue_ms", "kernel_ms", "kernel_over_floor",
                                  "kernel_over_issue"], digits=3))


if __name__ == "__main__":
    main()
