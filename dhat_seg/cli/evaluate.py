"""``dhat-seg eval``: evaluate a trained model (attacks, gaps, attention IoU, sanity checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dhat_seg.cli.common import log, print_table, user_errors


def register(root: typer.Typer) -> None:
    """Adds the ``eval`` command to the root app."""

    @root.command("eval")
    @user_errors
    def eval_(
        target: Path = typer.Argument(..., help="run directory, checkpoint directory or model.safetensors"),
        attacks: str = typer.Option("clean,pgd10,pgd20,cw,aa", help="comma list: clean,fgsm,pgd10,pgd20,pgd50,cw,aa"),
        n_examples: Optional[str] = typer.Option(None, metavar="N", help="evaluate the first N examples of the split (default all)"),
        aa_examples: Optional[str] = typer.Option(None, metavar="N", help="AutoAttack on the first N of those only (default all)"),
        gap_attack: str = typer.Option("pgd10", help="attack of the Robust Gap (train minus test), or 'none'"),
        gap_examples: Optional[str] = typer.Option(None, metavar="N",
                                                   help="first N un-augmented training samples for the Robust Gap (default: as many as test; 0 = off)"),
        bg_gap: bool = typer.Option(True, "--bg-gap/--no-bg-gap", help="BG-gap: test minus test-mixed-rand (built-in data; a folder with test-mixed-rand/)"),
        iou_examples: Optional[str] = typer.Option("500", metavar="N", help="attention IoU with ground truth on N test images (0 = off)"),
        sanity: bool = typer.Option(False, "--sanity", help="also run the gradient-masking sanity checks (PART H.3, FSR sec. 3)"),
        sanity_examples: Optional[str] = typer.Option("500", metavar="N", help="the first N samples of the split for the sanity checks (may exceed --n-examples)"),
        data: Optional[str] = typer.Option(None, help="dataset (default: the run's)"),
        split: str = typer.Option("test", help="split to evaluate"),
        eps: float = typer.Option(8.0, help="L_inf budget in 1/255 units"),
        robust_accuracy: str = typer.Option("any-iterate", metavar="any-iterate|last-iterate",
                                            help="any-iterate: broken once the clean input or any attack iterate is misclassified "
                                                 "(AutoAttack then runs on what the other attacks left, reported as the union); "
                                                 "last-iterate: each attack judged on its last iterate, AutoAttack alone"),
        batch_size: int = typer.Option(256, help="evaluation batch size"),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        seed: int = typer.Option(0, help="seed of the random starts"),
        cache_dir: Optional[Path] = typer.Option(None, help="cache with the run's attention model (default $DHAT_SEG_CACHE, else $XDG_CACHE_HOME/dhat-seg, else ~/.cache/dhat-seg)"),
        output: Optional[Path] = typer.Option(None, help="where to write the report (default RUN/eval.json)"),
    ):
        """Evaluate a trained model: Clean, FGSM, PGD-10/20/50, C&W-inf, AutoAttack (standard), worst case,
        Robust Gap, BG-gap, attention IoU; --sanity adds the gradient-masking checks. Writes eval.json."""
        from dhat_seg.evaluation.report import parse_count, run_eval

        report = run_eval(target, attacks=attacks, n_examples=parse_count(n_examples, "--n-examples"),
                          aa_examples=parse_count(aa_examples, "--aa-examples"), gap_attack=gap_attack,
                          gap_examples=parse_count(gap_examples, "--gap-examples", allow_zero=True), bg_gap=bg_gap,
                          iou_examples=parse_count(iou_examples, "--iou-examples", allow_zero=True), sanity=sanity,
                          sanity_examples=parse_count(sanity_examples, "--sanity-examples"), data=data, split=split, eps=eps, robust_accuracy=robust_accuracy,
                          batch_size=batch_size, device=device, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
                          output=str(output) if output else None, log=log)
        acc, n = report["accuracy"], report["examples"]
        print_table([{k: f"{v:.2f}" for k, v in acc.items()}, {k: str(n[k]) for k in acc}], [(a, a) for a in acc])
        typer.echo(f"(accuracy %, then examples; {report['data']}/{report['split']})")
        gap, bg, iou = report["robust_gap"], report["bg_gap"], report["attention_iou"]
        if gap:
            typer.echo(f"Robust Gap ({gap['attack']}): train {gap['train_accuracy']:.2f}% (n={gap['n_train']}) - "
                       f"test {gap['test_accuracy']:.2f}% (n={gap['n_test']}) = {gap['gap']:.2f} points")
        if bg:
            typer.echo(f"BG-gap (test - test-mixed-rand, n={bg['n']}): clean {bg['clean']['gap']:.2f}, PGD-10 {bg['pgd10']['gap']:.2f} points")
        bc = report.get("background_challenge")
        if bc:
            typer.echo(f"Backgrounds Challenge (clean %, n={bc['n']}, chance {bc['chance']:.0f}): same {bc['same']:.2f}, "
                       f"mixed-rand {bc['mixed_rand']:.2f}, only-FG {bc['only_fg']:.2f}, "
                       f"no-FG scored as the background's class {bc['no_fg_bg_class']:.2f}")
        if iou:
            value = f"{iou['mean_iou']:.4f} (n={iou['n']})" if iou.get("mean_iou") is not None else f"n/a: {iou['note']}"
            typer.echo(f"attention IoU ({iou['method']}, {iou['threshold_policy']}): {value}")
        if "sanity" in report:
            s = report["sanity"]
            typer.echo(f"gradient-masking checks (n={s['n']}, transfer surrogate: {s['surrogate']}):")
            for check in s["checks"]:
                typer.echo(f"  [{'PASS' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
        typer.echo(f"written to {report['path']}")


