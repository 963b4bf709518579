"""dhat-seg: adversarial training with debiased attention (DHAT, ICCV 2025)."""

from dhat_seg.hookspecs import hookimpl

__version__ = "0.2.0"
__all__ = ["hookimpl", "__version__"]
