"""A training run: resolved once (:mod:`~dhat_seg.run.experiment`), fitted by the
:class:`~dhat_seg.run.trainer.Trainer`, with the hot loop's pieces, checkpoints, callbacks,
torchrun and the process-level pieces a run holds for its length (devices, determinism,
stopping, locks).

Imports nothing: import the module you need (``from dhat_seg.run.experiment import Experiment``)."""
