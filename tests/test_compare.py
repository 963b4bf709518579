"""`dhat-seg compare`: method rows (parsing, configs), the ablation's machinery with them
(outputs, reuse, resume, failed and skipped rows, paper numbers) and the CLI's errors.
Training and evaluation are fakes (tests/test_ablate.py's pattern): fast."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg.studies import ablate, compare
from dhat_seg.studies import run as study_run
from dhat_seg.attention import plugin_manager
from dhat_seg.cli import app
from dhat_seg.errors import UserError
from dhat_seg.evaluation.report import EvalOptions
from cli_helpers import assert_one_line_error

SMALL = {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"}
INSTALLED = {"gradcam": 1, "ig": 1}


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugin_manager.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    plugin_manager.reset()


# ---------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------


def test_compare_is_a_dhat_seg_command():
    assert "compare" in {c.name or c.callback.__name__ for c in app.registered_commands}


def sglr_not_implemented(monkeypatch):
    """No row is unimplemented in this version: SGLR's, with method None, stands in for one."""
    monkeypatch.setitem(compare.METHOD_ROWS, "sglr", compare.MethodRow("sglr", "SGLR", None))


def test_parse_methods_plain_composed_and_not_implemented(monkeypatch):
    assert compare.parse_methods("cfa,sglr", "gradcam", INSTALLED) == (["cfa", "sglr"], {})
    sglr_not_implemented(monkeypatch)
    rows, skipped = compare.parse_methods("AT, trades,dhat_trades,at-awp, awp,dhat-awp,cfa,sglr", "gradcam", INSTALLED)
    assert rows == ["at", "trades", "dhat-trades", "awp", "dhat-awp", "cfa", "sglr"]  # aliases and repeats folded
    assert skipped == {"sglr": compare.NOT_IMPLEMENTED}
    assert compare.NOT_IMPLEMENTED == "not implemented in this version"
    assert compare.parse_methods("paper", "gradcam", INSTALLED)[0] == ["mart", "awp", "uiat", "sglr", "dhat", "dhat-cfa"]
    assert compare.parse_methods("all", "gradcam", INSTALLED)[0] == list(compare.METHOD_ROWS)
    assert set(compare.PAPER_MAIN_RESULTS) <= set(compare.METHOD_ROWS)


def test_parse_methods_refuses_unknown_names_listing_the_known_ones():
    with pytest.raises(UserError, match="--methods 'fgsm-at' is unknown") as info:
        compare.parse_methods("at,fgsm-at", "gradcam", INSTALLED)
    assert all(name in str(info.value) for name in compare.METHOD_ROWS)
    with pytest.raises(UserError, match="--methods is empty"):
        compare.parse_methods(" , ", "gradcam", INSTALLED)
    with pytest.raises(UserError, match="--attention 'nosuch' is unknown"):
        compare.parse_methods("at,dhat", "nosuch", INSTALLED)
    assert compare.parse_methods("at,mart", "nosuch", INSTALLED) == (["at", "mart"], {})  # no DHAT row: not read
    rows, skipped = compare.parse_methods("at,dhat", "solo", INSTALLED)  # a built-in whose dependency is missing
    assert rows == ["at", "dhat"] and "unavailable" in skipped["dhat"] and "at" not in skipped


def quick_base(**more):
    return ablate.base_config(ablate.ABLATE_PRESETS["quick"], {**SMALL, **more})


def test_row_configs(monkeypatch):
    base = quick_base()
    options = ablate.ABLATE_PRESETS["quick"].attention_options

    def cfg(name, attention="gradcam", b=base):
        return compare.method_config(b, name, attention, options)

    trades_dhat = cfg("dhat-trades")
    assert (trades_dhat.method, trades_dhat.base, trades_dhat.awp, trades_dhat.attention) == ("dhat", "trades", False, "gradcam")
    assert (cfg("dhat-mart").method, cfg("dhat-mart").base) == ("dhat", "mart")
    awp = cfg("awp")
    assert (awp.method, awp.awp, awp.awp_gamma, awp.awp_warmup) == ("at", True, 0.01, 0)
    dhat_awp = cfg("dhat-awp")
    assert (dhat_awp.method, dhat_awp.base, dhat_awp.awp, dhat_awp.awp_gamma) == ("dhat", "at", True, 0.01)
    trades_awp = cfg("trades-awp")
    assert (trades_awp.method, trades_awp.awp, trades_awp.awp_gamma) == ("trades", True, 0.005)
    # the official --awp-warmup 10 against 1-based epochs: 9 warm-up epochs of 100 -> 1 of the quick preset's 15
    assert trades_awp.awp_warmup == 1
    assert cfg("trades-awp", b=quick_base(epochs=100)).awp_warmup == 9
    assert [compare.scaled_warmup(10, e) for e in (1, 4, 5, 6, 20, 100, 200)] == [0, 0, 1, 1, 2, 10, 20]
    for name, method in (("standard", "standard"), ("at", "at"), ("trades", "trades"), ("mart", "mart"), ("uiat", "uiat")):
        c = cfg(name, attention="u2net")
        assert (c.method, c.awp) == (method, False) and c.attention == base.attention  # the DHAT rows' attention only
    u2net = cfg("dhat", attention="u2net")
    assert u2net.attention == "u2net" and u2net.attention_options == {"input_size": 224}  # the preset's options
    # rows differ only in what the row defines: data, model, schedule and evaluation are shared
    shared = {k: v for k, v in base.to_dict().items()
              if k not in ("method", "base", "awp", "awp_gamma", "awp_warmup", "method_options")}  # the methods' own
    for name in ("at", "dhat-trades", "trades-awp"):
        assert {k: v for k, v in cfg(name).to_dict().items() if k in shared} == shared
    assert (cfg("cfa").method, cfg("cfa").awp) == ("cfa", False)
    dhat_cfa = cfg("dhat-cfa")
    assert (dhat_cfa.method, dhat_cfa.base, dhat_cfa.attention) == ("dhat", "cfa", "gradcam")
    assert (cfg("sglr").method, cfg("sglr").base) == ("sglr", "at")
    sglr_not_implemented(monkeypatch)
    with pytest.raises(UserError, match="not implemented"):
        cfg("sglr")


def test_set_refuses_what_the_rows_define():
    compare.check_overrides({"lr": 0.1, "epochs": 3})
    for key in ("method", "base", "awp", "awp_gamma", "attention"):
        with pytest.raises(UserError, match=f"--set {key}=... is not allowed"):
            compare.check_overrides({key: 1})


# ---------------------------------------------------------------------------------
# running (fake training and evaluation)
# ---------------------------------------------------------------------------------


class FakeTrainer:
    """Writes summary.json (and config.yaml, as a run directory has); raises for rows in ``failing``."""

    failing: tuple[str, ...] = ()
    runs: list = []

    def __init__(self, cfg, run_dir, **_):
        self.cfg, self.run_dir = cfg, run_dir

    def run(self, resume=False):
        FakeTrainer.runs.append((self.run_dir.name, self.cfg, resume))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(f"method: {self.cfg.method}\n")
        if self.run_dir.name in FakeTrainer.failing:
            raise RuntimeError(f"boom in {self.run_dir.name}")
        (self.run_dir / "summary.json").write_text(json.dumps({"config_digest": self.cfg.digest()}))


CLEAN = {"standard": 90.0, "at": 70.0, "trades": 72.0, "mart": 69.0, "awp": 71.0, "uiat": 73.0, "dhat": 74.0,
         "dhat-trades": 75.0, "cfa": 70.5, "dhat-cfa": 76.0}


def fake_eval(calls):
    def run_eval(run_dir, options, log=None):
        name, seed = run_dir.name, options.seed
        calls.append((name, seed))
        checks = [{"name": "iterative beats single-step", "passed": True, "detail": "", "values": {}}]
        report = {"accuracy": {"clean": CLEAN[name] + seed, "pgd10": 40.0, "pgd20": 39.0, "cw": 35.0, "aa": 30.0 + seed},
                  "examples": {"clean": 24}, "robust_gap": {"gap": 4.0, "train_accuracy": 44.0, "n_train": 24},
                  "bg_gap": {"clean": {"gap": 5.0}, "pgd10": {"gap": 1.0}},
                  "background_challenge": {"same": 70.0, "mixed_rand": 65.0, "only_fg": 60.0, "no_fg_bg_class": 20.0,
                                           "pgd10": {"same": 40.0, "mixed_rand": 35.0, "only_fg": 30.0}},
                  "attention_iou": {"mean_iou": 0.3} if name.startswith("dhat") else None,
                  "config_digest": json.loads((run_dir / "summary.json").read_text())["config_digest"],
                  "eval_settings": options.result_settings(),
                  "sanity": {"n": 24, "surrogate": "test", "passed": True, "alpha": 0.01, "checks": checks}}
        (run_dir / "eval.json").write_text(json.dumps(report))
        return report

    return run_eval


def fake_compare(tmp_path, monkeypatch, calls, methods=("at", "dhat-trades", "cfa", "sglr"), seeds=None, failing=(),
                 show_paper=False, preset_name="quick"):
    """compare on the quick preset's data and evaluation; ``preset_name`` names it (the
    paper table and columns shown are that preset's)."""
    monkeypatch.setattr(study_run, "run_eval", fake_eval(calls))
    monkeypatch.setattr(FakeTrainer, "failing", tuple(failing))
    monkeypatch.setattr(FakeTrainer, "runs", [])
    preset = dataclasses.replace(ablate.ABLATE_PRESETS["quick"], show_paper=show_paper, name=preset_name)
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    return compare.run_comparison(list(methods), quick_base(), options, tmp_path / "out", seeds=seeds,
                                  cache_dir=tmp_path / "cache", preset=preset, log=lambda m: None, progress=False,
                                  trainer_factory=FakeTrainer)


def by_row(result):
    return {r["row"]: r for r in result["rows"]}


def test_compare_writes_the_table_with_not_implemented_rows_skipped(tmp_path, monkeypatch):
    sglr_not_implemented(monkeypatch)
    calls = []
    result = fake_compare(tmp_path, monkeypatch, calls)
    out = tmp_path / "out"
    for name in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "ablation.json").exists()
    assert calls == [("at", 0), ("dhat-trades", 0), ("cfa", 0)]  # the skipped rows never train nor evaluate
    assert [(name, cfg.method, cfg.base) for name, cfg, _ in FakeTrainer.runs] == [
        ("at", "at", "at"), ("dhat-trades", "dhat", "trades"), ("cfa", "cfa", "at")]
    rows = by_row(result)
    assert list(rows) == ["AT", "DHAT-TRADES", "CFA", "SGLR"]
    assert rows["AT"]["status"] == "ok" and rows["AT"]["clean"] == 70.0 and rows["AT"]["run_dir"] == str(out / "at")
    assert (rows["DHAT-TRADES"]["method"], rows["DHAT-TRADES"]["base"], rows["DHAT-TRADES"]["attention"]) == ("dhat", "trades", "gradcam")
    assert (rows["AT"]["method"], rows["AT"]["base"], rows["AT"]["awp"], rows["AT"]["attention"]) == ("at", None, False, None)
    assert rows["CFA"]["status"] == "ok" and rows["CFA"]["clean"] == 70.5
    for name in ("SGLR",):
        assert rows[name]["status"] == "skipped: not implemented in this version" and rows[name].get("clean") is None
        assert not (out / name.lower()).exists()
    md = (out / "comparison.md").read_text()
    assert md.startswith("# dhat-seg compare: training methods")
    assert "| method | Clean | PGD-10 | C&W | AA | Robust Gap | BG-gap | mixed-rand | only-FG | status |" in md  # no IoU column
    assert "| AT | 70.00 | 40.00 | 35.00 | 30.00 | 4.00 | 5.00 | 65.00 | 60.00 | ok |" in md
    assert "| SGLR | - | - | - | - | - | - | - | - | skipped: not implemented in this version |" in md
    assert "Paper main results" not in md  # the quick preset shows no paper numbers
    assert "Rows as trained: AT: at; DHAT-TRADES: dhat (base trades) + gradcam; CFA: cfa." in md
    with open(out / "comparison.csv") as fh:
        table = {r["row"]: r for r in csv.DictReader(fh)}
    assert list(table) == ["AT", "DHAT-TRADES", "CFA", "SGLR"]
    assert (table["DHAT-TRADES"]["method"], table["DHAT-TRADES"]["base"], table["DHAT-TRADES"]["awp"]) == ("dhat", "trades", "false")
    assert table["DHAT-TRADES"]["iou"] == "0.3" and table["AT"]["iou"] == "" and table["SGLR"]["clean"] == ""
    assert table["AT"]["sanity"] == "passed"
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["preset"] == "quick" and "AWP warm-ups scaled" in saved["preset_description"]


def test_a_finished_row_is_reused_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    calls = []
    fake_compare(tmp_path, monkeypatch, calls, methods=("at", "mart"))
    out = tmp_path / "out"
    watched = [out / "at" / f for f in ("summary.json", "eval.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    (out / "mart" / "summary.json").unlink()  # interrupted during training: config.yaml is there
    (out / "mart" / "eval.json").unlink()
    calls.clear()
    rows = by_row(fake_compare(tmp_path, monkeypatch, calls, methods=("at", "mart")))
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert rows["AT"]["status"] == "reused" and rows["MART"]["status"] == "ok"
    assert calls == [("mart", 0)] and [(name, resume) for name, _, resume in FakeTrainer.runs] == [("mart", True)]


def test_reuse_copies_a_run_finished_by_another_study_instead_of_training_it(tmp_path, monkeypatch):
    calls = []
    fake_compare(tmp_path, monkeypatch, calls, methods=("at", "uiat"), seeds=[0, 1])
    first = tmp_path / "out"
    calls.clear()
    monkeypatch.setattr(FakeTrainer, "runs", [])
    preset = ablate.ABLATE_PRESETS["quick"]
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    second = tmp_path / "second"
    (second / "seed-1" / "uiat").mkdir(parents=True)  # a run directory of its own is never overwritten
    result = compare.run_comparison(["uiat", "trades"], quick_base(), options, second, seeds=[0, 1],
                                    cache_dir=tmp_path / "cache", preset=preset, log=lambda m: None, progress=False,
                                    trainer_factory=FakeTrainer, reuse=(first,))
    assert calls == [("trades", 0), ("uiat", 1), ("trades", 1)]
    assert [name for name, _, _ in FakeTrainer.runs] == ["trades", "uiat", "trades"]
    copied = second / "seed-0" / "uiat"
    assert (copied / "eval.json").read_bytes() == (first / "seed-0" / "uiat" / "eval.json").read_bytes()
    uiat = by_row(result)["UIAT"]
    assert [p["status"] for p in uiat["per_seed"]] == ["reused", "ok"] and uiat["per_seed"][0]["run_dir"] == str(copied)
    # a run of another config (here: another evaluation) is not taken
    calls.clear()
    third = compare.run_comparison(["at"], quick_base(), dataclasses.replace(options, n_examples=7), tmp_path / "third",
                                   cache_dir=tmp_path / "cache", preset=preset, log=lambda m: None, progress=False,
                                   trainer_factory=FakeTrainer, reuse=(first,))
    assert calls == [("at", 0)] and by_row(third)["AT"]["status"] == "ok"


def test_a_failed_row_is_reported_without_losing_the_others(tmp_path, monkeypatch):
    calls = []
    rows = by_row(fake_compare(tmp_path, monkeypatch, calls, methods=("at", "trades", "uiat"), failing=("trades",)))
    assert rows["AT"]["status"] == "ok" and rows["UIAT"]["status"] == "ok"
    assert rows["TRADES"]["status"] == "failed: RuntimeError: boom in trades"
    assert "boom in trades" in (tmp_path / "out" / "trades" / "error.log").read_text()
    assert "failed: RuntimeError: boom in trades" in (tmp_path / "out" / "comparison.md").read_text()


def test_seeds_and_the_paper_numbers(tmp_path, monkeypatch):
    calls = []
    result = fake_compare(tmp_path, monkeypatch, calls, methods=("mart", "awp", "dhat", "dhat-cfa"), seeds=[0, 1],
                          show_paper=True)
    out = tmp_path / "out"
    assert calls == [("mart", 0), ("awp", 0), ("dhat", 0), ("dhat-cfa", 0), ("mart", 1), ("awp", 1), ("dhat", 1),
                     ("dhat-cfa", 1)]
    assert all((out / f"seed-{s}" / name / "eval.json").is_file() for s in (0, 1) for name in ("mart", "awp", "dhat"))
    rows = by_row(result)
    assert rows["MART"]["clean"] == pytest.approx(69.5) and rows["MART"]["std"]["clean"] == pytest.approx(0.5 ** 0.5)
    assert rows["DHAT-CFA"]["status"] == "ok" and rows["DHAT-CFA"]["clean"] == pytest.approx(76.5)
    assert result["paper_main_results"]["dhat"]["robust_gap"] == 3.51
    assert rows["AT-AWP"]["trains"] == "at + AWP (gamma 0.01, 0 warm-up epochs)" and rows["DHAT-CFA"]["trains"] == "dhat (base cfa) + gradcam"
    md = (out / "comparison.md").read_text()
    assert "| MART | 69.50 ± 0.71 (82.99) |" in md and "(56.25)" in md  # measured, then the paper's in parentheses
    assert "| AT-AWP | 71.50 ± 0.71 (82.67) |" in md and "| DHAT | 74.50 ± 0.71 (83.95) |" in md
    assert "| DHAT-CFA | 76.50 ± 0.71 (84.49) |" in md
    paper = compare.PAPER_MAIN_RESULTS
    assert paper["dhat-cfa"] == {"clean": 84.49, "pgd10": 62.67, "cw": 55.95, "aa": 54.05, "robust_gap": 6.33}
    assert "## Paper main results" in md and "| AWP | 82.67 | 57.80 | 54.82 | 51.90 | 6.90 |" in md
    assert "| DHAT-CFA | 84.49 | 62.67 | 55.95 | 54.05 | 6.33 |" in md and "| SGLR | 85.76 |" in md
    # paired by seed: every row minus DHAT, and every pair on the metrics fixed in docs/results.md
    assert "## Paired by seed: each row minus DHAT" in md and "| MART | -5.00 [-5.00, -5.00] (2) * |" in md
    assert list(result["pairwise"]) == ["clean", "pgd10", "aa", "mixed_rand", "no_fg_bg_class"]
    clean = {(p["a"], p["b"]): p for p in result["pairwise"]["clean"]}
    assert len(clean) == 6 and clean[("mart", "dhat")]["per_seed"] == {0: -5.0, 1: -5.0} and clean[("mart", "dhat")]["differs"]
    assert not any(p["differs"] for p in result["pairwise"]["pgd10"])  # PGD-10 is 40 for every row and seed
    assert "## Which rows differ beyond the seed spread" in md and "**Clean**: 6 of 6 pairs differ" in md
    assert "**PGD-10**: 0 of 6 pairs differ" in md and "| 1 MART |  | - | - | - |" in md


def test_the_part_paper_preset_prints_the_part_papers_table_with_pgd20(tmp_path, monkeypatch):
    assert ablate.ABLATE_PRESETS["part-paper"].show_paper
    result = fake_compare(tmp_path, monkeypatch, [], methods=("at", "part", "dhat"), show_paper=True,
                          preset_name="part-paper")
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| method | Clean | PGD-10 | PGD-20 | C&W | AA | Robust Gap | BG-gap | mixed-rand | only-FG | status |" in md
    assert "| AT | 70.00 (82.58) | 40.00 | 39.00 (43.69) | 35.00 | 30.00 (41.63) |" in md
    assert "| DHAT | 74.00 | 40.00 | 39.00 |" in md  # no PART-paper number for DHAT, nor the DHAT paper's here
    assert "## PART paper Table 1" in md and "| PART-T | 79.36 | 48.90 | 45.97 |" in md
    assert "Paper main results" not in md and "Clean, PGD-10, PGD-20, C&W" in md
    assert result["paper_part_results"]["part-m"] == {"clean": 78.67, "pgd20": 50.26, "aa": 45.19}
    assert "paper_main_results" not in result


def test_the_ablation_shows_no_table10_numbers_under_the_part_paper_preset():
    study = ablate.ATTENTION_STUDY
    assert study.for_preset("paper").paper["gradcam"]["aa"] == 53.10
    assert study.for_preset("part-paper").paper == {} and study.for_preset(None) is study


def test_the_plot_is_a_bar_chart_with_error_bars(tmp_path):
    study = compare.method_study("gradcam")

    def seeds(name, values):
        return ablate.SeedRows(name, {s: ablate.Row(name, status="ok", seed=s, metrics=m, study=study)
                                      for s, m in enumerate(values)}, study=study)

    rows = [seeds("at", [{"clean": 70.0, "aa": 30.0}, {"clean": 72.0, "aa": 31.0}]),
            seeds("dhat", [{"clean": 74.0, "aa": 33.0, "iou": 0.3}, {"clean": 75.0, "aa": 34.0, "iou": 0.4}]),
            ablate.SeedRows("cfa", {0: ablate.Row("cfa", status="skipped: x", study=study)}, study=study)]
    fig = ablate.plot(rows, tmp_path / "p.png")
    (bars,) = fig.axes  # no attention-IoU panels
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["AT", "DHAT"]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["Clean", "AA"]  # IoU is no column of the comparison
    assert bars.get_title().startswith("dhat-seg compare: training methods")


def test_the_plot_of_many_rows_gives_each_its_own_colour_and_a_legend_beside_the_bars(tmp_path):
    study = compare.method_study("gradcam")
    names = [*compare.method_rows(), "dhat[attention=u2net]", "dhat[attention=oracle]"]  # every row: 24
    rows = [ablate.SeedRows(n, {0: ablate.Row(n, status="ok", seed=0, metrics={"clean": 50.0 + i}, study=study)},
                            study=study) for i, n in enumerate(names)]
    fig = ablate.plot(rows, tmp_path / "p.png")
    (bars,) = fig.axes
    colours = {tuple(p.get_facecolor()) for p in bars.patches}
    assert len(colours) == 24  # the default cycle has 10: rows 11-24 would repeat rows 1-14
    legend = bars.get_legend()
    assert len(legend.get_texts()) == 24
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= bars.get_window_extent(renderer).x1  # hides no bar


# ---------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------


def invoke(args):
    return CliRunner().invoke(app, ["compare"] + args)


SMALL_ARGS = ["--device", "cpu", "--set", "image_size=16", "--set", "train_size=100", "--set", "test_size=40"]


def test_compare_cli_runs_the_rows(tmp_path, monkeypatch):
    import dhat_seg.run.experiment

    sglr_not_implemented(monkeypatch)
    calls = []
    monkeypatch.setattr(study_run, "run_eval", fake_eval(calls))
    monkeypatch.setattr(dhat_seg.run.experiment, "Experiment", FakeTrainer)
    monkeypatch.setattr(dhat_seg.run.experiment, "provision_attention", lambda *a, **k: None)  # the fake trains no attention model
    monkeypatch.setattr(FakeTrainer, "runs", [])
    out = tmp_path / "out"
    result = invoke(["--methods", "at,dhat,sglr", "--out", str(out), "--cache-dir", str(tmp_path / "cache")] + SMALL_ARGS)
    assert result.exit_code == 0, result.output
    assert "| AT | 70.00 |" in result.output and "| SGLR |" in result.output and "not implemented" in result.output
    assert "3 rows in" in result.output and f"{out}/comparison.md" in result.output
    assert [name for name, _ in calls] == ["at", "dhat"], result.output
    assert json.loads((out / "comparison.json").read_text())["overrides"]["image_size"] == 16


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--methods", "at,fgsm"], ["--methods 'fgsm' is unknown", "dhat-trades", "cfa"]),
        (["--methods", ","], ["--methods is empty"]),
        (["--attention", "nosuch"], ["--attention 'nosuch' is unknown"]),
        (["--preset", "huge"], ["--preset 'huge' is unknown", "quick"]),
        (["--set", "method=at"], ["--set method=... is not allowed", "--methods"]),
        (["--set", "awp=true"], ["--set awp=... is not allowed"]),
        (["--set", "attention=ig"], ["--set attention=... is not allowed", "--attention"]),
        (["--set", "bogus=1"], ["'bogus' is unknown"]),
        (["--n-examples", "0"], ["--n-examples '0' is invalid"]),
        (["--epochs", "0"], ["--epochs 0 is invalid"]),
        (["--seeds", "0,x"], ["--seeds '0,x' is invalid"]),
        (["--seeds", "0,1", "--seed", "3"], ["--seeds 0,1 and --seed are exclusive"]),
        (["--reuse", "/no/such/study", "--methods", "at", "--set", "image_size=16"], ["--reuse /no/such/study is not a folder"]),
    ],
)
def test_compare_cli_errors_are_one_line(tmp_path, args, needles):
    assert_one_line_error(invoke(["--out", str(tmp_path / "o")] + args), *needles)


def test_compare_paper_preset_without_cifar_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(["--preset", "paper", "--methods", "mart", "--out", str(tmp_path / "o"), "--device", "cpu",
                     "--set", f"data_root={tmp_path / 'empty'}"])
    assert_one_line_error(result, "not found", "(for dhat-seg compare: --set download=true")


def test_tiny_real_rows_train_composed_methods(tmp_path):
    """Two real rows: composed methods through the real trainer and evaluation (AutoAttack left out: its Square
    attack alone takes about 15 s on a model at chance)."""
    preset = ablate.ABLATE_PRESETS["quick"]
    base = quick_base(epochs=1, train_size=100, test_size=40, val_size=0.2, batch_size=50, attack_steps=1,
                      val_examples=10, val_attack_steps=1, inv_steps=1, attention_model_epochs=1)
    options = dataclasses.replace(EvalOptions(), **{**preset.eval, "attacks": "clean,pgd10,cw", "n_examples": 16,
                                                    "gap_examples": 16, "iou_examples": 16, "sanity_examples": 8},
                                  device="cpu").validate()
    out = tmp_path / "out"
    result = compare.run_comparison(["trades-awp", "dhat-mart"], base, options, out, cache_dir=tmp_path / "cache", preset=preset,
                                    log=lambda m: None, progress=False)
    row, dhat = result["rows"]
    assert row["status"] == "ok" and row["trains"] == "trades + AWP (gamma 0.005, 0 warm-up epochs)", row["status"]
    assert dhat["status"] == "ok" and dhat["trains"] == "dhat (base mart) + gradcam", dhat["status"]
    assert all(isinstance(r[k], float) for r in (row, dhat) for k in ("clean", "pgd10", "cw", "robust_gap", "bg_gap"))
    assert isinstance(dhat["iou"], float) and row["iou"] is None
    config = (out / "trades-awp" / "config.yaml").read_text().splitlines()
    assert {"method: trades", "awp: true", "awp_gamma: 0.005", "awp_warmup: 0"} <= set(config)
    config = (out / "dhat-mart" / "config.yaml").read_text().splitlines()
    assert {"method: dhat", "base: mart", "awp: false", "attention: gradcam"} <= set(config)


def test_cfa_start_epochs_scale_with_the_schedule_unless_set():
    """CFA calibrates from epoch 10 and averages from 50 of the paper's 100; a 15-epoch row
    would otherwise train as plain AT. A value given with --set is kept."""
    import dataclasses

    from dhat_seg.studies.rows import ABLATE_PRESETS, base_config
    from dhat_seg.studies.compare import method_config

    base = base_config(ABLATE_PRESETS["quick"], {})
    assert base.epochs == 15
    for name in ("cfa", "dhat-cfa"):
        cfg = method_config(base, name, "gradcam")
        assert (cfg.options("cfa").begin, cfg.options("cfa").fawa_begin) == (2, 8)
    assert "cfa" not in method_config(base, "at", "gradcam").method_options  # rows without CFA: untouched
    given = dataclasses.replace(base, method_options={"cfa": {"begin": 2, "fawa_begin": 4}})
    kept = method_config(given, "cfa", "gradcam")
    assert (kept.options("cfa").begin, kept.options("cfa").fawa_begin) == (2, 4)


def test_a_comparison_row_may_name_its_own_attention():
    installed = {"gradcam": object(), "u2net": object(), "oracle": object()}
    names, unavailable = compare.parse_methods("at,dhat,DHAT[attention=u2net],dhat[attention=u2net]", "gradcam", installed)
    assert names == ["at", "dhat", "dhat[attention=u2net]"] and unavailable == {}
    assert compare.compare_label("dhat[attention=u2net]") == "DHAT [U^2-Net-p]"
    assert compare.compare_key("dhat[attention=u2net]") == "dhat-u2net" and compare.compare_key("dhat") == "dhat"
    base = quick_base()
    cfg = compare.method_config(base, "dhat[attention=u2net]", "gradcam")
    assert (cfg.method, cfg.attention) == ("dhat", "u2net")
    assert compare.method_config(base, "dhat", "gradcam").attention == "gradcam"
    study = compare.method_study("gradcam")
    assert study.describe("dhat[attention=u2net]")["attention"] == "u2net"
    for bad, match in (("at[attention=u2net]", "reads no attention"), ("dhat[base=trades]", "takes only attention"),
                       ("dhat[attention=nosuch]", "is unknown")):
        with pytest.raises(UserError, match=match):
            compare.parse_methods(bad, "gradcam", installed)
