"""Where a decode step's time goes: the engine filled with requests, then one block's worth of
decode steps (every sequence's tail fills and is compressed once) under ``torch.profiler`` — wall
time per step, GPU busy time per step, and the kernels and CPU-side operators that take it.

    python bench/step_profile.py model=llama3_8b bench=h100_8b 'bench.methods=[gear]'

Same config tree as jobs/bench.py (model, compression by method name, engine, bench sizes);
writes bench/results/profile-<device>-<date>-<model>.json and prints a table per method.
"""

from __future__ import annotations

import dataclasses
import json
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gear_dist import results
from gear_dist.config import Config, register_configs
from gear_dist.engine.benchmark import random_prompts
from gear_dist.engine.request import SamplingParams

register_configs()
TOP = 12  # operators listed per method


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_method(config: Config, engine) -> dict:
    """Fill ``engine`` (every request prefilled), then profile one block of decode steps."""
    b = config.bench
    vocab = engine.core.worker.model.config.get_text_config(decoder=True).vocab_size
    pages = engine.core.scheduler.allocator.capacity
    per_seq = -(-(b.prompt_len + b.new_tokens) // engine.core.scheduler.block)
    count = b.num_prompts or min(b.max_num_seqs, pages // per_seq)
    params = SamplingParams(max_tokens=b.new_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts(count, b.prompt_len, vocab, b.seed)]
    while not all(engine.output(i).completion_tokens for i in ids):  # prefill everything first
        engine.step()
    engine.step()  # one plain decode step: allocations and compiles settle
    _sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        steps = engine.core.scheduler.block
        for _ in range(steps):
            engine.step()
        _sync()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    top_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:TOP]
    top_cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    return dict(batch=count, context=b.prompt_len, steps=steps, wall_ms=1e3 * wall, gpu_busy_ms=busy,
                gpu_busy_fraction=busy / (1e3 * wall),
                gpu=[dict(name=e.key[:80], ms_per_step=e.self_device_time_total / steps / 1e3,
                          calls_per_step=e.count / steps) for e in top_gpu],
                cpu=[dict(name=e.key[:80], ms_per_step=e.self_cpu_time_total / steps / 1e3,
                          calls_per_step=e.count / steps) for e in top_cpu])


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    import sys

    sys.path.insert(0, "jobs")
    from bench import engines  # jobs/bench.py: one model load, an engine per method

    config: Config = OmegaConf.to_object(cfg)
    b = config.bench
    engine_cfg = dataclasses.replace(config.engine, max_num_seqs=b.max_num_seqs,
                                     max_model_len=b.prompt_len + b.new_tokens)
    rows = []
    for name, comp, engine, _ in engines(config, engine_cfg):
        row = dict(method=name, bits=comp.bits, model=config.model.name, **profile_method(config, engine))
        rows.append(row)
        print(f"\n{name}: batch {row['batch']}, {row['wall_ms']:.1f} ms per decode step, "
              f"GPU busy {row['gpu_busy_ms']:.1f} ms ({100 * row['gpu_busy_fraction']:.0f}%)")
        print(results.markdown(row["gpu"], ["name", "ms_per_step", "calls_per_step"]))
        print(results.markdown(row["cpu"], ["name", "ms_per_step", "calls_per_step"]))
        del engine
    result = results.record("profile", rows, model=OmegaConf.to_container(OmegaConf.structured(config.model)),
                            bench=OmegaConf.to_container(OmegaConf.structured(b)))
    path = results.write(result, config.results_dir, suffix=config.model.name)
    print(f"wrote {path}")
    print(json.dumps({"path": str(path)}))


if __name__ == "__main__":
    main()
