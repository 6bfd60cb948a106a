import math

import pytest
import torch

from gear_dist.codec import GearCodec, compress, formula_bits_per_element
from gear_dist.config import CompressionConfig
from gear_dist.evals.synthetic import synthetic_kv

KINDS = ["key", "value"]


def _rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    return ((y.float() - x).norm() / x.norm()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 4])
def test_outliers_reconstruct_exactly_before_lowrank(seed, kind, bits):
    """With L off, D + S equals X at every outlier up to the fp16 rounding of the stored
    correction S = X - D (half an fp16 ulp of |S|), i.e. the outlier is kept exactly."""
    cfg = CompressionConfig.preset("kivi", bits=bits, outlier_ratio=0.05)
    x = synthetic_kv(2, 3, tokens=128, head_dim=64, kind=kind)
    block = compress(x, kind, cfg, rank=0)
    rows_x = block.spec.to_rows(x)
    rows_y = block.spec.to_rows(block.decompress(torch.float32))
    idx = block.outlier_index.long()
    got, want = rows_y.gather(-1, idx), rows_x.gather(-1, idx)
    bound = block.outlier_values.float().abs() * 2**-11 + 1e-6
    assert ((got - want).abs() <= bound).all()
    assert (rows_x - rows_y).abs().gather(-1, idx).max() < (rows_x - rows_y).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_each_component_reduces_error_on_heavy_tails(seed, kind):
    x = synthetic_kv(2, 4, tokens=256, head_dim=128, kind=kind)
    errs = {}
    for name, extra in [("kivi", {}), ("kivi_s", dict(outlier_ratio=0.02)), ("gear", {})]:
        cfg = CompressionConfig.preset("kivi" if name != "gear" else "gear", **extra)
        errs[name] = _rel_err(GearCodec(cfg).compress(x, kind, prefill=True).decompress(torch.float32), x)
    assert errs["gear"] <= errs["kivi_s"] <= errs["kivi"], errs


@pytest.mark.parametrize("name", ["kivi", "gear_l", "gear", "kcvt", "uniform"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nbytes_is_what_is_held_and_matches_the_formula(name, kind, bits):
    cfg = CompressionConfig.preset(name, bits=bits)
    n, d = 256, 128
    block = GearCodec(cfg).compress(torch.randn(2, 3, n, d), kind, prefill=True)
    spec = block.spec
    assert block.nbytes == sum(t.numel() * t.element_size() for t in block.tensors().values())
    assert block.nbytes == 6 * spec.nbytes
    for field, (shape, dtype) in spec.shapes().items():
        held = getattr(block, field)
        assert held.shape == (2, 3, *shape) and held.dtype == dtype, field
    assert math.isclose(spec.bits_per_element, formula_bits_per_element(cfg, kind, n, d, cfg.rank_prefill))
    assert math.isclose(block.bits_per_element, spec.bits_per_element)


@pytest.mark.parametrize("kind", KINDS)
def test_two_bit_gear_is_under_30_percent_of_fp16(kind):
    cfg = CompressionConfig.preset("gear")
    block = GearCodec(cfg).compress(torch.randn(1, 1, 1024, 128), kind, prefill=True)
    assert block.nbytes < 0.30 * 1024 * 128 * 2


def test_storage_is_packed_not_simulated(seed):
    block = GearCodec(CompressionConfig.preset("gear")).compress(torch.randn(2, 64, 128), "value")
    assert block.codes.dtype == torch.uint8 and block.codes.shape == (2, 64, 128 * 2 // 8)
    # no tensor of the block is as large as a dense fp16 copy of the input
    assert max(t.numel() * t.element_size() for t in block.tensors().values()) < 2 * 64 * 128 * 2 / 4
    assert block.outlier_index.dtype == torch.uint8  # rows of <= 256 entries: 24 bits per outlier


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_influences_valid_tokens(seed, kind):
    x = synthetic_kv(3, 2, tokens=64, head_dim=64, kind=kind)
    valid = torch.ones(3, 1, 64, dtype=torch.bool)
    valid[0, :, :20] = False  # left padding of sequence 0
    valid[2, :, :63] = False
    codec = GearCodec(CompressionConfig.preset("gear"))
    base = codec.compress(x, kind, valid=valid).decompress(torch.float32)
    x2 = x.clone()
    x2[~valid.expand(3, 2, 64)] = 1e3  # garbage where the padding is
    other = codec.compress(x2, kind, valid=valid).decompress(torch.float32)
    m = valid[..., None].expand_as(x)
    torch.testing.assert_close(other[m], base[m], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(other).all()


def test_reorder_commutes_with_decompress(seed):
    x = torch.randn(4, 2, 64, 64)
    block = GearCodec(CompressionConfig.preset("gear")).compress(x, "key")
    order = torch.tensor([2, 0, 0, 3])
    reordered = block.map(lambda t: t.index_select(0, order)).decompress()
    assert torch.equal(reordered, block.decompress().index_select(0, order))


def test_deterministic(seed):
    x = torch.randn(2, 2, 64, 64)
    codec = GearCodec(CompressionConfig.preset("gear"))
    a, b = codec.compress(x, "value"), codec.compress(x, "value")
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_equals_cpu(seed, kind):
    x = synthetic_kv(2, 4, tokens=256, head_dim=128, kind=kind).half()
    codec = GearCodec(CompressionConfig.preset("gear"))
    cpu, gpu = codec.compress(x, kind, prefill=True), codec.compress(x.cuda(), kind, prefill=True)
    for name, t in cpu.tensors().items():
        g = gpu.tensors()[name].cpu()
        if t.dtype.is_floating_point:
            torch.testing.assert_close(g, t, rtol=2e-3, atol=2e-3, msg=name)
        else:
            assert (g != t).float().mean() < 1e-3, name  # codes at exact rounding ties may differ
    torch.testing.assert_close(gpu.decompress().cpu(), cpu.decompress(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backbone, tn", [("kivi", 64), ("kcvt", 256)])
def test_key_outlier_rows_are_channels_within_a_group(backbone, tn):
    spec = GearCodec(CompressionConfig.preset("gear", backbone=backbone)).spec("key", 256, 128, prefill=True)
    assert spec.rows == (256 // tn * 128, tn)
    x = torch.arange(256 * 128.0).reshape(256, 128)
    rows = spec.to_rows(x)
    assert torch.equal(rows[1], x[:tn, 1])  # row 1: channel 1 along the first group's tokens
    assert torch.equal(spec.from_rows(rows), x)
