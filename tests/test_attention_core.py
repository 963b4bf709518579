"""Threshold policies, result validation and option handling of attention methods."""

import pytest
import torch

from dhat_seg.attention import AttentionSpec, foreground_mask, minmax_normalise, otsu_threshold, validate_attention
from dhat_seg.errors import PluginError, UserError


def test_fixed_threshold_is_omega():
    att = torch.tensor([0.05, 0.1, 0.5, 0.0]).view(1, 1, 2, 2)
    assert foreground_mask(att, "fixed", omega=0.1).flatten().tolist() == [False, True, True, False]


def test_quantile_threshold_keeps_top_fraction():
    att = torch.linspace(0, 1, 100).view(1, 1, 10, 10)
    fg = foreground_mask(att, "quantile", quantile=0.75)
    assert fg.sum().item() == 25


def test_mean_threshold_per_image():
    att = torch.stack([torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.7, 0.8])]).view(2, 1, 2, 2)
    fg = foreground_mask(att, "mean")
    assert fg[0].flatten().tolist() == [False, False, False, True]
    assert fg[1].flatten().tolist() == [False, False, True, True]


def test_otsu_separates_two_modes():
    torch.manual_seed(0)
    values = torch.cat([torch.rand(60) * 0.2, 0.7 + torch.rand(40) * 0.3]).view(1, 100)
    thr = otsu_threshold(values).item()
    assert 0.2 <= thr <= 0.7
    fg = foreground_mask(values.view(1, 1, 10, 10), "otsu")
    assert fg.sum().item() == 40


def test_bool_masks_pass_through_and_unknown_policy_fails():
    m = torch.rand(1, 1, 3, 3) > 0.5
    assert foreground_mask(m, "otsu") is m
    with pytest.raises(UserError, match="threshold policy 'median'"):
        foreground_mask(torch.rand(1, 1, 2, 2), "median")


def test_minmax_normalise_per_image():
    x = torch.tensor([[1.0, 3.0], [10.0, 20.0]]).view(2, 1, 1, 2)
    assert minmax_normalise(x).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((2, 1, 4, 4), float("nan")), "NaN"),
        (torch.rand(2, 4, 4), "shape"),
        (torch.rand(2, 1, 4, 4) + 1.5, r"values in \["),
        (torch.zeros(2, 1, 4, 4, dtype=torch.long), "dtype"),
        ([1, 2], "returned list"),
    ],
)
def test_validate_attention_names_the_method(bad, message):
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(PluginError, match=message) as info:
        validate_attention(bad, images, "mymethod")
    assert "mymethod" in str(info.value)


def test_validate_accepts_soft_and_bool():
    images = torch.rand(2, 3, 4, 4)
    validate_attention(torch.rand(2, 1, 4, 4), images, "ok")
    validate_attention(torch.rand(2, 1, 4, 4) > 0.5, images, "ok")


def test_spec_options_are_typed_and_checked():
    spec = AttentionSpec(name="demo", description="d", factory=lambda ctx: None, default_options={"steps": 4, "flag": False, "w": 0.5})
    assert spec.resolve_options({"steps": "8", "flag": "yes", "w": "0.25"}) == {"steps": 8, "flag": True, "w": 0.25}
    with pytest.raises(UserError, match="has no option 'nope'"):
        spec.resolve_options({"nope": 1})
    with pytest.raises(UserError, match="'abc' is invalid"):
        spec.resolve_options({"steps": "abc"})


def test_spec_rejects_bad_names_and_kinds():
    with pytest.raises(PluginError):
        AttentionSpec(name="bad name", description="", factory=lambda c: None)
    with pytest.raises(PluginError, match="kind"):
        AttentionSpec(name="ok", description="", factory=lambda c: None, kind="magic")


def test_foreground_iou_by_hand():
    from dhat_seg.attention import foreground_iou

    p = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).view(2, 1, 2, 2)
    t = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool).view(2, 2, 2)
    assert foreground_iou(p, t).tolist() == pytest.approx([1 / 3, 1.0])
