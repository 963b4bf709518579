"""Studies: one run per row (x seed), trained, evaluated, reused, resumed and tabulated.

:mod:`~dhat_seg.studies.ablate` is the attention study (``dhat-seg ablate``, the paper's
Table 10) and :mod:`~dhat_seg.studies.compare` the training-method study (``dhat-seg
compare``); both run on the same machinery: :mod:`~dhat_seg.studies.study` (what a study's
rows are), :mod:`~dhat_seg.studies.rows`, :mod:`~dhat_seg.studies.presets`, :mod:`~dhat_seg.studies.run`,
:mod:`~dhat_seg.studies.launch`, :mod:`~dhat_seg.studies.output` and
:mod:`~dhat_seg.studies.paired`, with :mod:`~dhat_seg.studies.variants`, :mod:`~dhat_seg.studies.trend` and
:mod:`~dhat_seg.studies.cost`.

Imports nothing: import the module you need."""
