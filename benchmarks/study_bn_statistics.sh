#!/usr/bin/env bash
# Should attack forwards and DHAT's x_B forward update BatchNorm running statistics?
# Trains UIAT and DHAT + Grad-CAM on the quick preset with attack_bn_update false (dhat-seg's
# default) and true (the authors' code), evaluates clean / PGD-10 accuracy, BG-gap and Robust
# Gap on 500 test and 500 training samples, and prints one table. A study, not a benchmark.
#   bash benchmarks/study_bn_statistics.sh [OUT_DIR] [SEED]
set -euo pipefail
out=${1:-runs/study-bn}; seed=${2:-0}
for bn in false true; do
  for method in uiat dhat; do
    run="$out/$method-bn_update_$bn"
    if [ ! -f "$run/summary.json" ]; then
      resume=(); [ -f "$run/config.yaml" ] && resume=(--resume)
      dhat-seg train --config quick --method "$method" --seed "$seed" --set attack_bn_update=$bn --out "$run" "${resume[@]}" >/dev/null
    fi
    [ -f "$run/eval.json" ] || dhat-seg eval "$run" --attacks clean,pgd10 --n-examples 500 --gap-examples 500 --iou-examples 0 >/dev/null
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("method  attack_bn_update  clean  PGD-10  BG-gap(clean)  BG-gap(PGD-10)  Robust Gap")
for run in sorted(out.glob("*-bn_update_*")):
    e = json.loads((run / "eval.json").read_text())
    a, bg, gap = e["accuracy"], e["bg_gap"], e["robust_gap"]
    method, bn = run.name.split("-bn_update_")
    print(f"{method:6}  {bn:16}  {a['clean']:5.1f}  {a['pgd10']:6.1f}  {bg['clean']['gap']:13.1f}  {bg['pgd10']['gap']:14.1f}  {gap['gap']:10.1f}")
PY
