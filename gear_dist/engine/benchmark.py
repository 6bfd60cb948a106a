"""Offline throughput measurements (used by jobs/bench.py and the sweep's trials)."""

from __future__ import annotations

import gc
import time

import torch
from transformers import DynamicCache

from gear_dist.engine.core import LLMEngine
from gear_dist.engine.request import SamplingParams


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (count, length), generator=gen).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_throughput(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Run every prompt to ``new_tokens`` (EOS ignored); tokens/s, TTFT, TPOT, peak memory, and
    the most sequences decoded together."""
    device = engine.core.worker.device if hasattr(engine.core.worker, "device") else torch.device("cpu")
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = [engine.add_request(p, params) for p in prompts]
    most = steps = 0
    _sync(device)
    t0 = time.perf_counter()
    while not all(engine.finished(i) for i in ids):
        engine.step()
        steps += 1
        most = max(most, engine.stats().running)
    _sync(device)
    wall = time.perf_counter() - t0
    outs = [engine.output(i) for i in ids]
    groups = [engine._groups[i][0] for i in ids]
    ttft = sorted(g.first_token_time - g.arrival for g in groups)
    done = time.monotonic()
    tpot = sorted((done - g.first_token_time) / max(len(g.output_ids) - 1, 1) for g in groups)
    generated = sum(o.completion_tokens for o in outs)
    stats = engine.stats()
    return dict(tok_s=generated / wall, wall_s=wall, steps=steps, requests=len(prompts), generated=generated,
                ttft_ms=1e3 * ttft[len(ttft) // 2], ttft_p90_ms=1e3 * ttft[int(0.9 * (len(ttft) - 1))],
                tpot_ms=1e3 * tpot[len(tpot) // 2], max_concurrent=most, preemptions=engine.core.preemptions,
                kv_capacity_tokens=stats.kv_capacity_tokens, kv_gib=stats.kv_bytes_capacity / 2**30,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"))


@torch.inference_mode()
def hf_generate_throughput(model, prompt_len: int, new_tokens: int, batches: list[int], seed: int) -> dict[str, float]:
    """transformers ``generate`` with its fp16 DynamicCache at the largest batch of ``batches``
    that fits (tried largest first; an OOM moves to the next)."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    for batch in sorted(batches, reverse=True):
        ids = torch.tensor(random_prompts(batch, prompt_len, vocab, seed), device=device)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(config=model.config),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(device)
            wall = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            gc.collect()
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        return dict(tok_s=batch * new_tokens / wall, wall_s=wall, max_concurrent=batch, peak_gib=peak,
                    generated=batch * new_tokens, requests=batch)
    return dict(tok_s=0.0, max_concurrent=0, errors=1)
