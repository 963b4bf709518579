"""Training throughput: samples per second of standard, AT, UIAT and DHAT training, by
model and speed option (fp32, bf16 autocast, channels_last, torch.compile).

Each (model, method, variant) is timed through the trainer's own per-batch code
(``Trainer._train_epoch``: data loading and augmentation, masks, the training method's
loss with its attacks, backward, step), after ``prepare_model`` applied the variant's
options as ``Trainer.fit`` does, under the run's deterministic-kernel settings. A
warm-up epoch of ``--warmup`` batches (compilation included) comes first, then an
epoch of ``--steps`` batches is timed; with ``--rounds`` above 1 the variants take
turns and the fastest round is reported. DHAT reads masks from a mask cache built once
with the ``oracle`` attention plugin (the synthetic data's exact object masks), as a
run with cached masks does, so its cost over UIAT is that of the method itself.

Every model starts from the same weights; the data are the built-in synthetic images at
32 x 32 (CIFAR's size), so the figures transfer to CIFAR-10 training:

    python benchmarks/bench_train.py --models small_cnn --steps 3
    python benchmarks/bench_train.py --models resnet18,wrn28_10 --steps 20 --batch-size 128 --device cuda --json bench.json

Variants: ``fp32`` (none), ``bf16`` (``amp: true, amp_dtype: bfloat16``),
``channels_last``, ``compile``, and ``all`` (the three together). Attacks run in fp32
in every variant (``attack_precision: fp32``), as in training.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("standard", "at", "uiat", "dhat")
MODEL_NAMES = ("small_cnn", "resnet18", "wrn28_10")
VARIANTS = {
    "fp32": {},
    "bf16": {"amp": True, "amp_dtype": "bfloat16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "all": {"amp": True, "amp_dtype": "bfloat16", "channels_last": True, "compile": True},
}


def _names(text: str, allowed, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"error: {what} {bad[0] if bad else text!r} is unknown; expected some of {', '.join(allowed)}")
    return names


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,resnet18,wrn28_10", help=f"comma-separated, of {', '.join(MODEL_NAMES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--variants", default="fp32,bf16,channels_last,compile", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (batches) per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator, kernel choice)")
    p.add_argument("--rounds", type=int, default=1, help="measurements per variant, interleaved; the fastest is reported")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (the paper's: 128)")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD and inverse-PGD steps (the paper's: 10)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    models = _names(args.models, MODEL_NAMES, "model")
    methods = _names(args.methods, METHODS, "method")
    variants = _names(args.variants, VARIANTS, "variant")
    if min(args.steps, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("error: --steps, --batch-size and --rounds must be >= 1 and --warmup >= 0")

    from torch.utils.data import Subset

    from dhat_seg.cache import MaskedDataset
    from dhat_seg.config import load_config
    from dhat_seg.data import channel_stats, split_for
    from dhat_seg.errors import UserError
    from dhat_seg.run.experiment import frozen_masks, resolve_runtime
    from dhat_seg.models import create_model
    from dhat_seg.run.determinism import deterministic_kernels, seed_everything
    from dhat_seg.run.devices import select_device
    from dhat_seg.run.speed import prepare_model
    from dhat_seg.run.trainer import RunParts, Trainer
    from dhat_seg.training_methods import create_training_method

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="dhat-bench-train-"))
    n_warm, n_timed = args.warmup * args.batch_size, args.steps * args.batch_size
    # val_size images are carved out of train_size: the training split keeps n_warm + n_timed
    base = dict(data="synthetic", image_size=32, train_size=n_warm + n_timed + 16, val_size=16, test_size=16,
                batch_size=args.batch_size, attack_steps=args.attack_steps, inv_steps=args.attack_steps,
                attention="oracle", mask_source="cache", device=str(device), epochs=1, milestones=[5])
    cfg0 = load_config(None, {**base, "method": "dhat", "model": models[0]})
    train_ds = split_for(cfg0, "train", augment=cfg0.augment)  # augmented (random crop + flip), as in training
    assert len(train_ds) >= n_warm + n_timed, (len(train_ds), n_warm + n_timed)
    mean, std = channel_stats(train_ds)
    masks = None
    if "dhat" in methods:  # the oracle's masks, cached once as a run with mask_source: cache does
        masks = frozen_masks(cfg0, train_ds, device=device, root=work / "cache", log=lambda m: None, progress=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(model_name, method_name, variant, model0):
        cfg = load_config(None, {**base, "method": method_name, "model": model_name, **VARIANTS[variant]})
        data = MaskedDataset(train_ds, masks) if method_name == "dhat" else train_ds
        warm, timed = Subset(data, range(n_warm)), Subset(data, range(n_warm, n_warm + n_timed))
        model = copy.deepcopy(model0)
        method = create_training_method(cfg)
        run_device, amp_dtype = resolve_runtime(cfg)  # what Experiment resolves once per run
        trainer = Trainer(cfg, work / "run", RunParts(train_ds, None, None, model, method), device=run_device,
                          amp_dtype=amp_dtype, progress=False, log=lambda m: None)
        prepare_model(model, cfg)  # as Trainer.fit does
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=trainer.amp)
        if hasattr(method, "on_train_data"):
            method.on_train_data(len(train_ds), len(train_ds) // cfg.batch_size)
        method.on_fit_start(model, None)
        method.on_epoch_start(model, 0)
        seed_everything(1)
        with deterministic_kernels(device):
            start = time.perf_counter()
            if n_warm:
                trainer._train_epoch(model, method, None, warm, optimizer, scaler, 0)
            sync()
            warm_s = time.perf_counter() - start
            start = time.perf_counter()
            trainer._train_epoch(model, method, None, timed, optimizer, scaler, 0)
            sync()
            return time.perf_counter() - start, warm_s

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"synthetic 32x32, batch {args.batch_size}, {args.attack_steps} attack steps (and inverse steps for UIAT/DHAT), "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s); DHAT masks: oracle, cached")
    results = []
    for model_name in models:
        seed_everything(0)
        model0 = create_model(model_name, train_ds.num_classes, mean, std).to(device)
        times: dict[tuple[str, str], list[float]] = {}
        warmups: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for method_name in methods:
                for variant in variants:
                    key = (method_name, variant)
                    if key in warmups and warmups[key] is None:
                        continue  # refused in the first round
                    try:
                        seconds, warm_s = measure(model_name, method_name, variant, model0)
                    except UserError as exc:  # e.g. compile without a C++ compiler, bf16 on an old GPU
                        print(f"  {model_name} {method_name} {variant}: skipped ({exc})", file=sys.stderr)
                        warmups[key] = None
                        continue
                    times.setdefault(key, []).append(seconds)
                    warmups.setdefault(key, warm_s)
                    print(f"  {model_name:<10} {method_name:<8} {variant:<13} {n_timed / seconds:9.1f} samples/s "
                          f"(warm-up {warm_s:.1f} s)", file=sys.stderr, flush=True)
        for (method_name, variant), ts in times.items():
            best = min(ts)
            results.append({"model": model_name, "method": method_name, "variant": variant, "seconds": round(best, 4),
                            "samples_per_s": round(n_timed / best, 2), "warmup_s": round(warmups[(method_name, variant)], 2),
                            "steps": args.steps, "batch_size": args.batch_size, "rounds": len(ts)})
    report = {"torch": torch.__version__, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results, "dhat_over_uiat": _dhat_over_uiat(results)}
    _print_tables(results, report["dhat_over_uiat"])
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


def _rate(results, model, method, variant):
    return next((r["samples_per_s"] for r in results
                 if (r["model"], r["method"], r["variant"]) == (model, method, variant)), None)


def _dhat_over_uiat(results) -> list[dict]:
    """DHAT's time per sample over UIAT's, by model and variant (both measured)."""
    out = []
    for model, variant in dict.fromkeys((r["model"], r["variant"]) for r in results):
        uiat, dhat = _rate(results, model, "uiat", variant), _rate(results, model, "dhat", variant)
        if uiat and dhat:
            out.append({"model": model, "variant": variant, "ratio": round(uiat / dhat, 3)})
    return out


def _print_tables(results, ratios) -> None:
    print()
    print(f"{'model':<10} {'method':<8} {'variant':<13} {'samples/s':>10} {'x fp32':>7} {'s/step':>8} {'warm-up s':>9}")
    for r in results:
        fp32 = _rate(results, r["model"], r["method"], "fp32")
        vs = f"{r['samples_per_s'] / fp32:7.2f}" if fp32 else f"{'-':>7}"
        print(f"{r['model']:<10} {r['method']:<8} {r['variant']:<13} {r['samples_per_s']:10.1f} {vs} "
              f"{r['seconds'] / r['steps']:8.3f} {r['warmup_s']:9.1f}")
    if ratios:
        print()
        print("DHAT / UIAT time per sample (cached masks):")
        print(f"{'model':<10} {'variant':<13} {'ratio':>6}")
        for r in ratios:
            print(f"{r['model']:<10} {r['variant']:<13} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
