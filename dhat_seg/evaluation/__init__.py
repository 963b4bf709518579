"""Evaluating trained models: the evaluation attacks and metrics
(:mod:`~dhat_seg.evaluation.evaluate`, AutoAttack in :mod:`~dhat_seg.evaluation.autoattack`),
``dhat-seg eval`` (:mod:`~dhat_seg.evaluation.report`), the gradient-masking sanity checks
(:mod:`~dhat_seg.evaluation.sanity`, exact binomial tests in
:mod:`~dhat_seg.evaluation.binomial`), the convergence verdict of a run
(:mod:`~dhat_seg.evaluation.convergence`) and the inspection of mask caches
(:mod:`~dhat_seg.evaluation.mask_inspection`).

Imports nothing: import the module you need."""
