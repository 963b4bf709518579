"""Calibration of the built-in benchmark: standard training, PGD-AT, UIAT and DHAT with
ground-truth (oracle) masks, trained with the quick recipe on both built-in datasets over
several seeds, scored on the four Backgrounds-Challenge test splits.

What the quick recipe must reach (docs/datasets.md, "How the quick recipe was calibrated"),
for UIAT on the default dataset:
``same`` >= 70 %, ``mixed_rand`` >= 35 %, ``same - mixed_rand`` >= 15 points (the
foreground is learned *and* the background still used); seed spread (max - min) of
``mixed_rand`` and PGD-10 <= 6 points; UIAT and DHAT-oracle on a plateau (validation
clean and PGD accuracy move by <= 2 points over the last 2 epochs), DHAT-oracle's spread
<= 6 points too. The script prints each criterion's verdict; it changes nothing.

    python benchmarks/study_benchmark_regime.py --out runs/regime            # 2 x 4 x 3 runs
    python benchmarks/study_benchmark_regime.py --data synthetic --methods uiat,dhat-oracle
    python benchmarks/study_benchmark_regime.py --out runs/regime --report-only

The data is fixed as in ``ablate`` and ``compare``: every seed trains and is scored on the
data of the first seed (``--data-seed each`` draws it per seed), so the seed spread is that of
training, the spread a study's rows have. Runs are resumable and reused: a finished run (summary.json and eval.json of these
settings) is not trained again. ``--jobs N`` trains N runs at once, each with
cores / N threads (on 2 cores, 2 jobs of 1 thread give the throughput of 1 job of 2
threads; more threads than cores slow everything down many times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: name -> the quick recipe's overrides that make the row
METHODS = {
    "standard": {"method": "standard"},
    "at": {"method": "at"},
    "uiat": {"method": "uiat"},
    "dhat-oracle": {"method": "dhat", "attention": "oracle"},
    # the main job (`dhat-seg train` with no options): for its seed spread; not in the default list
    "dhat-gradcam": {"method": "dhat", "attention": "gradcam"},
}
DEFAULT_METHODS = ("standard", "at", "uiat", "dhat-oracle")
#: evaluation of every run: clean and PGD-10 on each Backgrounds-Challenge split (``n_examples``: --test-n)
EVAL = {"attacks": "clean,pgd10", "n_examples": 1000, "gap_attack": "none", "iou_examples": 0, "bg_gap": True}
#: how robust accuracy is counted (``dhat-seg eval``'s default); an eval.json counted otherwise is redone
ROBUST_ACCURACY = "any-iterate"
KEYS = ("same", "mixed_rand", "only_fg", "no_fg_bg_class", "pgd10")


def _one(job: dict) -> dict:
    """Train (or resume, or reuse) and evaluate one run; returns its figures."""
    import torch

    torch.set_num_threads(job["threads"])
    from dhat_seg.config import load_config
    from dhat_seg.evaluation.convergence import read_metrics, run_verdict
    from dhat_seg.evaluation.report import EVAL_FILE, run_eval
    from dhat_seg.run.experiment import Experiment

    out = Path(job["out"])
    cfg = load_config("quick", {**METHODS[job["method"]], "data": job["data"], "seed": job["seed"], **job["set"]})
    summary, report = out / "summary.json", out / EVAL_FILE
    t0 = time.time()
    trained = False
    if not (summary.is_file() and json.loads(summary.read_text()).get("config_digest") == cfg.digest()):
        if job["report_only"]:
            return None  # not finished with these settings: nothing is trained in --report-only
        Experiment(cfg, out, cache_dir=job["cache_dir"], progress=False, log=lambda m: None, on_epoch=lambda r: None).run(
            resume=(out / "config.yaml").is_file())
        trained = True
    train_s = time.time() - t0
    settings = {**EVAL, "n_examples": job["test_n"]}
    previous = json.loads(report.read_text()) if report.is_file() else {}
    stale = previous.get("config_digest") != cfg.digest() or previous.get("n_examples") != settings["n_examples"] or \
        (previous.get("eval_settings") or {}).get("robust_accuracy") != ROBUST_ACCURACY
    if trained or stale:
        run_eval(out, cache_dir=job["cache_dir"], show_progress=False, log=lambda m: None, **settings)
    r = json.loads(report.read_text())
    bc = r["background_challenge"]
    conv = run_verdict(out)
    epoch_seconds = sum(float(rec.get("seconds") or 0) for rec in read_metrics(out))
    s = json.loads(summary.read_text())
    return {**{k: bc[k] for k in KEYS[:4]}, "pgd10": r["accuracy"]["pgd10"], "clean": r["accuracy"]["clean"],
            "converged": conv.converged, "changes": conv.changes, "epoch_seconds": round(epoch_seconds, 1),
            "wall_s": round(train_s, 1), "summary_clean_1000": s["clean_acc"], "summary_pgd10_1000": s["pgd10_acc"],
            "threads": job["threads"], **{k: job[k] for k in ("data", "method", "seed")}}


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if values else float("nan")


def summarise(results: list[dict], datasets: list[str], methods: list[str]) -> str:
    lines = ["| data | method | seeds | same | mixed_rand | only_fg | no_fg (bg class) | PGD-10 | same - mixed_rand "
             "| last-2-epoch change (val clean / PGD), worst seed | summary.json clean / PGD-10 (n = 1000), min-max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for data in datasets:
        for method in methods:
            rows = [r for r in results if r["data"] == data and r["method"] == method]
            if not rows:
                continue
            cells = []
            for k in KEYS:
                v = [r[k] for r in rows]
                cells.append(f"{statistics.fmean(v):.1f} (±{_spread(v) / 2:.1f})" if len(v) > 1 else f"{v[0]:.1f}")
            gap = [r["same"] - r["mixed_rand"] for r in rows]
            worst = max(rows, key=lambda r: max(abs(c) for c in r["changes"].values()) if r["changes"] else 0)
            ch = worst["changes"]
            moved = f"{ch['clean']:+.1f} / {ch['PGD']:+.1f}" if ch else "n/a"
            sc, sp = [r["summary_clean_1000"] for r in rows], [r["summary_pgd10_1000"] for r in rows]
            main = f"{min(sc):.1f}-{max(sc):.1f} / {min(sp):.1f}-{max(sp):.1f}"
            lines.append(f"| {data} | {method} | {','.join(str(r['seed']) for r in rows)} | " + " | ".join(cells)
                         + f" | {statistics.fmean(gap):.1f} | {moved} | {main} |")
    return "\n".join(lines)


def criteria(results: list[dict], data: str) -> list[tuple[str, bool | None, str]]:
    """The calibration criteria of the default dataset: (what, passed, figures)."""
    def rows(method):
        return [r for r in results if r["data"] == data and r["method"] == method]

    out = []
    u, d = rows("uiat"), rows("dhat-oracle")
    if u:
        same, mixed, pgd = ([r[k] for r in u] for k in ("same", "mixed_rand", "pgd10"))
        out.append(("UIAT same >= 70", min(same) >= 70, f"min {min(same):.1f}"))
        out.append(("UIAT mixed_rand >= 35", min(mixed) >= 35, f"min {min(mixed):.1f}"))
        gaps = [a - b for a, b in zip(same, mixed)]
        out.append(("UIAT same - mixed_rand >= 15", min(gaps) >= 15, f"min {min(gaps):.1f}"))
        out.append(("UIAT spread of mixed_rand <= 6", _spread(mixed) <= 6, f"{_spread(mixed):.1f}"))
        out.append(("UIAT spread of PGD-10 <= 6", _spread(pgd) <= 6, f"{_spread(pgd):.1f}"))
    for name, rs in (("UIAT", u), ("DHAT-oracle", d)):
        if rs:
            ok = all(r["converged"] for r in rs)
            worst = max(max(abs(c) for c in r["changes"].values()) for r in rs if r["changes"]) if any(
                r["changes"] for r in rs) else float("nan")
            out.append((f"{name} on a plateau (last 2 epochs <= 2 points)", ok, f"largest change {worst:.1f}"))
    if d:
        for k in ("mixed_rand", "pgd10", "same"):
            v = [r[k] for r in d]
            out.append((f"DHAT-oracle spread of {k} <= 6", _spread(v) <= 6, f"{_spread(v):.1f}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/regime")
    p.add_argument("--data", default="synthetic,digits")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"some of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--test-n", type=int, default=EVAL["n_examples"],
                   help="test images per split (the built-in test split holds 1000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a quick-recipe setting changed for every run (YAML value), e.g. salience=0.4")
    p.add_argument("--data-seed", default="first",
                   help="'first' (default): every seed trains on the data of the first seed, as `ablate` and `compare` "
                        "do (the benchmark is one fixed dataset; the first seed's run is the plain --seed run); "
                        "'each': every seed draws its own data")
    p.add_argument("--report-only", action="store_true", help="train nothing; summarise the finished runs")
    args = p.parse_args()
    import yaml

    datasets, methods = args.data.split(","), args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: method {unknown[0]!r} is unknown; expected some of {', '.join(METHODS)}")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: --set {item!r} is invalid; expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.data_seed not in ("first", "each"):
        sys.exit(f"error: --data-seed {args.data_seed!r} is invalid; expected 'first' or 'each'")

    def seed_set(seed: int) -> dict:  # data_seed given only where it differs from seed: same digest as a plain run
        fixed = args.data_seed == "first" and seed != seeds[0] and "data_seed" not in overrides
        return {**overrides, "data_seed": seeds[0]} if fixed else overrides
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, args.jobs))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a cap set by the caller (other jobs share the machine)
        threads = min(threads, max(1, int(os.environ["OMP_NUM_THREADS"])))
    jobs = [{"data": d, "method": m, "seed": s, "set": seed_set(s), "threads": threads, "cache_dir": args.cache_dir,
             "test_n": args.test_n, "report_only": args.report_only,
             "out": str(Path(args.out) / d / m / f"seed-{s}")}
            for s in seeds for d in datasets for m in methods]
    if args.report_only:
        jobs = [j for j in jobs if (Path(j["out"]) / "summary.json").is_file()]  # evaluated again if stale
    t0 = time.time()
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for res in pool.map(_one, jobs):
            if res is None:
                continue
            results.append(res)
            print(f"{res['data']:>9} {res['method']:>12} seed {res['seed']}: same {res['same']:.1f} mixed_rand "
                  f"{res['mixed_rand']:.1f} only_fg {res['only_fg']:.1f} no_fg(bg) {res['no_fg_bg_class']:.1f} "
                  f"PGD-10 {res['pgd10']:.1f}; summary.json {res['summary_clean_1000']:.1f} / "
                  f"{res['summary_pgd10_1000']:.1f} (wall {res['wall_s']:.0f} s)", flush=True)
    table = summarise(results, datasets, methods)
    data_note = f"data of seed {seeds[0]} for every seed" if args.data_seed == "first" else "data drawn per seed"
    lines = [f"settings: quick recipe{' + ' + str(overrides) if overrides else ''}; seeds {seeds} ({data_note}); "
             f"robust accuracy {ROBUST_ACCURACY}; "
             f"test n = {args.test_n} per split; {args.jobs} job(s) x {threads} thread(s); "
             f"{time.time() - t0:.0f} s", "", "cells: mean (± half the max - min range over seeds)", "", table, ""]
    default = datasets[0]
    for what, ok, fig in criteria(results, default):
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {default}: {what}: {fig}")
    text = "\n".join(lines)
    print("\n" + text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "regime.md").write_text(text + "\n")
    (Path(args.out) / "regime.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
