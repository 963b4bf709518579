"""Mask cache (dhat_seg.cache) vs attention recomputed every batch, in DHAT training.

One DHAT training epoch (small CNN, built-in synthetic data; the trainer's own epoch
loop) is timed with

* masks from the cache, built once with SAM (a randomly initialised SAM of the
  official architecture, sized by the arguments: no weights can be downloaded here),
* masks from the cache, built once with Grad-CAM of a (random) small-CNN attention model,
* Grad-CAM recomputed on every augmented batch (``mask_source: online``, the authors' way),
* SAM recomputed on every batch (``mask_source: online``),

and the cache's bytes per sample are read from the caches built. Every variant starts
from the same weights and random draws; the variants take turns, epoch by epoch, so that
a change of machine load affects them alike. All ratios come from this one run.
Defaults take about a minute on 2 CPU cores:

    python benchmarks/bench_cache.py
    python benchmarks/bench_cache.py --n 1024 --img-size 256 --embed-dim 192 --depth 4 --num-heads 4 --device cuda

The SAM stand-in is tiny by default (256 x 256 encoder input, width 96, depth 4); the
real vit_b (``--img-size 1024 --embed-dim 768 --depth 12 --num-heads 12 --prompt-dim
256``) costs far more per image, which widens the online/cache gap further.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
import types
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=320, help="training pool size (train = n - val)")
    p.add_argument("--val", type=int, default=32, help="validation samples held out of the pool")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attack-steps", type=int, default=2, help="PGD and inverse-PGD steps per batch")
    p.add_argument("--rounds", type=int, default=2, help="epochs per variant, interleaved (the fastest is reported)")
    p.add_argument("--img-size", type=int, default=256, help="SAM encoder input side (1024 for the real models)")
    p.add_argument("--embed-dim", type=int, default=96, help="SAM encoder width (vit_b: 768)")
    p.add_argument("--depth", type=int, default=4, help="SAM encoder depth (vit_b: 12)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--prompt-dim", type=int, default=64, help="SAM prompt/decoder width (real models: 256)")
    p.add_argument("--skip-online-sam", action="store_true", help="do not time SAM recomputed every batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); one thread gives steady timings on a busy machine")
    args = p.parse_args(argv)

    from dhat_seg import hookimpl
    from dhat_seg.attention import AttentionSpec, plugin_manager
    from dhat_seg.attention.model import build_attention
    from dhat_seg.cache import MaskedDataset
    from dhat_seg.data import channel_stats, split_for
    from dhat_seg.run.experiment import frozen_masks, resolve_runtime
    from dhat_seg.run.determinism import seed_everything
    from dhat_seg.run.trainer import RunParts, Trainer
    from dhat_seg.run.checkpoint import save_weights
    from dhat_seg.config import load_config
    from dhat_seg.training_methods import create_training_method
    from dhat_seg.models import create_model
    from dhat_seg.plugins.sam import SamAttention, random_sam

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sam = random_sam(args.img_size, 16, args.embed_dim, args.depth, args.num_heads, args.prompt_dim, seed=0)
    sam_params = sum(q.numel() for q in sam.parameters())

    def sam_factory(ctx):
        return SamAttention.from_model(sam.to(ctx.device), prompt="center", encoder_batch_size=args.batch_size)

    # a benchmark-only method: the SAM plugin itself, on the random stand-in model
    plugin_manager.register_plugin(types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name="bench-sam", description="random SAM", factory=sam_factory,
                                                kind="image")))), "bench-cache")

    work = Path(tempfile.mkdtemp(prefix="dhat-bench-cache-"))
    torch.manual_seed(0)
    weights = work / "attention-model.safetensors"
    save_weights(create_model("small_cnn", 10), weights, "small_cnn")  # Grad-CAM's attention model (random weights)
    base = dict(method="dhat", data="synthetic", model="small_cnn", train_size=args.n, val_size=args.val, test_size=32,
                epochs=1, batch_size=args.batch_size, attack_steps=args.attack_steps,
                inv_steps=args.attack_steps, val_examples=16, val_attack_steps=1, milestones=[5],
                attention_model=str(weights), device=str(device))

    cfg = load_config(None, base)
    train_ds = split_for(cfg, "train", augment=cfg.augment)  # augmented (random crop + flip), as in training
    # the training loop itself, on parts filled in per variant below
    run_device, amp_dtype = resolve_runtime(cfg)  # what Experiment resolves once per run
    trainer = Trainer(cfg, work / "run", RunParts(train_ds, None, None, None, None), device=run_device, amp_dtype=amp_dtype,
                      progress=False, log=lambda m: None)
    seed_everything(0)
    model0 = create_model("small_cnn", train_ds.num_classes, *channel_stats(train_ds)).to(device)
    method = create_training_method(cfg)
    sam_cfg, gc_cfg = dataclasses.replace(cfg, attention="bench-sam"), dataclasses.replace(cfg, attention="gradcam")
    root = work / "cache"
    common = dict(device=device, root=root, log=lambda m: None, progress=False)
    # warm-up (kernel selection, allocator) so that the build time is the steady-state cost
    warm = torch.stack([train_ds.load_image(i) for i in range(min(args.batch_size, len(train_ds)))]).to(device)
    sam_factory(types.SimpleNamespace(device=device))(warm, torch.zeros(len(warm), device=device))
    sam_c = frozen_masks(sam_cfg, train_ds, **common)
    gc_c = frozen_masks(gc_cfg, train_ds, **common)
    online = dict(num_classes=train_ds.num_classes, device=device, classifier_path=weights)
    variants = {
        "cache SAM": (None, MaskedDataset(train_ds, sam_c)),
        "cache Grad-CAM": (None, MaskedDataset(train_ds, gc_c)),
        "online Grad-CAM": (build_attention(gc_cfg, **online), train_ds),
    }
    if not args.skip_online_sam:
        variants["online SAM"] = (build_attention(sam_cfg, **online), train_ds)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    train_n = len(train_ds)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"DHAT epoch on synthetic: {train_n} training images 32x32, small_cnn, batch {args.batch_size}, "
          f"{args.attack_steps} attack steps; variants interleaved, {args.rounds} rounds, fastest reported")
    print(f"SAM stand-in: encoder input {args.img_size}, width {args.embed_dim}, depth {args.depth}, "
          f"{sam_params / 1e6:.2f}M parameters (random weights); Grad-CAM on a small_cnn (random weights)")
    epoch_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (attention, data) in variants.items():
            # the same start for every variant: same weights, same optimiser, same draws
            model = copy.deepcopy(model0)
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            seed_everything(1)
            sync()
            start = time.perf_counter()
            trainer._train_epoch(model, method, attention, data, optimizer, scaler, 0)
            sync()
            epoch_times[name].append(time.perf_counter() - start)
    for name, times in epoch_times.items():
        each = ", ".join(f"{t:.2f}" for t in times)
        print(f"  {name:<16} fastest epoch {min(times):7.2f} s   (each: {each} s)")
    sam_cache, gc_cache = min(epoch_times["cache SAM"]), min(epoch_times["cache Grad-CAM"])
    gc_online = min(epoch_times["online Grad-CAM"])
    sam_online = min(epoch_times["online SAM"]) if "online SAM" in epoch_times else None

    print("caches (built once, before the first epoch; after a warm-up batch):")
    for name, c in (("SAM", sam_c), ("Grad-CAM", gc_c)):
        build = float(c.meta["build_seconds"])
        print(f"  {name:<9} {c.storage:<5} {c.bytes_per_sample:8.1f} bytes/sample, built in {build:6.2f} s "
              f"({1000 * build / len(c):.2f} ms/image)")
    print("ratios (this run):")
    print(f"  epoch with cached SAM masks / epoch with cached Grad-CAM masks : {sam_cache / gc_cache:6.2f}")
    print(f"  DHAT recomputing Grad-CAM every batch / DHAT with the cache    : {gc_online / gc_cache:6.2f}")
    if sam_online is not None:
        print(f"  DHAT recomputing SAM every batch / DHAT with the cache         : {sam_online / sam_cache:6.2f}")
    print(f"  bytes per cached sample, SAM (bits) / Grad-CAM (uint8 maps)    : {sam_c.bytes_per_sample / gc_c.bytes_per_sample:6.3f}")
    print(json.dumps({"epoch_s": {k: round(min(v), 3) for k, v in epoch_times.items()},
                      "bytes_per_sample": {"sam": round(sam_c.bytes_per_sample, 1), "gradcam": round(gc_c.bytes_per_sample, 1)},
                      "build_s": {"sam": sam_c.meta["build_seconds"], "gradcam": gc_c.meta["build_seconds"]}}))
    plugin_manager.reset()


if __name__ == "__main__":
    main()
