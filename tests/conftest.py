"""Shared fixtures: fresh random inputs each run, with the seed shown when a test fails."""

from __future__ import annotations

import secrets

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; pytest prints captured stdout on failure, so it can be replayed."""
    value = secrets.randbelow(2**31)
    print(f"torch seed: {value}")
    torch.manual_seed(value)
    return value
