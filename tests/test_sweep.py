"""Sweeps: the search space, the report, a tiny sweep through Ray Tune with W&B offline, and a
`ray job submit` against a `ray start --head` cluster this test starts and stops itself."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from gear_dist.config import CompressionConfig, SweepConfig
from gear_dist.sweep.report import pareto_front, with_ratios, write_report
from gear_dist.sweep.space import grid_points, trial_compression

ROOT = Path(__file__).resolve().parents[1]
COMP = {n: vars(CompressionConfig.preset(n)) for n in ("fp16", "kivi", "gear")}
MODELS = {"m": {"name": "m"}}


def test_grid_crosses_compressed_methods_and_always_has_the_baseline():
    sweep = SweepConfig(models=["m"], methods=["gear"], grid={"bits": [2, 4], "rank": [1, 2]})
    points = grid_points(sweep, MODELS, COMP)
    labels = [p["label"] for p in points]
    assert labels == ["fp16", "gear-bits2-rank1", "gear-bits2-rank2", "gear-bits4-rank1", "gear-bits4-rank2"]
    assert points[4]["compression"]["bits"] == 4 and points[4]["compression"]["rank"] == 2
    drawn = trial_compression({"point": points[1], "random": {"block_size": 128, "outlier_ratio": 0.01}})
    assert drawn["block_size"] == drawn["prefill_block_size"] == 128 and drawn["outlier_ratio"] == 0.01
    assert trial_compression({"point": points[0], "random": {"block_size": 128}})["block_size"] == 64  # fp16 untouched
    with pytest.raises(ValueError, match="^grid: unknown compression fields"):
        SweepConfig(grid={"bitz": [2]})


def test_ratios_pareto_and_report_files(tmp_path):
    rows = [dict(method="fp16", label="fp16", model="m", bits=16, bits_per_element=16.0, kl=0.0, ppl=10.0,
                 tok_s_b1=10.0, kv_capacity_tokens=100, peak_gib_b1=float("nan")),
            dict(method="kivi", label="kivi", model="m", bits=2, bits_per_element=2.5, kl=0.3, ppl=12.0,
                 tok_s_b1=11.0, kv_capacity_tokens=600, peak_gib_b1=float("nan")),
            dict(method="gear", label="gear", model="m", bits=2, bits_per_element=4.2, kl=0.1, ppl=11.0,
                 tok_s_b1=9.0, kv_capacity_tokens=380, peak_gib_b1=float("nan")),
            dict(method="gear", label="bad", model="m", bits=3, bits_per_element=5.0, kl=0.2, ppl=11.5,
                 tok_s_b1=9.0, kv_capacity_tokens=300, peak_gib_b1=float("nan"))]
    df = with_ratios(pd.DataFrame(rows))
    assert df.loc[1, "ppl_vs_fp16"] == pytest.approx(1.2) and df.loc[2, "kv_capacity_tokens_vs_fp16"] == 3.8
    assert list(pareto_front(df, "bits_per_element", "kl")["label"]) == ["kivi", "gear", "fp16"]
    paths = write_report(rows, tmp_path)
    assert pd.read_parquet(paths["parquet"]).shape[0] == 4 and "ppl_vs_fp16" in pd.read_csv(paths["csv"]).columns
    assert "| gear |" in paths["markdown"].read_text()
    assert paths["pareto"].stat().st_size > 10_000 and paths["throughput"].stat().st_size > 10_000


def _sweep_args(tmp_path: Path) -> list[str]:
    return ["jobs/sweep.py", "sweep=tiny", "eval=smoke", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]


def _wandb_history(path: Path) -> dict[str, float]:
    """Last logged value of every history key in an offline ``.wandb`` run file: a LevelDB-style
    log (7-byte header; 32 KiB blocks of records: crc32, length, type; W&B protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, out = 7, 32768, [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7: pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            if rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def _check_sweep_outputs(run_dir: Path) -> None:
    report = run_dir / "report"
    df = pd.read_csv(report / "results.csv")
    assert sorted(df["method"]) == ["fp16", "gear", "kivi"]
    assert df["kl"].notna().all() and (df.loc[df.method != "fp16", "kl"] > 0).all()
    assert (df.loc[df.method == "gear", "bits_per_element"] > df.loc[df.method == "kivi", "bits_per_element"].max()).all()
    assert "tok_s_b2_vs_fp16" in df.columns and (report / "pareto.png").stat().st_size > 10_000
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3  # one offline W&B run per trial, holding the trial's metrics
    logged = {}
    for path in runs:
        history = _wandb_history(path)
        assert {"kl", "ppl", "bits_per_element", "tok_s_b2"} <= set(history)
        logged[history["method"] if "method" in history else path.name] = history
    assert {round(h["kl"], 6) for h in logged.values()} == {round(k, 6) for k in df["kl"]}


@pytest.mark.slow
def test_tiny_sweep_through_tune_with_wandb_offline(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run([sys.executable, *_sweep_args(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["trials"] == 3
    _check_sweep_outputs(tmp_path / "sweeps" / "tiny")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_head_node(tmp_path):
    """`ray start --head --block` in its own process group, stopped by signalling that group. Its
    temp dir is short: Ray's socket paths must fit the 107-byte AF_UNIX limit."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # Ray 2.60 enables token auth by default
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=3",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={temp_dir}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dash}"
        for _ in range(120):  # the job API answers once the dashboard is up
            if subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(1)
        job = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                              sys.executable, *_sweep_args(tmp_path)],
                             env=env, capture_output=True, text=True, timeout=1500)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-4000:]
        _check_sweep_outputs(tmp_path / "sweeps" / "tiny")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
