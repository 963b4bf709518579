"""Speed options of a run: channels-last memory format and ``torch.compile``.

Both change how the model computes, not what: results agree with the plain run up to
float rounding (as ``amp`` does), so they may differ between a run and its resume.

- ``channels_last``: the model's parameters and buffers are converted with
  ``model.to(memory_format=torch.channels_last)`` and every 4-D input of the model's
  forward (training batches, attack iterates, evaluation batches) is made
  channels-last by a forward pre-hook, so the convolutions run in NHWC (faster with
  cuDNN on tensor cores, and with oneDNN on recent CPUs). The conversion is
  differentiable: input gradients (attacks) come back as before.
- ``compile``: the model's forward is compiled in place (``nn.Module.compile``), so the
  module, its ``state_dict`` keys (no ``_orig_mod.`` prefix) and its checkpoints stay
  those of the plain model. Train/eval mode, grad mode and autocast are guarded by
  TorchDynamo: each combination the run uses is compiled once (the first batches and
  the first validation are slow) and reused after that. ``Classifier.features`` and
  deep copies (AWP's proxy, CFA's weight average) run eagerly.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from dhat_seg.errors import UserError

#: The ``torch.compile`` backend (tests use a cheaper one).
COMPILE_BACKEND = "inductor"
#: Compiled variants kept per forward: (train, eval) x (grad, no grad, input grad) x
#: (autocast or not) x (BN statistics updated or frozen) x (static, dynamic batch size).
RECOMPILE_LIMIT = 32

_MARK = "_dhat_seg_speed"


def _cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on CPU, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: look for it as Inductor does by default
        return shutil.which(os.environ.get("CXX", "g++"))
    try:
        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or a compiler that does not run
        return None


def check_speed_options(cfg, device: torch.device) -> None:
    """A UserError before any work when ``cfg.compile`` cannot work on ``device``: a
    torch without ``nn.Module.compile``, no C++ compiler on CPU, no Triton on CUDA."""
    if not cfg.compile:
        return
    if not hasattr(nn.Module, "compile"):
        raise UserError(f"config option compile=true needs torch >= 2.2 (this is torch {torch.__version__}); "
                        "upgrade torch or drop --compile")
    if COMPILE_BACKEND != "inductor":
        return
    if device.type == "cpu" and _cpp_compiler() is None:
        raise UserError("config option compile=true needs a C++ compiler on CPU (torch.compile's Inductor builds "
                        f"C++ kernels) and none was found ({os.environ.get('CXX', 'g++')!r}; set CXX to one); "
                        "install g++ or drop --compile")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("config option compile=true needs Triton on CUDA (torch.compile's Inductor builds Triton "
                            "kernels) and it is not installed; `pip install triton` or drop --compile")


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a 4-D first argument made channels-last (a no-op when it is)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """Apply ``cfg``'s speed options to ``model`` in place (once; a second call does
    nothing) and return it. Call after the model is on its device."""
    done = getattr(model, _MARK, set())
    if cfg.channels_last and "channels_last" not in done:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_channels_last_input)
        done = done | {"channels_last"}
    if cfg.compile and "compile" not in done:
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        model.compile(backend=COMPILE_BACKEND)
        done = done | {"compile"}
    setattr(model, _MARK, done)
    return model


def describe(cfg, amp_dtype: torch.dtype | None) -> str | None:
    """The trainer's one line naming the speed options that are on (None: none is)."""
    on = []
    if amp_dtype is not None:
        on.append(f"{str(amp_dtype).replace('torch.', '')} autocast for the training passes (attacks in "
                  f"{'the same' if cfg.attack_precision == 'autocast' else 'fp32'})")
    if cfg.channels_last:
        on.append("channels_last memory format")
    if cfg.compile:
        on.append(f"torch.compile ({COMPILE_BACKEND}; the first batches and the first validation compile)")
    return "speed options: " + ", ".join(on) if on else None
