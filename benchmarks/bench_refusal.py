"""How fast the CLI refuses bad settings, against the cost of importing torch.

Each command is run ``--repeat`` times as a fresh process (the way a user meets it); the
median wall time is printed with its ratio to ``python -c "import torch"``, the cost a
refusal pays when it validates only after the heavy imports (dhat-seg 0.1.0: range errors
such as ``--set omega=2`` came after torch, the data and the models were imported).

    python benchmarks/bench_refusal.py            # about half a minute on 2 CPU cores
    python benchmarks/bench_refusal.py --repeat 9 --json out.json

A range error (``omega=2``) is refused before torch is imported; an unknown name
(``--method nosuch``) is checked against the method registry, which imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch (reference)": [sys.executable, "-c", "import torch"],
    "dhat-seg --help": [sys.executable, "-m", "dhat_seg", "--help"],
    "train --set omega=2 (range error)": [sys.executable, "-m", "dhat_seg", "train", "--set", "omega=2"],
    "train --epochs 0 (flag range error)": [sys.executable, "-m", "dhat_seg", "train", "--epochs", "0"],
    "train --method nosuch (unknown name)": [sys.executable, "-m", "dhat_seg", "train", "--method", "nosuch"],
}


def timed(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {}
    for _ in range(args.repeat):  # interleaved, so that a change of load hits every command alike
        for name, cmd in COMMANDS.items():
            seconds, rc = timed(cmd)
            results.setdefault(name, {"seconds": [], "exit_codes": set()})
            results[name]["seconds"].append(seconds)
            results[name]["exit_codes"].add(rc)
    reference = statistics.median(results["import torch (reference)"]["seconds"])
    print(f"{'command':40s} {'median s':>9s} {'/ import torch':>15s} exit")
    out = {}
    for name, r in results.items():
        median = statistics.median(r["seconds"])
        codes = ",".join(map(str, sorted(r["exit_codes"])))
        print(f"{name:40s} {median:9.2f} {median / reference:15.2f} {codes}")
        out[name] = {"median_s": round(median, 3), "ratio_to_import_torch": round(median / reference, 3),
                     "exit_codes": sorted(r["exit_codes"]), "runs": len(r["seconds"])}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
