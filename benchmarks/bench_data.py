"""Input pipeline throughput: training batches per second (image + cached mask, random crop and
flip) of the DataLoader against the training set held on the device (``data_on_device``).

The data are the built-in synthetic images at 32 x 32 with a mask cache of their exact object
masks (the ``oracle`` plugin's), as a DHAT run with cached masks reads them; each batch is
moved to ``--device`` (the trainer's ``.to(device)``) and, on CUDA, synchronised, so the time
is the time until the training step could use it. The model is not involved: this is the
pipeline's share of a step, to put beside ``bench_train.py``'s step times.

    python benchmarks/bench_data.py                       # CPU, 3000 samples, batches of 128
    python benchmarks/bench_data.py --device cuda --size 50000 --workers 0,4,8 --json data.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _time_epochs(loader_epoch, epochs: int, device: torch.device) -> tuple[float, int]:
    """Fastest epoch's seconds and its batch count."""
    best, count = float("inf"), 0
    for epoch in range(epochs):
        start, count = time.perf_counter(), 0
        for batch in loader_epoch(epoch):
            x, mask = batch[0].to(device, non_blocking=True), batch[3].to(device, non_blocking=True)
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del x, mask
    return best, count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3000, help="training samples (default 3000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", default="0", help="comma-separated DataLoader worker counts to time (default 0)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant; the fastest is reported (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from dhat_seg import cache as C
    from dhat_seg.data import build_dataset
    from dhat_seg.attention.plugin_manager import attention_methods
    from dhat_seg.run.devices import select_device
    from dhat_seg.run.train_loop import EpochLoader

    device = select_device(args.device)
    ds = build_dataset("synthetic", "train", size=args.size, seed=0, val_size=0, augment=True)
    spec = attention_methods()["oracle"]
    with tempfile.TemporaryDirectory() as tmp:
        key = C.mask_key(ds, spec, {})
        gt = {ds.load_image(i).numpy().tobytes(): ds.gt_masks[i] for i in range(len(ds))}

        def oracle(images, labels):
            return torch.stack([gt[im.cpu().numpy().tobytes()] for im in images]).unsqueeze(1)

        masks = C.build_masks(oracle, ds, Path(tmp) / "masks", key, progress=False, log=lambda m: None)
        data = C.MaskedDataset(ds, masks)
        rows = []
        variants = [(f"DataLoader, {w} workers", dict(num_workers=w, on_device=False))
                    for w in (int(v) for v in args.workers.split(","))]
        variants.append(("on the device", dict(num_workers=0, on_device=True)))
        for name, kw in variants:
            loader = EpochLoader(batch_size=args.batch_size, seed=0, pin_memory=device.type == "cuda", device=device, **kw)
            seconds, batches = _time_epochs(lambda e: loader.epoch(data, e), args.epochs, device)
            rows.append({"pipeline": name, "seconds_per_epoch": round(seconds, 4), "batches": batches,
                         "samples_per_s": round(batches * args.batch_size / seconds, 1)})
            print(f"  {name}: {rows[-1]['samples_per_s']} samples/s", file=sys.stderr)
    base = rows[0]["samples_per_s"]
    print(f"input pipeline on {device} ({torch.get_num_threads()} threads), {args.size} synthetic 32x32 samples with "
          f"cached masks, batch {args.batch_size}, fastest of {args.epochs} epochs:")
    print(f"{'pipeline':<26} {'samples/s':>10} {'x first':>8}")
    for row in rows:
        row["ratio"] = round(row["samples_per_s"] / base, 2)
        print(f"{row['pipeline']:<26} {row['samples_per_s']:>10} {row['ratio']:>8}")
    result = {"device": str(device), "size": args.size, "batch_size": args.batch_size, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
