"""U^2-Net-p masks (dhat_seg.plugins.u2net): the plugin's two backends (batched torch,
batched onnxruntime) vs an onnxruntime one-image loop of the shipped file, and IoU /
speed at smaller inputs, on the built-in data with the wheel's weights.

    python benchmarks/bench_u2net.py --threads 1              # 32 images, inputs 160, 224, 320
    python benchmarks/bench_u2net.py --n 64 --sizes 96,160,224,288,320 --threads 2 --repeats 3

All paths run the same pre- and post-processing (bilinear resize to the input size,
ImageNet normalisation; the fused output resized back and min-max normalised per
image). The reference runs rembg's ``u2netp.onnx`` as shipped (fixed 1 x 3 x 320 x 320
input, all seven outputs) image by image, as rembg does; the plugin's rows run
``--batch-size`` images per call at any input size: ``torch`` (the torch module, the
CUDA path) and ``onnxruntime`` (the shipped graph with a free batch axis, the CPU
default). torch and onnxruntime both use ``--threads`` intra-op threads (onnxruntime
one inter-op thread). Prints masks per second (best of ``--repeats`` rounds, each timing every row once), the
ratio to the one-image loop, the largest difference of each backend's maps from the
loop's at 320, and the IoU of the foreground (fixed thresholds 0.1 and 0.5, and Otsu)
with the true masks.
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
    p.add_argument("--backends", default="onnxruntime,torch", help="plugin backends to time (comma list)")
    p.add_argument("--repeats", type=int, default=1, help="rounds, each timing every row once; the fastest round of a row is reported")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime loop and backend")
    args = p.parse_args(argv)

    from dhat_seg.attention import foreground_iou, foreground_mask, minmax_normalise
    from dhat_seg.data import build_dataset
    from dhat_seg.plugins import u2net as U
    from dhat_seg.plugins import u2net_ort as ORT

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
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.no_onnxruntime:
        backends = [b for b in backends if b != "onnxruntime"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def scores(maps: torch.Tensor) -> dict[str, float]:
        out = {f"IoU@{o}": foreground_iou(foreground_mask(maps, "fixed", o), truth).mean().item() for o in (0.1, 0.5)}
        out["IoU otsu"] = foreground_iou(foreground_mask(maps, "otsu"), truth).mean().item()
        return out

    jobs: list = []  # (row, callable) pairs
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
            x = pre.preprocess(image[None].to(device)).cpu().numpy().astype(np.float32)
            d0 = torch.from_numpy(session.run(None, {name: x})[0])
            return minmax_normalise(U._resize(d0, tuple(image.shape[-2:])), eps=1e-7).clamp_(0, 1)

        ort_one(images[0])  # warm-up
        jobs.append(({"path": "onnxruntime, 1 image/run", "input": 320}, lambda: torch.cat([ort_one(img) for img in images])))

    def plugin(backend: str, size: int, batch: int):
        network = None
        if backend == "onnxruntime":
            network = ORT.onnxruntime_network(path, model, size, threads)
        fn = U.U2NetAttention(model, input_size=size, batch_size=batch, network=network, backend=backend)
        fn(images[:batch].to(device))  # warm-up (kernel selection, allocator)
        return lambda: fn(images.to(device))

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    batches = [args.batch_size] + ([1] if args.batch_size != 1 else [])
    for size in sizes:
        for backend in backends:
            for batch in batches if size == 320 else batches[:1]:
                jobs.append(({"path": f"{backend}, batch {batch}", "input": size}, plugin(backend, size, batch)))
    # every row is timed once per round, rounds repeated: a load that drifts over the run
    # (other processes on the machine) weighs on all rows alike; the fastest round counts
    times = [float("inf")] * len(jobs)
    outputs: list = [None] * len(jobs)
    for _ in range(max(1, args.repeats)):
        for i, (_, fn) in enumerate(jobs):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times[i] = min(times[i], time.perf_counter() - start)
            outputs[i] = out.cpu()
    rows, maps_320, ort_maps = [], {}, None
    for (row, _), t, maps in zip(jobs, times, outputs):
        row = {**row, "s": t}
        if row["path"].endswith("1 image/run"):
            ort_maps = maps
        if row["input"] == 320 and row["path"].endswith(f"batch {args.batch_size}"):
            maps_320[row["path"].split(",")[0]] = maps
        if row["path"].endswith("1 image/run") or row["path"].endswith(f"batch {args.batch_size}"):
            row.update(scores(maps))
        rows.append(row)

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({cpu})")
          + f", {threads} intra-op threads (torch and onnxruntime), {os.cpu_count()} CPUs visible; "
          + f"{args.n} built-in 32x32 training images, best of {max(1, args.repeats)}; weights {os.path.basename(path)}")
    base = rows[0]["s"] if not args.no_onnxruntime else None
    header = f"{'path':<26} {'input':>5} {'masks/s':>8} {'ratio':>6} {'IoU@0.1':>8} {'IoU@0.5':>8} {'IoU otsu':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{base / r['s']:.2f}x" if base else "-"
        ious = " ".join(f"{r[k]:>8.3f}" if k in r else f"{'':>8}" for k in ("IoU@0.1", "IoU@0.5", "IoU otsu"))
        print(f"{r['path']:<26} {r['input']:>5} {args.n / r['s']:>8.2f} {ratio:>6} {ious}")
    print("(ratio: masks/s over the onnxruntime one-image loop's, both measured in this run)")
    for backend, maps in maps_320.items():
        if ort_maps is not None:
            print(f"max |{backend} - onnxruntime loop| of the maps at input 320: {(maps - ort_maps).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
