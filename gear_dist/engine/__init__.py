"""Batched generation over GEAR caches: continuous batching, a byte budget, streaming outputs."""

from gear_dist.engine.core import EngineStats, LLMEngine
from gear_dist.engine.request import CompletionOutput, RequestOutput, SamplingParams
from gear_dist.engine.scheduler import QueueFull

__all__ = ["CompletionOutput", "EngineStats", "LLMEngine", "QueueFull", "RequestOutput", "SamplingParams"]
