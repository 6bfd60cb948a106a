"""Offline throughput of the engine: fp16 vs kivi vs gear (and HF generate) in one run.

    python jobs/bench.py bench=smoke model=tiny_llama               # seconds on a CPU
    python jobs/bench.py model=llama3_8b engine.gpu_memory_fraction=0.9   # the H100 figure

N prompts of random token ids (random weights are fine: speed and memory only) go through a fresh
engine per method, each given the same memory (a fraction of what is free after the model
loads); ``bench.num_prompts=0`` sends each method as many as its memory holds at once (up to
``bench.max_num_seqs``). Prints a table and writes bench/results/engine-<device>-<date>.json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from gear_dist import results
from gear_dist.cache import use_gear_attention
from gear_dist.config import CompressionConfig, Config, register_configs
from gear_dist.engine import LLMEngine
from gear_dist.engine.benchmark import engine_throughput, hf_generate_throughput, random_prompts
from gear_dist.engine.build import build_engine
from gear_dist.models import load, load_config

logger = logging.getLogger("bench")
register_configs()
COLUMNS = ["method", "bits", "tok_s", "ttft_ms", "tpot_ms", "max_concurrent", "max_batch", "peak_gib",
           "kv_capacity_tokens", "preemptions", "wall_s"]


def compression(name: str) -> CompressionConfig:
    """A conf/compression option by name (so the bench runs exactly what serving would)."""
    return OmegaConf.to_object(compose("config", [f"compression={name}"])).compression


def engines(config: Config, engine_cfg):
    """(method, compression, engine, model) for each method: one model load at tp = 1."""
    b = config.bench
    if config.model.tp == 1:
        model, tokenizer = load(config.model)
        use_gear_attention(model)
        for name in b.methods:
            comp = compression(name)
            yield name, comp, LLMEngine(model, tokenizer, comp, engine_cfg), model
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return
    for name in b.methods:  # a fresh group per method, so each gets the same free memory
        comp = compression(name)
        engine = build_engine(dataclasses.replace(config, engine=engine_cfg, compression=comp))
        try:
            yield name, comp, engine, None
        finally:
            engine.core.worker.shutdown()


def _pages_per_seq(b, block: int) -> int:
    """KV pages one request of the benchmark needs: prompt + output, rounded up to pages."""
    return -(-(b.prompt_len + b.new_tokens) // block)


def run(config: Config, on_row=lambda rows: None) -> dict:
    """All methods; ``on_row(rows)`` after each (the job writes partial results as it goes)."""
    b = config.bench
    engine_cfg = dataclasses.replace(config.engine, max_num_seqs=b.max_num_seqs,
                                     max_model_len=b.prompt_len + b.new_tokens)
    vocab = load_config(config.model).get_text_config(decoder=True).vocab_size
    rows, model = [], None
    for name, comp, engine, model in engines(config, engine_cfg):
        pages = engine.core.scheduler.allocator.capacity
        count = b.num_prompts or min(b.max_num_seqs, pages // _pages_per_seq(b, engine.core.scheduler.block))
        row = engine_throughput(engine, random_prompts(count, b.prompt_len, vocab, b.seed), b.new_tokens)
        row.update(kv_pages=pages, block=engine.core.scheduler.block)
        if config.model.tp > 1:
            mem = engine.core.worker.memory()
            row["peak_gib"] = max((m.get("peak_gib", float("nan")) for m in mem), default=float("nan"))
            row["peak_gib_per_rank"] = [m.get("peak_gib") for m in mem]
        rows.append(dict(method=name, bits=comp.bits, model=config.model.name, tp=config.model.tp,
                         prompt_len=b.prompt_len, new_tokens=b.new_tokens, batch=row["max_concurrent"], **row))
        logger.info("%s: %.1f tok/s, %d concurrent", name, row["tok_s"], row["max_concurrent"])
        on_row(rows)
        del engine
    if b.hf_baseline and model is not None:
        row = hf_generate_throughput(model, b.prompt_len, b.hf_new_tokens, b.hf_batches, b.seed)
        rows.append(dict(method="hf_fp16", bits=16, model=config.model.name, prompt_len=b.prompt_len,
                         new_tokens=b.hf_new_tokens, batch=row.get("max_concurrent", 0), **row))
    return _record(config, rows)


def _record(config: Config, rows: list[dict]) -> dict:
    """The result; ratios to the fp16 engine where it ran, and the largest batch the KV
    memory holds at this prompt + output length."""
    b = config.bench
    base = next((r for r in rows if r["method"] == "fp16"), None)
    for r in rows:
        if "kv_pages" in r:
            r["max_batch"] = int(r["kv_pages"] // _pages_per_seq(b, r["block"]))
        if base and base["tok_s"]:
            r["speedup_vs_fp16"] = r["tok_s"] / base["tok_s"]
            r["concurrency_vs_fp16"] = r["max_concurrent"] / max(base["max_concurrent"], 1)
    return results.record("engine", rows, model=OmegaConf.to_container(OmegaConf.structured(config.model)),
                          bench=OmegaConf.to_container(OmegaConf.structured(b)))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config: Config = OmegaConf.to_object(cfg)
    result = run(config, on_row=lambda rows: results.write(_record(config, rows), config.results_dir,
                                                           suffix=config.model.name + "-partial"))
    path = results.write(result, config.results_dir, suffix=config.model.name)
    print(results.markdown(result["rows"], COLUMNS + ["speedup_vs_fp16", "concurrency_vs_fp16"]))
    print(f"wrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
