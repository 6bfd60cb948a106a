"""Greedy agreement: how many of N generated tokens a GEAR cache reproduces against fp16."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from gear_dist.cache import GEARCache
from gear_dist.config import CompressionConfig
from gear_dist.evals.stream import compare_streams


@torch.no_grad()
def greedy_agreement(model, tokenizer, compression: CompressionConfig, prompts: list[str],
                     new_tokens: int = 256) -> dict[str, float]:
    """The fp16 cache's greedy continuation of ``new_tokens`` (EOS suppressed) is the reference.

    ``greedy_agreement`` and ``greedy_kl``: the GEAR cache decodes along that continuation token by
    token (teacher-forced, exactly the decode path), scoring how often its next-token argmax is
    fp16's and the KL to fp16 - so one near-tie cannot turn every later token into a miss.
    ``greedy_free_agreement`` and ``greedy_prefix_agreement``: the GEAR cache generates freely;
    the position-wise match and the mean fraction generated before the first divergence.
    """
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    n = inputs["input_ids"].shape[1]
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kw)[:, n:]
    forced = compare_streams(model, torch.cat([inputs["input_ids"], ref], 1), compression, prefix=n, chunk=1,
                             score_from=n - 1, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ref)], 1))
    out = model.generate(**inputs, past_key_values=GEARCache(model.config, compression), **kw)[:, n:]
    same = ref == out
    first_diff = torch.where(same.all(-1), new_tokens, (~same).float().argmax(-1))
    summary = forced.summary()
    return dict(greedy_agreement=summary["top1_agreement"], greedy_kl=summary["kl"],
                greedy_free_agreement=same.float().mean().item(),
                greedy_prefix_agreement=(first_diff.float() / new_tokens).mean().item())
