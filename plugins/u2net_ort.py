"""The ``u2net`` plugin's onnxruntime backend: U^2-Net(-p) batched on the CPU.

On the CPU onnxruntime's convolutions (MLAS) are faster than torch's oneDNN ones for this
network (``benchmarks/bench_u2net.py``), so with ``backend: auto`` (the default) a CPU
run builds its maps through onnxruntime when it is installed; CUDA runs, and runs
without onnxruntime, keep the torch module of ``u2net_net.py``. ``backend: torch`` or
``backend: onnxruntime`` forces one; asking for onnxruntime without it installed is an
error, never a silent fall-back.

The graph onnxruntime runs:

* an ``.onnx`` checkpoint (rembg's ``u2netp.onnx`` by default) is run as it is, with
  its input and fused output declared with a free batch axis (and free height and
  width): the file fixes them at 1 x 3 x 320 x 320, but its Resize sizes come from
  Shape ops, so the graph itself computes any batch and size. Only the fused output
  sigmoid(d0) is kept (the six side outputs are dropped). The weights and operators
  are untouched, so the maps are those of the original file run image by image
  (max abs difference 0 on the built-in images).
* a ``.pth``/``.pt`` checkpoint has no graph: the torch module (its BatchNorm folded)
  is exported with ``torch.onnx.export`` (TorchScript exporter, opset 17) at the
  plugin's input size with a free batch axis, in memory, once per plugin build (about
  3 s for U^2-Net-p). It is traced at the size it runs at, so no shape decision of the
  trace is reused at another size.

Maps of the two backends agree to float32 rounding (max abs difference of sigmoid(d0)
about 6e-5 at 320; ``tests/test_u2net.py`` checks 1e-4 and the binary masks).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dhat_seg.errors import UserError

#: Values of the plugin option ``backend``.
BACKENDS = ("auto", "torch", "onnxruntime")
ORT_HINT = 'pip install "dhat-seg[u2net]" (or pip install onnxruntime)'


def onnxruntime_missing() -> bool:
    return importlib.util.find_spec("onnxruntime") is None


def check_backend(value: Any) -> None:
    """A one-line UserError for a ``backend`` value that is not one of :data:`BACKENDS`."""
    if value not in BACKENDS:
        raise UserError(f"u2net option backend={value!r} is invalid; expected one of {', '.join(BACKENDS)} "
                        "(auto: onnxruntime on the CPU when it is installed, else torch)")


def choose_backend(requested: str, device: torch.device) -> str:
    """The backend that runs: ``requested``, with "auto" resolved for ``device``."""
    check_backend(requested)
    if requested == "auto":
        return "onnxruntime" if device.type == "cpu" and not onnxruntime_missing() else "torch"
    if requested == "onnxruntime" and onnxruntime_missing():
        raise UserError(f"u2net option backend=onnxruntime needs the onnxruntime package, which is not installed: "
                        f"{ORT_HINT}, or use backend=torch (or auto)")
    return requested


def _free(dims, names: dict[int, str]) -> None:
    for i, name in names.items():
        dims[i].Clear()
        dims[i].dim_param = name


def batched_graph(proto: Any) -> bytes:
    """``proto`` (a U^2-Net ONNX ModelProto, changed in place) with a free batch, height
    and width on its image input and only the fused output sigmoid(d0), serialised.

    The fused output is found as the Sigmoid of the last Conv (the 1 x 1 fusion conv,
    which every other conv feeds); a graph without one raises ``GraphMismatch``.
    """
    from dhat_seg.plugins.u2net_net import GraphMismatch

    graph = proto.graph
    stored = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in stored]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if len(inputs) != 1 or not convs:
        raise GraphMismatch(f"expected one image input and Conv nodes, found {len(inputs)} inputs and {len(convs)} convs")
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensor = convs[-1].output[0]
    bns = [n for n in consumers.get(tensor, []) if n.op_type == "BatchNormalization"]
    if bns:
        tensor = bns[0].output[0]
    sigmoids = {n.output[0] for n in consumers.get(tensor, []) if n.op_type == "Sigmoid"}
    fused = [o for o in graph.output if o.name in sigmoids]
    if not fused:
        raise GraphMismatch("no graph output is the sigmoid of the fusion conv (the fused map d0)")
    keep = fused[0]
    del graph.output[:]
    graph.output.append(keep)
    _free(inputs[0].type.tensor_type.shape.dim, {0: "batch", 2: "height", 3: "width"})
    _free(keep.type.tensor_type.shape.dim, {0: "batch", 2: "height", 3: "width"})
    del graph.value_info[:]  # shapes recorded for the fixed input would contradict the free axes
    return proto.SerializeToString()


def exported_graph(model: nn.Module, input_size: int) -> bytes:
    """The torch module exported to ONNX (opset 17) for ``input_size`` x ``input_size``
    images, with a free batch axis, serialised (in memory)."""
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    model = model.to("cpu", memory_format=torch.contiguous_format)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["d0"], dynamic_axes={"image": {0: "batch"}, "d0": {0: "batch"}})
    return buffer.getvalue()


class OnnxRuntimeU2Net:
    """Callable: normalised images B x 3 x S x S (any device) -> sigmoid(d0) B x 1 x S x S
    on the same device, one onnxruntime run per call (the whole batch)."""

    def __init__(self, graph: bytes, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(x.device)


def onnxruntime_network(checkpoint: str, model: nn.Module, input_size: int, threads: int) -> OnnxRuntimeU2Net:
    """The onnxruntime runner for ``checkpoint`` (already loaded into ``model``, which
    validated it): its own graph when it is an ``.onnx`` file, else ``model`` exported."""
    if checkpoint.lower().endswith(".onnx"):
        import onnx

        graph = batched_graph(onnx.load(str(Path(checkpoint).expanduser())))
    else:
        graph = exported_graph(model, input_size)
    return OnnxRuntimeU2Net(graph, threads)
