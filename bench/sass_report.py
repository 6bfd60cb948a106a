"""Machine code of the GPU kernels, compiled on this machine without a GPU: instructions per pass
of each kernel's main loop, registers, spills. What a kernel's time is made of, before (or
without) a device call.

    python bench/sass_report.py --out bench/results   # a table; sass-cpu-<date>-sm90-triton<version>.json

For each method of ``bench/kernel_bench.py`` (GQA 32q/8kv, d=128, 64-token pages) a cache is built on
the CPU and one decode step runs under ``launch.compile_only``: every kernel is compiled for the
target as a real launch with those arguments would be (16-byte alignment, ints equal to 1), then
disassembled with the ``cuobjdump`` Triton ships. Per kernel: all instructions, the instructions of
its main loop (the widest backward branch: one pass per page for decode attention, one power-
iteration step for compression) by opcode, and per-thread registers, stack and local memory.

The compiler decides the code, so the figures hold for the Triton they were made with (recorded
in the result). The H100 machine of the device tool has Triton 3.6; to count its code here:
``pip install --no-deps --target /tmp/t36 triton==3.6.0`` and ``PYTHONPATH=/tmp/t36``.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from kernel_bench import HKV, HQ, METHODS, D

from gear_dist import results
from gear_dist.cache import GearLayer
from gear_dist.kernels import kernels_mode
from gear_dist.kernels.decode_attention import gear_decode_attention
from gear_dist.kernels.launch import compile_only

_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_BRANCH = re.compile(r"BRA\s+(?:`\()?(0x[0-9a-f]+)")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction in a ``cuobjdump -sass`` listing."""
    return [(int(m[1], 16), m[2], m[3]) for m in map(_LINE.match, sass.splitlines()) if m]


def main_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions between the widest backward branch and its target (empty without a loop)."""
    spans = [(int(m[1], 16), addr) for addr, op, rest in code
             if op.startswith("BRA") and (m := _BRANCH.search(op + rest)) and int(m[1], 16) < addr]
    if not spans:
        return []
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return [ins for ins in code if lo <= ins[0] <= hi]


def disassemble(kernel) -> tuple[str, dict[str, int]]:
    """SASS listing and per-thread resources of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack, shared, local = map(int, _USAGE.search(usage).groups())
    return sass, dict(registers=regs, stack_bytes=stack, local_bytes=local, static_shared_bytes=shared)


def report(method: str, arch: int) -> list[dict]:
    """One row per kernel a decode step of ``method`` compiles: the prompt's page compression,
    decode attention over the pages, the merge with the tail."""
    cfg = METHODS[method]
    layer = GearLayer(cfg)
    k = torch.randn(2, HKV, 2 * cfg.prefill_block_size + 7, D, dtype=torch.float16)
    with kernels_mode("on"), compile_only(arch) as compiled:
        before = len(compiled)
        layer.update(k, k.clone())
        layer.commit(None)
        gear_decode_attention(torch.randn(2, HQ, D, dtype=torch.float16), layer.paged(), D**-0.5)
        kernels = compiled[before:]
    rows = []
    for kernel in kernels:
        sass, usage = disassemble(kernel)
        code = instructions(sass)
        loop = main_loop(code)
        ops = collections.Counter(op.split(".")[0] for _, op, _ in loop)
        meta = {kernel.src.fn.arg_names[i]: v for (i,), v in kernel.src.constants.items()}
        role = {"key": " (keys)", "value": " (values)", "both": " (keys and values)"}.get(meta.get("KINDS"), "")
        rows.append(dict(method=method, bits=cfg.bits, kernel=kernel.name + role,
                         num_warps=kernel.metadata.num_warps, instructions=len(code), loop_instructions=len(loop),
                         **usage, loop_top_ops=dict(ops.most_common(12)), constexprs=meta))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [row for method in args.methods for row in report(method, args.arch)]
    result = results.record("sass", rows, arch=f"sm_{args.arch}")
    path = results.write(result, args.out, suffix=f"sm{args.arch}-triton{triton.__version__}")
    print(f"sm_{args.arch}, Triton {triton.__version__}: instructions a warp issues (loop: one pass of the main "
          "loop); registers per thread\n")
    print(results.markdown(rows, ["method", "kernel", "num_warps", "instructions", "loop_instructions", "registers",
                                  "stack_bytes", "local_bytes"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
