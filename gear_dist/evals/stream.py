"""Teacher-forced comparison of a compressed cache against the fp16 cache on the same text.

The text is fed as a prefill of ``prefix`` tokens, then in chunks of ``chunk`` tokens, each chunk
attending to the compressed past (and, within itself, at full precision, as the fp16 tail does
while decoding). With ``chunk`` equal to the block size this reproduces what streaming decode
sees, yet costs one forward per chunk instead of one per token. Both caches advance in
lockstep, so logits are compared chunk by chunk and never all held at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from gear_dist.cache import GEARCache
from gear_dist.config import CompressionConfig


@dataclass
class StreamStats:
    """Running sums over scored positions (sequences x tokens)."""

    tokens: int = 0
    nll_ref: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    top1_agree: int = 0
    per_sequence_nll: list[float] = field(default_factory=list)

    def add(self, logits_ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> None:
        """``logits*`` [B, T, V], ``targets`` [B, T], ``weight`` [B, T] (0 where not scored)."""
        lp_ref = torch.log_softmax(logits_ref.float(), dim=-1)
        lp = torch.log_softmax(logits.float(), dim=-1)
        w = weight.float()
        nll_ref = -lp_ref.gather(-1, targets[..., None])[..., 0]
        nll = -lp.gather(-1, targets[..., None])[..., 0]
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        self.tokens += int(w.sum())
        self.nll_ref += float((nll_ref * w).sum())
        self.nll += float((nll * w).sum())
        self.kl += float((kl * w).sum())
        self.top1_agree += int(((lp_ref.argmax(-1) == lp.argmax(-1)).float() * w).sum())
        seq = (nll * w).sum(-1) - (nll_ref * w).sum(-1)
        if not self.per_sequence_nll:
            self.per_sequence_nll = [0.0] * len(seq)
        self.per_sequence_nll = [a + float(b) for a, b in zip(self.per_sequence_nll, seq)]

    def summary(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        ppl_ref, ppl = math.exp(self.nll_ref / n), math.exp(self.nll / n)
        return dict(tokens=self.tokens, nll_ref=self.nll_ref / n, nll=self.nll / n, nll_delta=(self.nll - self.nll_ref) / n,
                    ppl_ref=ppl_ref, ppl=ppl, ppl_delta=ppl - ppl_ref, ppl_rel_delta=ppl / ppl_ref - 1,
                    kl=self.kl / n, top1_agreement=self.top1_agree / n)


@torch.no_grad()
def compare_streams(model, input_ids: torch.Tensor, compression: CompressionConfig, *, prefix: int, chunk: int,
                    score_from: int | torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    stats: StreamStats | None = None) -> StreamStats:
    """Feed ``input_ids [B, T]`` to an fp16 cache and a GEAR cache in lockstep and accumulate
    NLL, KL(fp16 || gear) and top-1 agreement of next-token predictions.

    Positions ``>= score_from`` (default: ``prefix``; a tensor gives one start per sequence) are
    scored. ``attention_mask`` marks left padding.
    """
    device = model.device
    ids = input_ids.to(device)
    b, t = ids.shape
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    start = torch.as_tensor(prefix if score_from is None else score_from, device=device).expand(b)
    stats = stats or StreamStats()
    caches = (DynamicCache(config=model.config), GEARCache(model.config, compression))
    bounds = [0, prefix] + list(range(prefix + chunk, t, chunk)) + [t]
    bounds = sorted(set(x for x in bounds if 0 <= x <= t))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits = [model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=c, use_cache=True).logits
                  for c in caches]
        # logits at position p predict token p + 1
        hi_t = min(hi, t - 1)
        if hi_t <= lo:
            continue
        pos = torch.arange(lo, hi_t, device=device)
        weight = (pos[None, :] >= start[:, None]) & (mask[:, lo + 1: hi_t + 1] > 0)
        stats.add(logits[0][:, : hi_t - lo], logits[1][:, : hi_t - lo], ids[:, lo + 1: hi_t + 1], weight)
    return stats
