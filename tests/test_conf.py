"""The Hydra config tree: every option composes, validates and mirrors the library's presets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gear_dist.config import PRESETS, CompressionConfig, Config, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("config", list(overrides)))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "compression").glob("*.yaml")))
def test_compression_options_validate(option):
    cfg = _compose(f"compression={option}").compression
    assert cfg.name == option
    if option in PRESETS:
        assert cfg == CompressionConfig.preset(option)


@pytest.mark.parametrize("group", ["model", "eval"])
def test_other_options_validate(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        if path.stem == "local":
            with pytest.raises(ValueError, match="^name: must be set"):
                _compose(f"{group}={path.stem}")
            assert _compose("model=local", "model.name=/some/path").model.source == "pretrained"
        else:
            _compose(f"{group}={path.stem}")


@pytest.mark.parametrize("override, field", [("compression.bits=5", "bits"), ("eval.ppl_prefix=5000", "ppl_prefix"),
                                              ("model.source=hub", "source"), ("eval.tasks=[ppl,mmlu]", "tasks")])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        _compose(override)


def test_misspelt_key_fails_at_startup():
    with pytest.raises(Exception, match="bitz"):
        _compose("compression.bitz=3")


@pytest.mark.slow
def test_eval_job_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "jobs/eval.py", "model=smollm2_4layers", "eval=smoke", "compression=gear",
                          f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "quality" and result["device"] == "cpu"
    assert {"date", "command", "versions", "rows"} <= set(result)
    row = result["rows"][0]
    assert row["method"] == "gear" and 0 < row["rel_err_k"] < 1 and row["ppl"] > 1
    assert list(tmp_path.glob("quality-cpu-*-gear.json"))
