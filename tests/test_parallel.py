"""Tensor parallelism on CPU: two and four Ray actors over gloo with DeepSpeed AutoTP, against one process."""

import asyncio
import collections
import time

import pytest
import ray
import torch

from gear_dist.config import CompressionConfig, Config, EngineConfig, ModelConfig
from gear_dist.engine import SamplingParams
from gear_dist.engine.build import build_engine
from gear_dist.engine.core import EngineError
from gear_dist.models import random_config
from gear_dist.parallel import check_divisible
from gear_dist.parallel.rank import shm_segment

pytestmark = pytest.mark.slow
PAGES = dict(block_size=16, prefill_block_size=16, group_size=16)
PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog. The quick brown fox"]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(path: str, tp: int, comp: str, kv_gib: float = 0.05) -> Config:
    return Config(model=ModelConfig(source="pretrained", name=path, tp=tp, device="cpu"),
                  compression=CompressionConfig.preset(comp, **PAGES),
                  engine=EngineConfig(max_num_seqs=4, kv_cache_gib=kv_gib, prefill_chunk=16))


def test_rejects_heads_tp_cannot_split():
    with pytest.raises(ValueError, match="^tp: 2 does not divide num_key_value_heads=3"):
        check_divisible(random_config("llama3-8b", hidden_size=384, num_attention_heads=6, num_key_value_heads=3), 2)
    with pytest.raises(ValueError, match="^tp: 4 does not divide num_attention_heads=6"):
        check_divisible(random_config("llama3-8b", hidden_size=384, num_attention_heads=6, num_key_value_heads=2), 4)


def assert_same_outputs(single, sharded) -> None:
    for a, b in zip(single, sharded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # logits agree to float rounding (AutoTP sums partial products in another order)
        lp_a = torch.tensor([t.logprob for t in a.outputs[0].logprobs])
        lp_b = torch.tensor([t.logprob for t in b.outputs[0].logprobs])
        torch.testing.assert_close(lp_b, lp_a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("comp", ["fp16", "gear"])
def test_tp2_equals_one_process(local_ray, tiny_dir, comp):
    single = build_engine(config(tiny_dir, 1, comp)).generate(PROMPTS, GREEDY)
    sharded_engine = build_engine(config(tiny_dir, 2, comp))
    try:
        # the ranks dropped the names of DeepSpeed's shared-memory segments (nothing left in
        # /dev/shm once they exit), and the all-reduce through them still works below
        assert not any(shm_segment(r, sharded_engine.core.worker.port).exists() for r in range(2))
        assert_same_outputs(single, sharded_engine.generate(PROMPTS, GREEDY))
    finally:
        sharded_engine.core.worker.shutdown()


def test_tp4_equals_one_process_and_compression_adds_no_collectives(local_ray, tiny_dir):
    """Four ranks of one KV head each: same tokens as one process, and the all-reduces of a
    2-bit GEAR run are exactly those of the fp16 run (the compression is head-local)."""
    def count_collectives(worker) -> None:
        """Runs on a rank (defined here so Ray ships it by value): count every collective call
        from here on, by function."""
        import deepspeed.comm as ds_comm
        import torch.distributed as tdist

        worker.collectives = counts = collections.Counter()
        for module, name in [(ds_comm, "inference_all_reduce"), (ds_comm, "all_reduce"), (tdist, "all_reduce"),
                             (tdist, "broadcast"), (tdist, "all_gather"), (tdist, "all_gather_into_tensor"),
                             (tdist, "reduce_scatter_tensor"), (tdist, "all_to_all_single")]:
            def counted(*args, _fn=getattr(module, name), _key=f"{module.__name__}.{name}", **kwargs):
                counts[_key] += 1
                return _fn(*args, **kwargs)
            setattr(module, name, counted)

    calls = {}
    for comp in ("fp16", "gear"):
        single = build_engine(config(tiny_dir, 1, comp)).generate(PROMPTS, GREEDY)
        engine = build_engine(config(tiny_dir, 4, comp))
        group = engine.core.worker
        try:
            assert group.layout.heads == 1
            group.collective_rpc(count_collectives)
            assert_same_outputs(single, engine.generate(PROMPTS, GREEDY))
            calls[comp] = group.collective_rpc(lambda w: dict(w.collectives))
        finally:
            group.shutdown()
    assert calls["gear"] == calls["fp16"]
    assert all(c.get("deepspeed.comm.inference_all_reduce", 0) > 0 for c in calls["gear"])  # the counter works


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_a_tp_th_of_the_kv_bytes(local_ray, tiny_dir, tp):
    one = build_engine(config(tiny_dir, 1, "gear", kv_gib=0.04))
    many = build_engine(config(tiny_dir, tp, "gear", kv_gib=0.04 / tp))  # the budget is per rank
    try:
        single = one.core.worker.store.nbytes()
        assert many.core.scheduler.allocator.capacity == one.core.scheduler.allocator.capacity
        assert many.core.worker.kv_nbytes() == [single // tp] * tp
    finally:
        many.core.worker.shutdown()


def test_a_dead_rank_fails_the_request_fast_and_the_group_recovers(local_ray, tiny_dir):
    engine = build_engine(config(tiny_dir, 2, "gear"))
    group = engine.core.worker

    async def run() -> float:
        stream = engine.stream(PROMPTS[1], SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
        await stream.__anext__()  # the request is running
        ray.kill(group.actors[1], no_restart=True)
        killed = time.monotonic()
        with pytest.raises(EngineError, match="rank"):
            async for _ in stream:
                pass
        return time.monotonic() - killed

    try:
        engine.core.scheduler.max_model_len = 4096
        assert asyncio.run(run()) < 10.0  # a clear error within seconds, not a hang
        after = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, temperature=0))  # the rebuilt group serves
        assert len(after[0].outputs[0].token_ids) == 5
    finally:
        group.shutdown()
