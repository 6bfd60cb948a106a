"""Token sampling for a batch: temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from gear_dist.engine.request import SamplingParams, TokenLogprob


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask of ``logits [V]`` outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[tuple[int, TokenLogprob | None]]:
    """One token per row of ``logits [B, V]`` (fp32 is used for the distribution)."""
    if all(p.greedy and p.logprobs is None for p in params):  # the common batch: one argmax, one sync
        return [(t, None) for t in logits.argmax(-1).tolist()]
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            token = int(torch.argmax(logits[row]))
        else:
            scaled = _filter(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(scaled, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        lp = None
        if p.logprobs is not None:
            top = torch.topk(logprobs[row], p.logprobs) if p.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lp = TokenLogprob(token, float(logprobs[row, token]), alts)
        out.append((token, lp))
    return out
