"""GSM8K (Cobbe et al., 2021; MIT): the paper's 8-shot chain-of-thought exact match, and the
teacher-forced NLL of the gold solution, which stays informative on small models that score ~0.

Data is read at run time from a directory holding ``train.jsonl`` and ``test.jsonl`` (default
``../shared/data/gsm8k``, or ``$GEAR_DIST_GSM8K``); it is never copied into the repository.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gear_dist.cache import GEARCache
from gear_dist.config import CompressionConfig
from gear_dist.evals.stream import StreamStats, compare_streams

DEFAULT_DIR = Path("../shared/data/gsm8k")
_CALC = re.compile(r"<<[^>]*>>")  # calculator annotations of the gold solutions
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # chain of thought, annotations removed, ending in "#### <answer>"
    answer: str


def data_dir(path: str | os.PathLike | None = None) -> Path:
    p = Path(path or os.environ.get("GEAR_DIST_GSM8K", DEFAULT_DIR))
    if not (p / "test.jsonl").exists():
        raise FileNotFoundError(f"gsm8k_path: no test.jsonl under {p.resolve()}; point eval.gsm8k_path "
                                "(or $GEAR_DIST_GSM8K) at a directory with GSM8K's train.jsonl and test.jsonl")
    return p


def load(split: str, path: str | os.PathLike | None = None, limit: int | None = None) -> list[Problem]:
    out = []
    with open(data_dir(path) / f"{split}.jsonl") as f:
        for line in f:
            row = json.loads(line)
            solution = _CALC.sub("", row["answer"]).strip()
            out.append(Problem(row["question"].strip(), solution, extract_answer(solution)))
            if limit and len(out) >= limit:
                break
    return out


def extract_answer(text: str) -> str:
    """The first number after '####' if present, else the last number; normalised ('1,000.0' -> '1000')."""
    if "####" in text:
        numbers = _NUMBER.findall(text.split("####", 1)[1])[:1]
    else:
        numbers = _NUMBER.findall(text)[-1:]
    if not numbers:
        return ""
    value = numbers[0].replace(",", "").rstrip(".")
    number = float(value)
    return str(int(number)) if number.is_integer() else value


def few_shot_prompt(shots: list[Problem], question: str) -> str:
    parts = [f"Question: {p.question}\nAnswer: {p.solution}\n\n" for p in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible near 0 and 1, unlike the normal one)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def gold_nll(model, tokenizer, compression: CompressionConfig, problems: list[Problem], shots: list[Problem],
             chunk: int, batch_size: int = 4) -> dict[str, float]:
    """Per-token NLL of each gold solution given the few-shot prompt, fp16 cache vs GEAR cache."""
    stats = StreamStats()
    for i in range(0, len(problems), batch_size):
        batch = problems[i: i + batch_size]
        prompts = [few_shot_prompt(shots, p.question) for p in batch]
        prompt_ids = [tokenizer(p).input_ids for p in prompts]
        answer_ids = [tokenizer(" " + p.solution, add_special_tokens=False).input_ids for p in batch]
        seqs = [a + b for a, b in zip(prompt_ids, answer_ids)]
        t = max(map(len, seqs))
        ids = torch.full((len(seqs), t), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):  # left padding, so every solution ends at the last position
            ids[j, t - len(s):] = torch.tensor(s)
            mask[j, t - len(s):] = 1
        score_from = torch.tensor([t - len(a) - 1 for a in answer_ids])
        compare_streams(model, ids, compression, prefix=int(score_from.min()), chunk=chunk, score_from=score_from,
                        attention_mask=mask, stats=stats)
    s = stats.summary()
    return dict(gsm8k_nll_ref=s["nll_ref"], gsm8k_nll=s["nll"], gsm8k_nll_delta=s["nll_delta"],
                gsm8k_tokens=s["tokens"])


@torch.no_grad()
def exact_match(model, tokenizer, compression: CompressionConfig, problems: list[Problem], shots: list[Problem],
                max_new_tokens: int = 256, batch_size: int = 4) -> dict[str, float]:
    """8-shot CoT exact match (the paper's metric) with greedy decoding through a GEAR cache."""
    correct = 0
    for i in range(0, len(problems), batch_size):
        batch = problems[i: i + batch_size]
        inputs = tokenizer([few_shot_prompt(shots, p.question) for p in batch], return_tensors="pt",
                           padding=True, padding_side="left").to(model.device)
        out = model.generate(**inputs, past_key_values=GEARCache(model.config, compression), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stop_strings=["\n\nQuestion:"], tokenizer=tokenizer)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for p, text in zip(batch, texts):
            correct += extract_answer(text.split("\n\nQuestion:")[0]) == p.answer
    lo, hi = wilson_interval(correct, len(problems))
    return dict(gsm8k_acc=correct / max(len(problems), 1), gsm8k_acc_lo=lo, gsm8k_acc_hi=hi, gsm8k_n=len(problems))
