"""Paired differences of a multi-seed study (dhat_seg.studies.paired), against hand computations
and scipy's t-interval."""

from __future__ import annotations

import math

import pytest

from scipy import stats

from dhat_seg.studies.paired import pairwise_differences, pairwise_markdown, paired_differences, paired_markdown
from dhat_seg.studies.rows import Row, SeedRows


def _row(name, per_seed, status="ok"):
    return SeedRows(name, {s: Row(name, status=status if v is not None else "pending", metrics=v or {}, seed=s)
                           for s, v in per_seed.items()})


def test_differences_per_seed_mean_std_and_t_interval():
    ref = _row("-", {0: {"aa": 30.0, "bg_gap": 50.0}, 1: {"aa": 40.0, "bg_gap": 60.0}, 2: {"aa": 35.0, "bg_gap": 55.0}})
    gc = _row("gradcam", {0: {"aa": 31.0, "bg_gap": 45.0}, 1: {"aa": 38.0, "bg_gap": 54.0}, 2: {"aa": 39.0, "bg_gap": 51.0}})
    d = paired_differences([ref, gc], "-", ["aa", "bg_gap"])
    aa = d["gradcam"]["aa"]
    assert aa["per_seed"] == {0: 1.0, 1: -2.0, 2: 4.0}
    assert aa["mean"] == pytest.approx(1.0) and aa["n"] == 3
    assert aa["std"] == pytest.approx(3.0)  # deviations 0, -3, 3: sqrt(18 / 2)
    half = 4.302652729911275 * 3.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
    assert (aa["low"], aa["high"]) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert (aa["low"], aa["high"]) == pytest.approx(stats.t.interval(0.95, 2, loc=1.0, scale=stats.sem([1.0, -2.0, 4.0])))
    assert aa["differs"] is False  # the interval [-6.45, 8.45] contains zero
    bg = d["gradcam"]["bg_gap"]
    assert bg["per_seed"] == {0: -5.0, 1: -6.0, 2: -4.0}
    assert bg["mean"] == pytest.approx(-5.0) and bg["std"] == pytest.approx(1.0)
    assert bg["differs"] is True  # [-7.48, -2.52]
    assert bg["high"] == pytest.approx(-5.0 + 4.302652729911275 / math.sqrt(3))
    assert "-" not in d


def test_only_seeds_where_both_rows_have_a_value_are_paired():
    ref = _row("-", {0: {"aa": 30.0}, 1: None, 2: {"aa": 35.0}})
    row = _row("u2net", {0: {"aa": 33.0}, 1: {"aa": 99.0}, 2: None})
    d = paired_differences([ref, row], "-", ["aa"])
    assert d["u2net"]["aa"]["per_seed"] == {0: 3.0}
    assert d["u2net"]["aa"]["n"] == 1 and d["u2net"]["aa"]["std"] is None and d["u2net"]["aa"]["differs"] is None


def test_no_reference_row_no_differences():
    row = _row("gradcam", {0: {"aa": 33.0}})
    assert paired_differences([row], "-", ["aa"]) == {}


def test_markdown_cells():
    ref = _row("-", {0: {"aa": 30.0}, 1: {"aa": 40.0}})
    row = _row("oracle", {0: {"aa": 32.0}, 1: {"aa": 44.0}})
    d = paired_differences([ref, row], "-", ["aa"])
    text = paired_markdown(d, [ref, row], [("aa", "AA"), ("iou", "IoU")], "- (UIAT)")
    assert "| row - - (UIAT) | AA |" in text  # columns without any difference are left out
    half = 12.706204736174707 * math.sqrt(2.0) / math.sqrt(2)  # diffs 2, 4: mean 3, std sqrt(2); t(0.975, 1)
    assert f"| Oracle (GT) | +3.00 [{3 - half:+.2f}, {3 + half:+.2f}] (2) |" in text  # contains zero: no *
    one = paired_markdown(paired_differences([ref, _row("ig", {0: {"aa": 31.0}})], "-", ["aa"]), [ref], [("aa", "AA")], "-")
    assert "| ig | +1.00 (1) |" in one  # one seed: no interval


def test_every_pair_and_its_matrix():
    a = _row("at", {0: {"pgd10": 40.0}, 1: {"pgd10": 42.0}, 2: {"pgd10": 41.0}})
    b = _row("dhat", {0: {"pgd10": 45.0}, 1: {"pgd10": 46.0}, 2: {"pgd10": 47.0}})  # +5, +4, +6 over AT
    c = _row("uiat", {0: {"pgd10": 39.0}, 1: {"pgd10": 43.0}, 2: {"pgd10": 40.0}})  # -1, +1, -1 over AT
    d = _row("sam", {0: None})  # no results: in no pair
    pairs = pairwise_differences([a, b, c, d], ["pgd10", "aa"])
    assert list(pairs) == ["pgd10"]  # no row has AA
    got = {(p["a"], p["b"]): p for p in pairs["pgd10"]}
    assert set(got) == {("at", "dhat"), ("at", "uiat"), ("dhat", "uiat")}
    assert got[("at", "dhat")]["per_seed"] == {0: -5.0, 1: -4.0, 2: -6.0} and got[("at", "dhat")]["differs"] is True
    assert got[("at", "uiat")]["mean"] == pytest.approx(1 / 3) and got[("at", "uiat")]["differs"] is False
    text = pairwise_markdown(pairs, [a, b, c, d], {"pgd10": "PGD-10"})
    # dhat - uiat: +6, +3, +7, mean 5.33, std 2.08, 95 % interval [+0.16, +10.50]
    assert "**PGD-10**: 2 of 3 pairs differ beyond the seed spread." in text
    assert "| 1 at |  | - | . |" in text and "| 2 dhat | + |  | + |" in text and "| 3 uiat | . | - |  |" in text
    assert "sam" not in text.lower()
