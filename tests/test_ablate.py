"""`dhat-seg ablate`: the table, skipped and failed rows, reuse and resume of rows."""

from __future__ import annotations

import csv
import json
import types

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg import hookimpl
from dhat_seg.studies import ablate
from dhat_seg.studies import run as study_run
from dhat_seg.attention import AttentionSpec, plugin_manager
from dhat_seg.cli import app
from dhat_seg.errors import UserError
from cli_helpers import assert_one_line_error

TINY = ["--epochs", "1", "--device", "cpu", "--n-examples", "24", "--aa-examples", "6", "--gap-examples", "24",
        "--set", "image_size=16", "--set", "train_size=200", "--set", "test_size=60", "--set", "val_size=0.2",
        "--set", "batch_size=50", "--set", "attack_steps=1", "--set", "inv_steps=1", "--set", "val_examples=20",
        "--set", "val_attack_steps=1", "--set", "attention_model_epochs=1"]


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugin_manager.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine
    yield
    torch.set_num_threads(threads)
    plugin_manager.reset()


def test_ablate_is_a_dhat_seg_command():
    assert "ablate" in {c.name or c.callback.__name__ for c in app.registered_commands}


def invoke(args):
    return CliRunner().invoke(app, ["ablate"] + args)


@pytest.fixture(scope="module")
def first_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    plugin_manager.reset()
    torch.set_num_threads(1)
    result = invoke(["--attention", "-,gradcam,sam", "--out", str(root / "out"), "--cache-dir", str(root / "cache")] + TINY)
    return root, result


def rows_of(out):
    return {r["row"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}


def test_ablate_writes_the_table_with_sam_skipped(first_ablation):
    root, result = first_ablation
    assert result.exit_code == 0, result.output
    out = root / "out"
    for name in ("ablation.md", "ablation.csv", "ablation.json", "ablation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = rows_of(out)
    assert list(rows) == ["- (UIAT)", "Grad-CAM", "SAM"]
    assert rows["SAM"]["status"].startswith("skipped:") and "--attention-checkpoint sam=PATH" in rows["SAM"]["status"]
    assert ablate.NO_DOWNLOAD_HINT in rows["SAM"]["status"]
    for name, method in (("- (UIAT)", "uiat"), ("Grad-CAM", "dhat")):
        row = rows[name]
        assert row["status"] == "ok" and row["method"] == method
        for key in ("clean", "pgd10", "cw", "aa", "robust_gap", "bg_gap"):
            assert isinstance(row[key], float), (name, key, row)
        evaluation = json.loads((out / ("uiat" if method == "uiat" else "gradcam") / "eval.json").read_text())
        assert evaluation["config_digest"] == json.loads((out / row["run_dir"].split("/")[-1] / "summary.json").read_text())["config_digest"]
    assert rows["Grad-CAM"]["iou"] is not None and rows["- (UIAT)"]["iou"] is None
    # the two rows differ only in the method: the rest of the config is shared
    uiat = (out / "uiat" / "config.yaml").read_text().splitlines()
    grad = (out / "gradcam" / "config.yaml").read_text().splitlines()
    assert [a for a, b in zip(uiat, grad) if a != b] == ["method: uiat"]
    # one attention model, in the cache
    assert len(list((root / "cache" / "attention-models").iterdir())) == 1
    with open(out / "ablation.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["status"][:7] for r in table] == ["ok", "ok", "skipped"]
    assert "| Grad-CAM |" in result.output and "skipped:" in result.output


def test_second_invocation_reuses_finished_rows(first_ablation):
    root, _ = first_ablation
    out = root / "out"
    watched = [out / d / f for d in ("uiat", "gradcam") for f in ("summary.json", "eval.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    result = invoke(["--attention", "-,gradcam,sam", "--out", str(out), "--cache-dir", str(root / "cache")] + TINY)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    rows = rows_of(out)
    assert rows["- (UIAT)"]["status"] == "reused" and rows["Grad-CAM"]["status"] == "reused"
    assert rows["SAM"]["status"].startswith("skipped:")


def _raising_plugin():
    def factory(ctx):
        def fn(images, labels):
            raise RuntimeError("boom from the test plugin")

        return fn

    return types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name="boom", description="raises", factory=factory, kind="image"))))


def test_a_failing_row_is_reported_and_an_interrupted_row_resumes(first_ablation):
    root, _ = first_ablation
    out = root / "out"
    # interrupt the UIAT row after training: its evaluation must be redone, training resumed (nothing left)
    (out / "uiat" / "summary.json").unlink()
    (out / "uiat" / "eval.json").unlink()
    plugin_manager.register_plugin(_raising_plugin(), "boom")
    result = invoke(["--attention", "-,boom", "--out", str(out), "--cache-dir", str(root / "cache")] + TINY)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output  # Trainer(resume=True) on the existing run directory
    rows = rows_of(out)
    assert rows["- (UIAT)"]["status"] == "ok" and isinstance(rows["- (UIAT)"]["aa"], float)
    assert rows["boom"]["status"].startswith("failed:") and "boom from the test plugin" in rows["boom"]["status"]
    assert "boom from the test plugin" in (out / "boom" / "error.log").read_text()
    assert "failed:" in (out / "ablation.md").read_text()


def test_parse_rows():
    installed = {"sam": 1, "gradcam": 1, "zeta": 1, "ig": 1}
    assert ablate.parse_rows("all", installed) == (["-", "gradcam", "ig", "sam", "zeta"], {})
    more = {**installed, "oracle": 1, "u2net": 1, "solo": 1, "alpha": 1}
    assert ablate.parse_rows("all", more)[0] == ["-", "gradcam", "ig", "solo", "sam", "u2net", "oracle", "alpha", "zeta"]
    assert ablate.parse_rows("none, gradcam,-,sam", installed) == (["-", "gradcam", "sam"], {})
    rows, unavailable = ablate.parse_rows("-,solo", installed)
    assert rows == ["-", "solo"] and "solo" in unavailable["solo"]
    with pytest.raises(UserError, match="--attention 'gradkam' is unknown"):
        ablate.parse_rows("-,gradkam", installed)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--attention", "-,nosuch"], ["--attention 'nosuch' is unknown"]),
        (["--preset", "huge"], ["--preset 'huge' is unknown", "quick"]),
        (["--attention-opt", "ig-steps"], ["--attention-opt 'ig-steps' is invalid"]),
        (["--n-examples", "0"], ["--n-examples '0' is invalid"]),
        (["--sanity-examples", "0"], ["--sanity-examples '0' is invalid"]),
        (["--set", "bogus=1"], ["'bogus' is unknown"]),
        (["--seeds", "0,x"], ["--seeds '0,x' is invalid", "non-negative integers"]),
        (["--seeds=-1"], ["--seeds '-1' is invalid"]),
        (["--seeds", "0,1,1"], ["--seeds '0,1,1' repeats seed 1"]),
        (["--seeds", "0,1", "--seed", "3"], ["--seeds 0,1 and --seed are exclusive"]),
    ],
)
def test_ablate_cli_errors_are_one_line(tmp_path, args, needles):
    assert_one_line_error(invoke(["--out", str(tmp_path / "o")] + args), *needles)


# ---------------------------------------------------------------------------------
# gradient-masking sanity checks per row (fake training and evaluation: fast)
# ---------------------------------------------------------------------------------

FAILED_CHECK = "unbounded attack succeeds"
SHIFT = {0: 0.0, 1: 2.0, 2: 7.0}  # clean accuracy 60, 62, 67 on seeds 0, 1, 2


class FakeTrainer:
    def __init__(self, cfg, run_dir, **_):
        self.cfg, self.run_dir = cfg, run_dir

    def run(self, resume=False):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "summary.json").write_text(json.dumps({"config_digest": self.cfg.digest()}))


def fake_eval(calls, failing=("gradcam",)):
    """run_eval stand-in: writes eval.json; the rows in ``failing`` fail one sanity check."""

    def run_eval(run_dir, options, log=None):

        calls.append((run_dir.name, options))
        seed = options.seed
        checks = [{"name": name, "passed": not (run_dir.name in failing and name == FAILED_CHECK), "detail": "", "values": {}}
                  for name in ("iterative beats single-step", FAILED_CHECK)]
        digest = json.loads((run_dir / "summary.json").read_text())["config_digest"]
        uiat = run_dir.name == "uiat"
        report = {"accuracy": {"clean": 60.0 + SHIFT[seed], "pgd10": 40.0, "cw": 35.0, "aa": 30.0 + seed},
                  "examples": {"clean": 24}, "robust_gap": None,
                  "bg_gap": {"clean": {"gap": 5.0 + seed + (0 if uiat else 2)}, "pgd10": {"gap": 1.0}},
                  "attention_iou": None if uiat else {"mean_iou": 0.1 * (seed + 1)}, "config_digest": digest,
                  "eval_settings": options.result_settings(),
                  "sanity": {"n": 24, "surrogate": "test", "passed": all(c["passed"] for c in checks), "alpha": 0.01,
                             "checks": checks}}
        (run_dir / "eval.json").write_text(json.dumps(report))
        return report

    return run_eval


def fake_ablation(tmp_path, monkeypatch, calls, failing=("gradcam",), seeds=None):
    import dataclasses

    from dhat_seg.evaluation.report import EvalOptions

    monkeypatch.setattr(study_run, "run_eval", fake_eval(calls, failing))
    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"})
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    return ablate.run_ablation(["-", "gradcam"], base, options, tmp_path / "out", seeds=seeds, cache_dir=tmp_path / "cache",
                               preset=preset, log=lambda m: None, progress=False, trainer_factory=FakeTrainer)


def test_a_row_failing_a_sanity_check_is_marked_suspect(tmp_path, monkeypatch):
    calls = []
    result = fake_ablation(tmp_path, monkeypatch, calls)
    assert [name for name, _ in calls] == ["uiat", "gradcam"]
    assert all(options.sanity and options.sanity_examples for _, options in calls)  # every row runs the checks
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["- (UIAT)"]["status"] == "ok" and rows["- (UIAT)"]["sanity"]["passed"]
    assert rows["Grad-CAM"]["status"] == f"suspect: {FAILED_CHECK} failed"
    assert [c["passed"] for c in rows["Grad-CAM"]["sanity"]["checks"]] == [True, False]
    out = tmp_path / "out"
    assert f"suspect: {FAILED_CHECK} failed" in (out / "ablation.md").read_text()
    with open(out / "ablation.csv") as fh:
        table = {r["row"]: r for r in csv.DictReader(fh)}
    assert table["Grad-CAM"]["sanity"] == f"failed: {FAILED_CHECK}" and table["- (UIAT)"]["sanity"] == "passed"
    assert table["Grad-CAM"]["clean"] == "60.0"  # the numbers stay, marked
    rows = [ablate.Row("-", status="ok", metrics={"clean": 1.0}), ablate.Row("gradcam", status="suspect: x failed", metrics={"clean": 2.0})]
    legend = [t.get_text() for t in ablate.plot(rows, tmp_path / "p.png").axes[0].get_legend().get_texts()]
    assert legend[0] == "- (UIAT)" and "suspect" in legend[1]


def test_reuse_of_finished_rows_is_aware_of_sanity(tmp_path, monkeypatch):
    calls = []
    fake_ablation(tmp_path, monkeypatch, calls)
    calls.clear()
    rows = {r["row"]: r for r in fake_ablation(tmp_path, monkeypatch, calls)["rows"]}
    assert calls == []  # both reused, the failed check still shown
    assert rows["- (UIAT)"]["status"] == "reused" and rows["Grad-CAM"]["status"] == f"suspect: {FAILED_CHECK} failed (reused)"
    # a row evaluated without the sanity checks (same settings otherwise) is evaluated again, not shown unchecked
    report = json.loads((tmp_path / "out" / "uiat" / "eval.json").read_text())
    del report["sanity"]
    (tmp_path / "out" / "uiat" / "eval.json").write_text(json.dumps(report))
    rows = {r["row"]: r for r in fake_ablation(tmp_path, monkeypatch, calls)["rows"]}
    assert [name for name, _ in calls] == ["uiat"] and rows["- (UIAT)"]["status"] == "ok"
    # so is a row checked by the old rules (no tests, no p-values: no alpha in its sanity block)
    calls.clear()
    report = json.loads((tmp_path / "out" / "gradcam" / "eval.json").read_text())
    del report["sanity"]["alpha"]
    (tmp_path / "out" / "gradcam" / "eval.json").write_text(json.dumps(report))
    rows = {r["row"]: r for r in fake_ablation(tmp_path, monkeypatch, calls)["rows"]}
    assert [name for name, _ in calls] == ["gradcam"] and rows["- (UIAT)"]["status"] == "reused"


# ---------------------------------------------------------------------------------
# several seeds: mean +- std, layout, reuse; u2net and oracle rows; the IoU panel
# ---------------------------------------------------------------------------------


def test_seeds_give_mean_and_sample_std_per_row(tmp_path, monkeypatch):
    calls = []
    fake_ablation(tmp_path, monkeypatch, calls, failing=(), seeds=None)  # single seed (0): OUT/<row>/, as before
    assert [(name, o.seed) for name, o in calls] == [("uiat", 0), ("gradcam", 0)]
    calls.clear()
    result = fake_ablation(tmp_path, monkeypatch, calls, failing=(), seeds=[0, 1, 2])
    out = tmp_path / "out"
    # seed 0 finished in the single-seed layout and is reused there; seeds 1 and 2 run in OUT/seed-<s>/<row>/
    assert [(name, o.seed) for name, o in calls] == [("uiat", 1), ("gradcam", 1), ("uiat", 2), ("gradcam", 2)]
    assert all((out / f"seed-{s}" / key / "eval.json").is_file() for s in (1, 2) for key in ("uiat", "gradcam"))
    rows = {r["row"]: r for r in result["rows"]}
    grad = rows["Grad-CAM"]
    assert result["seeds"] == [0, 1, 2] and grad["seeds"] == [0, 1, 2] and grad["n_seeds"] == 3
    assert grad["status"] == "ok" and rows["- (UIAT)"]["status"] == "ok"  # reused on seed 0, run on 1 and 2
    # by hand: clean 60, 62, 67 -> mean 63, deviations -3, -1, 4, sample variance (9 + 1 + 16) / 2 = 13
    assert grad["clean"] == pytest.approx(63.0) and grad["std"]["clean"] == pytest.approx(13 ** 0.5) and grad["n"]["clean"] == 3
    # IoU 0.1, 0.2, 0.3 -> 0.2 +- 0.1; AA 30, 31, 32 -> 31 +- 1; equal values -> std 0
    assert grad["iou"] == pytest.approx(0.2) and grad["std"]["iou"] == pytest.approx(0.1)
    assert grad["aa"] == pytest.approx(31.0) and grad["std"]["aa"] == pytest.approx(1.0)
    assert grad["pgd10"] == 40.0 and grad["std"]["pgd10"] == 0.0
    assert rows["- (UIAT)"]["iou"] is None and rows["- (UIAT)"]["n"]["iou"] == 0 and rows["- (UIAT)"]["std"]["iou"] is None
    assert [p["clean"] for p in grad["per_seed"]] == [60.0, 62.0, 67.0] and [p["seed"] for p in grad["per_seed"]] == [0, 1, 2]
    assert grad["per_seed"][0]["status"] == "reused" and grad["per_seed"][0]["run_dir"] == str(out / "gradcam")
    md = (out / "ablation.md").read_text()
    assert "| Grad-CAM | 63.00 ± 3.61 | 40.00 ± 0.00 |" in md and "0.2000 ± 0.1000" in md and "| 3 | ok |" in md
    with open(out / "ablation.csv") as fh:
        table = {r["row"]: r for r in csv.DictReader(fh)}
    assert float(table["Grad-CAM"]["clean_mean"]) == pytest.approx(63.0)
    assert float(table["Grad-CAM"]["clean_std"]) == pytest.approx(13 ** 0.5) and table["Grad-CAM"]["clean_n"] == "3"
    assert table["- (UIAT)"]["iou_mean"] == "" and table["- (UIAT)"]["iou_n"] == "0" and table["Grad-CAM"]["seeds"] == "0 1 2"
    assert (out / "ablation.png").is_file()
    # everything finished: a second invocation runs nothing
    calls.clear()
    again = fake_ablation(tmp_path, monkeypatch, calls, failing=(), seeds=[0, 1, 2])
    assert calls == [] and {r["status"] for r in again["rows"]} == {"reused"}


def test_a_suspect_or_failed_seed_marks_its_row():
    def row(status, clean=1.0):
        return ablate.Row("gradcam", status=status, metrics={"clean": clean})

    entry = ablate.SeedRows("gradcam", {0: row("ok"), 1: row("suspect: x failed"), 2: row("reused")})
    assert entry.status == "suspect: x failed (seed 1); ok (seeds 0, 2)" and entry.suspect and len(entry.done) == 3
    entry = ablate.SeedRows("gradcam", {0: row("ok", 2.0), 1: row("failed: boom"), 2: row("pending")})
    assert entry.status == "ok (seed 0); failed: boom (seed 1); pending (seed 2)"
    assert entry.stat("clean") == (2.0, None, 1) and "| 2.00 |" in ablate.markdown_table([entry, ablate.SeedRows(
        "-", {0: row("ok"), 1: row("ok"), 2: row("ok")})])
    skipped = ablate.SeedRows("sam", {s: ablate.Row("sam", status="skipped: no weights") for s in (0, 1)})
    assert skipped.status == "skipped: no weights" and not skipped.has_results


@pytest.mark.parametrize("value, seeds", [(None, None), ("0", [0]), ("0,1,2", [0, 1, 2]), (" 3, 1 ", [3, 1])])
def test_parse_seeds(value, seeds):
    assert ablate.parse_seeds(value) == seeds


def test_all_rows_include_u2net_and_oracle_and_sam_points_at_u2net():
    methods = plugin_manager.attention_methods()
    rows, _ = ablate.parse_rows("all", methods)
    assert rows[:7] == ["-", "gradcam", "ig", "solo", "sam", "u2net", "oracle"]
    assert [ablate.Row(n).label for n in ("u2net", "oracle")] == ["U^2-Net-p", "Oracle (GT)"]
    base = ablate.base_config(ablate.ABLATE_PRESETS["quick"], {})
    for name in ("sam", "solo"):
        cfg = ablate.row_config(base, name, {}, {})
        reason = ablate.readiness(name, cfg, methods[name], methods)
        assert f"--attention-checkpoint {name}=PATH" in reason and reason.endswith(ablate.NO_DOWNLOAD_HINT), reason
    for name in ("u2net", "oracle", "gradcam"):
        assert ablate.readiness(name, ablate.row_config(base, name, {}, {}), methods[name], methods) is None


def test_the_plot_has_iou_panels(tmp_path):
    """One seed: attention IoU against BG-gap and AA, UIAT as a reference line; several
    seeds with UIAT: one panel per hypothesis, each row's mean paired difference at its
    mean IoU with its 95 % t-interval."""
    from matplotlib.container import ErrorbarContainer

    def seeds(name, values):
        return ablate.SeedRows(name, {s: ablate.Row(name, status="ok", seed=s, metrics=m) for s, m in enumerate(values)})

    values = {"-": [{"clean": 60.0, "aa": 30.0, "bg_gap": 8.0}, {"clean": 62.0, "aa": 32.0, "bg_gap": 6.0}],
              "gradcam": [{"clean": 61.0, "aa": 31.0, "bg_gap": 5.0, "iou": 0.1}, {"clean": 63.0, "aa": 33.0, "bg_gap": 3.0, "iou": 0.2}],
              "oracle": [{"clean": 64.0, "aa": 34.0, "bg_gap": 1.0, "iou": 1.0}, {"clean": 64.0, "aa": 35.0, "bg_gap": 2.0, "iou": 1.0}]}
    skipped = ablate.SeedRows("sam", {0: ablate.Row("sam", status="skipped: no weights")})
    one = [seeds(name, v[:1]) for name, v in values.items()] + [skipped]
    bars, bg, aa = ablate.plot(one, tmp_path / "one.png").axes
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["- (UIAT)", "Grad-CAM", "Oracle (GT)"]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in (bg, aa)] == [
        ("attention IoU with the ground truth", "BG-gap (points)"), ("attention IoU with the ground truth", "AA (%)")]
    for ax, uiat in ((bg, 8.0), (aa, 30.0)):
        points = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(points) == 2  # Grad-CAM and the oracle; UIAT has no IoU: a reference line
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["- (UIAT): no attention IoU", "Grad-CAM", "Oracle (GT)"]
        assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("- (UIAT)")] == [uiat]

    several = [seeds(name, v) for name, v in values.items()] + [skipped]
    fig = ablate.plot(several, tmp_path / "p.png")
    bars, panels = fig.axes[0], fig.axes[1:]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["H1", "H2", "H3", "H4", "H5"]
    h4 = panels[3]
    points = [c for c in h4.containers if isinstance(c, ErrorbarContainer)]
    got = sorted((float(c.lines[0].get_data()[0][0]), float(c.lines[0].get_data()[1][0])) for c in points)
    # Grad-CAM: mean IoU 0.15, AA minus UIAT's 1 and 1; the oracle: IoU 1, differences 4 and 3
    assert got == [(pytest.approx(0.15), pytest.approx(1.0)), (pytest.approx(1.0), pytest.approx(3.5))]
    assert h4.get_title().endswith("supported")  # both rows' intervals above -5
    assert (tmp_path / "p.png").stat().st_size > 0


def test_report_only_writes_the_finished_rows_and_runs_nothing(tmp_path, monkeypatch):
    calls = []
    fake_ablation(tmp_path, monkeypatch, calls, failing=(), seeds=[0])  # seed 0 finished, single-seed layout
    calls.clear()
    import dataclasses

    from dhat_seg.evaluation.report import EvalOptions

    class NoTraining(FakeTrainer):
        def run(self, resume=False):
            raise AssertionError("report_only must not train")

    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"})
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    result = ablate.run_ablation(["-", "gradcam"], base, options, tmp_path / "out", seeds=[0, 1], cache_dir=tmp_path / "cache",
                                 preset=preset, log=lambda m: None, progress=False, trainer_factory=NoTraining,
                                 report_only=True)
    assert calls == []  # nothing evaluated either
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["- (UIAT)"]["n_seeds"] == 1 and rows["Grad-CAM"]["n_seeds"] == 1
    assert rows["Grad-CAM"]["status"] == "ok (seed 0); pending (seed 1)"
    assert not (tmp_path / "out" / "seed-1").exists()
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "Paired by seed" in md  # seed 0 pairs Grad-CAM with UIAT
    assert "`pending`: not finished yet (--report-only trains nothing)" in md


def test_table_cells_keep_the_precision_of_their_column():
    from dhat_seg.studies.output import _fmt, _fmt_std

    # a Robust Gap of 0.6 points is printed like every other point value, not as a fraction
    assert (_fmt(0.6, "robust_gap"), _fmt(63.2, "bg_gap"), _fmt(0.0, "clean")) == ("0.60", "63.20", "0.00")
    assert (_fmt(0.51234, "iou"), _fmt_std(0.0321, "iou"), _fmt_std(2.5, "aa")) == ("0.5123", "0.0321", "2.50")
    assert (_fmt(None, "aa"), _fmt(3, "n")) == ("n/a", "3")


def test_report_only_regenerates_the_table_files_bit_for_bit(tmp_path, monkeypatch):
    import dataclasses

    from dhat_seg.evaluation.report import EvalOptions

    calls = []
    fake_ablation(tmp_path, monkeypatch, calls, failing=(), seeds=[0, 1])
    out = tmp_path / "out"
    # the runs' own cost, read from their folders: epochs' seconds and the evaluation's total
    (out / "seed-0" / "uiat" / "metrics.jsonl").write_text('{"epoch": 1, "seconds": 30.5}\n{"epoch": 2, "seconds": 29.5}\n')
    report = json.loads((out / "seed-0" / "uiat" / "eval.json").read_text())
    (out / "seed-0" / "uiat" / "eval.json").write_text(json.dumps({**report, "seconds": {"total": 90.0}}))
    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 100, "test_size": 40, "device": "cpu"})
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()

    def regenerate():
        result = ablate.run_ablation(["-", "gradcam"], base, options, out, seeds=[0, 1], cache_dir=tmp_path / "cache",
                                     preset=preset, log=lambda m: None, progress=False, trainer_factory=FakeTrainer,
                                     report_only=True)
        return result, {name: (out / name).read_bytes() for name in ("ablation.md", "ablation.csv", "ablation.json", "ablation.png")}

    evaluated = len(calls)
    first, files = regenerate()
    second, again = regenerate()
    assert files == again and len(calls) == evaluated  # same bytes, nothing evaluated
    assert [r["status"] for r in first["rows"]] == ["ok", "ok"]  # each row's verdict: all are read, none "reused"
    assert first["seconds"] is None and first["compute"] == {"train_s": 60.0, "eval_s": 90.0, "runs": 1}
    assert first["rows"][0]["per_seed"][0]["cost"] == {"train_s": 60.0, "eval_s": 90.0}
    md = files["ablation.md"].decode()
    assert "Report regenerated from the run folders" in md and "training 1.0 min, evaluation 1.5 min" in md
