"""Per-sample mask cache: expensive segmenters (SAM, SOLO, ...) run once per image.

DHAT needs a foreground mask of every clean training image in every batch. Computing it
per batch (the authors' code recomputes Grad-CAM for every batch) costs a segmenter
forward pass per image and epoch; this module computes each sample's mask once, on the
*un-augmented* image, stores it on disk, and lets the data loader hand it out with its
image, both augmented by the same random crop and flip (:class:`MaskedDataset`).

Layout of one cache, ``<cache_root>/masks/<dataset>-<split>-<method>-<keyhash>/``::

    meta.json          the key, storage kind, shape, SHA-256 of every chunk, coverage,
                       build time (rewritten atomically after every chunk)
    chunk_00000.npy    samples 0 .. 1023: a numpy array with one row per sample
    chunk_00001.npy    samples 1024 .. 2047, ...
    .lock              held (flock) by the process that builds

What is stored is what the method returns, at the dataset's stored resolution:

* bool masks (SAM, SOLO): storage "bits", ``np.packbits`` of the H*W mask, i.e.
  ceil(H*W / 8) bytes per sample (128 bytes at 32 x 32);
* soft maps in [0, 1] (Grad-CAM, Integrated Gradients): storage "uint8",
  round(255 * map), H*W bytes per sample (8x more). The threshold policy (omega,
  quantile, ...) is applied when a batch is read (:func:`batch_foreground`), so an
  omega ablation needs no rebuild. Quantisation moves a pixel across the threshold
  only when its map value lies within 1/510 of it.

So the threshold settings are not part of the key. The key (:func:`mask_key`) holds
the dataset identity (name, split, size, image size, content ``fingerprint()``), the
method's name, version and resolved options (file-valued options such as
``checkpoint`` by their SHA-256, not their path) and, for methods that read a
classifier, the SHA-256 of its weights ("frozen": the attention model's weights file;
"self": the tensors of the model being trained, with the epoch they were taken at).
The directory name carries a hash of the key, so other settings get another directory
and a cache is never reused for settings it was not built with; ``meta.json`` repeats
the full key, and opening a cache with a different key is refused with a message
naming what differs.

Chunks are written atomically (temporary file + ``os.replace``) and recorded with
their SHA-256 in ``meta.json``: an interrupted build resumes at the first chunk not
recorded. Every chunk is computed under its own seed, so a resumed build is
byte-identical to an uninterrupted one even for stochastic methods. Chunks are
verified against their hashes when a cache is opened and read through memory maps
(``np.load(mmap_mode="r")``), opened lazily in each DataLoader worker.


Modules: :mod:`~dhat_seg.cache.key` (the key), :mod:`~dhat_seg.cache.store` (reading),
:mod:`~dhat_seg.cache.build` (building), :mod:`~dhat_seg.cache.dataset` (training data
with masks), :mod:`~dhat_seg.cache.provision` (caches of a run configuration).
"""
from dhat_seg.cache.build import Threshold, build_masks
from dhat_seg.cache.dataset import MaskedDataset
from dhat_seg.cache.key import (
    CHUNK_SIZE,
    FORMAT,
    META,
    REBUILD_HINT,
    STORAGES,
    cache_dir_for,
    cache_name,
    check_key,
    key_differences,
    key_hash,
    key_options,
    mask_key,
    sha256_file,
    sha256_state,
)
from dhat_seg.cache.provision import (
    dataset_for,
    ensure_mask_cache,
    frozen_key,
    open_self_cache,
    resolve_method,
    self_mask_cache,
)
from dhat_seg.cache.store import MaskCache, batch_foreground, list_caches, read_meta, remove_other_caches

__all__ = [
    "CHUNK_SIZE", "FORMAT", "META", "REBUILD_HINT", "STORAGES", "MaskCache", "MaskedDataset", "Threshold",
    "batch_foreground", "build_masks", "cache_dir_for", "cache_name", "check_key", "dataset_for", "ensure_mask_cache",
    "frozen_key", "key_differences", "key_hash", "key_options", "list_caches", "mask_key", "open_self_cache",
    "read_meta", "remove_other_caches", "resolve_method", "self_mask_cache", "sha256_file", "sha256_state",
]
