"""Settings a training method brings with it when the user leaves them out (no torch here, except
:func:`method_steps`, which reads the training-method registry once types and ranges are checked).

One place for them, used by ``dhat-seg train`` (through :func:`dhat_seg.config.load_config`) and
by ``dhat-seg compare``'s rows (:func:`dhat_seg.studies.compare.method_config`):

* :func:`scaled_warmup`: a warm-up of a paper's schedule scaled to a shorter run.
* :func:`part_settings`: PART's masks, as the PART paper takes them.
* :func:`again_code_settings`: AWP as AGAIN's released code runs it (``again_form: code``).
* :func:`method_steps`: the model variant a method needs, and the refusal of settings it does not read.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

#: PART's burn-in: 20 of its 80 epochs (paper section 4.1), scaled to a run's epochs like AWP's warm-up.
PART_BURN_IN, PART_EPOCHS = 20, 80


def scaled_warmup(paper_warmup: int, epochs: int, paper_epochs: int = 100) -> int:
    """A warm-up of ``paper_warmup`` epochs out of the paper's ``paper_epochs``, scaled to
    ``epochs`` (rounded half up, below ``epochs``): 10 -> 10 of 100, 1 of 6, 0 of 1-4."""
    return max(0, min(epochs - 1, int(paper_warmup * epochs / paper_epochs + 0.5)))


#: AGAIN's released script (InsLin/AGAIN, ``AGAIN_with_AWP/train_awp_again_cifar.py``): AWP gamma,
#: ``--awp-warmup`` and epochs. It applies AWP ``if epoch >= args.awp_warmup`` with 1-based epochs, from
#: its 10th epoch; dhat-seg's ``awp_warmup`` counts 0-based epochs, so the release's start is 10 - 1 = 9.
AGAIN_CODE_AWP_GAMMA, AGAIN_CODE_AWP_WARMUP, AGAIN_CODE_EPOCHS = 5e-3, 10, 200


def again_code_awp_warmup(epochs: int) -> int:
    """dhat-seg's (0-based) ``awp_warmup`` for the release's start of AWP (its 10th of 200 epochs), scaled to ``epochs``."""
    return scaled_warmup(AGAIN_CODE_AWP_WARMUP - 1, epochs, AGAIN_CODE_EPOCHS)


def again_code_settings(epochs: int, is_set: Callable[[str], bool]) -> dict[str, Any]:
    """AWP as AGAIN's release runs it (always on, gamma 5e-3, warm-up :func:`again_code_awp_warmup`),
    for every AWP key for which ``is_set(key)`` is false."""
    values = {"awp": True, "awp_gamma": AGAIN_CODE_AWP_GAMMA, "awp_warmup": again_code_awp_warmup(epochs)}
    return {k: v for k, v in values.items() if not is_set(k)}


def scaled_milestones(milestones: list[int], from_epochs: int, to_epochs: int) -> list[int]:
    """A schedule's milestones moved to a run of ``to_epochs`` epochs: the same fractions
    of the run (rounded down), keeping only those that take effect (1 to to_epochs - 1)."""
    out: list[int] = []
    for m in milestones:
        scaled = int(m * to_epochs / from_epochs) if from_epochs > 0 else m
        if 1 <= scaled < to_epochs and scaled not in out:
            out.append(scaled)
    return out


def part_settings(epochs: int, attention: str, options: Mapping[str, Any],
                  is_set: Callable[[str], bool]) -> dict[str, Any]:
    """PART's mask settings for a run of ``epochs`` epochs whose masks come from ``attention``
    (with ``options``); a key for which ``is_set(key)`` is true is left as the user set it.

    With an attention method that reads a classifier (Grad-CAM, IG, SAM prompted at Grad-CAM
    peaks): the paper's, masks of the model being trained (``attention_source: self``) for its
    predicted class (option ``target: pred`` unless given), refreshed every epoch (s = 1) and
    important above the image's mean + std (``mean_std``, PART's standardised CAM > 1). Any other
    method's masks (u2net, SAM, the oracle) do not depend on the model: frozen, from the mask
    cache, thresholded by the run's policy (foreground masks, not importance maps: mean + std
    marks nothing on a near-binary map whose object covers more than half the image). Burn-in:
    20 of 80 epochs, scaled to ``epochs``, whatever the attention method."""
    from dhat_seg.attention.plugin_manager import get_attention_spec

    spec = get_attention_spec(attention)
    reads_model = spec.needs_classifier(spec.resolve_options(options))
    values: dict[str, Any] = {}
    if not is_set("attention_source"):
        values["attention_source"] = "self" if reads_model else "frozen"
    if not is_set("attention_burn_in"):
        values["attention_burn_in"] = scaled_warmup(PART_BURN_IN, epochs, PART_EPOCHS)
    if not reads_model:
        return values | ({} if is_set("mask_refresh_every") else {"mask_refresh_every": 0})  # frozen: never rebuilt
    if not is_set("mask_refresh_every"):
        values["mask_refresh_every"] = 1
    if not is_set("threshold_policy"):
        values["threshold_policy"] = "mean_std"
    if "target" in spec.default_options:
        values["attention_options"] = {"target": "pred", **options}
    return values


def describe_part_masks(cfg: Any) -> str:
    """One line on where a PART run's masks come from (printed by ``dhat-seg train``)."""
    if cfg.attention_source == "self":
        source = (f"{cfg.attention} of the model being trained (options {dict(cfg.attention_options)}), rebuilt every "
                  f"{cfg.mask_refresh_every} epoch(s)" if cfg.mask_refresh_every else
                  f"{cfg.attention} of the model being trained, taken once")
    else:
        source = f"{cfg.attention} (frozen, from the mask cache)"
    return (f"PART masks: {source}; important pixels by threshold_policy={cfg.threshold_policy}; "
            f"{cfg.attention_burn_in} burn-in epoch(s) of plain {cfg.base.upper()} first "
            "(the PART paper: Grad-CAM of the trained model, predicted class, mean+std, every epoch, 20 of 80 epochs)")


def method_steps(make: Callable[..., Any], values: dict[str, Any], explicit: set[str], check_unread: bool,
                 notes: list[str] | None) -> None:
    """For :func:`dhat_seg.config.load_config` (``make``: ``TrainConfig``): the method's model variant into
    ``values`` (said in ``notes``), then, if ``check_unread``, the refusal of an ``explicit`` setting the
    method does not read. Types and ranges are checked first, before the registry (and torch) is imported."""
    make(**values).check_ranges()
    from dhat_seg.training_methods import TRAINING_METHODS, unread_settings

    entry = TRAINING_METHODS.get(values.get("method", make().method))
    if entry is None:
        return  # validate names the known methods
    cfg = make(**values).check_ranges()
    variant = entry.model_variant(cfg) if entry.model_variant else None
    if variant and variant != cfg.model:
        values["model"] = variant
        if notes is not None:
            notes.append(f"method {entry.name} trains model {variant!r}: {cfg.model!r} with the "
                         f"{'FSR module' if entry.name == 'fsr' else 'auxiliary heads of AGAIN as released'}")
    if check_unread:
        unread_settings(make(**values).check_ranges(), explicit)
