"""Image folders (``--set data=folder --data-root ROOT``), with optional foreground masks and
Backgrounds-Challenge test splits.

Layout (only ``train/`` and ``test/`` are required)::

    ROOT/train/<class>/<image>          training images (val is carved out of them ...)
    ROOT/val/<class>/<image>            ... unless this folder exists
    ROOT/test/<class>/<image>
    ROOT/test-mixed-rand/<class>/...    the objects on random backgrounds (folder: the object's class)
    ROOT/test-only-fg/<class>/...       the objects on black (folder: the object's class)
    ROOT/test-no-fg/<class>/...         the objects blacked out (folder: the class of the background)
    ROOT/masks/<split>/<class>/<name>   foreground masks: one per image of that split, same
                                        relative path and name, extension .npy or an image's

or ``ROOT/<class>/<image>`` alone (training data only, no masks). ImageNet-9 of the
Backgrounds Challenge (Xiao et al., ICLR 2021) maps onto it: ``original/val`` is ``test``,
``mixed_rand/val`` ``test-mixed-rand``, ``only_fg/val`` ``test-only-fg``, ``no_fg/val``
``test-no-fg`` (its label is the original image's, whose background it keeps) and
``fg_mask/val`` ``masks/test``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dhat_seg.data.base import IndexedDataset, JointTransform, pool_split, subset_indices
from dhat_seg.data.datasets import GENERATED_TEST_SPLITS
from dhat_seg.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
#: Mask files: a numpy array (read with ``allow_pickle=False``) or an image.
MASK_EXTENSIONS = (".npy", *IMAGE_EXTENSIONS)
#: The subfolder of ROOT that holds the masks, one subfolder per split.
MASKS_DIR = "masks"
#: The splits a folder can hold: the test splits are those of the built-in data.
FOLDER_SPLITS = ("train", "val", *GENERATED_TEST_SPLITS)
#: The split whose class folders name the background's class, not the object's.
NO_FG_SPLIT = "test-no-fg"


def scan_image_folder(path: Path) -> tuple[list[str], list[Path], list[str]]:
    """ImageFolder layout: one subfolder per class. Returns (class names sorted, files
    sorted by class then relative path, class name of each file). Classes without
    images are skipped."""
    classes, files, file_classes = [], [], []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if found:
            classes.append(class_dir.name)
            files.extend(found)
            file_classes.extend([class_dir.name] * len(found))
    return classes, files, file_classes


def find_masks(files: list[Path], image_dir: Path, mask_dir: Path) -> list[Path] | None:
    """The mask file of each image (same path relative to its folder, any extension of
    :data:`MASK_EXTENSIONS`), or None when ``mask_dir`` does not exist. Every image must
    have exactly one."""
    if not mask_dir.is_dir():
        return None
    found: dict[str, Path] = {}
    for path in sorted(mask_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in MASK_EXTENSIONS:
            key = path.relative_to(mask_dir).with_suffix("").as_posix()
            if key in found:
                raise UserError(f"two masks for one image in {mask_dir}: {found[key].name} and {path.name}; keep one")
            found[key] = path
    keys = [f.relative_to(image_dir).with_suffix("").as_posix() for f in files]
    if len(set(keys)) < len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise UserError(f"two images in {image_dir} share the name {twice!r} without extension; masks are "
                        f"matched by it, so rename one")
    missing = [k for k in keys if k not in found]
    if missing:
        raise UserError(f"{len(missing)} of {len(files)} images in {image_dir} have no mask in {mask_dir} "
                        f"(first: expected {mask_dir / missing[0]}.png or .npy); give every image a mask, "
                        f"or remove {mask_dir}")
    return [found[k] for k in keys]


def _mask_array(path: Path) -> np.ndarray:
    """The mask file as a 2-D array (channels reduced by their maximum)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                array = np.asarray(im if im.mode in ("1", "L", "I", "I;16", "F") else im.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from exc
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = array.max(axis=-1)
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.max(axis=0)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise UserError(f"mask {path} is a {array.dtype} array of shape {array.shape}: expected a 2-D numeric "
                        f"array (H x W, or with a channel axis of 1, 3 or 4)")
    return array


def read_mask(path: Path, image_size: tuple[int, int], *, image: Path | None = None) -> Tensor:
    """Foreground mask ``path`` as bool H x W at ``image_size``: values above half the
    mask's maximum are foreground (so 0/1, 0/255 and slightly lossy masks all read as
    drawn); resized like the images (bilinear, the aspect ratio not kept), then
    thresholded at one half. ``image``: the mask's image, whose size it must have."""
    from PIL import Image

    array = _mask_array(path)
    if image is not None:
        with Image.open(image) as im:
            if (im.height, im.width) != array.shape:
                raise UserError(f"mask {path} is {array.shape[0]}x{array.shape[1]} but its image {image} is "
                                f"{im.height}x{im.width} (height x width): a mask must have its image's size")
    top = array.max() if array.size else 0
    fg = array > top / 2 if top > 0 else np.zeros(array.shape, dtype=bool)
    if fg.shape != tuple(image_size):
        small = Image.fromarray(fg.astype(np.uint8) * 255).resize((image_size[1], image_size[0]), Image.BILINEAR)
        fg = np.asarray(small) >= 128
    return torch.from_numpy(np.ascontiguousarray(fg))


class FolderDataset(IndexedDataset):
    """Images read lazily from files, converted to RGB and resized to ``image_size``
    (bilinear; the aspect ratio is not kept). Fingerprint: the files' relative paths,
    labels and bytes, and the masks' where the split has masks.

    Extra attributes: ``mask_files`` (one per image, or None), read into ``gt_masks`` on
    first use; ``backgrounds`` (the class of each image's background: the labels of the
    ``test-no-fg`` split, None for the others).
    """

    def __init__(self, files: list[Path], labels: Tensor, *, root: Path, mask_files: list[Path] | None = None,
                 **kwargs: Any):
        super().__init__(labels=labels, **kwargs)
        self.files = files
        self.root = root
        self.mask_files = mask_files
        self.backgrounds = labels.clone() if self.split == NO_FG_SPLIT else None
        self._gt_masks: Tensor | None = None

    @property
    def gt_masks(self) -> Tensor | None:
        if self.mask_files is None:
            return None
        if self._gt_masks is None:
            self._gt_masks = torch.stack([read_mask(m, self.image_size, image=f)
                                          for f, m in zip(self.files, self.mask_files)])
        return self._gt_masks

    def load_image(self, index: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
                array = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)

    def _fingerprint_payload(self, h: "hashlib._Hash") -> None:
        for path, label in zip(self.files, self._labels.tolist()):
            h.update(f"{path.relative_to(self.root).as_posix()}:{label}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        for path in self.mask_files or ():  # none: the fingerprint of a folder before masks existed
            h.update(f"mask:{path.relative_to(self.root).as_posix()}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())


def folder_splits(root: str | os.PathLike | None) -> tuple[str, ...]:
    """The splits folder ``root`` holds (train and val always; val may be carved); empty
    when ``root`` is not a folder."""
    if root is None or not Path(root).expanduser().is_dir():
        return ()
    base = Path(root).expanduser()
    if not (base / "train").is_dir():
        return ("train", "val")
    return tuple(s for s in FOLDER_SPLITS if s in ("train", "val") or (base / s).is_dir())


def load_folder(
    split: str,
    *,
    root: str | os.PathLike | None,
    seed: int,
    image_size: int,
    size: int | None,
    val_size: int | float,
    transform: JointTransform | None,
) -> FolderDataset:
    """One split of an image folder (the layout: see the module's docstring). Without
    ``root/val``, val is carved out of the training data (and its masks with it)."""
    if root is None:
        raise UserError("dataset 'folder' needs the folder of images: pass --data-root PATH")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"image folder {base} does not exist or is not a directory")
    split_layout = (base / "train").is_dir()
    train_dir = base / "train" if split_layout else base
    train_classes, _, _ = scan_image_folder(train_dir)
    if not train_classes:
        raise UserError(
            f"no images found in {train_dir}: expected one subfolder per class holding image files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    has_val_dir = split_layout and (base / "val").is_dir()
    if split.startswith("test") or (split == "val" and has_val_dir):
        source_dir = base / split
        if not split_layout or not source_dir.is_dir():
            raise UserError(f"image folder {base} has no {split}/ subfolder (expected {base}/{split}/<class>/<images>)")
    else:
        source_dir = train_dir
    _, files, file_classes = scan_image_folder(source_dir)
    if not files:
        raise UserError(f"no images found in {source_dir}: expected one subfolder per class holding image files")
    unknown = sorted(set(file_classes) - set(train_classes))
    if unknown:
        raise UserError(f"classes {unknown} in {source_dir} do not appear in the training folder {train_dir}")
    class_index = {c: i for i, c in enumerate(train_classes)}
    labels = torch.tensor([class_index[c] for c in file_classes], dtype=torch.int64)
    masks = find_masks(files, source_dir, base / MASKS_DIR / source_dir.name) if split_layout else None

    # the test splits share one draw: ImageNet-9's variants list the same objects in the same order
    key = "folder-test" if split.startswith("test") else f"folder-{source_dir.name}"
    take = subset_indices(len(files), size, seed, key)
    if split in ("train", "val") and not has_val_dir:
        idx = pool_split(split, len(files) if take is None else len(take), val_size, seed)
        take = idx if take is None else take[idx]
    if take is not None:
        files = [files[i] for i in take.tolist()]
        masks = None if masks is None else [masks[i] for i in take.tolist()]
        labels = labels[take]
    return FolderDataset(
        files,
        labels,
        root=base,
        mask_files=masks,
        name="folder",
        split=split,
        num_classes=len(train_classes),
        image_size=(image_size, image_size),
        class_names=train_classes,
        source_indices=take,
        transform=transform,
    )


def describe_folder(root: str | os.PathLike, *, image_size: int = 32, val_size: int | float = 0.1, seed: int = 0,
                    read_masks: bool = False) -> list[dict[str, Any]]:
    """One row per split image folder ``root`` holds, as ``--set data=folder`` reads it:
    images, classes, where they come from, and the masks (matched by name; with
    ``read_masks`` every mask is read, which checks its format and size, and their mean
    foreground fraction is given). Raises :class:`UserError` as loading would."""
    rows = []
    for split in folder_splits(root):
        ds = load_folder(split, root=root, seed=seed, image_size=image_size, size=None, val_size=val_size,
                         transform=None)
        split_layout = (Path(root).expanduser() / "train").is_dir()
        source = ds.files[0].relative_to(ds.root).parts[0] if split_layout else "."
        carved = split in ("train", "val") and not (Path(root).expanduser() / "val").is_dir()
        masks = "-"
        if ds.mask_files is not None:
            masks = f"{len(ds.mask_files)}"
            if read_masks:
                masks += f" (foreground {100 * ds.gt_masks.float().mean().item():.1f} %)"
        rows.append({"split": split, "images": len(ds), "classes": len(set(ds.labels.tolist())),
                     "from": f"{source}/" + (" (val carved out)" if carved else ""),
                     "masks": masks})
    return rows
