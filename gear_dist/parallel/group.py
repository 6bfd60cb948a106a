"""A model replica as a group of Ray actors, one per tensor-parallel rank, in a placement group.

The group presents the worker interface (``execute(StepPlan)``), so the engine drives it exactly
as a local worker: every step is sent to all ranks, rank 0 samples and returns the tokens. The
scheduler's memory budget is per rank: every rank holds the same page ids for its own heads, and
the page count is the minimum any rank can afford (as vLLM's executor does).

Failure: a dead rank fails the step with :class:`RankFailure` within seconds (the others, stuck
in a collective, are killed), and :meth:`rebuild` starts a fresh group.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gear_dist.config import CompressionConfig, EngineConfig, ModelConfig
from gear_dist.engine.kv import KVLayout, model_geometry
from gear_dist.parallel.rank import RankWorker

logger = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering; the group must be rebuilt."""


def check_divisible(model_config, tp: int) -> None:
    """Reject shapes AutoTP cannot split evenly, before any actor starts."""
    layers, kv_heads, _, heads = model_geometry(model_config)
    if heads % tp:
        raise ValueError(f"tp: {tp} does not divide num_attention_heads={heads}")
    if kv_heads % tp:
        raise ValueError(f"tp: {tp} does not divide num_key_value_heads={kv_heads} (each rank keeps whole KV heads)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardGroup:
    def __init__(self, model_cfg: ModelConfig, model_config, compression: CompressionConfig, engine_cfg: EngineConfig,
                 tp: int, use_gpu: bool, step_timeout_s: float = 300.0, start_timeout_s: float = 1800.0):
        check_divisible(model_config, tp)
        self.model_cfg, self.model_config, self.compression, self.engine_cfg = model_cfg, model_config, compression, engine_cfg
        self.tp, self.use_gpu = tp, use_gpu
        self.step_timeout_s, self.start_timeout_s = step_timeout_s, start_timeout_s
        self.actors: list = []
        self.pg = None
        self._start()

    @property
    def layout(self) -> KVLayout:
        import torch

        from gear_dist.parallel.rank import DTYPES

        return KVLayout.of(self.model_config, self.compression, self.engine_cfg, DTYPES.get(self.model_cfg.dtype, torch.float32),
                           tp=self.tp)

    def _start(self) -> None:
        bundle = {"GPU": 1, "CPU": 1} if self.use_gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * self.tp, strategy="STRICT_PACK")
        ray.get(self.pg.ready(), timeout=self.start_timeout_s)
        self.port = port = _free_port()
        actor_cls = ray.remote(RankWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if self.use_gpu else 0, max_restarts=0, max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                # each rank sees every GPU and picks its own: NCCL then uses NVLink peer access
                runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}},
            ).remote(i, self.tp, port, self.model_cfg, self.compression, self.engine_cfg, self.use_gpu,
                     self.step_timeout_s)
            for i in range(self.tp)
        ]
        budgets = self._all([a.kv_budget.remote() for a in self.actors], self.start_timeout_s)
        self.pages = min(self.layout.pages_for(b) for b in budgets)
        self.ranks = self._all([a.build.remote(self.pages) for a in self.actors], self.start_timeout_s)
        logger.info("shard group of %d ranks ready: %d pages each", self.tp, self.pages)

    def _all(self, refs: list, timeout: float) -> list:
        """Results of one call per rank; a dead rank raises at once, a silent one after ``timeout``."""
        pending, deadline = list(refs), time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankFailure(f"{len(pending)} of {self.tp} ranks did not answer within {timeout:.0f}s")
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                raise RankFailure(f"a tensor-parallel rank failed: {exc}") from exc
        return ray.get(refs)

    def execute(self, plan):
        return self._all([a.execute.remote(plan) for a in self.actors], self.step_timeout_s)[0]

    def kv_nbytes(self) -> list[int]:
        return self._all([a.kv_nbytes.remote() for a in self.actors], 60)

    def memory(self) -> list[dict]:
        return self._all([a.memory.remote() for a in self.actors], 60)

    def collective_rpc(self, fn: Callable[[Any], Any], timeout: float = 60) -> list:
        """``fn(rank_worker)`` on every rank, results in rank order (as vLLM's ``collective_rpc``):
        for inspection and profiling hooks that need no method of their own."""
        return self._all([a.call.remote(fn) for a in self.actors], timeout)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def rebuild(self) -> None:
        """Tear the group down and start it again (after a rank failure)."""
        logger.warning("rebuilding the shard group of %d ranks", self.tp)
        self.shutdown()
        self._start()
