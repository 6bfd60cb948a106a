import json

import pytest
import torch

from gear_dist.config import CompressionConfig, EvalConfig
from gear_dist.evals import gsm8k, passkey
from gear_dist.evals.harness import evaluate, text_windows, with_absolute_paths
from gear_dist.evals.stream import compare_streams


@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,250", "1250"),
    ("The answer is 12.0 dollars", "12"),
    ("it costs $3.50 in total.", "3.50"),
    ("first 4 then -2", "-2"),
    ("no number here", ""),
])
def test_extract_answer(text, want):
    assert gsm8k.extract_answer(text) == want


def test_wilson_interval_contains_the_estimate_and_narrows():
    lo, hi = gsm8k.wilson_interval(3, 10)
    assert lo < 0.3 < hi
    lo2, hi2 = gsm8k.wilson_interval(300, 1000)
    assert hi2 - lo2 < hi - lo
    assert gsm8k.wilson_interval(0, 20)[0] == 0.0 and gsm8k.wilson_interval(0, 20)[1] > 0


def test_gsm8k_reads_a_configured_directory(tmp_path):
    rows = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "A box holds 4 pens. How many in 2 boxes?", "answer": "4*2=<<4*2=8>>8\n#### 8"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    problems = gsm8k.load("test", tmp_path)
    assert [p.answer for p in problems] == ["5", "8"]
    assert "<<" not in problems[0].solution and problems[0].solution.endswith("#### 5")
    prompt = gsm8k.few_shot_prompt(problems[:1], "What is 1+1?")
    assert prompt.startswith("Question: Tom") and prompt.endswith("Question: What is 1+1?\nAnswer:")
    with pytest.raises(FileNotFoundError, match="gsm8k_path"):
        gsm8k.load("test", tmp_path / "missing")


def test_fp16_stream_equals_reference(real_model):
    model, tok = real_model
    ids = torch.randint(100, 10000, (2, 160))
    stats = compare_streams(model, ids, CompressionConfig.preset("fp16"), prefix=96, chunk=32).summary()
    assert stats["tokens"] == 2 * (160 - 96 - 1)
    assert stats["nll_delta"] == 0 and stats["kl"] < 1e-9 and stats["top1_agreement"] == 1.0


def test_compressed_stream_costs_something_and_scores_only_from_prefix(real_model):
    model, tok = real_model
    ids = tok("\n".join(["The quick brown fox jumps over the lazy dog."] * 40), return_tensors="pt").input_ids[:, :256]
    cfg = CompressionConfig.preset("kivi", block_size=32, prefill_block_size=64, group_size=32)
    stats = compare_streams(model, ids, cfg, prefix=128, chunk=32).summary()
    assert stats["tokens"] == 256 - 128 - 1
    assert stats["kl"] > 0 and stats["top1_agreement"] < 1.0 + 1e-9


def test_text_windows_are_spread_and_sized(real_model):
    _, tok = real_model
    w = text_windows(tok, "word " * 3000, count=3, length=100)
    assert w.shape == (3, 100)
    with pytest.raises(ValueError, match="^text:"):
        text_windows(tok, "short", count=1, length=100)


def test_passkey_prompt_places_the_needle(real_model):
    _, tok = real_model
    prompt = passkey.build_prompt(tok, "lorem ipsum dolor sit amet " * 500, context=400, depth=0.25, key=12345)
    n = len(tok(prompt).input_ids)
    assert 380 <= n <= 420
    pos = prompt.index("The pass key is 12345")
    assert 0.15 < pos / len(prompt) < 0.35


@pytest.mark.slow
def test_harness_on_the_real_model(real_model):
    model, tok = real_model
    cfg = EvalConfig(tasks=["kv", "ppl", "greedy", "passkey"], text="pydoc", kv_tokens=256, ppl_windows=1,
                     ppl_context=192, ppl_prefix=128, greedy_prompts=1, greedy_context=64, greedy_tokens=16,
                     passkey_contexts=[256], passkey_depths=[0.5], batch_size=2)
    fp16 = evaluate(model, tok, CompressionConfig.preset("fp16"), cfg)
    assert fp16["kl"] < 1e-9 and fp16["greedy_agreement"] == 1.0 and fp16["bits_per_element"] == 16
    gear = evaluate(model, tok, CompressionConfig.preset("gear"), cfg)
    assert 0 < gear["rel_err_k"] < 0.5 and 0 < gear["rel_err_v"] < 0.6
    assert 3 < gear["bits_per_element"] < 6 and gear["kl"] > 0
    assert fp16["passkey_acc"] == 1.0  # SmolLM2 retrieves reliably at this length (DESIGN §4)
    assert {"ppl", "ppl_delta", "top1_agreement", "passkey_acc_256", "kv_s", "ppl_s"} <= set(gear)


def test_gsm8k_path_is_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig(tasks=["ppl", "gsm8k_nll"], gsm8k_path="data")
    assert with_absolute_paths(cfg).gsm8k_path == str(tmp_path / "data")
    assert with_absolute_paths(EvalConfig(tasks=["ppl"], gsm8k_path="nowhere")).gsm8k_path == "nowhere"  # not needed
    with pytest.raises(FileNotFoundError, match="^gsm8k_path: no test.jsonl"):
        with_absolute_paths(EvalConfig(tasks=["gsm8k_em"], gsm8k_path="nowhere"))
