"""Low-rank approximation L of the quantization residual by power (subspace) iteration (§1.3).

Batched over any leading dims: every (sequence, head) residual gets its own factors; the
reference code reuses batch 0's basis for the whole batch, which we do not. Columns are
orthonormalised by Gram-Schmidt rather than ``torch.linalg.qr``: for rank 2-8 it is a handful of
vector ops, the same algorithm the GPU kernel runs in registers, and it avoids cuSOLVER's slow
small batched QR (DESIGN §3, 67 ms per layer-block).
"""

from __future__ import annotations

import functools

import torch


def orthonormalize(q: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Orthonormal columns of ``q [..., n, r]`` by classical Gram-Schmidt, applied twice (CGS2).

    A column that loses all but ``rtol`` of its norm to the previous ones (dependent, or zero)
    becomes zero instead of amplified rounding noise, so a residual of rank < r yields zero
    columns and factors carry no garbage.
    """
    tiny = torch.finfo(torch.float32).tiny
    cols: list[torch.Tensor] = []
    for j in range(q.shape[-1]):
        v = q[..., j]
        before = v.norm(dim=-1, keepdim=True)
        for _ in range(2):  # "twice is enough" (Giraud et al., 2005)
            for u in cols:
                v = v - (u * v).sum(-1, keepdim=True) * u
        norm = v.norm(dim=-1, keepdim=True)
        keep = (norm > rtol * before) & (norm > tiny)
        cols.append(torch.where(keep, v / norm.clamp_min(tiny), torch.zeros_like(v)))
    return torch.stack(cols, dim=-1)


@functools.lru_cache(maxsize=64)
def init_basis(d: int, rank: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded Gaussian start ``[d, r]``, drawn on the CPU so every device starts identically;
    made once per shape and device (a host copy per block would wait for the GPU). Read-only:
    callers share it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, rank, generator=gen).to(device)


def power_iteration(
    e: torch.Tensor, rank: int, iters: int, seed: int = 0, oversample: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``A [..., n, r]``, ``B [..., d, r]`` with ``A @ B.T ~= e [..., n, d]`` (fp32).

    Subspace iteration on ``m = r + oversample`` columns (each pass ``Q = orth(E P)``,
    ``P = E^T Q``), then Rayleigh-Ritz: the best rank-r approximation of E inside span(Q), from
    the top eigenvectors of the m x m Gram matrix ``(Q^T E)(Q^T E)^T``.
    Deviation from the paper (r columns, QR on the last pass only): plain 3-pass iteration lands
    up to 1.1x (1.7x on gapped spectra) above the truncated SVD's error; 4 extra columns bring
    3 passes within 1.02x (Halko, Martinsson & Tropp, 2011, §4.5). A is orthonormal and
    ``A B^T`` a projection of E, so ``||E - A B^T|| <= ||E||`` always holds.
    """
    # E times a power of two that puts its largest entry at 2^8 (exact; the GPU kernel does the
    # same): Rayleigh-Ritz squares the Gram matrix, whose squared columns overflow fp32 for singular
    # values above ~6e4 otherwise (a block near fp16's largest values), and the factors came out zero
    e = e.float()
    top = e.abs().amax((-2, -1), keepdim=True)
    up = torch.exp2(torch.clamp(8.0 - torch.ceil(torch.log2(torch.where(top > 0, top, 1.0))), max=100.0))
    e = e * up
    *lead, n, d = e.shape
    m = min(rank + oversample, n, d)
    p = init_basis(d, m, seed, e.device).expand(*lead, d, m)
    for _ in range(iters):
        q = orthonormalize(e @ p)  # [..., n, m]
        p = e.transpose(-1, -2) @ q  # [..., d, m] = (Q^T E)^T
    w = top_eigenvectors(p.transpose(-1, -2) @ p, rank)  # [..., m, r]
    return q @ w, (p @ w) / up


B_TOP = 15  # log2 of the largest entry B's columns keep (fp16 holds < 2^16: a 2x margin)


def fp16_safe(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors with powers of two moved from B's columns to A's where B's would not fit fp16:
    A is orthonormal and B carries the singular values (its column norms, which bound its entries),
    which for a block near fp16's largest values exceed it. The product is unchanged exactly, and
    every other block is left as it is."""
    shift = torch.exp2(torch.clamp(torch.ceil(torch.log2(b.norm(dim=-2, keepdim=True))) - B_TOP, min=0))
    return a * shift, b / shift


RITZ_STEPS = 8  # on the Gram matrix's square: the subspace of 16 steps on the matrix (8 land within 1.03x of eigh)


def top_eigenvectors(gram: torch.Tensor, rank: int, steps: int = RITZ_STEPS) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of the small symmetric PSD ``gram [..., m, m]``.

    Subspace iteration from the first ``rank`` coordinate vectors rather than ``eigh``: the
    same few multiply-adds run in registers in the GPU kernel (kernels/compress.py), so both
    paths compute one function, and cuSOLVER's slow small batched solvers are never called.
    The coordinate start is safe because subspace iteration already ordered P's columns by
    strength. The steps multiply by ``gram @ gram``: the subspace of twice as many steps on
    ``gram``, for half the orthonormalisations (the kernel's chain of reductions across warps);
    squaring in fp32 loses only eigenvalue ratios under ~3e-4, which the rank-r part never needs
    (a fourth power would: up to 2.5x the error on synthetic keys).
    """
    m = gram.shape[-1]
    square = gram @ gram
    w = torch.eye(m, rank, dtype=gram.dtype, device=gram.device).expand(*gram.shape[:-2], m, rank)
    for _ in range(steps):
        w = orthonormalize(square @ w)
    return w
