"""Which FLOE form trains? The paper, code and relative forms at batch size 128.

A study, not a speed benchmark: each form trains DHAT + Grad-CAM on the built-in data
with the paper's batch size (128), learning rate (0.1) and loss weights, with the
divergence guard on (``max_abs_logit``), and the table reports how far each got, its
largest clean and x_B logits, and validation clean / PGD accuracy. The `paper` preset
uses only forms seen to train here (see docs/methods.md, "DHAT, as implemented").

    python benchmarks/study_floe_forms.py --epochs 10 --train-size 1500 --out runs/study-floe

On the 2-core development machine ResNet-18 costs ~10-20 s per forward+backward of
128 images, so a DHAT step (about 25 forward and 23 backward passes) takes minutes;
the study therefore uses the small CNN (``--model`` changes it where you can afford it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dhat_seg.config import load_config
from dhat_seg.errors import DivergenceError
from dhat_seg.run.experiment import Experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forms", default="paper,code,relative")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=1500)
    ap.add_argument("--attack-steps", type=int, default=3, help="PGD and inverse-PGD steps (paper: 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=200, help="validation and test samples")
    ap.add_argument("--out", type=Path, default=Path("runs/study-floe"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for form in args.forms.split(","):
        cfg = load_config("quick", {
            "floe_form": form, "model": args.model, "batch_size": 128, "lr": 0.1, "epochs": args.epochs,
            "milestones": [max(1, int(args.epochs * 0.8))], "train_size": args.train_size,
            "attack_steps": args.attack_steps, "inv_steps": args.attack_steps, "seed": args.seed, "device": "cpu",
            "val_examples": args.eval_size, "test_size": args.eval_size,
        })
        out = args.out / form
        t0 = time.time()
        status = "trained"
        try:
            Experiment(cfg, out, cache_dir=args.cache_dir, progress=False).run(resume=(out / "config.yaml").exists())
        except DivergenceError as exc:
            status = f"diverged: {str(exc).split(';')[0]}"
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()] \
            if (out / "metrics.jsonl").exists() else []
        last = lines[-1] if lines else {}
        rows.append({
            "floe_form": form, "epochs_done": len(lines), "status": status,
            "max_logit_clean": max((l.get("train_max_logit_clean", 0) for l in lines), default=None),
            "max_logit_background": max((l.get("train_max_logit_background", 0) for l in lines), default=None),
            "val_clean": last.get("val_clean_acc"), "val_pgd": last.get("val_robust_acc"),
            "minutes": round((time.time() - t0) / 60, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nFLOE forms, {args.model}, built-in data ({args.train_size} samples incl. validation), batch 128, lr 0.1, "
          f"{args.epochs} epochs, {args.attack_steps}-step attacks, seed {args.seed}")
    header = ("floe_form", "epochs_done", "max_logit_clean", "max_logit_background", "val_clean", "val_pgd", "minutes", "status")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in header))
    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
