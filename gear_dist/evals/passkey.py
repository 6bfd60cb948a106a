"""Passkey retrieval (Mohtashami & Jaggi, 2023): a number hidden at a given depth of a long
Wikipedia haystack must be repeated back, through a GEAR cache."""

from __future__ import annotations

import random

import torch

from gear_dist.cache import GEARCache
from gear_dist.config import CompressionConfig

_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_prompt(tokenizer, haystack: str, context: int, depth: float, key: int) -> str:
    """About ``context`` tokens with the needle at fraction ``depth`` of the filler."""
    budget = context - len(tokenizer(_INTRO + _NEEDLE.format(key=key) + _QUESTION).input_ids)
    filler_ids = tokenizer(haystack[: budget * 8], add_special_tokens=False).input_ids[: max(budget, 0)]
    cut = int(len(filler_ids) * depth)
    before, after = tokenizer.decode(filler_ids[:cut]), tokenizer.decode(filler_ids[cut:])
    return _INTRO + before + _NEEDLE.format(key=key) + after + _QUESTION


@torch.no_grad()
def retrieval(model, tokenizer, compression: CompressionConfig, haystack: str, contexts: list[int],
              depths: list[float], trials: int = 2, seed: int = 0) -> dict[str, float]:
    """Accuracy per context length (and overall) of repeating the key in 8 greedy tokens."""
    rng = random.Random(seed)
    out: dict[str, float] = {}
    total = correct_all = 0
    for context in contexts:
        correct = n = 0
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                start = rng.randint(0, max(len(haystack) - context * 8, 0))
                prompt = build_prompt(tokenizer, haystack[start:], context, depth, key)
                ids = tokenizer(prompt, return_tensors="pt").to(model.device)
                gen = model.generate(**ids, past_key_values=GEARCache(model.config, compression), do_sample=False,
                                     max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
                answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:])
                correct += str(key) in answer
                n += 1
        out[f"passkey_acc_{context}"] = correct / n
        total, correct_all = total + n, correct_all + correct
    out["passkey_acc"] = correct_all / max(total, 1)
    return out
