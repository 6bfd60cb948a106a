"""Runs the model over a step: one prefill chunk and one batched decode, through the KV store.

The step arrives as a :class:`StepPlan`, plain data that can be sent to tensor-parallel ranks;
sampling state (seeded generators) lives here, next to the logits, and is dropped when the
scheduler reports a request finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gear_dist.engine.kv import EngineCache, KVStore, SeqStep
from gear_dist.engine.request import SamplingParams, TokenLogprob
from gear_dist.engine.sampling import sample
from gear_dist.engine.scheduler import SchedulerOutput
from gear_dist.transfer import to_device


@dataclass
class SeqWork:
    """One sequence's work in a step."""

    request_id: str
    token_ids: list[int]  # the tokens whose KV this step computes
    seq: SeqStep
    sample: bool  # the tokens reach the end of the sequence: sample the next one
    params: SamplingParams


@dataclass
class StepPlan:
    prefill: list[SeqWork] = field(default_factory=list)  # chunks packed into one forward
    decode: list[SeqWork] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests whose sampling state can go

    @classmethod
    def of(cls, out: SchedulerOutput, finished: list[str]) -> "StepPlan":
        prefill = [SeqWork(r.request_id, r.token_slice(s.start, s.end), s, s.end == r.length, r.params)
                   for r, s in out.prefill]
        decode = [SeqWork(r.request_id, r.token_slice(r.length - 1, r.length), s, True, r.params) for r, s in out.decode]
        return cls(prefill, decode, finished)


Sampled = list[tuple[str, int, TokenLogprob | None]]


class Worker:
    """Model + KV store; ``execute`` is what the engine core calls, locally or on every rank of
    a tensor-parallel group (gear_dist.parallel), where only rank 0 samples."""

    def __init__(self, model, store: KVStore, samples: bool = True):
        self.model, self.store, self.samples = model, store, samples
        self.device = next(model.parameters()).device
        self.generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqStep],
                keep: torch.Tensor, decode: bool) -> torch.Tensor:
        """Logits at positions ``keep`` of the sequence dim: ``input_ids [B, T]`` -> ``[B, len(keep), V]``."""
        out = self.model(input_ids=input_ids, position_ids=positions,
                         past_key_values=EngineCache(self.store, seqs, decode), use_cache=True, logits_to_keep=keep)
        return out.logits

    def execute(self, plan: StepPlan) -> Sampled:
        for rid in plan.finished:
            self.generators.pop(rid, None)
        sampled: Sampled = []
        dev = self.device
        if plan.prefill:  # every chunk in one row: [1, sum of chunk lengths]
            ids = to_device([t for w in plan.prefill for t in w.token_ids], dev)[None]
            positions = to_device([p for w in plan.prefill for p in range(w.seq.start, w.seq.end)], dev)[None]
            ends = to_device([len(w.token_ids) for w in plan.prefill], dev).cumsum(0) - 1
            logits = self.forward(ids, positions, [w.seq for w in plan.prefill], ends, decode=False)[0]  # [chunks, V]
            rows = [i for i, w in enumerate(plan.prefill) if w.sample]
            sampled += self._sample(logits[rows], [plan.prefill[i] for i in rows])
        if plan.decode:
            ids = to_device([w.token_ids for w in plan.decode], dev)
            positions = to_device([[w.seq.start] for w in plan.decode], dev)
            logits = self.forward(ids, positions, [w.seq for w in plan.decode], to_device([0], dev), decode=True)[:, 0]
            sampled += self._sample(logits, plan.decode)
        return sampled

    def _sample(self, logits: torch.Tensor, work: list[SeqWork]) -> Sampled:
        if not self.samples:
            return []
        gens = [self._generator(w) for w in work]
        return [(w.request_id, token, lp) for w, (token, lp) in zip(work, sample(logits, [w.params for w in work], gens))]

    def _generator(self, w: SeqWork) -> torch.Generator | None:
        if w.params.seed is None:
            return None
        if w.request_id not in self.generators:
            self.generators[w.request_id] = torch.Generator(device=self.device).manual_seed(w.params.seed)
        return self.generators[w.request_id]
