"""Continuous batching, CPU-only bookkeeping (no model): what each step computes, and memory.

A step is ``{request: tokens to compute}``: every running request with one uncomputed token
decodes, and requests with more advance their prefill by chunks, ``prefill_chunk`` tokens in all
per step, packed into one forward (vLLM v1's "no prefill or decode phase"). Memory is admitted by pages, i.e. bytes: a request enters only when the pages not
yet promised to running requests cover its prompt and ``reserve_output`` of its max_tokens
(1.0, the default, means a running request never finds the pool empty). If one does (optimistic
admission), the youngest request is preempted: its pages are freed and it is recomputed later,
and nobody is admitted in that step, so preemption cannot thrash. Nothing is dropped.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from gear_dist.cache.pool import PageAllocator
from gear_dist.config import EngineConfig
from gear_dist.engine.kv import KVLayout, SeqStep
from gear_dist.engine.request import Request, Status

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    prefill: list[tuple[Request, SeqStep]] = field(default_factory=list)  # chunks, packed in one forward
    decode: list[tuple[Request, SeqStep]] = field(default_factory=list)  # one token each
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Owns the page ids and tail rows; ``layout`` and ``pages`` size them (per rank, for a
    tensor-parallel group: every rank mirrors the same ids)."""

    def __init__(self, config: EngineConfig, layout: KVLayout, pages: int, max_model_len: int):
        self.config, self.layout, self.max_model_len = config, layout, max_model_len
        self.block = layout.block
        self.allocator = PageAllocator(pages, growable=False)
        self.free_slots = list(range(layout.slots - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished_ids: list[str] = []  # finished since the last step (workers drop their state)

    # -- requests ----------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        total = len(req.prompt_ids) + req.params.max_tokens
        if len(req.prompt_ids) == 0:
            raise ValueError("prompt: is empty")
        if total > self.max_model_len:
            raise ValueError(f"prompt: {len(req.prompt_ids)} prompt tokens + max_tokens {req.params.max_tokens} "
                             f"exceed the context of {self.max_model_len} tokens")
        if total // self.block > self.allocator.capacity:
            raise ValueError(f"prompt: needs {total} tokens of KV, more than the engine's memory holds "
                             f"({self.layout.capacity_tokens(self.allocator.capacity)} tokens)")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.config.max_waiting})")
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason = Status.FINISHED, reason
        self.finished_ids.append(req.request_id)
        if req in self.running:
            self.running.remove(req)
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- a step ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        alloc = self.allocator
        decoding = [r for r in self.running if r.uncomputed == 1]
        completes = lambda r: (r.num_computed + 1) % self.block == 0  # noqa: E731
        while sum(map(completes, decoding)) > alloc.free:  # a block completes and no page is free
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim)
            out.preempted.append(victim)
            decoding = [r for r in decoding if r is not victim]
        for r in decoding:
            new = int(completes(r))
            if new:
                r.pages += alloc.allocate(1)
            out.decode.append((r, SeqStep(r.pages, new, r.slot, r.num_computed, r.num_computed + 1)))

        budget = self.config.prefill_chunk
        prefilling = [r for r in self.running if r.uncomputed > 1]
        while budget > 0:
            pre = prefilling.pop(0) if prefilling else (None if out.preempted else self._admit())
            if pre is None:
                break
            end = pre.num_computed + min(budget, pre.uncomputed)
            new = end // self.block - len(pre.pages)
            if new > alloc.free:
                break
            pre.pages += alloc.allocate(new)
            out.prefill.append((pre, SeqStep(pre.pages, new, pre.slot, pre.num_computed, end)))
            budget -= end - pre.num_computed
        return out

    def pages_needed(self, req: Request) -> int:
        """Pages promised to a request: its prompt and ``reserve_output`` of its output."""
        reserve = int(self.config.reserve_output * req.params.max_tokens)
        return (len(req.prompt_ids) + max(reserve, len(req.output_ids) + 1)) // self.block

    @property
    def promised(self) -> int:
        """Pages running requests may still take."""
        return sum(max(0, self.pages_needed(r) - len(r.pages)) for r in self.running)

    def _admit(self) -> Request | None:
        if not self.waiting or len(self.running) >= self.config.max_num_seqs or not self.free_slots:
            return None
        req = self.waiting[0]
        if self.pages_needed(req) - len(req.pages) > self.allocator.free - self.promised:
            return None  # wait for memory: it frees as requests finish
        self.waiting.popleft()
        req.status, req.slot = Status.RUNNING, self.free_slots.pop()
        self.running.append(req)
        return req

    def _preempt(self, req: Request) -> None:
        """Free everything; the request recomputes its prompt and output so far when readmitted."""
        logger.info("preempting %s (%d tokens computed)", req.request_id, req.num_computed)
        self.running.remove(req)
        self._free(req)
        req.status, req.num_computed, req.preemptions = Status.WAITING, 0, req.preemptions + 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.allocator.release(req.pages)
        req.pages = []
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429/503)."""
