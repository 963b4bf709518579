"""The built-in benchmark: foreground salience, the Backgrounds-Challenge test splits, the
``digits`` dataset, settings that start from the data's recipe, milestones that follow the
epochs, and the convergence verdict."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dhat_seg.config import TrainConfig, load_config
from dhat_seg.method_defaults import scaled_milestones
from dhat_seg.evaluation.convergence import read_metrics, run_verdict, verdict
from dhat_seg.data import build_dataset, split_args
from dhat_seg.data import datasets as ds_module
from dhat_seg.data.digits import TEST_SOURCE_FRACTION, generate_digits, source_digits, source_split
from dhat_seg.data.registry import BACKGROUND_CHALLENGE_SPLITS, DATASETS
from dhat_seg.data.synthetic import DEFAULT_SALIENCE, GENERATOR_VERSION, generate_synthetic, salience_bands
from dhat_seg.errors import UserError


# ------------------------------------------------------------------ salience
def test_salience_zero_is_the_version_1_generator_byte_for_byte():
    """The version-1 colours stay reachable: these hashes were taken from the version-1
    generator (before salience existed) with the same arguments."""
    expected = {(): "f406481254a64947", (("background", "random"),): "5e663f28a5673ce4",
                (("rho", 0.3), ("image_size", 20)): "4b986942a0d02789"}
    for kwargs, digest in expected.items():
        arrays = generate_synthetic(300, seed=7, salience=0.0, **dict(kwargs))
        assert hashlib.sha256(arrays.images.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("salience", [DEFAULT_SALIENCE, 0.3, 0.7])
def test_salience_keeps_object_and_background_colours_in_their_bands(salience):
    arrays = generate_synthetic(400, seed=1, salience=salience)
    (bg_lo, bg_hi), (obj_lo, obj_hi) = salience_bands(salience)
    img = arrays.images.float() / 255
    m = arrays.masks[:, None].expand_as(img)
    tol = 0.6 / 255  # rounding to uint8
    assert img[m].min() >= obj_lo - tol and img[m].max() <= obj_hi + tol
    assert img[~m].min() >= bg_lo - tol and img[~m].max() <= bg_hi + tol
    # the object is still one flat colour per image (exact masks)
    for i in range(20):
        inside = arrays.images[i][:, arrays.masks[i]]
        assert torch.equal(inside, inside[:, :1].expand_as(inside))


def test_salience_bad_values_are_refused():
    for bad in (1.0, -0.1, "high", True):
        with pytest.raises(UserError, match="salience"):
            generate_synthetic(10, seed=0, salience=bad)
    with pytest.raises(UserError, match="salience"):
        load_config("quick", {"salience": 1.5})


def test_old_generator_data_is_never_reused(monkeypatch):
    """The generator version and the salience are in the dataset fingerprint (which keys
    mask caches and attention models) and in the config digest (which decides whether
    ``ablate``/``compare`` reuse a finished run)."""
    fp = build_dataset("synthetic", "train", size=100).fingerprint()
    cfg = TrainConfig()
    digest = cfg.digest()
    assert build_dataset("synthetic", "train", size=100, salience=0.0).fingerprint() != fp
    assert TrainConfig(salience=0.0).digest() != digest
    monkeypatch.setattr(ds_module, "GENERATOR_VERSION", "1")
    ds_module._generate_cached.cache_clear()
    assert build_dataset("synthetic", "train", size=100).fingerprint() != fp  # same pixels, older version: not reused
    import dhat_seg.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", "1")
    assert TrainConfig().digest() != digest
    assert TrainConfig(data="cifar10").digest() == TrainConfig(data="cifar10").digest()


# ------------------------------------------------------------------ Backgrounds-Challenge splits
@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_background_challenge_splits(name):
    assert set(BACKGROUND_CHALLENGE_SPLITS.values()) <= set(DATASETS[name].splits)
    same = build_dataset(name, "test", size=60)
    mixed = build_dataset(name, "test-mixed-rand", size=60)
    only_fg = build_dataset(name, "test-only-fg", size=60)
    no_fg = build_dataset(name, "test-no-fg", size=60)
    # paired: the same objects in every split
    for d in (mixed, only_fg, no_fg):
        assert torch.equal(d.labels, same.labels) and torch.equal(d.gt_masks, same.gt_masks)
    assert torch.equal(only_fg.backgrounds, same.backgrounds) and torch.equal(no_fg.backgrounds, mixed.backgrounds)
    assert (mixed.backgrounds != same.backgrounds).any()
    for i in range(len(same)):
        m = same.gt_masks[i]
        x_same, x_mixed, x_fg, x_nofg = (d[i][0] for d in (same, mixed, only_fg, no_fg))
        assert torch.equal(x_fg[:, m], x_same[:, m]) and (x_fg[:, ~m] == 0).all()  # the object on black
        assert (x_nofg[:, m] == 0).all() and torch.equal(x_nofg[:, ~m], x_mixed[:, ~m])  # the object blacked out
    # the fingerprints tell them apart (per-split caches never mix)
    assert len({d.fingerprint() for d in (same, mixed, only_fg, no_fg)}) == 4


def test_cifar_has_no_background_challenge_splits():
    with pytest.raises(UserError, match="expected one of"):
        build_dataset("cifar10", "test-only-fg")


# ------------------------------------------------------------------ digits
def test_digits_train_and_test_come_from_disjoint_source_digits():
    glyphs, labels = source_digits()
    assert glyphs.shape == (1797, 8, 8) and 0 <= glyphs.min() and glyphs.max() <= 1
    for seed in (0, 1):
        train_src, test_src = source_split(seed)
        assert not set(train_src.tolist()) & set(test_src.tolist())
        assert len(train_src) + len(test_src) == 1797
        assert abs(len(test_src) / 1797 - TEST_SOURCE_FRACTION) < 0.01
        pools = [build_dataset("digits", split, size=400, seed=seed) for split in ("train", "val")]
        tests = [build_dataset("digits", split, size=300, seed=seed) for split in BACKGROUND_CHALLENGE_SPLITS.values()]
        seen = set(torch.cat([p.sources for p in pools]).tolist())
        for t in tests:
            assert seen <= set(train_src.tolist())
            assert not seen & set(t.sources.tolist()), "a source digit of training appears in a test split"
            assert set(t.sources.tolist()) <= set(test_src.tolist())
            assert torch.equal(t.labels, labels[t.sources])  # the label is the source digit's class
        assert torch.equal(pools[0].labels, labels[pools[0].sources])
    assert not torch.equal(source_split(0)[1], source_split(1)[1])


def test_digits_masks_are_the_ink_and_exact():
    arrays = generate_digits(200, seed=3, sources=source_split(0)[0])
    area = arrays.masks.float().mean(dim=(1, 2))
    assert (area > 0.03).all() and (area < 0.6).all()
    for i in range(50):
        inside = arrays.images[i][:, arrays.masks[i]]
        assert torch.equal(inside, inside[:, :1].expand_as(inside))
        outside = arrays.images[i][:, ~arrays.masks[i]].float()
        assert ((outside - inside[:, :1].float()).norm(dim=0) > 0).all()
    same = generate_digits(200, seed=3, sources=source_split(0)[0])
    assert torch.equal(same.images, arrays.images)  # deterministic


def test_digits_are_not_flipped_by_augmentation():
    assert DATASETS["digits"].flip is False and DATASETS["synthetic"].flip is True
    assert build_dataset("digits", "train", size=50, augment=True).transform.flip is False


# ------------------------------------------------------------------ settings follow the data and the epochs
def test_milestones_follow_the_epochs():
    assert scaled_milestones([80, 90], 100, 50) == [40, 45]
    assert scaled_milestones([8, 9], 10, 3) == [2]
    assert scaled_milestones([80, 90], 100, 1) == []
    quick = load_config("quick")
    longer = load_config("quick", {"epochs": 2 * quick.epochs})
    assert longer.milestones == [2 * m for m in quick.milestones]
    assert load_config(None, {"data": "cifar10", "epochs": 50}).milestones == [40, 45]
    assert load_config("quick", {"epochs": 6, "milestones": [3]}).milestones == [3]  # explicit ones are kept


def test_a_milestone_that_never_takes_effect_is_refused(tmp_path):
    with pytest.raises(UserError, match="never take effect"):
        load_config("quick", {"epochs": 6, "milestones": [6]})
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\nmilestones: [5]\n")
    with pytest.raises(UserError, match="never take effect"):
        load_config(path)
    # a resumed run keeps its own schedule
    assert load_config(path, resumed=True).milestones == [5]


def test_train_epochs_on_built_in_data_stays_small_and_says_where_settings_start(tmp_path):
    from typer.testing import CliRunner

    from dhat_seg.cli import app

    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--method", "uiat"]
    for key, value in dict(train_size=40, val_size=8, test_size=8, val_examples=8, attack_steps=1, inv_steps=1,
                           device="cpu").items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("settings:"))
    assert first.startswith("settings: quick recipe of the built-in data, plus --method uiat --epochs 1")
    saved = (out / "config.yaml").read_text()
    assert "model: small_cnn" in saved and "batch_size: 32" in saved and "milestones: []" in saved
    assert "validation accuracy: convergence unknown" in result.output


def test_cifar_starts_from_the_paper_schedule():
    from dhat_seg.cli.common import config_base, describe_base

    base = config_base(None, resume=False, out=None, data="cifar10")
    cfg = load_config(base, {"data": "cifar10", "model": "wrn28_10"})
    assert (cfg.epochs, cfg.milestones, cfg.batch_size, cfg.attack_steps) == (100, [80, 90], 128, 10)
    assert describe_base(base, ["--data cifar10"]) == "settings: the paper's recipe (CIFAR and image folders), plus --data cifar10"


def test_quick_with_more_epochs_decays_at_the_scaled_milestone(tmp_path):
    quick = load_config("quick")
    cfg = load_config("quick", {"epochs": 12})
    assert cfg.milestones == scaled_milestones(quick.milestones, quick.epochs, 12)
    assert (quick.epochs, quick.milestones, cfg.milestones) == (15, [10], [8])  # two thirds of the run, as the recipe
    from dhat_seg.config import save_config

    save_config(cfg, tmp_path / "config.yaml")
    assert "milestones:\n- 8\n" in (tmp_path / "config.yaml").read_text()


# ------------------------------------------------------------------ convergence verdict
def _records(clean, robust):
    return [{"epoch": i + 1, "val_clean_acc": c, "val_robust_acc": r} for i, (c, r) in enumerate(zip(clean, robust))]


def test_convergence_verdict_on_made_up_curves():
    flat = verdict(_records([50, 70, 80, 81, 80.5], [30, 40, 45, 46, 45]))
    assert flat.converged is True and flat.changes == {"clean": 0.5, "PGD": 0.0}
    assert flat.describe().startswith("converged")
    climbing = verdict(_records([50, 60, 70, 72, 74], [20, 25, 31, 31, 36.3]))
    assert climbing.converged is False
    assert climbing.describe() == "still climbing: +5.3 PGD over the last 2 epochs"
    falling = verdict(_records([80, 80, 80, 70], [40, 40, 40, 40]))
    assert falling.describe() == "still falling: -10.0 clean over the last 2 epochs"
    assert verdict(_records([50, 60], [1, 2])).converged is None
    # the threshold is a setting
    assert verdict(_records([50, 60, 70, 72, 74], [20, 25, 30, 31, 33]), threshold=5).converged is True


def test_convergence_reads_metrics_jsonl(tmp_path):
    lines = [json.dumps(r) for r in _records([10, 20, 30, 40], [5, 10, 15, 20])]
    lines.insert(2, "not json")
    lines.append(json.dumps({"epoch": 4, "val_clean_acc": 30.5, "val_robust_acc": 15}))  # a resumed epoch 4 wins
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    v = run_verdict(tmp_path)
    assert v.changes == {"clean": 10.5, "PGD": 5.0} and v.converged is False


def test_rows_show_the_verdict_in_their_status():
    from dhat_seg.studies.rows import Row, SeedRows

    climbing = verdict(_records([50, 60, 70, 72, 74], [20, 25, 31, 31, 36.3])).to_dict()
    flat = verdict(_records([50, 70, 80, 81, 80.5], [30, 40, 45, 46, 45])).to_dict()
    row = Row("-", status="ok", convergence=climbing)
    assert row.shown_status == "ok; still climbing: +5.3 PGD over the last 2 epochs"
    assert row.to_dict()["convergence"]["converged"] is False
    assert Row("-", status="ok", convergence=flat).shown_status == "ok"
    seeds = SeedRows("-", runs={0: Row("-", status="ok", convergence=flat, seed=0),
                                1: Row("-", status="ok", convergence=climbing, seed=1)})
    assert seeds.shown_status == "ok; seed 1: still climbing: +5.3 PGD over the last 2 epochs"


def test_split_args_carry_the_salience():
    cfg = TrainConfig(salience=0.25)
    assert split_args(cfg, "test")["salience"] == 0.25
    assert build_dataset(**split_args(cfg, "test-only-fg") | {"size": 10})._fingerprint_params()["salience"] == 0.25
    assert GENERATOR_VERSION == "2"


def test_config_default_salience_is_the_generator_s():
    assert TrainConfig().salience == DEFAULT_SALIENCE == load_config("quick").salience


def test_built_in_data_list_matches_the_registry():
    from dhat_seg.presets import BUILT_IN_DATA

    assert {name for name, info in DATASETS.items() if info.built_in} == set(BUILT_IN_DATA)


@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_eval_json_has_the_background_challenge(tmp_path, name):
    from dhat_seg.evaluation.report import run_eval
    from dhat_seg.run.experiment import Experiment

    cfg = load_config("quick", dict(method="standard", data=name, image_size=16, train_size=60, val_size=12, test_size=24,
                                    epochs=1, batch_size=16, val_examples=12, val_attack_steps=1, device="cpu"))
    run = tmp_path / "run"
    Experiment(cfg, run, cache_dir=tmp_path / "c", progress=False, log=lambda m: None, on_epoch=lambda r: None).run()
    report = run_eval(run, attacks="clean,pgd10", n_examples=24, gap_attack="none", iou_examples=0, show_progress=False,
                      cache_dir=str(tmp_path / "c"), log=lambda m: None)
    bc = json.loads((run / "eval.json").read_text())["background_challenge"]
    assert bc == report["background_challenge"]
    assert set(bc) >= {"same", "mixed_rand", "only_fg", "no_fg_bg_class", "pgd10", "n", "chance"}
    assert all(0 <= bc[k] <= 100 for k in ("same", "mixed_rand", "only_fg", "no_fg_bg_class")) and bc["n"] == 24
    assert bc["same"] == report["accuracy"]["clean"]  # the same test images as the main evaluation
    assert report["bg_gap"]["clean"]["same"] == bc["same"] and report["bg_gap"]["clean"]["mixed_rand"] == bc["mixed_rand"]
