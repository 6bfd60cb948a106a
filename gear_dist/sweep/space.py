"""The Tune search space of a sweep: grid points (model x method x field grid) and random draws."""

from __future__ import annotations

import itertools
from typing import Any

from ray import tune

from gear_dist.config import SweepConfig


def grid_points(sweep: SweepConfig, models: dict[str, dict], compressions: dict[str, dict]) -> list[dict[str, Any]]:
    """Every (model, compression) of the sweep as plain dicts. The field grid crosses only the
    compressed methods; fp16 runs once per model, the baseline every ratio is taken against."""
    methods = list(dict.fromkeys(["fp16", *sweep.methods]))  # the baseline is always in the sweep
    keys = list(sweep.grid)
    points = []
    for model in sweep.models:
        for method in methods:
            base = compressions[method]
            combos = [()] if base["bits"] == 16 or not keys else itertools.product(*(sweep.grid[k] for k in keys))
            for values in combos:
                comp = {**base, **dict(zip(keys, values))}
                label = method + "".join(f"-{k}{v}" for k, v in zip(keys, values))
                points.append({"model_name": model, "model": models[model], "method": method, "label": label,
                               "compression": comp})
    return points


def search_space(sweep: SweepConfig, models: dict[str, dict], compressions: dict[str, dict]) -> dict[str, Any]:
    space: dict[str, Any] = {"point": tune.grid_search(grid_points(sweep, models, compressions))}
    if sweep.random:
        space["random"] = {k: tune.choice(v) for k, v in sweep.random.items()}
    return space


def trial_compression(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's compression fields: its grid point plus its random draws (for compressed methods;
    a new block size moves the prompt's blocks with it, so every page keeps one format)."""
    comp = dict(config["point"]["compression"])
    if comp["bits"] != 16:
        comp.update(config.get("random", {}))
        if "block_size" in config.get("random", {}):
            comp["prefill_block_size"] = comp["block_size"]
    return comp
