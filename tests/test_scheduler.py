"""The scheduler alone: CPU bookkeeping driven by hand, no model (its contract, not numbers)."""

import pytest
import torch

from gear_dist.config import CompressionConfig, EngineConfig
from gear_dist.engine.kv import KVLayout
from gear_dist.engine.request import Request, SamplingParams, Status
from gear_dist.engine.scheduler import QueueFull, Scheduler
from gear_dist.models import random_config

CFG = random_config("llama3-8b", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=100)
COMP = CompressionConfig.preset("fp16", block_size=8, prefill_block_size=8)


def make(pages: int, max_num_seqs: int = 4, chunk: int = 16, max_waiting: int = 100, reserve: float = 1.0) -> Scheduler:
    engine = EngineConfig(max_num_seqs=max_num_seqs, prefill_chunk=chunk, max_waiting=max_waiting,
                          reserve_output=reserve)
    return Scheduler(engine, KVLayout.of(CFG, COMP, engine, torch.float32), pages, max_model_len=10_000)


def run_step(s: Scheduler, out=None) -> None:
    """What the worker does to the bookkeeping: tokens computed, a token sampled at the end."""
    out = out or s.schedule()
    for req, seq in out.prefill + out.decode:
        req.num_computed = seq.end
        if req.uncomputed == 0:
            req.output_ids.append(1)
            if len(req.output_ids) >= req.params.max_tokens:
                s.finish(req, "length")


def test_prefill_is_chunked_then_decodes_one_token_per_step():
    s = make(pages=100, chunk=16)
    req = Request(list(range(40)), SamplingParams(max_tokens=3))
    s.add(req)
    ends = []
    while not req.finished:
        out = s.schedule()
        ends.append(("prefill", out.prefill[0][1].end) if out.prefill else ("decode", out.decode[0][1].end))
        run_step(s, out)
    assert ends == [("prefill", 16), ("prefill", 32), ("prefill", 40), ("decode", 41), ("decode", 42)]
    assert s.allocator.used == 0 and len(s.free_slots) == 4  # freed at once


def test_pages_follow_blocks():
    s = make(pages=100, chunk=100)
    req = Request(list(range(20)), SamplingParams(max_tokens=10))
    s.add(req)
    out = s.schedule()
    assert out.prefill[0][1].new_pages == 2 and len(req.pages) == 2  # 16 of 20 tokens in pages, 4 in the tail
    run_step(s, out)
    for _ in range(3):  # tokens 21..23: the tail fills
        run_step(s)
    out = s.schedule()
    assert out.decode[0][1].new_pages == 1 and len(req.pages) == 3  # token 24 completes a block


def test_admission_by_memory_queues_and_completes_everything():
    s = make(pages=6, chunk=64)  # 48 tokens of pages
    reqs = [Request(list(range(30)), SamplingParams(max_tokens=4)) for _ in range(5)]
    for r in reqs:
        s.add(r)
    running_max = 0
    for _ in range(200):
        if not s.has_work:
            break
        run_step(s)
        running_max = max(running_max, len(s.running))
        assert s.allocator.used <= 6
    assert all(r.finished and r.finish_reason == "length" for r in reqs)
    assert running_max < 5  # memory, not the batch limit, held some back


def test_reserved_admission_never_preempts():
    s = make(pages=5, chunk=64, max_num_seqs=2)
    reqs = [Request(list(range(15)), SamplingParams(max_tokens=20)) for _ in range(2)]
    for r in reqs:
        s.add(r)
    for _ in range(300):
        if not s.has_work:
            break
        out = s.schedule()
        assert not out.preempted and len(s.running) <= 1  # 35 tokens = 4 pages each: one at a time
        run_step(s, out)
    assert all(r.finished for r in reqs)


def test_decode_overflow_preempts_the_youngest_and_it_finishes_later():
    s = make(pages=5, chunk=64, max_num_seqs=2, reserve=0.0)
    old, young = Request(list(range(15)), SamplingParams(max_tokens=20)), Request(list(range(15)), SamplingParams(max_tokens=20))
    s.add(old)
    s.add(young)
    preempted = []
    for _ in range(300):
        if not s.has_work:
            break
        out = s.schedule()
        preempted += out.preempted
        run_step(s, out)
    assert young in preempted and old not in preempted
    assert old.finished and young.finished and young.preemptions >= 1
    assert len(young.output_ids) == 20  # nothing lost: recomputed, then continued


def test_rejects_what_can_never_run_and_a_full_queue():
    s = make(pages=4, max_waiting=2)
    with pytest.raises(ValueError, match="^prompt: needs"):
        s.add(Request(list(range(40)), SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="^prompt: is empty"):
        s.add(Request([], SamplingParams()))
    s.add(Request([1], SamplingParams()))
    s.add(Request([1], SamplingParams()))
    with pytest.raises(QueueFull):
        s.add(Request([1], SamplingParams()))


def test_finish_of_a_waiting_request_removes_it():
    s = make(pages=10)
    r = Request([1, 2], SamplingParams())
    s.add(r)
    s.finish(r, "abort")
    assert r.status is Status.FINISHED and not s.waiting


def test_prefill_chunks_of_several_requests_share_one_step():
    s = make(pages=100, chunk=50)
    reqs = [Request(list(range(20)), SamplingParams(max_tokens=2)) for _ in range(4)]
    for r in reqs:
        s.add(r)
    out = s.schedule()
    assert [(seq.start, seq.end) for _, seq in out.prefill] == [(0, 20), (0, 20), (0, 10)]  # 50 tokens in all
