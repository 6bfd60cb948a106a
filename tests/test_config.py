import pytest
import torch

from gear_dist.codec import GearCodec, compress
from gear_dist.config import PRESETS, CompressionConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_named(name):
    cfg = CompressionConfig.preset(name)
    assert cfg.name == name
    expected = {"fp16": "fp16", "kivi": "kivi", "kcvt": "kivi", "uniform": "kivi", "gear_l": "gear_l", "gear": "gear"}
    assert cfg.method == expected[name]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(bits=5), "bits"),
        (dict(backbone="perchannel"), "backbone"),
        (dict(outlier_ratio=0.5), "outlier_ratio"),
        (dict(outlier_ratio=-0.01), "outlier_ratio"),
        (dict(group_size=-64), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=48), "group_size"),  # does not divide block_size=64
        (dict(block_size=-1), "block_size"),
        (dict(rank=-1), "rank"),
        (dict(rank=65), "rank"),  # > block_size
        (dict(rank_prefill=-2), "rank_prefill"),
        (dict(iters=0), "iters"),
        (dict(prefill_block_size=96), "prefill_block_size"),
        (dict(bits=16), "bits"),  # fp16 with outliers / low rank is contradictory
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        CompressionConfig.preset("gear", **overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="name: unknown compression preset 'gears'.*gear_l"):
        CompressionConfig.preset("gears")


def test_shape_dependent_checks_name_the_field():
    codec = GearCodec(CompressionConfig.preset("gear"))
    with pytest.raises(ValueError, match="^group_size: 64 does not divide head_dim=96"):
        codec.compress(torch.randn(1, 64, 96), "value")
    with pytest.raises(ValueError, match=r"^rank: 20 exceeds min\(tokens=64, head_dim=16\)"):
        compress(torch.randn(1, 64, 16), "key", CompressionConfig.preset("gear", backbone="kcvt"), rank=20)
    with pytest.raises(ValueError, match="^head_dim:"):
        GearCodec(CompressionConfig.preset("kcvt")).compress(torch.randn(1, 64, 12), "key")
    with pytest.raises(ValueError, match="^bits:"):
        GearCodec(CompressionConfig.preset("fp16"))
