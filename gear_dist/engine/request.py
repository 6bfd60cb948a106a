"""Requests, their sampling parameters, and what the engine hands back."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class SamplingParams:
    """OpenAI-style sampling controls; invalid values raise a ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None  # top alternatives returned per token (0 = only the chosen one)
    ignore_eos: bool = False  # benchmarks: run to max_tokens

    def __post_init__(self) -> None:
        _require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
                 f"must be an integer >= 1, got {self.max_tokens!r}")
        _require(0.0 <= self.temperature <= 100.0, "temperature", f"must lie in [0, 100], got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must lie in (0, 1], got {self.top_p}")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        _require(isinstance(self.n, int) and 1 <= self.n <= 16, "n", f"must be an integer in [1, 16], got {self.n!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(len(self.stop) <= 8 and all(isinstance(s, str) and s for s in self.stop), "stop",
                 "must be up to 8 non-empty strings")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "must be non-negative integers")
        _require(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _require(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the best alternatives


_ids = itertools.count()


@dataclass
class Request:
    """One sequence. ``all_ids`` = prompt + generated; ``num_computed`` tokens have their KV
    stored; each step computes KV for the next ones (a prefill chunk, or the one token just
    sampled) and, when it reaches the end of ``all_ids``, samples a token: prefill and decode are
    the same bookkeeping, and a preempted request simply restarts from 0."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # detokenized output (stop strings cut)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)  # page ids, shared by every layer's pool
    slot: int | None = None  # row of the fp16 tail tensors
    first_token_time: float | None = None
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building ``all_ids``: a decode step reads one token of
        each of a thousand long sequences."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:min(end, p)] + self.output_ids[max(start - p, 0):max(end - p, 0)]

    @property
    def uncomputed(self) -> int:
        return self.length - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """A request's state after a step: all ``n`` completions so far (``new_*`` for streaming)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
