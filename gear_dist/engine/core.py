"""The engine: ``step()`` is schedule -> execute -> update (vLLM v1's EngineCore), and
:class:`LLMEngine` wraps it for batch jobs (``generate``) and servers (async ``stream``).

The engine knows tokenizers only to turn prompts into ids and ids into text for stop strings;
what attention reads and how memory is spent belong to the KV store and the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from gear_dist.config import CompressionConfig, EngineConfig
from gear_dist.engine.kv import KVLayout, KVStore
from gear_dist.engine.request import CompletionOutput, Request, RequestOutput, SamplingParams
from gear_dist.engine.scheduler import Scheduler
from gear_dist.engine.worker import StepPlan, Worker

logger = logging.getLogger(__name__)


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_gib:
        return int(config.kv_cache_gib * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_fraction)
    return 2**30


@dataclass
class EngineStats:
    """What operators watch (Prometheus in gear_dist.serve)."""

    waiting: int
    running: int
    kv_bytes_in_use: int
    kv_bytes_capacity: int
    kv_capacity_tokens: int
    tokens_held: int
    compression_ratio: float  # fp16 bytes of the tokens held / bytes they take
    preemptions: int


class EngineCore:
    """``step()``: schedule -> execute -> update. ``worker`` is a local :class:`Worker` or a
    tensor-parallel group presenting the same ``execute(StepPlan)``."""

    def __init__(self, worker, scheduler: Scheduler, tokenizer, eos_ids: Sequence[int]):
        self.worker, self.scheduler, self.tokenizer = worker, scheduler, tokenizer
        self.eos_ids = set(eos_ids)
        self.preemptions = 0

    def step(self) -> list[Request]:
        """One step; returns the requests that changed (new tokens or finished)."""
        out = self.scheduler.schedule()
        self.preemptions += len(out.preempted)
        if out.empty:
            return []
        finished, self.scheduler.finished_ids = self.scheduler.finished_ids, []
        plan = StepPlan.of(out, finished)
        for req, seq in out.prefill + out.decode:
            req.num_computed = seq.end
        by_id = {r.request_id: r for r in self.scheduler.running}
        changed = []
        for rid, token, logprob in self.worker.execute(plan):
            req = by_id[rid]
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            self._append(req, token, logprob)
            changed.append(req)
        return changed

    def _append(self, req: Request, token: int, logprob) -> None:
        p = req.params
        if not p.ignore_eos and token in self.eos_ids or token in p.stop_token_ids:
            self.scheduler.finish(req, "stop")
            return
        req.output_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        if p.stop:  # detokenize every step only when a stop string must be looked for
            text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True) if self.tokenizer else ""
            for stop in p.stop:
                cut = text.find(stop, max(0, len(req.text) - len(stop)))
                if cut >= 0:
                    req.text = text[:cut]
                    self.scheduler.finish(req, "stop")
                    return
            req.text = text
        if len(req.output_ids) >= p.max_tokens or req.length >= self.scheduler.max_model_len:
            self.scheduler.finish(req, "length")

    def text(self, req: Request) -> str:
        """The request's output as text; with stop strings it is kept (and cut) at every step."""
        if req.params.stop:
            return req.text
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=True) if self.tokenizer else ""

    def stats(self) -> EngineStats:
        s = self.scheduler
        layout, pages = s.layout, s.allocator.capacity
        tails = sum(r.num_computed % layout.block for r in s.running)
        held = sum(r.num_computed for r in s.running)
        in_use = layout.bytes_in_use(s.allocator.used, tails)
        return EngineStats(len(s.waiting), len(s.running), in_use, layout.nbytes(pages), layout.capacity_tokens(pages),
                           held, layout.fp16_bytes(held) / in_use if in_use else 0.0, self.preemptions)


class LLMEngine:
    """Continuous batching over a GEAR KV store.

    ``generate(prompts, params)`` runs a batch to completion (the caller's thread);
    ``stream(prompt, params)`` yields :class:`RequestOutput` snapshots as tokens arrive, with a
    background thread stepping the engine; ``abort(id)`` frees a request at once.
    """

    def __init__(self, model, tokenizer, compression: CompressionConfig, config: EngineConfig | None = None):
        """A single-process engine over ``model`` (see :meth:`from_worker` for a sharded one)."""
        config = config or EngineConfig()
        param = next(model.parameters())
        layout = KVLayout.of(model.config, compression, config, param.dtype)
        pages = layout.pages_for(kv_budget_bytes(config, param.device))
        worker = Worker(model, KVStore(layout, compression, pages, param.dtype, param.device))
        self._setup(worker, layout, pages, model.config, getattr(model, "generation_config", None), tokenizer, config)

    @classmethod
    def from_worker(cls, worker, layout: KVLayout, pages: int, model_config, generation_config, tokenizer,
                    config: EngineConfig) -> "LLMEngine":
        """An engine driving ``worker`` (e.g. a tensor-parallel group) whose KV has ``pages``."""
        engine = cls.__new__(cls)
        engine._setup(worker, layout, pages, model_config, generation_config, tokenizer, config)
        return engine

    def _setup(self, worker, layout, pages, model_config, generation_config, tokenizer, config) -> None:
        self.config, self.tokenizer = config, tokenizer
        text = model_config.get_text_config(decoder=True)
        max_len = config.max_model_len or getattr(text, "max_position_embeddings", 2**20)
        self.core = EngineCore(worker, Scheduler(config, layout, pages, max_len), tokenizer,
                               _eos_ids(generation_config, tokenizer))
        self._groups: dict[str, list[Request]] = {}
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (``n`` sequences); raises ValueError for bad input, QueueFull when full."""
        params = params or SamplingParams()
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        group = []
        rid = request_id or f"req-{time.monotonic_ns()}"
        with self._lock:
            if rid in self._groups:
                raise ValueError(f"request_id: {rid!r} is already in flight")
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                sub = SamplingParams(**{**vars(params), "n": 1, "seed": seed})
                req = Request(ids, sub, request_id=f"{rid}#{i}")
                self.core.scheduler.add(req)
                group.append(req)
            self._groups[rid] = group
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away): its memory is freed before the next step."""
        with self._lock:
            for req in self._groups.get(request_id, []):
                if not req.finished:
                    self.core.scheduler.finish(req, "abort")
        self._publish({request_id})

    def output(self, request_id: str) -> RequestOutput:
        group = self._groups[request_id]
        first = group[0]
        outs = [CompletionOutput(i, self.core.text(r), list(r.output_ids), r.finish_reason,
                                 list(r.logprobs) if r.params.logprobs is not None else None)
                for i, r in enumerate(group)]
        ttft = None if first.first_token_time is None else first.first_token_time - first.arrival
        return RequestOutput(request_id, first.prompt_ids, outs, all(r.finished for r in group),
                             len(first.prompt_ids), sum(len(r.output_ids) for r in group), ttft)

    def finished(self, request_id: str) -> bool:
        """Whether every sequence of the request has ended (cheap: :meth:`output` detokenizes)."""
        return all(r.finished for r in self._groups[request_id])

    # -- batch ----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion in this thread; outputs in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        try:
            while not all(self.finished(i) for i in ids):
                self.step()
            return [self.output(i) for i in ids]
        finally:
            for i in ids:
                self._groups.pop(i, None)

    def step(self) -> None:
        """One engine step. If it fails (e.g. a tensor-parallel rank died), every request in flight
        ends with an error, a worker that can (``rebuild``) is rebuilt, and the error is raised."""
        try:
            with self._lock:
                changed = self.core.step()
        except Exception as exc:
            self._fail_running(exc)
            raise
        self._publish({r.request_id.rsplit("#", 1)[0] for r in changed})

    def stats(self) -> EngineStats:
        with self._lock:
            return self.core.stats()

    # -- streaming ------------------------------------------------------------------------------------
    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Snapshots of the request as it advances; the last one has ``finished=True``. Leaving
        the iterator early (a disconnect) aborts the request."""
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.add_request(prompt, params, request_id)
        self._listeners[rid] = (asyncio.get_running_loop(), queue)
        self._ensure_thread()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._listeners.pop(rid, None)
            if not self.output(rid).finished:
                self.abort(rid)
            self._groups.pop(rid, None)

    def _publish(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            listener = self._listeners.get(rid)
            if listener and rid in self._groups:
                loop, queue = listener
                loop.call_soon_threadsafe(queue.put_nowait, self.output(rid))

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="gear-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            if not self.core.scheduler.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # already reported to the requests it failed; keep serving
                logger.exception("engine step failed")

    def _fail_running(self, exc: Exception) -> None:
        """End every running request with ``exc`` (its clients get the error at once, not a hang),
        then rebuild the worker if it knows how (a tensor-parallel group), so new requests succeed."""
        with self._lock:
            failed = {r.request_id.rsplit("#", 1)[0] for r in list(self.core.scheduler.running)}
            for rid in failed:
                for req in self._groups.get(rid, []):
                    if not req.finished:
                        self.core.scheduler.finish(req, "error")
            for rid in failed:
                listener = self._listeners.get(rid)
                if listener:
                    loop, queue = listener
                    loop.call_soon_threadsafe(queue.put_nowait, EngineError(f"request {rid} failed: {exc}"))
            rebuild = getattr(self.core.worker, "rebuild", None)
            if rebuild is not None:
                rebuild()


class EngineError(RuntimeError):
    """A request failed inside the engine (e.g. a tensor-parallel rank died mid-request)."""


def _eos_ids(generation_config, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(generation_config, "eos_token_id", None)
    for e in (eos if isinstance(eos, list) else [eos]):
        if e is not None:
            ids.add(int(e))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
