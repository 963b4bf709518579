"""The studies' presets: a training preset with overrides and the evaluation settings
(``dhat-seg ablate|compare --preset quick|paper|part-paper``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


#: The PART paper's schedule (section 4.1, Appendix G: CIFAR-10, ResNet-18) over the ``paper``
#: training preset; configs/part.yaml holds the same for ``dhat-seg train`` (a test keeps them equal).
PART_PAPER_TRAIN: dict[str, Any] = {"model": "resnet18", "epochs": 80, "batch_size": 128, "lr": 0.01, "momentum": 0.9,
                                    "weight_decay": 2e-4, "milestones": [60], "gamma": 0.1, "eps": 8.0, "step_size": 2.0,
                                    "attack_steps": 10, "attack_mode": "eval", "trades.beta": 6.0, "mart.beta": 6.0}


@dataclass(frozen=True)
class AblatePreset:
    """Training preset (``config.PRESETS`` name) + overrides, and evaluation settings."""

    name: str
    description: str
    base: str
    train: Mapping[str, Any]
    eval: Mapping[str, Any]
    show_paper: bool = False
    #: attention-method options of the preset (``--attention-opt`` overrides them)
    attention_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


ABLATE_PRESETS: dict[str, AblatePreset] = {
    p.name: p
    for p in (
        AblatePreset(
            "quick",
            "built-in data (32x32; synthetic unless --set data=digits), small CNN, the `quick` training preset unchanged (batches of 32, "
            "3-step attacks, 15 epochs decayed at 10, FLOE in the bounded 'relative' form: the paper form diverges and the code form "
            "collapses at this scale); about 20-25 minutes on 2 otherwise idle CPU cores for the three rows that run "
            "without checkpoints (UIAT, Grad-CAM, IG); evaluation on the first 500 test samples, AutoAttack on the "
            "first 100 (on CPU its four attacks cost about 2 s per robust sample), Robust Gap on 500 training samples, "
            "gradient-masking sanity checks on the first 1000 test samples (the whole quick test split: power 0.8 "
            "to detect noise breaking 5% of the PGD-robust samples)",
            "quick",
            {},
            # sanity_examples: the noise check tests "noise breaks <= 2% of the PGD-robust samples" at
            # alpha 0.01 (dhat_seg.evaluation.sanity); detecting a masking effect of 5% with power >= 0.8 needs
            # binomial.samples_for_power(0.02, 0.05, 0.01, 0.8) = 383 PGD-robust samples (power 0.80
            # at 383, 0.85 at 400, 0.86 at 450). Quick AT-family rows kept 42-48% under PGD-10 on the
            # first generator: at 40% or more, 1000 samples give 400 or more (power >= 0.85);
            # 100 (before) gave about 45 (power 0.1). Rows with less robustness have less power; each
            # eval.json says how much ("power" of the noise check).
            {"attacks": "clean,pgd10,cw,aa", "n_examples": 500, "aa_examples": 100, "gap_attack": "pgd10",
             "gap_examples": 500, "iou_examples": 500, "bg_gap": True, "sanity_examples": 1000},
            # U^2-Net-p at 224 instead of its native 320: about 2.5x the masks per second on CPU
            # (3.9/s on 2 idle cores: 12 minutes for the 2700 training masks) for a foreground IoU
            # at omega 0.1 of 0.50 instead of 0.55 (benchmarks/bench_u2net.py; at 192 and 176
            # it drops to 0.41-0.42 for no gain in speed)
            attention_options={"u2net": {"input_size": 224}},
        ),
        AblatePreset(
            "paper",
            "the paper's setting (REFERENCE section 1): CIFAR-10, WRN-28-10, 100 epochs, lr 0.1 decayed at 80/90, "
            "PGD-10 training; Grad-CAM from a normally trained ResNet-18. Evaluation on the full test set "
            "(AutoAttack standard on all 10000), Robust Gap on the first 10000 training samples, gradient-masking "
            "sanity checks on the first 1000 test samples. Needs a GPU and CIFAR-10 (--set download=true or "
            "--set data_root=...)",
            "paper",
            {},
            {"attacks": "clean,pgd10,cw,aa", "n_examples": None, "aa_examples": None, "gap_attack": "pgd10",
             "gap_examples": 10000, "iou_examples": 500, "bg_gap": True, "sanity_examples": 1000},
            show_paper=True,
        ),
        AblatePreset(
            "part-paper",
            "the PART paper's setting (REFERENCE section 2; configs/part.yaml): CIFAR-10, ResNet-18, 80 epochs, lr 0.01 "
            "decayed at 60, weight decay 2e-4, PGD-10 training attacks in eval mode; PART rows burn in 20 epochs and "
            "refresh their masks every epoch. Evaluation as the paper preset's, plus PGD-20 (eval.json). Needs a GPU "
            "and CIFAR-10 (--set download=true or --set data_root=...)",
            "paper",
            PART_PAPER_TRAIN,
            {"attacks": "clean,pgd10,pgd20,cw,aa", "n_examples": None, "aa_examples": None, "gap_attack": "pgd10",
             "gap_examples": 10000, "iou_examples": 500, "bg_gap": True, "sanity_examples": 1000},
            show_paper=True,  # compare: the PART paper's Table 1 (compare.PAPER_PART_RESULTS)
        ),
    )
}
