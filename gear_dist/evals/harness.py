"""The quality harness: one model x one compression config -> a flat dict of metrics.

Every task compares the GEAR cache against the model's own fp16 cache on real text (DESIGN §3),
so a metric is a *cost of compression*, not a model score. The dict is what the sweep logs.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from gear_dist.config import CompressionConfig, EvalConfig
from gear_dist.evals import generation, gsm8k, passkey
from gear_dist.evals.kv_error import capture_kv, kv_fidelity
from gear_dist.evals.stream import StreamStats, compare_streams
from gear_dist.evals.text import load_text

logger = logging.getLogger(__name__)


def text_windows(tokenizer, text: str, count: int, length: int) -> torch.Tensor:
    """``count`` token windows of ``length``, evenly spread over ``text`` ([count, length])."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < length:
        raise ValueError(f"text: corpus has {len(ids)} tokens, fewer than a window of {length}")
    step = (len(ids) - length) // max(count - 1, 1)
    return torch.stack([ids[i * step: i * step + length] for i in range(count)])


def perplexity(model, tokenizer, compression: CompressionConfig, text: str, cfg: EvalConfig) -> dict[str, float]:
    windows = text_windows(tokenizer, text, cfg.ppl_windows, cfg.ppl_context)
    stats = StreamStats()
    for batch in windows.split(cfg.batch_size):
        compare_streams(model, batch, compression, prefix=cfg.ppl_prefix, chunk=compression.block_size, stats=stats)
    s = stats.summary()
    return {k: s[k] for k in ("ppl_ref", "ppl", "ppl_delta", "ppl_rel_delta", "kl", "top1_agreement")}


def with_absolute_paths(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with its data paths made absolute where the job starts: Ray runs trials and jobs
    in a working-dir copy, where a path relative to the caller's directory means nothing. A
    missing GSM8K directory fails here, before any trial starts."""
    if any(task.startswith("gsm8k") for task in cfg.tasks):
        return dataclasses.replace(cfg, gsm8k_path=str(gsm8k.data_dir(cfg.gsm8k_path).resolve()))
    return cfg


def evaluate(model, tokenizer, compression: CompressionConfig, cfg: EvalConfig) -> dict[str, float]:
    """Run ``cfg.tasks``; returns metric name -> value, plus ``<task>_s`` wall times."""
    text = load_text(cfg.text)
    metrics: dict[str, float] = {}

    def timed(task: str, fn) -> None:
        if task not in cfg.tasks:
            return
        t0 = time.perf_counter()
        metrics.update(fn())
        metrics[f"{task}_s"] = time.perf_counter() - t0
        logger.info("%s done in %.1fs", task, metrics[f"{task}_s"])

    def kv() -> dict[str, float]:
        ids = tokenizer(text[: cfg.kv_tokens * 8], return_tensors="pt").input_ids[:, : cfg.kv_tokens]
        fid = kv_fidelity(capture_kv(model, ids), compression, compression.prefill_block_size)
        return {k: v for k, v in fid.items() if not k.endswith("_layers")}

    def greedy() -> dict[str, float]:
        windows = text_windows(tokenizer, text[len(text) // 2:], cfg.greedy_prompts, cfg.greedy_context)
        prompts = tokenizer.batch_decode(windows)
        return generation.greedy_agreement(model, tokenizer, compression, prompts, cfg.greedy_tokens)

    def gsm8k_problems() -> tuple[list, list]:
        shots = gsm8k.load("train", cfg.gsm8k_path, limit=cfg.gsm8k_shots) if cfg.gsm8k_shots else []
        return gsm8k.load("test", cfg.gsm8k_path, limit=cfg.gsm8k_problems), shots

    timed("kv", kv)
    timed("ppl", lambda: perplexity(model, tokenizer, compression, text, cfg))
    timed("greedy", greedy)
    timed("gsm8k_nll", lambda: gsm8k.gold_nll(model, tokenizer, compression, *gsm8k_problems(),
                                              chunk=compression.block_size, batch_size=cfg.batch_size))
    timed("gsm8k_em", lambda: gsm8k.exact_match(model, tokenizer, compression, *gsm8k_problems(),
                                                max_new_tokens=cfg.gsm8k_max_new_tokens, batch_size=cfg.batch_size))
    timed("passkey", lambda: passkey.retrieval(model, tokenizer, compression, text, cfg.passkey_contexts,
                                               cfg.passkey_depths, cfg.passkey_trials, cfg.seed))
    return metrics
