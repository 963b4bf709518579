"""Held-out regime check of the built-in data: does a plain CNN learn the foreground,
and does it still use the background?

A small CNN defined here (not dhat-seg's models, trainer or attacks: plain torch, SGD,
cross-entropy, random crop + flip) is trained normally on the data exactly as
dhat-seg's generator makes it with its default settings, then scored on the four
Backgrounds-Challenge test splits (Xiao et al., ICLR 2021):

* ``same``: backgrounds correlated with the class as in training;
* ``mixed_rand``: the same objects on uniformly random backgrounds;
* ``only_fg``: the objects on black;
* ``no_fg_bg_class``: the objects blacked out on random backgrounds, scored against
  the background's class (how much the model reads the background).

The regime Table 10's question needs: ``mixed_rand`` far above chance (the foreground
is learned) and well below ``same`` (the background is still used).

    python benchmarks/check_regime.py                       # synthetic, defaults
    python benchmarks/check_regime.py --data digits
    python benchmarks/check_regime.py --salience 0          # version-1 colours
    python benchmarks/check_regime.py --seeds 0,1,2 --epochs 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from dhat_seg.data import build_dataset
from dhat_seg.data.registry import BACKGROUND_CHALLENGE_SPLITS


def plain_cnn(num_classes: int) -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 4 pixels of zero padding and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=g)
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return 100.0 * (pred == y).float().mean().item()


def run(args, seed: int) -> dict[str, float]:
    common = dict(seed=args.data_seed, image_size=32, rho=args.rho)
    if args.salience is not None:
        common["salience"] = args.salience
    train = build_dataset(args.data, "train", size=args.train_size + 300, val_size=300, **common)
    x, y = tensors(train)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = plain_cnn(train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    out = {}
    for key, split in BACKGROUND_CHALLENGE_SPLITS.items():
        ds = build_dataset(args.data, split, size=args.test_size, **common)
        xt, yt = tensors(ds)
        if key == "no_fg_bg_class":
            yt = ds.backgrounds
        out[key] = accuracy(model, xt, yt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", choices=("synthetic", "digits"))
    p.add_argument("--salience", type=float, default=None, help="generator salience (default: the generator's)")
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=2700)
    p.add_argument("--test-size", type=int, default=1000)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    rows = [run(args, s) for s in seeds]
    keys = list(BACKGROUND_CHALLENGE_SPLITS)
    print(f"data={args.data} salience={args.salience if args.salience is not None else 'default'} rho={args.rho} "
          f"epochs={args.epochs} train n={args.train_size} test n={args.test_size} seeds={seeds} "
          f"({time.time() - t0:.0f} s, {torch.get_num_threads()} threads)")
    print("seed  " + "  ".join(f"{k:>14}" for k in keys))
    for s, r in zip(seeds, rows):
        print(f"{s:<4}  " + "  ".join(f"{r[k]:>14.1f}" for k in keys))
    if len(rows) > 1:
        print("mean  " + "  ".join(f"{statistics.mean(r[k] for r in rows):>14.1f}" for k in keys))
        print("range " + "  ".join(f"{max(r[k] for r in rows) - min(r[k] for r in rows):>14.1f}" for k in keys))


if __name__ == "__main__":
    main()
