"""Greedy agreement: how many of N generated tokens a GEAR cache reproduces against fp16."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from gear_dist.cache import GEARCache
from gear_dist.config import CompressionConfig


@torch.no_grad()
def greedy_agreement(model, tokenizer, compression: CompressionConfig, prompts: list[str],
                     new_tokens: int = 256) -> dict[str, float]:
    """Position-wise agreement of greedy continuations (EOS suppressed so both run N tokens),
    and the mean fraction generated before the first divergence."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    n = inputs["input_ids"].shape[1]
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kw)[:, n:]
    out = model.generate(**inputs, past_key_values=GEARCache(model.config, compression), **kw)[:, n:]
    same = ref == out
    first_diff = torch.where(same.all(-1), new_tokens, (~same).float().argmax(-1))
    return dict(greedy_agreement=same.float().mean().item(),
                greedy_prefix_agreement=(first_diff.float() / new_tokens).mean().item())
