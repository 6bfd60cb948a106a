"""A Ray Tune sweep over compression configs: quality and throughput per trial, W&B and a report.

    python jobs/sweep.py                                  # the quick sweep: SmolLM2 on CPU, local Ray, W&B offline
    python jobs/sweep.py sweep=gear_grid wandb.mode=online
    RAY_AUTH_MODE=disabled ray start --head
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py sweep=bits_vs_rank

Each trial (gear_dist.sweep.trainable) runs the quality harness against the fp16 cache and the
engine's throughput; the fp16 baseline is always one of the trials, and the report gives every
metric also as a ratio to it. Results land in <results_dir>/sweeps/<name>/ (Tune's experiment,
resumable), with report/ (CSV, parquet, markdown, PNG plots) and wandb/ (offline runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import hydra
import ray
from hydra import compose
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback

from gear_dist import results
from gear_dist.config import Config, register_configs
from gear_dist.evals.harness import with_absolute_paths
from gear_dist.serve.app import config_to_dict
from gear_dist.sweep.report import write_report
from gear_dist.sweep.space import search_space
from gear_dist.sweep.trainable import run_trial, trial_resources

logger = logging.getLogger("sweep")
TUNE_FIELDS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
               "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore"}
register_configs()


def option(group: str, name: str) -> dict:
    """A conf/<group>/<name>.yaml option, validated, as a plain dict (what trials receive)."""
    return config_to_dict(OmegaConf.to_object(compose("config", [f"{group}={name}"])))[group]


def callbacks(config: Config, run_dir: Path) -> list:
    w = config.wandb
    if w.mode == "disabled":
        return []
    wandb_dir = Path(w.dir or run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    if w.mode == "offline":  # Ray asks for an API key unless the mode says none is needed
        os.environ["WANDB_MODE"] = "offline"
    return [WandbLoggerCallback(project=w.project, group=w.group or config.sweep.name, tags=w.tags or None,
                                mode=w.mode, dir=str(wandb_dir), log_config=True)]


def _trial_dir(trial) -> str:
    return f"{trial.trial_id}-{trial.config['point']['label']}"


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config: Config = OmegaConf.to_object(cfg)
    config = dataclasses.replace(config, eval=with_absolute_paths(config.eval))  # trials run elsewhere
    sweep = config.sweep
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    models = {m: option("model", m) for m in sweep.models}
    compressions = {c: option("compression", c) for c in dict.fromkeys(["fp16", *sweep.methods])}
    storage = Path(sweep.storage or Path(config.results_dir) / "sweeps").resolve()
    run_dir = storage / sweep.name
    tp = max(m["tp"] for m in models.values())
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=config_to_dict(config)),
                                    trial_resources(sweep.cpus_per_trial, sweep.gpus_per_trial, tp))
    if sweep.resume and tune.Tuner.can_restore(str(run_dir)):
        logger.info("resuming %s", run_dir)
        tuner = tune.Tuner.restore(str(run_dir), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space(sweep, models, compressions),
                           tune_config=tune.TuneConfig(num_samples=sweep.num_samples,
                                                       max_concurrent_trials=sweep.max_concurrent_trials,
                                                       trial_dirname_creator=_trial_dir),
                           run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage),
                                                     callbacks=callbacks(config, run_dir)))
    grid = tuner.fit()
    rows = [{k: v for k, v in r.metrics.items() if k not in TUNE_FIELDS} for r in grid if r.metrics and "label" in r.metrics]
    errors = [str(r.error) for r in grid if r.error]
    paths = write_report(rows, run_dir / "report")
    result = results.record("sweep", rows, sweep=sweep.name, errors=errors, report=str(paths["markdown"]))
    results.write(result, run_dir / "report", suffix=sweep.name)
    print(paths["markdown"].read_text())
    print(f"trials: {len(rows)} finished, {len(errors)} failed")
    print(f"table:  {paths['markdown']} (also {paths['csv'].name}, {paths['parquet'].name})")
    print(f"plots:  {paths['pareto']}  {paths['throughput']}")
    if config.wandb.mode != "disabled":
        print(f"W&B:    {Path(config.wandb.dir or run_dir) / 'wandb'} ({config.wandb.mode}; `wandb sync` uploads offline runs)")
    print(json.dumps({"trials": len(rows), "failed": len(errors), "report": str(paths["markdown"])}))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
