"""Synthetic K/V with the structure of real activations, for fidelity tests and benchmarks.

Random-weight models give near-Gaussian K/V (kurtosis ~3); real ones do not (SmolLM2 keys have
kurtosis ~12 and a few large channels, DESIGN §4). These tensors imitate the real shape so that
outlier handling is exercised without a model.
"""

from __future__ import annotations

import torch


def synthetic_kv(*lead: int, tokens: int, head_dim: int, kind: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``[*lead, tokens, head_dim]`` fp32: Student-t(4) entries; keys get 1/16 of their channels
    scaled x8 and shifted (the per-channel outliers that motivate per-channel key grouping)."""
    shape = (*lead, tokens, head_dim)
    # Student-t(nu) = N(0, 1) / sqrt(chi2(nu) / nu), drawn from one generator for reproducibility.
    nu = 4.0
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((*shape, int(nu)), generator=generator).pow(2).sum(-1)
    x = normal / (chi2 / nu).sqrt()
    if kind == "key":
        big = torch.randperm(head_dim, generator=generator)[: max(1, head_dim // 16)]
        x[..., big] = x[..., big] * 8 + 4
    return x
