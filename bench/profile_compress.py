"""Where block compression's GPU time goes, from the hardware counters (Nsight Compute).

    python bench/profile_compress.py --out bench/results   # gear gear_l kivi gear_4bit

Runs itself under ``ncu`` (``--clock-control none``: the clocks the benchmarks run at), one batch-64
decode block per method as bench/kernel_bench.py times it, compiled and warmed up outside the
profiled range. Per kernel: duration, warp instructions, issue slots busy, registers, spill
requests. Per phase of ``_compress_block`` (its ``# --`` sections: outlier picks, statistics and
codes, packing, subspace iteration, Rayleigh-Ritz, outlier corrections): the share of the
instructions executed and of the warp stall samples, with the leading stall reasons. An
instruction of a helper (orthonormalisation, Triton's reductions) counts towards the phase whose
code precedes it in the binary; lines come from ``nvdisasm`` on the launched kernels' cubins.
Prints a table and writes ``profile-<device>-<date>-compress.json``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from kernel_bench import HKV, METHODS, D
from sass_report import _tool

from gear_dist import results
from gear_dist.cache import PagePool
from gear_dist.evals.synthetic import synthetic_kv
from gear_dist.kernels import compress, launch

SOURCE = Path(compress.__file__)
_SECTION = re.compile(r"^\s*# -- ([^:]+):")
_LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s")
KERNEL_METRICS = {  # ncu's name -> ours
    "Duration": "duration_us", "Executed Instructions": "warp_instructions", "Issue Slots Busy": "issue_busy_pct",
    "Warp Cycles Per Issued Instruction": "cycles_per_instruction", "Registers Per Thread": "registers",
    "Local Memory Spilling Requests": "spill_requests", "Achieved Occupancy": "occupancy_pct",
    "SM Frequency": "sm_ghz", "SM Active Cycles": "active_cycles",
}


def run_blocks(methods: list[str], batch: int, cubins: Path) -> None:
    """Compress a block per method, warmed up, then once more inside the profiler's range; writes
    each launched kernel's cubin and ``kernels.json`` (method, kinds per launch, in launch order)."""
    calls, kernels = [], []
    for name in methods:
        cfg = METHODS[name]
        x = {kind: synthetic_kv(batch, HKV, tokens=cfg.block_size, head_dim=D, kind=kind).cuda().half()
             for kind in ("key", "value")}
        pool = PagePool(cfg, cfg.block_size, cfg.rank, HKV, D, "cuda", capacity=batch)
        ids = torch.arange(batch, device="cuda")
        calls.append(lambda x=x, pool=pool, ids=ids: compress.compress_into_pool(x["key"], x["value"], pool, ids))
        before = list(launch._ready)
        calls[-1]()  # compiles: the launch keys it adds are this method's kernels, in launch order
        for key in [k for k in launch._ready if k not in before]:
            kernel = launch._ready[key][0]
            (cubins / f"{len(kernels)}.cubin").write_bytes(kernel.asm["cubin"])
            kernels.append(dict(method=name, kinds=dict(key[2])["KINDS"]))
    (cubins / "kernels.json").write_text(json.dumps(kernels))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def phase_of_line() -> dict[int, str]:
    """Line of compress.py -> phase: the ``# --`` section of ``_compress_block`` it is in ("load"
    before the first), "launch" in ``_compress_kernel``; helpers' lines are absent."""
    lines = SOURCE.read_text().splitlines()
    out, phase, owner = {}, None, None
    for number, text in enumerate(lines, 1):
        if text.startswith("def "):
            owner = text[4:text.index("(")]
            phase = "load" if owner == "_compress_block" else "launch" if owner == "_compress_kernel" else None
        elif text.startswith(("@", "class ")):
            owner = phase = None
        elif owner == "_compress_block" and (m := _SECTION.match(text)):
            phase = m[1].strip()
        if phase is not None:
            out[number] = phase
    return out


def phases(listing: str, of_line: dict[int, str]) -> dict[int, str]:
    """Instruction offset -> phase, from a kernel's ``nvdisasm -g`` listing (its line info)."""
    out, line, phase = {}, None, "launch"
    for text in listing.splitlines():
        if m := _LINE_INFO.search(text):
            line = int(m[2]) if Path(m[1]).name == SOURCE.name else None
        elif m := _INSTRUCTION.match(text):
            phase = of_line.get(line, phase)  # helpers' and library lines: the phase before them
            out[int(m[1], 16)] = phase
    return out


def _number(cell: str) -> float:
    return float(cell.replace(",", "")) if cell not in ("", "-") else 0.0


def per_phase(rows: list[dict[str, str]], phase_at: dict[int, str]) -> list[dict]:
    """Shares of instructions and stall samples per phase, from ncu's per-instruction rows."""
    start = int(rows[0]["Address"], 16)
    executed, samples = collections.Counter(), collections.Counter()
    stalls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        phase = phase_at[int(row["Address"], 16) - start]
        executed[phase] += _number(row["Instructions Executed"])
        samples[phase] += _number(row["Warp Stall Sampling (All Samples)"])
        for name, cell in row.items():
            if name.startswith("stall_") and not name.endswith(")"):
                stalls[phase][name.removeprefix("stall_")] += _number(cell)
    total_e, total_s = sum(executed.values()), sum(samples.values())
    return [dict(phase=phase, instructions_pct=100 * executed[phase] / total_e, samples_pct=100 * samples[phase] / total_s,
                 stalls={k: round(100 * v / max(sum(stalls[phase].values()), 1)) for k, v in stalls[phase].most_common(3)})
            for phase in sorted(executed, key=lambda p: -samples[p])]


def profile(methods: list[str], batch: int) -> list[dict]:
    """One row per kernel launched, with its phases."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([ncu, "--profile-from-start", "off", "--clock-control", "none", "--set", "full",
                        "-o", str(work / "report"), sys.executable, __file__, "--run", str(work),
                        "--batch", str(batch), *methods], check=True, stdout=subprocess.DEVNULL)
        report = str(work / "report.ncu-rep")
        page = lambda *a: subprocess.run([ncu, "-i", report, "--csv", *a], capture_output=True, text=True,  # noqa: E731
                                         check=True).stdout
        details = list(csv.DictReader(io.StringIO(page("--page", "details"))))
        source = page("--page", "source", "--print-source", "sass").split('"Kernel Name",')[1:]
        kernels = json.loads((work / "kernels.json").read_text())
        of_line = phase_of_line()
        out = []
        for i, (kernel, block) in enumerate(zip(kernels, source)):
            metrics = {KERNEL_METRICS[r["Metric Name"]]: _number(r["Metric Value"])
                       for r in details if int(r["ID"]) == i and r["Metric Name"] in KERNEL_METRICS}
            rows = list(csv.DictReader(io.StringIO(block.split("\n", 1)[1])))
            out.append(dict(**kernel, **metrics, instructions_per_warp=metrics["warp_instructions"] / _warps(details, i),
                            phases=per_phase(rows, phases(_listing(work / f"{i}.cubin"), of_line))))
    return out


def _listing(cubin: Path) -> str:
    return subprocess.run([_tool("nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def _warps(details: list[dict[str, str]], i: int) -> int:
    """Warps launched by kernel ``i``: grid times block over 32."""
    row = next(r for r in details if int(r["ID"]) == i)
    return math.prod(int(n) for n in re.findall(r"\d+", row["Grid Size"] + row["Block Size"])) // 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="*", default=["gear", "gear_l", "kivi", "gear_4bit"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # inside ncu: launch, write cubins there
    args = ap.parse_args()
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise ValueError(f"methods: {bad} are not among {sorted(METHODS)}")
    if args.run:
        run_blocks(args.methods, args.batch, args.run)
        return
    rows = profile(args.methods, args.batch)
    path = results.write(results.record("profile", rows, batch=args.batch, tool="ncu --set full --clock-control none"),
                         args.out, suffix="compress")
    print(results.markdown(rows, ["method", "kinds", "duration_us", "instructions_per_warp", "issue_busy_pct",
                                  "cycles_per_instruction", "registers", "spill_requests"]))
    for row in rows:
        print(f"\n{row['method']} {row['kinds']}:")
        print(results.markdown(row["phases"], ["phase", "instructions_pct", "samples_pct", "stalls"], digits=3))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
