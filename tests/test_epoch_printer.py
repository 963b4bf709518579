"""The epoch table printed while training: columns from what the method logs."""

from dhat_seg.epoch_table import EpochPrinter

UIAT = {"epoch": 1, "lr": 0.05, "train_loss": 2.3, "train_ce_adv": 2.2, "train_kl_inv": 0.01, "val_clean_acc": 20.0,
        "val_robust_acc": 15.0, "best": True, "seconds": 30.0}
DHAT = {"epoch": 2, "lr": 0.005000000000000001, "train_loss": 1.5, "train_ce_adv": 2.0, "train_dhlr": 0.05,
        "train_floe": -0.8, "train_fg_frac": 0.15, "val_clean_acc": 40.0, "val_robust_acc": 30.0, "best": True, "seconds": 34.0}


def test_columns_come_from_the_records():
    lines = []
    printer = EpochPrinter(lines.append)
    printer(UIAT)
    assert "kl_inv" in lines[0] and "dhlr" not in lines[0]
    assert len(lines) == 3  # header, rule, row


def test_new_terms_after_burn_in_print_a_new_header():
    lines = []
    printer = EpochPrinter(lines.append)
    printer(UIAT)
    printer(DHAT)
    headers = [line for line in lines if "val_clean" in line]
    assert len(headers) == 2 and "dhlr" in headers[1] and "floe" in headers[1]
    assert "0.005" in lines[-1] and "0.005000000000000001" not in lines[-1]  # rounded, not raw JSON
    printer(dict(DHAT, epoch=3))
    assert len([line for line in lines if "val_clean" in line]) == 2  # same keys: no new header


def test_prefix_on_every_line():
    lines = []
    EpochPrinter(lines.append, prefix="attention model: ")(UIAT)
    assert all(line.startswith("attention model: ") for line in lines)
