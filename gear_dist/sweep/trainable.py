"""One sweep trial, a plain function (Tune's function API): quality harness + throughput."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ray import tune

from gear_dist.config import CompressionConfig, ModelConfig
from gear_dist.sweep.space import trial_compression

logger = logging.getLogger(__name__)


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Measure one (model, compression): the quality harness (gear_dist.evals) against the
    model's own fp16 cache, then engine throughput at each of the sweep's batch sizes."""
    import torch

    from gear_dist.cache import use_gear_attention
    from gear_dist.engine import LLMEngine
    from gear_dist.engine.benchmark import engine_throughput, random_prompts
    from gear_dist.evals.harness import evaluate
    from gear_dist.models import load
    from gear_dist.serve.app import config_from_dict

    cfg = config_from_dict(base)
    sweep = cfg.sweep
    comp = CompressionConfig(**trial_compression(config))
    model_cfg = ModelConfig(**config["point"]["model"])
    metrics: dict[str, Any] = {"method": config["point"]["method"], "label": config["point"]["label"],
                               "model": model_cfg.name, "bits": comp.bits}
    if model_cfg.tp > 1:
        raise ValueError("model: sweep trials run one-device models; use jobs/bench.py for tensor-parallel throughput")
    model, tokenizer = load(model_cfg)
    use_gear_attention(model)
    torch.manual_seed(cfg.eval.seed)
    metrics.update(evaluate(model, tokenizer, comp, cfg.eval))
    metrics["compression_ratio"] = 16.0 / metrics["bits_per_element"] if metrics.get("bits_per_element") else 1.0

    vocab = model.config.get_text_config(decoder=True).vocab_size
    engine_cfg = dataclasses.replace(cfg.engine, max_num_seqs=max(sweep.batches),
                                     max_model_len=sweep.prompt_len + sweep.new_tokens)
    engine = LLMEngine(model, tokenizer, comp, engine_cfg)
    for batch in sweep.batches:
        r = engine_throughput(engine, random_prompts(batch, sweep.prompt_len, vocab, cfg.eval.seed), sweep.new_tokens)
        metrics.update({f"tok_s_b{batch}": r["tok_s"], f"ttft_ms_b{batch}": r["ttft_ms"],
                        f"tpot_ms_b{batch}": r["tpot_ms"], f"peak_gib_b{batch}": r["peak_gib"]})
    stats = engine.stats()
    metrics["kv_capacity_tokens"] = stats.kv_capacity_tokens
    metrics["kv_gib"] = stats.kv_bytes_capacity / 2**30
    tune.report(metrics)


def trial_resources(cpus: int, gpus: int, tp: int):
    """One bundle for the trial (CPU, or its GPU); a tensor-parallel model adds one bundle per rank."""
    from ray.tune import PlacementGroupFactory

    bundles = [{"CPU": cpus, "GPU": gpus if tp == 1 else 0}]
    bundles += [{"CPU": 1, "GPU": gpus}] * (tp if tp > 1 else 0)
    return PlacementGroupFactory(bundles)
