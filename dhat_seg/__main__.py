"""``python -m dhat_seg ...`` runs the ``dhat-seg`` command line."""

from dhat_seg.cli import main

if __name__ == "__main__":
    main()
