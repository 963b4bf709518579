"""Do the speed options leave robustness alone? PGD-10 accuracy after the same short run
with and without each option, against the spread between seeds.

For every seed, one run without any speed option (``fp32``) and one run with each option
(``bf16`` = ``amp: true, amp_dtype: bfloat16``; ``channels_last``; ``compile``;
``data_on_device``, the training set on the device, whose crop and flip draws differ from
the DataLoader's, so it is a different sample of the same run, not a rounding change), all
otherwise identical (real ``dhat-seg train`` runs through :class:`Experiment`, final
test evaluation included). The options change float rounding only, so an option passes
when its PGD-10 accuracy differs from the fp32 run of the same seed by less than the
fp32 runs differ between seeds (the seed spread, max - min).

Runs go to ``--out`` (default: a new temporary folder) and are reused when finished, so
an interrupted check continues where it stopped. ``data_seed`` is fixed, so every seed
shares one attention model and mask cache (as ``dhat-seg ablate --seeds`` does).
Defaults: the quick preset unchanged (DHAT + Grad-CAM, 6 epochs on 3000 images, PGD-10 on
1000 test images) and seeds 0, 1, 2: 15 runs of 2.2-3.3 minutes each on 2 idle CPU cores
(about 40 minutes). A shorter run is no check: 3 epochs on 1000 images (this script's earlier default)
ended near chance for every variant, with a seed spread of 0. Two seeds are the least
(``--seeds 0,1``); the spread, max - min, is a rough yardstick with so few:

    python benchmarks/check_speed_options.py
    python benchmarks/check_speed_options.py --options bf16,channels_last,compile --seeds 0,1,2 \\
        --config paper --set epochs=10 --device cuda --out runs/speed-check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

OPTIONS = {
    "bf16": {"amp": True, "amp_dtype": "bfloat16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "data_on_device": {"data_on_device": True},  # other random crop/flip draws: a different run, same distribution
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {', '.join(OPTIONS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (at least 2: the spread needs them)")
    p.add_argument("--config", default="quick", help="preset or YAML file the runs start from")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="config option for every run (repeatable; YAML values)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (reused when finished)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    if not options or any(o not in OPTIONS for o in options):
        raise SystemExit(f"error: --options {args.options!r}: expected some of {', '.join(OPTIONS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(set(seeds)) < 2:
        raise SystemExit("error: --seeds needs at least two different seeds (the spread is measured between them)")

    import yaml

    from dhat_seg.config import load_config
    from dhat_seg.errors import UserError
    from dhat_seg.run.experiment import Experiment

    overrides: dict = {}
    for item in args.set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    overrides.update(device=args.device, data_seed=overrides.get("data_seed", 0))
    out = args.out or Path(tempfile.mkdtemp(prefix="dhat-speed-check-"))
    out.mkdir(parents=True, exist_ok=True)
    variants = {"fp32": {}, **{o: OPTIONS[o] for o in options}}
    acc: dict[str, dict[int, float]] = {v: {} for v in variants}
    seconds: dict[str, dict[int, float]] = {v: {} for v in variants}
    skipped: set[str] = set()
    for seed in seeds:
        for variant, extra in variants.items():
            if variant in skipped:
                continue
            cfg = load_config(args.config, {**overrides, **extra, "seed": seed})
            run = out / f"{variant}-seed{seed}"
            summary_path = run / "summary.json"
            if summary_path.is_file() and json.loads(summary_path.read_text()).get("config_digest") == cfg.digest():
                summary = json.loads(summary_path.read_text())
                print(f"{variant} seed {seed}: finished earlier in {run}", file=sys.stderr)
            else:
                print(f"{variant} seed {seed}: training in {run}", file=sys.stderr, flush=True)
                start = time.perf_counter()
                try:
                    summary = Experiment(cfg, run, cache_dir=out / "cache", progress=False, log=lambda m: None,
                                         on_epoch=lambda r: None).run(resume=(run / "config.yaml").is_file())
                except UserError as exc:  # e.g. compile without a C++ compiler
                    print(f"{variant}: skipped ({exc})", file=sys.stderr)
                    skipped.add(variant)
                    acc.pop(variant, None)
                    continue
                seconds[variant][seed] = round(time.perf_counter() - start, 1)
            acc[variant][seed] = summary["pgd10_acc"]
    report = _report(acc, seeds, seconds)
    report["settings"] = {"config": args.config, "overrides": overrides, "out": str(out)}
    _print(report, seeds)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


def _report(acc, seeds, seconds) -> dict:
    base = acc["fp32"]
    spread = max(base.values()) - min(base.values())
    rows = []
    for variant, by_seed in acc.items():
        signed = [by_seed[s] - base[s] for s in seeds if s in by_seed and s in base]
        diffs = [abs(d) for d in signed]
        paired = None
        if len(signed) >= 2 and variant != "fp32":  # a systematic shift shows here, beside the per-seed noise
            paired = {"mean": round(statistics.mean(signed), 2), "std": round(statistics.stdev(signed), 2), "n": len(signed)}
        rows.append({"variant": variant, "pgd10": {str(s): by_seed.get(s) for s in seeds},
                     "max_abs_diff_vs_fp32": round(max(diffs), 2) if diffs and variant != "fp32" else None,
                     "paired_diff_vs_fp32": paired,
                     "within_seed_spread": (max(diffs) < spread or max(diffs) == 0) if diffs and variant != "fp32" else None,
                     "train_seconds": {str(s): t for s, t in seconds.get(variant, {}).items()}})
    return {"seed_spread_fp32": round(spread, 2), "rows": rows}


def _print(report, seeds) -> None:
    cols = "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    print(f"\nPGD-10 accuracy (%) after the same run, by seed; seed spread of fp32 (max - min): "
          f"{report['seed_spread_fp32']:.2f}")
    print(f"{'variant':<14}{cols} {'max |diff| vs fp32':>19} {'< spread':>9} {'diff vs fp32, mean ± std (n)':>29}")
    for r in report["rows"]:
        vals = "".join(f"{r['pgd10'][str(s)]:9.2f}" if r["pgd10"][str(s)] is not None else f"{'-':>9}" for s in seeds)
        diff = f"{r['max_abs_diff_vs_fp32']:19.2f}" if r["max_abs_diff_vs_fp32"] is not None else f"{'-':>19}"
        ok = {True: "yes", False: "NO", None: "-"}[r["within_seed_spread"]]
        p = r["paired_diff_vs_fp32"]
        paired = f"{p['mean']:+.2f} ± {p['std']:.2f} ({p['n']})" if p else "-"
        print(f"{r['variant']:<14}{vals} {diff} {ok:>9} {paired:>29}")


if __name__ == "__main__":
    main()
