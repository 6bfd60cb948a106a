import pytest
import torch

from gear_dist.codec import quant


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [8, 64, 128, 256])
def test_pack_unpack_round_trip_is_bit_exact(seed, bits, d):
    codes = torch.randint(0, 2**bits, (3, 2, 17, d), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, 17, d * bits // 8)  # really b bits per code
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_pack_layout_is_planar():
    """Code plane i (channels i*d/8 ...) sits in byte plane 2i//8 at shift 2i%8 for b=2."""
    d = 16
    codes = torch.zeros(1, d, dtype=torch.uint8)
    codes[0, 5 * d // 8 + 1] = 3  # plane 5, column 1 -> byte plane 1, shift 2
    packed = quant.pack(codes, 2)
    assert packed[0].tolist() == [0] * (d // 8) + [0, 3 << 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("backbone", ["kivi", "kcvt", "uniform"])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_quantization_error_is_at_most_half_a_step(seed, bits, backbone, kind):
    x = torch.randn(2, 3, 128, 64) * torch.rand(1, 1, 1, 64) * 5
    tile = quant.group_tile(backbone, kind, 128, 64, 32)
    codes, scale, zero = quant.quantize(x, bits, tile)
    assert codes.max() <= 2**bits - 1 and scale.dtype == zero.dtype == torch.float16
    err = (quant.dequantize(codes, scale, zero, tile) - x).abs()
    step = quant._untiles(scale.float()[..., None].expand(*scale.shape, tile[0] * tile[1]), tile)
    fp32_slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + step * 2**bits)  # rounding of x - zero
    assert (err <= step / 2 + fp32_slack).all()


def test_constant_tile_is_exact_and_finite():
    x = torch.full((1, 64, 64), 3.0)
    tile = quant.group_tile("kivi", "key", 64, 64, 64)
    codes, scale, zero = quant.quantize(x, 2, tile)
    assert torch.isfinite(scale).all()
    assert torch.equal(quant.dequantize(codes, scale, zero, tile), x)


def test_statistics_ignore_invalid_entries(seed):
    x = torch.randn(1, 64, 64)
    valid = torch.ones(1, 64, 1, dtype=torch.bool)
    valid[:, :10] = False
    tile = quant.group_tile("kivi", "key", 64, 64, 64)
    base = quant.quantize(x, 2, tile, valid)
    x2 = x.clone()
    x2[:, :10] = 1e4  # garbage in padding must not move the statistics
    other = quant.quantize(x2, 2, tile, valid)
    assert torch.equal(base[1], other[1]) and torch.equal(base[2], other[2])
    assert torch.equal(base[0][:, 10:], other[0][:, 10:])
