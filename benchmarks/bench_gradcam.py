"""Throughput of dhat-seg's batched Grad-CAM vs pytorch-grad-cam's GradCAM.

Same model (torchvision ResNet-18 with the CIFAR 3x3 stem, random weights, eval mode),
same layer (layer4), same targets, N images of 32 x 32 in batches. dhat-seg keeps the
batch on its device (Captum LayerGradCam + torch bilinear resize); pytorch-grad-cam
copies activations and gradients to CPU numpy and resizes each map with cv2, which is
what the DHAT authors' pipeline did for every training batch.

Usage:  python benchmarks/bench_gradcam.py [--n 256] [--batch-size 128] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision
from torch import nn

from dhat_seg.plugins.gradcam import grad_cam


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, images, labels, batch_size, device) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], labels[i : i + batch_size]
        out.append(grad_cam(model, model.layer4, x, y))
    _sync(device)
    return out


def run_reference(cam, images, labels, batch_size) -> list[np.ndarray]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out = []
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], labels[i : i + batch_size]
        out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in y]))
    return out  # CPU numpy: already synchronised


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function; runs alternate so that load changes hit both."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def main() -> None:
    from pytorch_grad_cam import GradCAM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method; the best is reported")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model = cifar_resnet18().to(device).eval()
    images = torch.rand(args.n, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.n,), device=device)
    cam = GradCAM(model=model, target_layers=[model.layer4])

    # warm-up (cuDNN autotuning, lazy inits) and a check that both compute the same maps
    ours = torch.cat(run_ours(model, images, labels, args.batch_size, device))[:, 0].cpu().numpy()
    ref = np.concatenate(run_reference(cam, images, labels, args.batch_size))
    max_diff = float(np.abs(ours - ref).max())

    t_ours, t_ref = best_times(
        [
            lambda: run_ours(model, images, labels, args.batch_size, device),
            lambda: run_reference(cam, images, labels, args.batch_size),
        ],
        args.repeats,
    )
    cam.activations_and_grads.release()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"model: CIFAR ResNet-18 (random weights), layer4; N={args.n} images of {args.size}x{args.size}, batch {args.batch_size}")
    print(f"max |ours - pytorch-grad-cam| = {max_diff:.2e}")
    print(f"dhat-seg grad_cam      : {args.n / t_ours:10.1f} images/s  ({t_ours:.3f} s, best of {args.repeats})")
    print(f"pytorch-grad-cam GradCAM: {args.n / t_ref:10.1f} images/s  ({t_ref:.3f} s, best of {args.repeats})")
    print(f"speed-up (ours / pytorch-grad-cam): {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
