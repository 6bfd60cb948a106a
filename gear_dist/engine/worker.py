"""Runs the model over a step: one prefill chunk and one batched decode, through the KV store."""

from __future__ import annotations

import torch

from gear_dist.engine.kv import EngineCache, KVStore, SeqStep
from gear_dist.engine.request import Request, TokenLogprob
from gear_dist.engine.sampling import sample
from gear_dist.engine.scheduler import SchedulerOutput

Sampled = list[tuple[Request, int, TokenLogprob | None]]


class Worker:
    """Model + KV store; ``execute`` is the only thing the engine core calls (the same interface
    a tensor-parallel actor group presents, gear_dist.parallel)."""

    def __init__(self, model, store: KVStore):
        self.model, self.store = model, store
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqStep]) -> torch.Tensor:
        """Logits of the last position of each row: ``input_ids [B, T]`` -> ``[B, V]``."""
        out = self.model(input_ids=input_ids.to(self.device), position_ids=positions.to(self.device),
                         past_key_values=EngineCache(self.store, seqs), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def execute(self, step: SchedulerOutput) -> Sampled:
        """Compute the step's tokens; sample where a request's tokens are all computed."""
        sampled: Sampled = []
        if step.prefill is not None:
            req, seq = step.prefill
            ids = torch.tensor(req.all_ids[seq.start: seq.end])[None]
            logits = self.forward(ids, torch.arange(seq.start, seq.end)[None], [seq])
            req.num_computed = seq.end
            if req.uncomputed == 0:
                sampled += [(req, *s) for s in sample(logits, [req])]
        if step.decode:
            reqs = [r for r, _ in step.decode]
            ids = torch.tensor([[r.all_ids[-1]] for r in reqs])
            positions = torch.tensor([[s.start] for _, s in step.decode])
            logits = self.forward(ids, positions, [s for _, s in step.decode])
            for r in reqs:
                r.num_computed += 1
            sampled += [(r, *s) for r, s in zip(reqs, sample(logits, reqs))]
        return sampled
