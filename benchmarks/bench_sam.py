"""Batched SAM masks (dhat_seg.plugins.sam) vs a SamPredictor loop, same weights and images.

The model is a randomly initialised SAM of the official architecture (no weights can be
downloaded here); its size is set by the arguments. Defaults are the tiny test model
(64 x 64 encoder input, depth 2, width 32); ``--img-size 1024 --embed-dim 768 --depth 12
--num-heads 12 --prompt-dim 256`` is vit_b.

    python benchmarks/bench_sam.py --n 64
    python benchmarks/bench_sam.py --n 32 --img-size 256 --embed-dim 192 --depth 4 --num-heads 4 --prompt-dim 64

Prints images/s of each path, the speed-up measured in this run, and how many mask
pixels differ between the two (expected 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predictor_loop(predictor, uint8_hwc: np.ndarray, prompt: str, h: int, w: int, margin: float) -> torch.Tensor:
    """SamPredictor image by image; best-IoU mask of 3, as the plugin does."""
    masks = []
    for image in uint8_hwc:
        predictor.set_image(image)
        if prompt == "center":
            m, iou, _ = predictor.predict(
                point_coords=np.array([[(w - 1) / 2, (h - 1) / 2]]), point_labels=np.array([1]), multimask_output=True
            )
        else:
            box = np.array([margin * w, margin * h, (w - 1) - margin * w, (h - 1) - margin * h])
            m, iou, _ = predictor.predict(box=box, multimask_output=True)
        masks.append(m[int(np.argmax(iou))])
    return torch.from_numpy(np.stack(masks)).unsqueeze(1)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--image-size", type=int, default=32, help="side of the (square) input images")
    p.add_argument("--img-size", type=int, default=64, help="SAM encoder input side (1024 for the real models)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--embed-dim", type=int, default=32, help="encoder width (vit_b: 768)")
    p.add_argument("--encoder-depth", "--depth", dest="depth", type=int, default=2, help="encoder depth (vit_b: 12)")
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--prompt-dim", type=int, default=32, help="prompt/decoder width (real models: 256)")
    p.add_argument("--encoder-batch-size", type=int, default=16)
    p.add_argument("--prompt", choices=("center", "box"), default="center")
    p.add_argument("--box-margin", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args(argv)

    from segment_anything import SamPredictor

    from dhat_seg.plugins.sam import SamAttention, random_sam

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sam = random_sam(args.img_size, args.patch_size, args.embed_dim, args.depth, args.num_heads, args.prompt_dim).to(device)
    params = sum(p.numel() for p in sam.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 3, args.image_size, args.image_size, generator=g)
    labels = torch.zeros(args.n, dtype=torch.long)
    uint8_hwc = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images_dev = images.to(device)

    batched = SamAttention.from_model(
        sam, prompt=args.prompt, encoder_batch_size=args.encoder_batch_size, box_margin=args.box_margin
    )
    predictor = SamPredictor(sam)
    h = w = args.image_size

    def run_batched():
        return batched(images_dev, labels.to(device))

    def run_loop():
        return predictor_loop(predictor, uint8_hwc, args.prompt, h, w, args.box_margin)

    # warm-up: kernels, allocator and caches for both paths
    batched(images_dev[: args.encoder_batch_size], labels[: args.encoder_batch_size].to(device))
    predictor_loop(predictor, uint8_hwc[:2], args.prompt, h, w, args.box_margin)

    t_batched, out_batched = timed(run_batched, device, args.repeats)
    t_loop, out_loop = timed(run_loop, device, args.repeats)
    differ = int((out_batched.cpu() != out_loop).sum())

    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    )
    print(
        f"SAM: encoder input {args.img_size}, patch {args.patch_size}, width {args.embed_dim}, depth {args.depth}, "
        f"heads {args.num_heads}, prompt dim {args.prompt_dim}; {params / 1e6:.2f}M parameters (random weights)"
    )
    print(f"{args.n} images {h}x{w}, prompt {args.prompt}, encoder_batch_size {args.encoder_batch_size}, median of {args.repeats}")
    print(f"batched (plugin)   : {t_batched:8.3f} s  {args.n / t_batched:9.1f} images/s")
    print(f"SamPredictor loop  : {t_loop:8.3f} s  {args.n / t_loop:9.1f} images/s")
    print(f"speed-up           : {t_loop / t_batched:8.2f}x")
    print(f"mask pixels differing between the two paths: {differ} of {out_loop.numel()}")


if __name__ == "__main__":
    main()
