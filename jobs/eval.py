"""Quality of one compression config on one model: the harness of gear_dist.evals, as a Hydra job.

    python jobs/eval.py                                   # SmolLM2-135M, 2-bit GEAR, quick tasks
    python jobs/eval.py compression=kivi eval=full        # another config, the committed settings
    python jobs/eval.py model=local model.name=/path/to/llama eval=paper model.device=cuda

Prints the metrics as a table and writes bench/results/quality-<device>-<date>-<config>.json.
"""

from __future__ import annotations

import json
import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from gear_dist import results
from gear_dist.cache import use_gear_attention
from gear_dist.config import Config, register_configs
from gear_dist.evals.harness import evaluate
from gear_dist.models import load

logger = logging.getLogger("eval")
register_configs()


def run(config: Config) -> dict:
    torch.manual_seed(config.eval.seed)
    model, tokenizer = load(config.model)
    use_gear_attention(model)
    metrics = evaluate(model, tokenizer, config.compression, config.eval)
    row = dict(method=config.compression.name, bits=config.compression.bits, model=config.model.name, **metrics)
    return results.record("quality", [row], compression=OmegaConf.to_container(OmegaConf.structured(config.compression)))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config: Config = OmegaConf.to_object(cfg)  # validated dataclasses: bad values fail here
    result = run(config)
    table = Table(title=f"{config.compression.name} on {config.model.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["rows"][0].items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    path = results.write(result, config.results_dir, suffix=config.compression.name)
    print(f"wrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
