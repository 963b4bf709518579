"""The ``sam`` attention plugin against segment-anything's own SamPredictor.

One tiny, randomly initialised SAM (segment-anything's modules: ViT encoder of depth 2
and width 32 on 64 x 64 inputs, so 4 x 4 embeddings) stands in for the real weights,
which cannot be downloaded here. The batched path must give *exactly* the masks that
``SamPredictor.set_image(uint8 HWC) + predict(..., multimask_output=True)`` + argmax
of the predicted IoU gives image by image: the resize reproduces Pillow's arithmetic
bit for bit, the prompts go through the same float64 -> float32 scaling, and on the
CPU the batched encoder/decoder matmuls give the same floats as single-image ones
(checked here: tolerance 0 pixels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn

pytest.importorskip("segment_anything")

from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling.mask_decoder import MaskDecoder  # noqa: E402

from dhat_seg.attention import AttentionContext, validate_attention  # noqa: E402
from dhat_seg.errors import UserError  # noqa: E402
from dhat_seg.plugins import sam as S  # noqa: E402

N_IMAGES = 4


@pytest.fixture(scope="module")
def tiny_sam():
    return S.random_sam(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, prompt_dim=32, seed=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N_IMAGES, 3, 32, 32, generator=g)


def spec():
    specs = []
    S.register_attention_methods(register=specs.append)
    (only,) = specs
    return only


def predictor_masks(sam, images, **predict_kwargs):
    """Reference: SamPredictor, one uint8 HWC image at a time, best-IoU mask."""
    predictor = SamPredictor(sam)
    uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    masks = []
    for i, image in enumerate(uint8):
        predictor.set_image(image)
        kwargs = {k: v[i] if isinstance(v, list) else v for k, v in predict_kwargs.items()}
        m, iou, _ = predictor.predict(multimask_output=True, **kwargs)
        masks.append(m[int(np.argmax(iou))])
    return torch.from_numpy(np.stack(masks)).unsqueeze(1)


def assert_nontrivial(masks):
    # both classes occur, and the masks depend on the image (a mix-up of images or
    # prompts across the batch would then show)
    assert masks.any() and not masks.all()
    assert len({m.numpy().tobytes() for m in masks}) > 1


# --- equivalence with SamPredictor ------------------------------------------------


def test_center_prompt_matches_sampredictor(tiny_sam, images):
    out = S.SamAttention.from_model(tiny_sam, prompt="center", encoder_batch_size=4)(images, torch.zeros(N_IMAGES))
    # pixel-grid centre of a 32 x 32 image, worked out by hand
    ref = predictor_masks(tiny_sam, images, point_coords=np.array([[15.5, 15.5]]), point_labels=np.array([1]))
    assert out.dtype == torch.bool and out.shape == (N_IMAGES, 1, 32, 32)
    assert_nontrivial(out)
    assert torch.equal(out, ref)


def test_box_prompt_matches_sampredictor(tiny_sam, images):
    out = S.SamAttention.from_model(tiny_sam, prompt="box", box_margin=0.05)(images, torch.zeros(N_IMAGES))
    # 5 % of 32 px = 1.6 px off each side, inclusive pixel positions: [1.6, 1.6, 29.4, 29.4]
    ref = predictor_masks(tiny_sam, images, box=np.array([1.6, 1.6, 29.4, 29.4]))
    assert_nontrivial(out)
    assert torch.equal(out, ref)


def test_single_mask_output_matches_sampredictor(tiny_sam, images):
    out = S.SamAttention.from_model(tiny_sam, prompt="center", multimask=False)(images, torch.zeros(N_IMAGES))
    predictor = SamPredictor(tiny_sam)
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = []
    for image in uint8:
        predictor.set_image(image)
        m, _, _ = predictor.predict(point_coords=np.array([[15.5, 15.5]]), point_labels=np.array([1]), multimask_output=False)
        ref.append(m[0])
    assert torch.equal(out, torch.from_numpy(np.stack(ref)).unsqueeze(1))


def test_batch_chunking_and_per_image_decoder_agree(tiny_sam, images):
    """encoder_batch_size that does not divide B, and the per-image decoder fallback
    used for decoders whose predict_masks is not segment-anything's."""
    labels = torch.zeros(N_IMAGES)
    whole = S.SamAttention.from_model(tiny_sam, encoder_batch_size=N_IMAGES)(images, labels)
    chunked = S.SamAttention.from_model(tiny_sam, encoder_batch_size=4)(images, labels)

    class OtherDecoder(MaskDecoder):
        def predict_masks(self, *args, **kwargs):
            return super().predict_masks(*args, **kwargs)

    original = tiny_sam.mask_decoder.__class__
    tiny_sam.mask_decoder.__class__ = OtherDecoder
    try:
        assert type(tiny_sam.mask_decoder).predict_masks not in S._known_decoders()
        fallback = S.SamAttention.from_model(tiny_sam, encoder_batch_size=4)(images, labels)
    finally:
        tiny_sam.mask_decoder.__class__ = original
    assert torch.equal(whole, chunked) and torch.equal(whole, fallback)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.cam_layer = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.cam_layer(x)).mean(dim=(2, 3)))


def test_peak_prompt_uses_gradcam_argmax(tiny_sam, images):
    from dhat_seg.plugins.gradcam import grad_cam

    net = TinyNet()
    labels = torch.tensor([0, 1, 0, 1])
    fn = S.SamAttention.from_model(tiny_sam, prompt="peak", classifier=net, cam_layer=net.cam_layer)
    out = fn(images, labels)
    cam = grad_cam(net, net.cam_layer, images, labels)
    idx = cam.flatten(1).argmax(dim=1)
    coords = [np.array([[float(i % 32), float(i // 32)]]) for i in idx]
    ref = predictor_masks(tiny_sam, images, point_coords=coords, point_labels=np.array([1]))
    assert torch.equal(out, ref)


def test_peak_points_hand_computed():
    cam = torch.zeros(2, 1, 5, 6)
    cam[0, 0, 1, 1], cam[0, 0, 3, 4], cam[0, 0, 3, 3] = 1.0, 0.5, 0.4  # (3,3) is not a local max
    cam[1, 0, 2, 5] = 0.7  # one peak only: the other slots are padding
    coords, labels = S.peak_points(cam, num_points=3)
    assert coords[0].tolist() == [[1.0, 1.0], [4.0, 3.0], coords[0, 2].tolist()]
    assert labels[0].tolist() == [1, 1, -1]
    assert coords[1, 0].tolist() == [5.0, 2.0] and labels[1].tolist() == [1, -1, -1]


# --- the resize: bit-exact Pillow ----------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (33, 17), (96, 80)])
def test_resize_matches_pil_exactly(size):
    from segment_anything.utils.transforms import ResizeLongestSide

    g = torch.Generator().manual_seed(sum(size))
    uint8 = (torch.rand(2, 3, *size, generator=g) * 255).round().to(torch.uint8)
    for long_side in (64, 1024):
        new = S.longest_side_shape(*size, long_side)
        assert new == ResizeLongestSide.get_preprocess_shape(*size, long_side)
        ours = S.pil_bilinear_resize(uint8.float(), new)
        ref = [ResizeLongestSide(long_side).apply_image(u.permute(1, 2, 0).numpy()) for u in uint8]
        assert torch.equal(ours, torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float())


# --- plugin, options and checkpoints -------------------------------------------------


def test_spec_registration():
    s = spec()
    assert (s.name, s.kind, s.version) == ("sam", "image", "1")
    for key, value in {"checkpoint": "", "model_type": "vit_b", "prompt": "center", "encoder_batch_size": 8, "multimask": True}.items():
        assert s.default_options[key] == value


def test_missing_checkpoint_message(tmp_path):
    s = spec()
    problem = s.readiness({})
    assert "--attention-checkpoint" in problem and "sam_vit_b_01ec64.pth" in problem
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in problem
    problem = s.readiness({"model_type": "vit_h", "checkpoint": str(tmp_path / "nope.pth")})
    assert "nope.pth" in problem and "sam_vit_h_4b8939.pth" in problem and "--attention-checkpoint" in problem
    with pytest.raises(UserError, match="--attention-checkpoint"):
        s.build(AttentionContext(options=s.resolve_options({})))
    assert "model_type" in s.readiness({"model_type": "vit_x"})


def test_mobile_sam_needs_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mobile_sam", None)  # as if it were not installed
    assert "pip install" in spec().readiness({"model_type": "vit_t"})


def test_wrong_checkpoints_are_user_errors(tmp_path, tiny_sam):
    s = spec()
    bad_keys = tmp_path / "bad_keys.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad_keys)
    with pytest.raises(UserError, match="does not fit model_type 'vit_b'"):
        s.build(AttentionContext(options=s.resolve_options({"checkpoint": str(bad_keys)})))
    tiny = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), tiny)
    with pytest.raises(UserError, match="wrong shape"):
        S.load_sam(str(tiny), "vit_b")
    looks_large = tmp_path / "large.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}, looks_large)
    with pytest.raises(UserError, match="model_type=vit_l"):
        S.load_sam(str(looks_large), "vit_b")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": TinyNet()}, pickled)  # needs unpickling of code: refused
    with pytest.raises(UserError, match="weights-only"):
        S.load_sam(str(pickled), "vit_b")


def test_checkpoint_round_trip_through_plugin(tmp_path, tiny_sam, images, monkeypatch):
    """Save the tiny SAM's weights, build through the plugin (check_ready, weights-only
    load, architecture check, load_state_dict) with a registry builder of the tiny
    architecture and another seed: the masks must be the original model's."""
    path = tmp_path / "tiny_sam.pth"
    torch.save({"model": tiny_sam.state_dict()}, path)  # nested, as fine-tuning code saves
    monkeypatch.setattr(S, "_registry", lambda model_type: lambda checkpoint=None: S.random_sam(seed=123))
    s = spec()
    fn = s.build(AttentionContext(options=s.resolve_options({"checkpoint": str(path), "encoder_batch_size": "3"})))
    labels = torch.zeros(N_IMAGES)
    other = S.SamAttention.from_model(S.random_sam(seed=123))(images, labels)
    out = validate_attention(fn(images, labels), images, "sam")
    assert torch.equal(out, S.SamAttention.from_model(tiny_sam)(images, labels))
    assert not torch.equal(out, other)  # the weights really came from the file
    assert not any(p.requires_grad for p in fn.sam.parameters()) and not fn.sam.training


def test_option_errors(tmp_path):
    s = spec()
    ckpt = tmp_path / "any.pth"
    ckpt.write_bytes(b"PK\x03\x04")  # looks like torch.save's zip format: the options are checked before loading
    for opts, match in [
        ({"prompt": "middle"}, "prompt='middle'"),
        ({"encoder_batch_size": "0"}, "encoder_batch_size"),
        ({"box_margin": "0.7"}, "box_margin"),
        ({"prompt": "peak"}, "--attention-model"),
        ({"prompt": "peaks"}, "--attention-model"),
    ]:
        with pytest.raises(UserError, match=match):
            s.build(AttentionContext(options=s.resolve_options({"checkpoint": str(ckpt), **opts})))


def test_output_on_images_device(tiny_sam, images):
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ref = None
    for device in devices:
        x = images[:2].to(device)
        out = validate_attention(S.SamAttention.from_model(tiny_sam)(x, torch.zeros(2, device=device)), x, "sam")
        assert out.device == x.device and out.dtype == torch.bool
        ref = out.cpu() if ref is None else ref
        # across devices, float differences may flip pixels whose logit is ~0
        assert (out.cpu() != ref).float().mean() < 0.02
    tiny_sam.to("cpu")


# --- prompt=peak|peaks reads a classifier: declared, keyed, runnable from the CLI ---------


def test_peak_prompts_declare_the_classifier():
    s = spec()
    assert not s.needs_classifier(s.resolve_options({})) and not s.needs_classifier(s.resolve_options({"prompt": "box"}))
    assert s.needs_classifier(s.resolve_options({"prompt": "peak"})) and s.needs_classifier(s.resolve_options({"prompt": "peaks"}))


def test_masks_build_with_peak_prompt_keys_the_classifier(tmp_path, tiny_sam, monkeypatch):
    """``dhat-seg masks build --attention sam --attention-opt prompt=peak``, end to end on
    the built-in data: the tiny SAM comes from a checkpoint file (the registry builder
    is swapped for the tiny architecture), the classifier from --attention-model. The
    cache key holds that classifier's SHA-256, and another classifier gives another key."""
    from typer.testing import CliRunner

    from dhat_seg.attention import plugin_manager
    from dhat_seg.cache import read_meta, sha256_file
    from dhat_seg.run.checkpoint import save_weights
    from dhat_seg.cli import app
    from dhat_seg.models import create_model

    plugin_manager.reset()
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), checkpoint)
    monkeypatch.setattr(S, "_registry", lambda model_type: lambda checkpoint=None: S.random_sam(seed=123))
    classifiers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"classifier{seed}.safetensors"
        save_weights(create_model("small_cnn", 10), path, "small_cnn")
        classifiers.append(path)

    def build(classifier):
        args = ["masks", "build", "--attention", "sam", "--attention-checkpoint", str(checkpoint),
                "--attention-opt", "prompt=peak", "--attention-model", str(classifier), "--data", "synthetic",
                "--cache-dir", str(tmp_path / "cache"), "--set", "train_size=20", "--set", "batch_size=8",
                "--set", "device=cpu"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        directory = Path(next(l for l in result.output.splitlines() if l.startswith("cache ")).split(None, 1)[1])
        return read_meta(directory)["key"]

    first, second = build(classifiers[0]), build(classifiers[1])
    assert first["method"]["options"]["prompt"] == "peak"
    assert first["classifier"] == {"source": "frozen", "sha256": sha256_file(classifiers[0])}
    assert second["classifier"]["sha256"] == sha256_file(classifiers[1]) != first["classifier"]["sha256"]
    assert {k: v for k, v in first.items() if k != "classifier"} == {k: v for k, v in second.items() if k != "classifier"}
    plugin_manager.reset()
