import pytest
import torch

from gear_dist.codec import lowrank, quant
from gear_dist.evals.synthetic import synthetic_kv


def _svd_error(e: torch.Tensor, r: int) -> torch.Tensor:
    s = torch.linalg.svdvals(e)
    return s[..., r:].pow(2).sum(-1).sqrt()


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("spectrum", ["flat", "decaying", "key_residual"])
def test_power_iteration_is_near_svd_and_never_worse_than_zero(seed, rank, spectrum):
    n, d = 64, 128
    if spectrum == "flat":
        e = torch.randn(4, 3, n, d)
    elif spectrum == "decaying":  # a few strong directions with small gaps, plus noise
        u, v = torch.randn(4, 3, n, 8), torch.randn(4, 3, 8, d)
        e = u @ (v * torch.logspace(1, -1, 8)[:, None]) + 0.3 * torch.randn(4, 3, n, d)
    else:  # what GEAR fits: the 2-bit KIVI residual of keys with large channels
        x = synthetic_kv(4, 3, tokens=n, head_dim=d, kind="key")
        tile = quant.group_tile("kivi", "key", n, d, 64)
        e = x - quant.dequantize(*quant.quantize(x, 2, tile), tile)
    a, b = lowrank.power_iteration(e, rank, iters=3, seed=seed)
    assert a.shape == (4, 3, n, rank) and b.shape == (4, 3, d, rank)
    err = (e - a @ b.transpose(-1, -2)).norm(dim=(-2, -1))
    assert (err <= e.norm(dim=(-2, -1))).all()
    assert (err <= 1.05 * _svd_error(e, rank)).all(), (err / _svd_error(e, rank)).max()


def test_each_matrix_gets_its_own_basis(seed):
    """The reference reuses batch 0's basis for the whole batch; here each fit is independent."""
    e = torch.randn(2, 1, 64, 32)
    a, b = lowrank.power_iteration(e, 2, 3)
    a0, b0 = lowrank.power_iteration(e[1:], 2, 3)
    torch.testing.assert_close(a[1:] @ b[1:].mT, a0 @ b0.mT, rtol=1e-4, atol=1e-4)


def test_deterministic_under_seed(seed):
    e = torch.randn(3, 64, 64)
    first = lowrank.power_iteration(e, 4, 3, seed=7)
    again = lowrank.power_iteration(e, 4, 3, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_orthonormalize_handles_rank_deficiency(seed):
    q = torch.randn(5, 32, 3)
    q[..., 2] = q[..., 0] * 2  # dependent column
    out = lowrank.orthonormalize(q)
    gram = out.mT @ out
    torch.testing.assert_close(gram[..., :2, :2], torch.eye(2).expand(5, 2, 2), atol=1e-5, rtol=0)
    assert out[..., 2].abs().max() < 1e-4


def test_fp16_safe_factors_fit_fp16_and_keep_the_product(seed):
    """A block near fp16's largest values has singular values above them: B (which carries them)
    would store inf. fp16_safe moves powers of two to A there, and leaves ordinary blocks as they are."""
    e = torch.randn(2, 32, 64) * 2e4  # singular values ~1e6: B's entries ~1e5
    a, b = lowrank.power_iteration(e, 2, iters=3, seed=seed)
    assert (e - a @ b.mT).norm(dim=(-2, -1)).le(1.05 * _svd_error(e, 2)).all()  # fp32 Rayleigh-Ritz holds up
    assert b.half().isinf().any()
    sa, sb = lowrank.fp16_safe(a, b)
    assert sb.abs().max() < 2**16 and torch.isfinite(sa.half()).all()
    assert torch.equal(sa @ sb.transpose(-1, -2), a @ b.transpose(-1, -2))  # powers of two: exact
    small = torch.randn(2, 32, 64)
    a, b = lowrank.power_iteration(small, 2, iters=3, seed=seed)
    assert all(torch.equal(x, y) for x, y in zip(lowrank.fp16_safe(a, b), (a, b)))
