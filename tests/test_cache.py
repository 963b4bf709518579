"""The per-sample mask cache (dhat_seg.cache), its use in training and ``dhat-seg masks``.

References: masks are checked against the synthetic dataset's exact ground-truth masks,
transformed by a crop/flip recovered from the delivered *image* by exhaustive search and
applied by hand (numpy pad / slice / flip), not by the transform under test.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from dhat_seg import cache as C
from dhat_seg import hookimpl
from dhat_seg.attention import AttentionSpec, foreground_mask, plugin_manager
from dhat_seg.run.checkpoint import save_weights
from dhat_seg.config import load_config
from dhat_seg.data import build_dataset
from dhat_seg.errors import PluginError, UserError
from dhat_seg.models import create_model
from dhat_seg.run.experiment import Experiment, frozen_masks
from dhat_seg.run.trainer import Trainer

PAD = 4
SPEC = AttentionSpec(name="test-gt", description="ground truth", factory=lambda ctx: None, kind="image",
                     default_options={"flavour": "a"})


def tiny(seed: int = 0, size: int = 72, augment: bool = False):
    # train split of a pool of `size`, 8 held out for validation
    return build_dataset("synthetic", "train", size=size, seed=seed, val_size=8, augment=augment)


def gt_attention(*datasets, soft: bool = False):
    """An attention function returning each image's ground-truth mask (found by its
    exact pixels), and a counter of the images it was called on."""
    table = {}
    for ds in datasets:
        for i in range(len(ds)):
            table[ds.load_image(i).numpy().tobytes()] = ds.gt_masks[i]
    calls = {"images": 0}

    def fn(images, labels):
        calls["images"] += images.shape[0]
        masks = torch.stack([table[img.cpu().numpy().tobytes()] for img in images]).unsqueeze(1).to(images.device)
        return masks.float() * 0.8 + 0.1 if soft else masks

    return fn, calls


def key_of(ds, **kwargs):
    options = kwargs.pop("options", {"flavour": "a"})
    return C.mask_key(ds, SPEC, options, **kwargs)


def build(fn, ds, directory, key=None, **kwargs):
    kwargs.setdefault("chunk_size", 16)
    kwargs.setdefault("batch_size", 8)
    return C.build_masks(fn, ds, directory, key or key_of(ds), progress=False, log=lambda m: None, **kwargs)


# ---------------------------------------------------------------------------------
# (a) the mask delivered with an augmented image is that image's mask, augmented alike
# ---------------------------------------------------------------------------------


def by_hand(array: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
    """Zero-pad by PAD, crop the original size at (top, left), optionally flip (C x H x W)."""
    h, w = array.shape[-2:]
    padded = np.pad(array, [(0, 0), (PAD, PAD), (PAD, PAD)])
    out = padded[:, top : top + h, left : left + w]
    return out[:, :, ::-1] if flip else out


def transforms_matching(original: torch.Tensor, augmented: torch.Tensor) -> list[tuple[int, int, bool]]:
    src, dst = original.numpy(), augmented.numpy()
    return [(t, l, f) for t in range(2 * PAD + 1) for l in range(2 * PAD + 1) for f in (False, True)
            if np.array_equal(by_hand(src, t, l, f), dst)]


def check_masked_batches(batches, ds, storage: str) -> tuple[set, int, int, int]:
    """Every (image, label, index, mask) of ``batches`` is a crop/flip of sample ``index`` of ``ds``,
    with its ground-truth mask cropped and flipped alike. Returns the samples seen and how many
    were flipped, shifted and had their mask changed."""
    seen, flipped, shifted, changed = set(), 0, 0, 0
    for images, labels, index, masks in batches:
        assert masks.dtype == (torch.bool if storage == "bits" else torch.uint8)
        assert masks.shape == (images.shape[0], 1, 32, 32)
        for image, label, i, mask in zip(images, labels, index.tolist(), masks):
            seen.add(i)
            assert label == ds.labels[i]
            found = transforms_matching(ds.load_image(i), image)
            assert found, f"sample {i}: the image is no crop/flip of sample {i}"
            gt = ds.gt_masks[i][None].numpy()
            if storage == "uint8":  # the soft map 0.1 / 0.9, quantised; padding is 0
                gt = np.where(gt, round(0.9 * 255), round(0.1 * 255)).astype(np.uint8)
            for top, left, flip in found:
                assert np.array_equal(mask.numpy(), by_hand(gt, top, left, flip)), (i, top, left, flip)
            top, left, flip = found[0]
            flipped += flip
            shifted += (top, left) != (PAD, PAD)
            changed += not np.array_equal(mask.numpy(), gt)
    return seen, flipped, shifted, changed


@pytest.mark.parametrize("storage, num_workers", [("bits", 0), ("bits", 2), ("uint8", 0)])
def test_mask_follows_the_random_crop_and_flip_of_its_image(tmp_path, storage, num_workers):
    ds = tiny(augment=True)
    fn, _ = gt_attention(ds, soft=storage == "uint8")
    cache = build(fn, ds, tmp_path / "c")
    assert cache.storage == storage and len(cache) == len(ds) == 64
    loader = DataLoader(C.MaskedDataset(ds, cache), batch_size=16, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(1))
    seen, flipped, shifted, changed = check_masked_batches(loader, ds, storage)
    assert seen == set(range(len(ds)))
    # the augmentation really happened, so a mask that ignored it would have failed
    assert flipped > 5 and shifted > 30 and changed > 30


def test_images_are_those_of_the_plain_dataset_under_the_same_seed(tmp_path):
    ds = tiny(augment=True)
    cache = build(gt_attention(ds)[0], ds, tmp_path / "c")
    masked = C.MaskedDataset(ds, cache)
    for i in (0, 5, 33):
        torch.manual_seed(100 + i)
        plain = ds[i][0]
        torch.manual_seed(100 + i)
        image, label, index, _ = masked[i]
        assert torch.equal(plain, image) and index == i and label == int(ds.labels[i])


def test_soft_maps_are_stored_as_uint8_and_thresholded_when_read(tmp_path):
    ds = tiny()
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32)

    def fn(images, labels):
        return (ramp * images[:, :1].mean(dim=(2, 3), keepdim=True).clamp(0.2, 1)).expand(images.shape[0], 1, 32, 32).clone()

    cache = build(fn, ds, tmp_path / "soft")
    assert cache.soft and cache.storage == "uint8"
    rows = np.load(tmp_path / "soft" / "chunk_00000.npy")
    assert rows.shape == (16, 32 * 32) and rows.dtype == np.uint8
    images = torch.stack([ds.load_image(i) for i in range(len(ds))])
    quantised = torch.round(fn(images, None) * 255) / 255
    stored = cache.get_many(range(len(ds)))
    assert torch.equal(stored, torch.round(fn(images, None) * 255).to(torch.uint8))
    for policy, omega in (("fixed", 0.1), ("fixed", 0.37), ("quantile", 0.1), ("mean", 0.1)):
        expected = foreground_mask(quantised, policy, omega, 0.7)
        assert torch.equal(C.batch_foreground(stored, policy, omega, 0.7), expected)
    # bit-packed bool masks: ceil(32 * 32 / 8) = 128 bytes per sample (+ the .npy header)
    bits = build(gt_attention(ds)[0], ds, tmp_path / "bits")
    assert np.load(tmp_path / "bits" / "chunk_00000.npy").shape == (16, 128)
    assert 128 <= bits.bytes_per_sample < 128 + 160 / 16
    assert torch.equal(bits.get_many(range(len(ds))).squeeze(1), ds.gt_masks)
    assert bits.meta["coverage"]["value"] == pytest.approx(ds.gt_masks.float().mean().item(), abs=1e-6)


def test_a_method_switching_between_masks_and_maps_is_a_plugin_error(tmp_path):
    ds = tiny()
    state = {"n": 0}

    def fn(images, labels):
        state["n"] += 1
        m = torch.zeros(images.shape[0], 1, 32, 32)
        return m.bool() if state["n"] == 1 else m

    with pytest.raises(PluginError, match="test-gt.*one kind"):
        build(fn, ds, tmp_path / "c")


# ---------------------------------------------------------------------------------
# (b) an interrupted build resumes without recomputing, to the same bytes
# ---------------------------------------------------------------------------------


def test_interrupted_build_resumes_to_identical_bytes(tmp_path):
    ds = tiny()
    fn, calls = gt_attention(ds, soft=True)
    reference = build(fn, ds, tmp_path / "straight")
    assert calls["images"] == len(ds) and reference.num_chunks == 4

    def failing(images, labels):
        if calls["images"] >= len(ds) + 40:  # inside chunk 2 (chunks of 16, batches of 8)
            raise RuntimeError("killed")
        return fn(images, labels)

    with pytest.raises(RuntimeError, match="killed"):
        build(failing, ds, tmp_path / "resumed")
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert sorted(meta["chunks"]) == ["chunk_00000.npy", "chunk_00001.npy"] and not meta["complete"]
    with pytest.raises(UserError, match="incomplete .2 of 4 chunks"):
        C.MaskCache.open(tmp_path / "resumed")
    (tmp_path / "resumed" / ".chunk_00002.npy.tmp999").write_bytes(b"half a chunk")  # a write cut short

    calls["images"] = 0
    resumed = build(fn, ds, tmp_path / "resumed")
    assert calls["images"] == len(ds) - 32  # chunks 0 and 1 were not recomputed
    assert not list((tmp_path / "resumed").glob(".chunk_*"))
    for k in range(4):
        name = f"chunk_{k:05d}.npy"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    a, b = resumed.meta, reference.meta
    for field in ("key", "chunks", "n", "storage", "coverage", "bytes_per_sample"):
        assert a[field] == b[field], field
    # a complete cache is reused as it is
    calls["images"] = 0
    build(fn, ds, tmp_path / "resumed")
    assert calls["images"] == 0


def test_stochastic_methods_resume_identically(tmp_path):
    ds = tiny()
    noisy = lambda images, labels: torch.rand(images.shape[0], 1, 32, 32, device=images.device)  # noqa: E731
    torch.manual_seed(0)
    build(noisy, ds, tmp_path / "a")
    calls = {"n": 0}

    def failing(images, labels):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("killed")
        return noisy(images, labels)

    torch.manual_seed(123)  # another global state: chunks must not depend on it
    with pytest.raises(RuntimeError):
        build(failing, ds, tmp_path / "b")
    state = torch.get_rng_state()
    build(noisy, ds, tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    for k in range(4):
        name = f"chunk_{k:05d}.npy"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---------------------------------------------------------------------------------
# (c) other settings are refused, damage is detected
# ---------------------------------------------------------------------------------


def test_other_data_options_or_weights_are_refused(tmp_path):
    ds = tiny()
    directory = tmp_path / "c"
    base = key_of(ds, classifier_sha256="a" * 64)
    build(gt_attention(ds)[0], ds, directory, base)
    C.MaskCache.open(directory, base)  # the right key opens
    others = {
        "dataset's content": key_of(tiny(seed=1), classifier_sha256="a" * 64),
        "attention option 'flavour'": key_of(ds, options={"flavour": "b"}, classifier_sha256="a" * 64),
        "attention model's weights": key_of(ds, classifier_sha256="b" * 64),
    }
    names = {C.cache_name(base)}
    for what, key in others.items():
        with pytest.raises(UserError, match=f"{what}.*differs.*--rebuild-masks.*--rebuild") as info:
            C.MaskCache.open(directory, key)
        assert "\n" not in str(info.value)
        with pytest.raises(UserError, match=what):
            C.build_masks(gt_attention(ds)[0], ds, directory, key, progress=False)
        names.add(C.cache_name(key))
    # the automatic location differs for every key: a cache is never reused for other settings
    assert len(names) == 4
    with pytest.raises(UserError, match="attention model's weights.*cache: 'aaaa.*now: 'bbbb"):
        C.check_key(directory, base, others["attention model's weights"])
    # a method that reads no classifier vs one that does
    with pytest.raises(UserError, match="whether the method reads a classifier"):
        C.MaskCache.open(directory, key_of(ds))


def test_flipped_byte_is_detected_and_rebuild_repairs_it(tmp_path):
    ds = tiny()
    fn, calls = gt_attention(ds)
    directory = tmp_path / "c"
    build(fn, ds, directory)
    good = (directory / "chunk_00001.npy").read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x10
    (directory / "chunk_00001.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt: chunk_00001.npy does not match its recorded SHA-256.*--rebuild"):
        C.MaskCache.open(directory, key_of(ds))
    with pytest.raises(UserError, match="corrupt"):
        build(fn, ds, directory)
    calls["images"] = 0
    repaired = build(fn, ds, directory, rebuild=True)
    assert calls["images"] == len(ds)
    assert (directory / "chunk_00001.npy").read_bytes() == good
    assert torch.equal(repaired.get_many(range(len(ds))).squeeze(1), ds.gt_masks)
    (directory / "chunk_00003.npy").unlink()
    with pytest.raises(UserError, match="chunk_00003.npy is missing"):
        C.MaskCache.open(directory)
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is not valid JSON"):
        C.MaskCache.open(directory)


def test_checkpoint_options_enter_the_key_by_content(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "moved.pth"
    a.write_bytes(b"weights one")
    first = C.key_options({"checkpoint": str(a), "prompt": "center"})
    a.rename(b)
    assert C.key_options({"checkpoint": str(b), "prompt": "center"}) == first  # moved: same key
    b.write_bytes(b"weights two")
    assert C.key_options({"checkpoint": str(b), "prompt": "center"}) != first  # replaced: another key
    import hashlib

    assert first["checkpoint"] == "sha256:" + hashlib.sha256(b"weights one").hexdigest()


# ---------------------------------------------------------------------------------
# The trainer and the attention model's weights
# ---------------------------------------------------------------------------------


def tiny_config(**overrides):
    values = dict(method="dhat", attention="gradcam", data="synthetic", model="small_cnn", train_size=56, test_size=16,
                  val_size=8, epochs=1, batch_size=16, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1,
                  device="cpu", milestones=[])
    values.update(overrides)
    return load_config(None, values)


def random_weights(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    save_weights(create_model("small_cnn", 10), path, "small_cnn")
    return str(path)


def test_changed_attention_model_weights_give_another_cache(tmp_path):
    logs: list[str] = []
    a, b = random_weights(tmp_path / "a.safetensors", 0), random_weights(tmp_path / "b.safetensors", 1)
    ds = C.dataset_for(tiny_config())
    ensure = lambda cfg: frozen_masks(cfg, ds, device=torch.device("cpu"), root=tmp_path / "cache",  # noqa: E731
                                      log=logs.append, progress=False)
    first = ensure(tiny_config(attention_model=a))
    assert first.soft and logs[-1].startswith("mask cache: building")
    again = ensure(tiny_config(attention_model=a))
    assert again.directory == first.directory and logs[-1] == f"mask cache: reusing {first.directory} ({len(ds)} masks)"
    other = ensure(tiny_config(attention_model=b))
    assert other.directory != first.directory and logs[-1].startswith("mask cache: building")
    with pytest.raises(UserError, match="attention model's weights"):
        C.MaskCache.open(first.directory, other.key)
    assert not torch.equal(first.get_many(range(8)), other.get_many(range(8)))


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_training_builds_the_cache_then_reuses_it(tmp_path):
    weights = random_weights(tmp_path / "a.safetensors", 0)
    logs: list[str] = []
    cfg = tiny_config(attention_model=weights)
    summary = Experiment(cfg, tmp_path / "one", log=logs.append, cache_dir=tmp_path / "cache", progress=False).run()
    assert summary["attention"] == "gradcam"
    built = [l for l in logs if l.startswith("mask cache:")]
    assert len(built) == 1 and built[0].startswith("mask cache: building")
    logs.clear()
    Experiment(cfg, tmp_path / "two", log=logs.append, cache_dir=tmp_path / "cache", progress=False).run()
    (line,) = [l for l in logs if l.startswith("mask cache:")]
    assert line.startswith("mask cache: reusing") and "(48 masks)" in line
    assert metrics(tmp_path / "one") == metrics(tmp_path / "two")
    assert 0 < metrics(tmp_path / "one")[0]["train_fg_frac"] < 1
    # a damaged cache stops training with a one-line error, --rebuild-masks repairs it
    chunk = next((tmp_path / "cache" / "masks").glob("*/chunk_00000.npy"))
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt.*--rebuild-masks"):
        Experiment(cfg, tmp_path / "three", cache_dir=tmp_path / "cache", progress=False).run()
    logs.clear()
    Experiment(cfg, tmp_path / "four", log=logs.append, cache_dir=tmp_path / "cache", progress=False, rebuild_masks=True).run()
    assert any(l.startswith("mask cache: building") for l in logs)
    assert metrics(tmp_path / "four") == metrics(tmp_path / "one")


def test_self_attention_masks_refresh_and_resume_exactly(tmp_path, monkeypatch):
    """attention_source=self: masks from the trained model after a 1-epoch burn-in, rebuilt
    every 2 epochs; a run interrupted after epoch 2 and resumed equals an uninterrupted one."""
    cfg = tiny_config(attention_source="self", attention_burn_in=1, mask_refresh_every=2, epochs=4)
    logs: list[str] = []
    reference = Experiment(cfg, tmp_path / "straight", log=logs.append, cache_dir=tmp_path / "cache", progress=False).run()
    refreshes = [l for l in logs if "building self-attention masks" in l]
    assert len(refreshes) == 2 and "of epoch 1" in refreshes[0] and "of epoch 3" in refreshes[1]
    kept = list((tmp_path / "straight" / "masks").iterdir())
    assert len(kept) == 1 and "-self-e0003-" in kept[0].name  # the older refresh was removed

    original = Trainer._train_epoch

    def interrupted(self, model, method, attention, dataset, optimizer, scaler, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, model, method, attention, dataset, optimizer, scaler, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg, tmp_path / "resumed", cache_dir=tmp_path / "cache", progress=False).run()
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    logs.clear()
    resumed = Experiment(cfg, tmp_path / "resumed", log=logs.append, cache_dir=tmp_path / "cache", progress=False).run(resume=True)
    assert any("reusing self-attention masks of epoch 1" in l for l in logs)
    assert resumed == reference
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_self_attention_needs_a_classifier_method(tmp_path):
    plugin_manager.register_plugin(types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name="test-image", description="t", kind="image",
                                                factory=lambda ctx: lambda x, y: torch.ones_like(x[:, :1]).bool())))),
        "test-image-plugin")
    try:
        with pytest.raises(UserError, match="attention_source='self' needs an attention method that reads a classifier"):
            Experiment(tiny_config(attention="test-image", attention_source="self", attention_burn_in=1, epochs=2), tmp_path / "r",
                    cache_dir=tmp_path / "cache", progress=False).run()
    finally:
        plugin_manager.reset()


# ---------------------------------------------------------------------------------
# dhat-seg masks build / info / show / score
# ---------------------------------------------------------------------------------

CLI_SETTINGS = ["--set", "train_size=40", "--set", "val_size=8", "--set", "batch_size=16", "--set", "device=cpu"]


@pytest.fixture
def test_methods():
    """Two in-process methods: the exact ground truth, and 'everything is foreground'."""
    splits = [build_dataset("synthetic", s, size=40, seed=0, val_size=8) for s in ("train", "val")]
    gt, _ = gt_attention(*splits)

    def plugin(register):
        register(AttentionSpec(name="test-gt", description="ground truth", kind="image", factory=lambda ctx: gt))
        register(AttentionSpec(name="test-all", description="all foreground", kind="image",
                                factory=lambda ctx: lambda x, y: torch.ones_like(x[:, :1], dtype=torch.bool)))

    plugin_manager.register_plugin(types.SimpleNamespace(register_attention_methods=hookimpl(plugin)), "test-methods")
    yield splits
    plugin_manager.reset()


def run_cli(*args):
    from dhat_seg.cli import app

    result = CliRunner().invoke(app, ["masks", *args])
    return result.exit_code, result.output


def test_masks_cli_build_info_show_score(tmp_path, test_methods):
    train, val = test_methods
    cache_dir = ["--cache-dir", str(tmp_path / "cache")]
    code, out = run_cli("build", "--attention", "test-gt", "--data", "synthetic", *CLI_SETTINGS, *cache_dir)
    assert code == 0, out
    assert "mask cache: building" in out and "storage       bits" in out and "32 (1 of 1 chunks of 1024)" in out
    code, out = run_cli("build", "--attention", "test-gt", *CLI_SETTINGS, *cache_dir)
    assert code == 0 and "mask cache: reusing" in out
    directory = next((tmp_path / "cache" / "masks").iterdir())
    code, out = run_cli("info", str(directory))
    assert code == 0 and "complete, verified" in out and f"{train.gt_masks.float().mean().item():.4f}" in out
    assert '"fingerprint": "' + train.fingerprint() + '"' in out
    code, out = run_cli("info", *cache_dir)
    assert code == 0 and directory.name in out and "ok" in out

    # score: the exact method scores IoU 1, "all foreground" scores |gt| / (H W) per image
    code, out = run_cli("score", "--attention", "test-gt,test-all", "--n", "20", *CLI_SETTINGS, *cache_dir)
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("test-")}
    assert rows["test-gt"][2:4] == ["1.0", "1.0"] and rows["test-gt"][-1] == "cache"
    expected = train.gt_masks[:20].float().mean(dim=(1, 2))
    assert float(rows["test-all"][2]) == pytest.approx(expected.mean().item(), abs=1e-4)
    assert float(rows["test-all"][3]) == pytest.approx(expected.median().item(), abs=1e-4)
    assert rows["test-all"][-1] == "computed"
    code, out = run_cli("score", "--attention", "test-all", "--split", "val", "--n", "100", *CLI_SETTINGS, *cache_dir)
    assert code == 0 and " 8 " in out  # n is capped at the split's size

    code, out = run_cli("show", str(directory), "--out", str(tmp_path / "grid.png"), "--n", "6")
    assert code == 0, out
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300
    code, out = run_cli("show", "--attention", "test-all", "--out", str(tmp_path / "x.png"), *CLI_SETTINGS, *cache_dir)
    assert code == 2 and "no mask cache of 'test-all'" in out

    # damage -> one-line error naming --rebuild; --rebuild repairs
    chunk = directory / "chunk_00000.npy"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out = run_cli("build", "--attention", "test-gt", *CLI_SETTINGS, *cache_dir)
    assert code == 2 and "corrupt" in out and "--rebuild" in out and "Traceback" not in out
    code, out = run_cli("build", "--attention", "test-gt", "--rebuild", *CLI_SETTINGS, *cache_dir)
    assert code == 0 and "mask cache: building" in out


def test_masks_cli_user_errors(tmp_path, test_methods):
    code, out = run_cli("score", "--attention", "test-gt", "--data", "cifar10", "--set", "data_root=" + str(tmp_path))
    assert code == 2 and "error:" in out
    code, out = run_cli("build", "--attention", "nosuch", *CLI_SETTINGS, "--cache-dir", str(tmp_path))
    assert code == 2 and "attention method 'nosuch' is unknown" in out
    code, out = run_cli("info", str(tmp_path))
    assert code == 2 and "holds no mask cache" in out
