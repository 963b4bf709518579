"""The fixed hypotheses' arithmetic (dhat_seg.studies.trend) against scipy/numpy, and
the ablation's row variants (``oracle[dilate=2]``) that give the attention-quality sweep
its rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dhat_seg.errors import UserError
from dhat_seg.studies import ablate
from dhat_seg.studies import trend
from dhat_seg.studies.rows import parse_rows, row_config, row_key, row_label
from dhat_seg.studies.variants import parse_variant, split_rows


def test_t_quantile_and_interval_match_scipy():
    assert trend.t_quantile(4) == pytest.approx(2.7764451, abs=1e-6)  # 5 seeds
    assert trend.t_quantile(2) == pytest.approx(4.3026527, abs=1e-6)  # 3 seeds
    values = [1.0, 4.0, 2.5, 7.0, 3.0]
    got = trend.t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (got["low"], got["high"], got["n"]) == (pytest.approx(low), pytest.approx(high), 5)
    assert got["std"] == pytest.approx(np.std(values, ddof=1))
    assert trend.t_interval([2.0]) == {"mean": 2.0, "std": None, "n": 1, "low": None, "high": None}
    assert trend.t_interval([])["mean"] is None
    with pytest.raises(ValueError):
        trend.t_quantile(0)


def test_slope_and_rank_correlation_match_numpy_and_scipy():
    xs, ys = [0.1, 0.4, 0.45, 1.0], [3.0, -1.0, 2.0, 8.0]
    slope, intercept = trend.ols_slope(xs, ys)
    ref_slope, ref_intercept = np.polyfit(xs, ys, 1)
    assert (slope, intercept) == (pytest.approx(ref_slope), pytest.approx(ref_intercept))
    assert trend.ols_slope([0.5, 0.5], [1.0, 2.0]) is None and trend.ols_slope([0.5], [1.0]) is None
    with pytest.raises(ValueError):
        trend.ols_slope([1.0], [1.0, 2.0])
    assert trend.spearman(xs, ys) == pytest.approx(stats.spearmanr(xs, ys).statistic)
    assert trend.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert trend.spearman([1, 2], [1, 2]) is None and trend.spearman([1, 2, 3], [5, 5, 5]) is None


def _rows(diffs_by_seed, ious, key="mixed_rand", base=50.0):
    """UIAT at ``base`` and one row per IoU whose value at seed s is base + diffs_by_seed[s][i]."""
    rows = [ablate.SeedRows("-", {s: ablate.Row("-", status="ok", seed=s, metrics={key: base}) for s in diffs_by_seed})]
    for i, iou in enumerate(ious):
        name = f"oracle[flip={i}]"
        rows.append(ablate.SeedRows(name, {s: ablate.Row(name, status="ok", seed=s, metrics={key: base + d[i], "iou": iou})
                                           for s, d in diffs_by_seed.items()}))
    return rows


IOUS = [0.2, 0.5, 1.0]
H1 = trend.HYPOTHESES[0]


def test_a_trend_is_the_mean_of_per_seed_slopes_with_a_t_interval():
    slopes = {0: 8.0, 1: 10.0, 2: 12.0}
    diffs = {s: [b * x - 1.0 for x in IOUS] for s, b in slopes.items()}  # exact lines, intercept -1
    result = trend.trend_test(_rows(diffs, IOUS), "-", H1)
    assert result["per_seed_slope"] == {s: pytest.approx(b) for s, b in slopes.items()}
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert (result["estimate"], result["low"], result["high"]) == (pytest.approx(10.0), pytest.approx(10 - half),
                                                                     pytest.approx(10 + half))
    assert result["verdict"] == "supported" and result["n_seeds"] == 3
    assert result["spearman_row_means"] == pytest.approx(1.0)
    assert result["per_seed_intercept"] == {s: pytest.approx(-1.0) for s in slopes}
    falls = trend.Hypothesis("Hx", "mixed_rand", "x", "falls", "trend", -1)
    assert trend.trend_test(_rows(diffs, IOUS), "-", falls)["verdict"] == "against"
    mixed = {0: [-5 * x for x in IOUS], 1: [5 * x for x in IOUS], 2: [10 * x for x in IOUS]}
    assert trend.trend_test(_rows(mixed, IOUS), "-", H1)["verdict"] == "inconclusive"


def test_a_trend_needs_two_seeds_and_rows_with_different_ious():
    one_seed = trend.trend_test(_rows({0: [1.0, 2.0, 3.0]}, IOUS), "-", H1)
    assert one_seed["verdict"] == "not measured"
    assert one_seed["per_seed_slope"] == {0: pytest.approx(np.polyfit(IOUS, [1.0, 2.0, 3.0], 1)[0])}
    same_iou = trend.trend_test(_rows({0: [1.0, 2.0], 1: [2.0, 1.0]}, [1.0, 1.0]), "-", H1)
    assert same_iou["verdict"] == "not measured" and same_iou["per_seed_slope"] == {}
    # a seed where the reference has no value pairs nothing
    rows = _rows({0: [1.0, 2.0, 3.0], 1: [1.0, 2.0, 3.0]}, IOUS)
    rows[0].runs[1].metrics = {}
    assert sorted(trend.paired_points(rows, "-", "mixed_rand")) == [0]
    assert trend.trend_test(rows, "missing", H1)["verdict"] == "not measured"


def test_the_floor_is_tested_row_by_row():
    h4 = next(h for h in trend.HYPOTHESES if h.kind == "floor")
    assert h4.key == "aa" and h4.margin == 5.0
    fine = _rows({0: [-1.0, 0.0, 1.0], 1: [-2.0, 1.0, 0.0], 2: [-1.5, 0.5, 0.5]}, IOUS, key="aa")
    result = trend.floor_test(fine, "-", h4)
    assert result["verdict"] == "supported" and result["worst_row"] == "oracle[flip=0]"
    assert result["estimate"] == pytest.approx(-1.5)
    lost = _rows({0: [-9.0, 0.0, 1.0], 1: [-10.0, 1.0, 0.0], 2: [-9.5, 0.5, 0.5]}, IOUS, key="aa")
    assert trend.floor_test(lost, "-", h4)["verdict"] == "against"
    # the row shown is the one that decides: the narrow row wholly below the floor, not the
    # wide row whose interval reaches lower
    narrow_and_wide = _rows({0: [-7.0, -12.0, 1.0], 1: [-7.5, 10.0, 0.0], 2: [-6.5, -1.0, 0.5]}, IOUS, key="aa")
    decided = trend.floor_test(narrow_and_wide, "-", h4)
    assert decided["verdict"] == "against" and decided["worst_row"] == "oracle[flip=0]"
    assert decided["high"] < -5 and decided["per_row"]["oracle[flip=1]"]["diff"]["low"] < decided["low"]
    wide = _rows({0: [-12.0, 0.0, 1.0], 1: [2.0, 1.0, 0.0], 2: [-4.0, 0.5, 0.5]}, IOUS, key="aa")
    assert trend.floor_test(wide, "-", h4)["verdict"] == "inconclusive"
    # in a partly filled table the seed count shown is the worst row's own, not the largest
    partial = _rows({0: [-4.0, 0.0, 1.0], 1: [-3.0, 1.0, 0.0], 2: [-4.5, 0.5, 0.5]}, IOUS, key="aa")
    del partial[1].runs[2]
    shown = trend.floor_test(partial, "-", h4)
    assert shown["worst_row"] == "oracle[flip=0]" and shown["n_seeds"] == 2
    assert "pts (2) |" in trend.hypotheses_markdown([shown])


def test_the_hypotheses_reach_the_ablation_outputs(tmp_path):
    metrics = ("mixed_rand", "no_fg_bg_class", "robust_gap", "aa", "pgd10")
    rows = [ablate.SeedRows("-", {s: ablate.Row("-", status="ok", seed=s, metrics={k: 50.0 for k in metrics})
                                  for s in range(3)})]
    for name, iou in (("gradcam", 0.2), ("oracle[dilate=1]", 0.6), ("oracle", 1.0)):
        rows.append(ablate.SeedRows(name, {s: ablate.Row(name, status="ok", seed=s, metrics={
            "mixed_rand": 50 + 10 * iou + s, "no_fg_bg_class": 50 - 20 * iou + s, "robust_gap": 50.0 + s * iou,
            "aa": 50 - s, "pgd10": 50 + 0.5 * s, "iou": iou}) for s in range(3)}))
    data = ablate.write_outputs(tmp_path, rows, {"seeds": [0, 1, 2]}, ablate.ABLATE_PRESETS["quick"])
    verdicts = {h["hypothesis"]: h["verdict"] for h in data["hypotheses"]}
    assert verdicts == {"H1": "supported", "H2": "supported", "H3": "inconclusive", "H4": "supported",
                        "H5": "inconclusive"}  # H5: PGD-10 does not move with the IoU: every slope 0
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [h["hypothesis"] for h in saved["hypotheses"]] == ["H1", "H2", "H3", "H4", "H5"]
    md = (tmp_path / "ablation.md").read_text()
    assert "## Hypotheses" in md and "| H1: DHAT's accuracy on random backgrounds" in md
    h5 = next(line for line in md.splitlines() if line.startswith("| H5:"))
    assert h5.endswith("| Grad-CAM +1.8, Integrated-Grad +1.7, SOLO +2.9, SAM +3.8 |")  # Table 10 minus UIAT
    assert next(line for line in md.splitlines() if line.startswith("| H1:")).endswith("| not measured |")
    fig = ablate.plot(rows, tmp_path / "p.png")
    titles = [ax.get_title() for ax in fig.axes[1:]]
    assert [t.split(":")[0] for t in titles] == ["H1", "H2", "H3", "H4", "H5"]
    assert titles[0].endswith("supported")


def test_row_variants_parse_name_and_configure_their_rows():
    assert split_rows("-, oracle[dilate=1,flip=0.1] ,gradcam,") == ["-", "oracle[dilate=1,flip=0.1]", "gradcam"]
    assert parse_variant("oracle[flip=0.1, dilate=1]") == ("oracle", {"flip": "0.1", "dilate": "1"})
    assert parse_variant("gradcam") == ("gradcam", {})
    installed = {"gradcam": object(), "oracle": object()}
    rows, unavailable = parse_rows("-,oracle[flip=0.1,dilate=1],oracle,oracle[dilate=1, flip=0.1]", installed)
    assert rows == ["-", "oracle[dilate=1,flip=0.1]", "oracle"] and unavailable == {}  # canonical, once
    assert row_key("oracle[dilate=1,flip=0.1]") == "oracle-dilate1-flip0.1" and row_key("-") == "uiat"
    assert row_label("oracle[dilate=1,flip=0.1]") == "Oracle (GT) [dilate=1, flip=0.1]"
    assert row_label("gradcam") == "Grad-CAM" and row_key("gradcam") == "gradcam"
    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"})
    cfg = row_config(base, "oracle[dilate=2]", {}, {"oracle": {"dilate": "1", "seed": "3"}})
    assert (cfg.method, cfg.attention, cfg.attention_options) == ("dhat", "oracle", {"dilate": "2", "seed": "3"})
    assert ablate.ATTENTION_STUDY.readiness("oracle[dilate=2]", cfg) is None
    for bad in ("oracle[dilate]", "oracle[]", "oracle[dilate=1,dilate=2]", "oracle[dilate=a b]", "oracle[x=1"):
        with pytest.raises(UserError, match="--attention row"):
            parse_rows(bad, installed)
    with pytest.raises(UserError, match="unknown"):
        parse_rows("nosuch[dilate=1]", installed)


def test_a_variant_row_runs_in_its_own_directory(tmp_path, monkeypatch):
    import dataclasses

    from dhat_seg.evaluation.report import EvalOptions
    from dhat_seg.studies import run as study_run
    from test_ablate import FakeTrainer, fake_eval

    seen = []

    class Recording(FakeTrainer):
        def __init__(self, cfg, run_dir, **kw):
            seen.append((run_dir.name, cfg.attention, dict(cfg.attention_options)))
            super().__init__(cfg, run_dir, **kw)

    monkeypatch.setattr(study_run, "run_eval", fake_eval([], failing=()))
    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"})
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    result = ablate.run_ablation(["-", "oracle[dilate=1]"], base, options, tmp_path / "out", cache_dir=tmp_path / "cache",
                                 preset=preset, log=lambda m: None, progress=False, trainer_factory=Recording)
    assert ("oracle-dilate1", "oracle", {"dilate": "1"}) in seen
    row = next(r for r in result["rows"] if r["row"] == "Oracle (GT) [dilate=1]")
    assert row["status"] == "ok" and row["attention"] == "oracle[dilate=1]"
    assert (tmp_path / "out" / "oracle-dilate1" / "eval.json").is_file()


def test_flagged_rows_stay_in_the_tests_and_the_tests_are_also_given_without_them(tmp_path):
    rows = _rows({s: [10 * x + s for x in [0.2, 0.5, 0.8, 1.0]] for s in range(3)}, [0.2, 0.5, 0.8, 1.0])
    rows[4].runs[1].status = "suspect: noise finds what PGD misses failed"  # the exact mask's row, seed 1
    rows[3].runs[2].convergence = {"converged": False, "verdict": "still climbing (clean +3.0)"}
    rows[1].runs[0].status = "pending"  # no results at seed 0: nothing to flag there
    data = ablate.write_outputs(tmp_path, rows, {"seeds": [0, 1, 2]}, ablate.ABLATE_PRESETS["quick"])
    assert data["hypotheses_flagged_rows"] == {"oracle[flip=2]": ["seed 2: still climbing (clean +3.0)"],
                                               "oracle[flip=3]": ["seed 1: suspect: noise finds what PGD misses failed"]}
    kept = next(h for h in data["hypotheses"] if h["hypothesis"] == "H1")
    without = next(h for h in data["hypotheses_without_flagged"] if h["hypothesis"] == "H1")
    assert kept["rows"] == ["oracle[flip=0]", "oracle[flip=1]", "oracle[flip=2]", "oracle[flip=3]"]
    assert without["rows"] == ["oracle[flip=0]", "oracle[flip=1]"]
    assert without["per_seed_slope"] == {1: pytest.approx(10.0), 2: pytest.approx(10.0)}  # seed 0: one row left
    md = (tmp_path / "ablation.md").read_text()
    assert "kept above: Oracle (GT) [flip=2] (seed 2: still climbing (clean +3.0)); Oracle (GT) [flip=3] (seed 1: suspect" in md
    assert md.count("| H1: DHAT's accuracy on random backgrounds") == 2
    clean = ablate.write_outputs(tmp_path, _rows({s: [1.0, 2.0] for s in range(2)}, [0.2, 0.5]), {"seeds": [0, 1]},
                                 ablate.ABLATE_PRESETS["quick"])
    assert "hypotheses_flagged_rows" not in clean and "hypotheses_without_flagged" not in clean


def test_the_paper_column_is_each_row_minus_the_reference_from_the_papers_numbers():
    paper = {"-": {"pgd10": 58.66, "robust_gap": 7.92}, "gradcam": {"pgd10": 60.49, "robust_gap": 3.51},
             "sam": {"pgd10": 62.44}}
    assert trend.paper_differences("pgd10", paper, "-", {"sam": "SAM"}) == "gradcam +1.8, SAM +3.8"
    assert trend.paper_differences("robust_gap", paper, "-") == "gradcam -4.4"  # SAM has no Robust Gap here
    assert trend.paper_differences("mixed_rand", paper, "-") == "not measured"
    assert trend.paper_differences("pgd10", paper, "uiat") == "not measured"  # no reference row
