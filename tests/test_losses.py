"""DHAT/UIAT losses against values computed by hand from the formulas."""

import math

import pytest
import torch

from dhat_seg import losses
from dhat_seg.errors import UserError


def softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


Z_ADV = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
Z_INV = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]
Z_B = [[1.0, 1.0, 0.5], [0.0, 1.0, 2.0]]


def t(v):
    return torch.tensor(v, dtype=torch.float64)


def test_kl_div_matches_hand_computation():
    p, q = [0.2, 0.3], [1.0, -1.0]
    expected = kl(softmax(p), softmax(q))
    assert losses.kl_div(t([p]), t([q])).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("form", losses.DHLR_FORMS)
def test_dhlr_forms(form):
    rows = []
    for za, zi, zb in zip(Z_ADV, Z_INV, Z_B):
        z_star = [a - b for a, b in zip(zi, zb)]
        if form == "code":
            rows.append(kl(softmax(za), softmax(z_star)))
        elif form == "paper":
            rows.append(kl(softmax(z_star), softmax(zi)))
        else:
            rows.append(kl(softmax(z_star), softmax(za)))
    expected = sum(rows) / len(rows)
    got = losses.dhlr_loss(t(Z_ADV), t(Z_INV), t(Z_B), form=form).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_floe_paper_form_by_hand():
    rows = []
    for zi, zb in zip(Z_INV, Z_B):
        coef = sum(a * b for a, b in zip(zi, zb)) / sum(b * b for b in zb)
        r = [a - coef * b for a, b in zip(zi, zb)]
        rows.append(-math.sqrt(sum(v * v for v in r)))
    got = losses.floe_loss(t(Z_INV), t(Z_B), form="paper", p=2).item()
    assert got == pytest.approx(sum(rows) / 2, rel=1e-10)


def test_floe_paper_form_p1_and_orthogonality():
    zi, zb = t([[3.0, 4.0]]), t([[1.0, 0.0]])
    # residual = [0, 4]: L1 norm 4, L2 norm 4
    assert losses.floe_loss(zi, zb, p=1).item() == pytest.approx(-4.0)
    assert losses.floe_loss(zi, zb, p=2).item() == pytest.approx(-4.0)
    # z_inv parallel to z_B: nothing is left
    assert losses.floe_loss(t([[2.0, 0.0]]), zb).item() == pytest.approx(0.0, abs=1e-12)


def test_floe_guards_zero_background_logits():
    out = losses.floe_loss(t([[1.0, 2.0]]), t([[0.0, 0.0]]))
    assert torch.isfinite(out) and out.item() == pytest.approx(-math.sqrt(5))


def test_floe_code_form_by_hand():
    zi, zb = t(Z_INV), t(Z_B)
    gram = [[sum(a * b for a, b in zip(r1, r2)) for r2 in Z_B] for r1 in Z_B]
    gram_norm = math.sqrt(sum(v * v for row in gram for v in row))
    proj = [[sum(a * b for a, b in zip(r1, r2)) / gram_norm for r2 in Z_B] for r1 in Z_INV]
    resid = [[Z_INV[i][k] - sum(proj[i][j] * Z_B[j][k] for j in range(2)) for k in range(3)] for i in range(2)]
    expected = math.sqrt(sum(v * v for row in resid for v in row)) / 2
    assert losses.floe_loss(zi, zb, form="code").item() == pytest.approx(expected, rel=1e-10)


def test_uiat_regulariser_is_kl_adv_inv():
    expected = sum(kl(softmax(a), softmax(b)) for a, b in zip(Z_ADV, Z_INV)) / 2
    assert losses.uiat_regulariser(t(Z_ADV), t(Z_INV)).item() == pytest.approx(expected, rel=1e-10)


def test_dhlr_code_form_gradients_flow_into_all_logits():
    za, zi, zb = (t(v).requires_grad_(True) for v in (Z_ADV, Z_INV, Z_B))
    losses.dhlr_loss(za, zi, zb, form="code").backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in (za, zi, zb))


def test_background_only_blacks_out_foreground():
    x = torch.rand(2, 3, 4, 4)
    fg = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    fg[0, 0, 1:3, 1:3] = True
    xb = losses.background_only(x, fg)
    assert (xb[0, :, 1:3, 1:3] == 0).all()
    assert torch.equal(xb[1], x[1])
    assert torch.equal(xb[0, :, 0], x[0, :, 0])


def test_unknown_forms_are_user_errors():
    with pytest.raises(UserError, match="dhlr_form 'x'"):
        losses.dhlr_loss(t(Z_ADV), t(Z_INV), t(Z_B), form="x")
    with pytest.raises(UserError, match="floe_form 'y'"):
        losses.floe_loss(t(Z_INV), t(Z_B), form="y")


def test_floe_relative_form_is_minus_sine_and_scale_free():
    zi, zb = t([[3.0, 4.0]]), t([[1.0, 0.0]])
    # residual [0, 4], ||z_inv|| = 5: sin = 0.8
    assert losses.floe_loss(zi, zb, form="relative").item() == pytest.approx(-0.8)
    assert losses.floe_loss(10 * zi, zb, form="relative").item() == pytest.approx(-0.8)
    assert losses.floe_loss(10 * zi, zb, form="paper").item() == pytest.approx(-40.0)
