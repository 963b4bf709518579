"""Paired differences of a multi-seed study (dhat_seg.studies.paired), against hand computations."""

from __future__ import annotations

import math

import pytest

from dhat_seg.studies.paired import paired_differences, paired_markdown
from dhat_seg.studies.rows import Row, SeedRows


def _row(name, per_seed, status="ok"):
    return SeedRows(name, {s: Row(name, status=status if v is not None else "pending", metrics=v or {}, seed=s)
                           for s, v in per_seed.items()})


def test_differences_per_seed_mean_std_and_screen():
    ref = _row("-", {0: {"aa": 30.0, "bg_gap": 50.0}, 1: {"aa": 40.0, "bg_gap": 60.0}, 2: {"aa": 35.0, "bg_gap": 55.0}})
    gc = _row("gradcam", {0: {"aa": 31.0, "bg_gap": 45.0}, 1: {"aa": 38.0, "bg_gap": 54.0}, 2: {"aa": 39.0, "bg_gap": 51.0}})
    d = paired_differences([ref, gc], "-", ["aa", "bg_gap"])
    aa = d["gradcam"]["aa"]
    assert aa["per_seed"] == {0: 1.0, 1: -2.0, 2: 4.0}
    assert aa["mean"] == pytest.approx(1.0) and aa["n"] == 3
    assert aa["std"] == pytest.approx(3.0)  # deviations 0, -3, 3: sqrt(18 / 2)
    assert aa["beyond_2se"] is False  # 1 < 2 * 3 / sqrt(3)
    bg = d["gradcam"]["bg_gap"]
    assert bg["per_seed"] == {0: -5.0, 1: -6.0, 2: -4.0}
    assert bg["mean"] == pytest.approx(-5.0) and bg["std"] == pytest.approx(1.0)
    assert bg["beyond_2se"] is True  # 5 > 2 / sqrt(3)
    assert "-" not in d


def test_only_seeds_where_both_rows_have_a_value_are_paired():
    ref = _row("-", {0: {"aa": 30.0}, 1: None, 2: {"aa": 35.0}})
    row = _row("u2net", {0: {"aa": 33.0}, 1: {"aa": 99.0}, 2: None})
    d = paired_differences([ref, row], "-", ["aa"])
    assert d["u2net"]["aa"]["per_seed"] == {0: 3.0}
    assert d["u2net"]["aa"]["n"] == 1 and d["u2net"]["aa"]["std"] is None and d["u2net"]["aa"]["beyond_2se"] is None


def test_no_reference_row_no_differences():
    row = _row("gradcam", {0: {"aa": 33.0}})
    assert paired_differences([row], "-", ["aa"]) == {}


def test_markdown_cells():
    ref = _row("-", {0: {"aa": 30.0}, 1: {"aa": 40.0}})
    row = _row("oracle", {0: {"aa": 32.0}, 1: {"aa": 44.0}})
    d = paired_differences([ref, row], "-", ["aa"])
    text = paired_markdown(d, [ref, row], [("aa", "AA"), ("iou", "IoU")], "- (UIAT)")
    assert "| row - - (UIAT) | AA |" in text  # columns without any difference are left out
    sd = math.sqrt(2.0)
    assert f"+3.00 ± {sd:.2f} (2)" in text
