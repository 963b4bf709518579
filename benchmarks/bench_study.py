"""What one seed of a quick Table 10 study costs on this machine: the five paper-like rows
(UIAT, Grad-CAM, IG, u2net, oracle) run by ``dhat-seg ablate`` with the quick preset, once
per ``--jobs`` value, each with a cache of its own (so the attention model and every mask
cache are built inside the measured time), then the u2net mask rate of each backend.

    python benchmarks/bench_study.py                        # --jobs 1 and 2, 15 epochs (about 2 hours on 2 cores)
    python benchmarks/bench_study.py --jobs 2               # one study, both cores
    python benchmarks/bench_study.py --epochs 3 --rows -,gradcam,oracle
    python benchmarks/bench_study.py --report-only          # print the figures of finished studies
    python benchmarks/bench_study.py --smoke --epochs 1 --skip-u2net --out /tmp/bench-smoke   # does it run?

Prints, per study: its wall time; per row the training seconds (the epochs' sum in
metrics.jsonl), the evaluation seconds (eval.json) and their ratio; the mask-cache builds
(meta.json) and the attention model's training; then the ratio of the wall times
(``--jobs 2`` / ``--jobs 1``) and each goal of the studies work, met or not:

- evaluation of a quick row <= 0.5x its training time;
- one seed of the five rows, sequential, <= 40 minutes including mask builds;
- ``--jobs 2`` on 2 cores no slower than sequential;
- u2net on the CPU >= 1.0x onnxruntime's one-image loop at input 320
  (``benchmarks/bench_u2net.py``, run here with ``--threads 1``).

A study interrupted and started again resumes (``ablate`` reuses finished rows), but its wall
time is then not one run's: the figure is marked ``resumed``. Run it on an otherwise idle
machine; state the machine and date with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROWS = "-,gradcam,ig,u2net,oracle"
ROW_DIRS = {"-": "uiat", "none": "uiat"}
GOAL_EVAL_RATIO, GOAL_SEQUENTIAL_MIN = 0.5, 40.0
BENCH_FILE = "bench.json"


def _ablate_command(args, jobs: int, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dhat_seg", "ablate", "--preset", "quick", "--attention", args.rows,
           "--seed", str(args.seed), "--out", str(out), "--cache-dir", str(out / "cache")]
    if jobs > 1:
        cmd += ["--jobs", str(jobs)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    for item in args.set:
        cmd += ["--set", item]
    if args.smoke:
        cmd += ["--set", "train_size=120", "--set", "test_size=40", "--set", "attention_model_epochs=1",
                "--n-examples", "20", "--aa-examples", "4", "--sanity-examples", "20", "--gap-examples", "20"]
    return cmd


def run_study(args, jobs: int) -> Path:
    """Runs (or resumes) the study of ``jobs`` jobs; its wall time goes to OUT/jobs-N/bench.json."""
    out = Path(args.out) / f"jobs-{jobs}"
    record = out / BENCH_FILE
    if record.is_file() and json.loads(record.read_text()).get("finished"):
        return out
    resumed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cmd = _ablate_command(args, jobs, out)
    print(f"bench_study: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ)
    if jobs == 1:  # sequential: the whole machine to the one process
        env.pop("OMP_NUM_THREADS", None)
    t0 = time.time()
    with open(out / "ablate.log", "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if code != 0:
        sys.exit(f"error: the study with --jobs {jobs} failed (exit code {code}); see {out / 'ablate.log'}")
    record.write_text(json.dumps({"jobs": jobs, "wall_s": round(wall, 1), "resumed": resumed, "finished": True,
                                  "command": cmd[1:], "epochs": args.epochs, "rows": args.rows, "set": args.set, "smoke": args.smoke,
                                  "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    return out


def _seconds(run_dir: Path, part: str) -> float:
    """A run's training (``train_s``) or evaluation (``eval_s``) seconds from its folder; nan when missing."""
    from dhat_seg.studies.cost import run_cost

    value = run_cost(run_dir)[part]
    return float("nan") if value is None else value


def study_figures(out: Path) -> dict:
    """Wall time, per-row training/evaluation seconds and cache builds of a finished study."""
    bench = json.loads((out / BENCH_FILE).read_text())
    rows = []
    table = json.loads((out / "ablation.json").read_text())
    for row in table["rows"]:
        run_dir = Path(row["run_dir"])
        report = run_dir / "eval.json"
        if not report.is_file():
            rows.append({"row": row["row"], "status": row["status"]})
            continue
        train_s, eval_s = _seconds(run_dir, "train_s"), _seconds(run_dir, "eval_s")
        rows.append({"row": row["row"], "status": row["status"], "train_s": train_s, "eval_s": eval_s,
                     "ratio": eval_s / train_s if train_s else float("nan")})
    caches = []
    for meta in sorted((out / "cache" / "masks").glob("*/meta.json")):
        m = json.loads(meta.read_text())
        caches.append({"cache": meta.parent.name, "n": m.get("n"), "build_s": m.get("build_seconds")})
    models = [{"model": d.name, "train_s": _seconds(d, "train_s")} for d in sorted((out / "cache" / "attention-models").glob("*"))
              if (d / "metrics.jsonl").is_file()]
    # bench.json's "rows" (the --rows value) stays as "row_list": "rows" are the measured rows
    return {**bench, "row_list": bench.get("rows"), "rows": rows, "caches": caches, "attention_models": models}


def print_study(fig: dict) -> None:
    note = " (resumed: not one run's wall time)" if fig["resumed"] else ""
    print(f"\n--jobs {fig['jobs']}: wall {fig['wall_s'] / 60:.1f} min{note}; epochs "
          f"{fig['epochs'] or 'the preset (15)'}; {fig['machine']}; {fig['date']}")
    print(f"  {'row':<18} {'train s':>8} {'eval s':>8} {'eval/train':>10}  status")
    for r in fig["rows"]:
        if "train_s" in r:
            print(f"  {r['row']:<18} {r['train_s']:>8.0f} {r['eval_s']:>8.0f} {r['ratio']:>10.2f}  {r['status']}")
        else:
            print(f"  {r['row']:<18} {'-':>8} {'-':>8} {'-':>10}  {r['status']}")
    for c in fig["caches"]:
        print(f"  mask cache {c['cache']}: {c['n']} masks in {c['build_s']:.0f} s")
    for m in fig["attention_models"]:
        print(f"  attention model {m['model']}: trained in {m['train_s']:.0f} s")


def _verdict(fig: dict, ok: bool) -> str:
    """MET / NOT MET for the goal's study (five rows, the preset's epochs, no settings changed), else '--'."""
    goal_study = (not fig.get("epochs") and not fig.get("set") and not fig.get("smoke")
                  and len([r for r in (fig.get("row_list") or "").split(",") if r]) == 5)
    return ("MET" if ok else "NOT MET") if goal_study else "--"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-study")
    p.add_argument("--jobs", default="1,2", help="a comma list of --jobs values, one study each (default 1,2)")
    p.add_argument("--rows", default=ROWS, help=f"ablate's --attention (default {ROWS})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every row (default: the quick preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting passed to ablate (e.g. for a smoke run: --set train_size=200)")
    p.add_argument("--skip-u2net", action="store_true", help="do not run benchmarks/bench_u2net.py")
    p.add_argument("--smoke", action="store_true",
                   help="tiny data and evaluation (with --epochs 1: a check that the script runs, not a measurement)")
    p.add_argument("--report-only", action="store_true", help="run nothing; print the figures of finished studies")
    args = p.parse_args()
    try:
        jobs_list = [int(j) for j in args.jobs.split(",")]
    except ValueError:
        sys.exit(f"error: --jobs {args.jobs!r} is invalid; expected a comma list of positive integers, e.g. 1,2")
    if any(j < 1 for j in jobs_list):
        sys.exit(f"error: --jobs {args.jobs!r} is invalid; expected positive integers")
    figures = {}
    for jobs in jobs_list:
        out = Path(args.out) / f"jobs-{jobs}"
        if not args.report_only:
            run_study(args, jobs)
        if (out / BENCH_FILE).is_file():
            figures[jobs] = study_figures(out)
            print_study(figures[jobs])
        else:
            print(f"\n--jobs {jobs}: not run yet ({out})")
    print("\ngoals (a verdict only for the goal's study: the five rows, the preset's epochs and data; else '--'):")
    for jobs, fig in figures.items():
        ratios = [r["ratio"] for r in fig["rows"] if "ratio" in r]
        if ratios:
            worst = max(ratios)
            print(f"  [{_verdict(fig, worst <= GOAL_EVAL_RATIO)}] --jobs {jobs}: evaluation <= {GOAL_EVAL_RATIO}x training "
                  f"per row: largest ratio {worst:.2f}")
    if 1 in figures:
        minutes = figures[1]["wall_s"] / 60
        print(f"  [{_verdict(figures[1], minutes <= GOAL_SEQUENTIAL_MIN)}] one seed sequential <= "
              f"{GOAL_SEQUENTIAL_MIN:.0f} min: {minutes:.1f} min")
    if 1 in figures and 2 in figures:
        ratio = figures[2]["wall_s"] / figures[1]["wall_s"]
        keys = ("epochs", "row_list", "set", "smoke")
        same = {k: figures[1].get(k) for k in keys} == {k: figures[2].get(k) for k in keys}
        verdict = ("MET" if ratio <= 1.0 else "NOT MET") if same else "--"
        print(f"  [{verdict}] --jobs 2 no slower than sequential: wall ratio jobs-2 / jobs-1 = {ratio:.2f}")
    if not args.skip_u2net and not args.report_only:
        print("\nu2net masks/s per path (benchmarks/bench_u2net.py --threads 1 --sizes 224,320 --repeats 2):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_u2net.py")), "--threads", "1",
                        "--sizes", "224,320", "--repeats", "2"], check=False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_study.json").write_text(json.dumps({str(k): v for k, v in figures.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
