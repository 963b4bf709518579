"""U^2-Net-p masks (dhat_seg.plugins.u2net): batched torch vs an onnxruntime one-image
loop, and IoU / speed at smaller inputs, on the built-in data with the wheel's weights.

    python benchmarks/bench_u2net.py                      # 32 images, inputs 160, 224, 320
    python benchmarks/bench_u2net.py --n 64 --sizes 96,160,224,288,320 --threads 2

Both paths run the same pre- and post-processing (bilinear resize to the input size,
ImageNet normalisation; the fused output resized back and min-max normalised per
image). The onnxruntime path runs rembg's ``u2netp.onnx`` (fixed 1 x 3 x 320 x 320
input) image by image, as rembg does; the torch path is the plugin: the network in
torch, ``--batch-size`` images per forward pass, at any input size. Prints masks per
second, the ratio to the onnxruntime loop, the largest difference between the two
paths' maps at 320, and the IoU of the foreground (fixed thresholds 0.1 and 0.5, and
Otsu) with the true masks.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="number of built-in training images")
    p.add_argument("--sizes", default="160,224,320", help="torch input sizes (comma list)")
    p.add_argument("--batch-size", type=int, default=8, help="images per torch forward pass")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime loop")
    args = p.parse_args(argv)

    from dhat_seg.attention import foreground_iou, foreground_mask, minmax_normalise
    from dhat_seg.data import build_dataset
    from dhat_seg.plugins import u2net as U

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    path = U.packaged_checkpoint()
    if path is None:
        raise SystemExit(f"the packaged weights are missing: {U.INSTALL_HINT}")
    ds = build_dataset("synthetic", "train", size=max(args.n + 100, 300), seed=0)
    images = torch.stack([ds.load_image(i) for i in range(args.n)])
    truth = ds.gt_masks[: args.n].unsqueeze(1)
    model = U.load_u2net(path).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def scores(maps: torch.Tensor) -> dict[str, float]:
        maps = maps.cpu()
        out = {f"IoU@{o}": foreground_iou(foreground_mask(maps, "fixed", o), truth).mean().item() for o in (0.1, 0.5)}
        out["IoU otsu"] = foreground_iou(foreground_mask(maps, "otsu"), truth).mean().item()
        return out

    rows = []
    ort_maps = None
    if not args.no_onnxruntime:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        pre = U.U2NetAttention(model, input_size=320)

        def ort_one(image: torch.Tensor) -> torch.Tensor:
            x = pre.preprocess(image[None]).numpy().astype(np.float32)
            d0 = torch.from_numpy(session.run(None, {name: x})[0])
            return minmax_normalise(U._resize(d0, tuple(image.shape[-2:])), eps=1e-7).clamp_(0, 1)

        ort_one(images[0])  # warm-up
        start = time.perf_counter()
        ort_maps = torch.cat([ort_one(img) for img in images])
        t_ort = time.perf_counter() - start
        rows.append({"path": "onnxruntime, 1 image/run", "input": 320, "s": t_ort, **scores(ort_maps)})

    def run_torch(size: int, batch: int) -> tuple[float, torch.Tensor]:
        fn = U.U2NetAttention(model, input_size=size, batch_size=batch)
        fn(images[:batch].to(device))  # warm-up (kernel selection, allocator)
        sync()
        start = time.perf_counter()
        maps = fn(images.to(device))
        sync()
        return time.perf_counter() - start, maps.cpu()

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    maps_320 = None
    for size in sizes:
        t, maps = run_torch(size, args.batch_size)
        if size == 320:
            maps_320 = maps
        rows.append({"path": f"torch, batch {args.batch_size}", "input": size, "s": t, **scores(maps)})
    if 320 in sizes and args.batch_size != 1:
        t, _ = run_torch(320, 1)
        rows.append({"path": "torch, batch 1", "input": 320, "s": t})

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({cpu}), {threads} threads")
          + f", {os.cpu_count()} CPUs visible; {args.n} built-in 32x32 training images; weights {os.path.basename(path)}")
    base = rows[0]["s"] if not args.no_onnxruntime else None
    header = f"{'path':<26} {'input':>5} {'masks/s':>8} {'ratio':>6} {'IoU@0.1':>8} {'IoU@0.5':>8} {'IoU otsu':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{base / r['s']:.2f}x" if base else "-"
        ious = " ".join(f"{r[k]:>8.3f}" if k in r else f"{'':>8}" for k in ("IoU@0.1", "IoU@0.5", "IoU otsu"))
        print(f"{r['path']:<26} {r['input']:>5} {args.n / r['s']:>8.2f} {ratio:>6} {ious}")
    print("(ratio: masks/s over the onnxruntime loop's, both measured in this run)")
    if ort_maps is not None and maps_320 is not None:
        print(f"max |torch - onnxruntime| of the maps at input 320: {(maps_320 - ort_maps).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
