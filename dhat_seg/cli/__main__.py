"""``python -m dhat_seg.cli ...``: the ``dhat-seg`` command line."""

from dhat_seg.cli import main

main()
