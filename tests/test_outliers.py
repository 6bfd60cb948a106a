import torch

from gear_dist.codec import outliers


def test_count_rule_matches_design():
    assert outliers.outliers_per_side(0.02, 64) == 1  # max(1, round(0.64))
    assert outliers.outliers_per_side(0.02, 1024) == 10
    assert outliers.outliers_per_side(0.0, 1024) == 0
    assert outliers.outliers_per_side(0.4, 2) == 1  # never more than half a row per side


def test_selects_by_signed_value_not_magnitude(seed):
    x = torch.randn(4, 7, 50)
    idx = outliers.select(x, 3)
    top, bottom = idx[..., :3], idx[..., 3:]
    assert torch.equal(x.gather(-1, top).sort(-1).values, x.topk(3, -1).values.sort(-1).values)
    assert torch.equal(x.gather(-1, bottom).sort(-1).values, (-x).topk(3, -1).values.neg().sort(-1).values)


def test_padding_is_never_chosen_when_data_suffices(seed):
    x = torch.randn(2, 5, 40)
    valid = torch.ones(2, 1, 40, dtype=torch.bool)
    valid[..., :30] = False
    x[..., :30] = 1e6  # huge padding values
    idx = outliers.select(x, 2, valid)
    assert (idx >= 30).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # four distinct positions


def test_short_rows_never_repeat_a_position(seed):
    x = torch.randn(3, 8, 4)
    valid = torch.zeros(3, 1, 4, dtype=torch.bool)
    valid[..., 0] = True  # one valid entry per row, two wanted per side
    idx = outliers.select(x, 2, valid)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
