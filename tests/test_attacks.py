"""Attacks stay in the eps-ball and [0, 1], and do what they claim to the loss."""

import pytest
import torch
import torch.nn.functional as F

from dhat_seg import attacks
from dhat_seg.models import create_model


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).eval()
    x = torch.rand(16, 3, 16, 16)
    y = torch.randint(0, 10, (16,))
    return model, x, y


def in_ball(x_adv, x, eps):
    return (x_adv - x).abs().max().item() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_stays_in_ball_and_raises_loss(model_and_batch, loss):
    model, x, y = model_and_batch
    eps = 8 / 255
    x_adv = attacks.pgd(model, x, y, eps, 2 / 255, 10, loss=loss)
    assert in_ball(x_adv, x, eps)
    fn = attacks.LOSSES[loss]
    with torch.no_grad():
        assert fn(model(x_adv), y).mean() > fn(model(x), y).mean()


def test_fgsm_is_one_full_step(model_and_batch):
    model, x, y = model_and_batch
    x = x.clamp(0.1, 0.9)
    x_adv = attacks.fgsm(model, x, y, 4 / 255)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 4 / 255), atol=1e-6)


def test_inverse_attack_lowers_its_loss_and_stays_in_ball(model_and_batch):
    model, x, y = model_and_batch
    x_adv = attacks.pgd(model, x, y, 8 / 255, 2 / 255, 5)
    with torch.no_grad():
        p_nat, p_adv = F.softmax(model(x), 1), F.softmax(model(x_adv), 1)
    x_inv = attacks.inverse_adversarial(model, x, y, p_nat, p_adv, 4 / 255, 1 / 255, 10)
    assert in_ball(x_inv, x, 4 / 255)
    with torch.no_grad():
        before = attacks.inverse_loss(model(x), y, p_nat, p_adv)
        after = attacks.inverse_loss(model(x_inv), y, p_nat, p_adv)
        assert after < before
        # inverse examples are more confident in the true class than clean ones
        assert F.cross_entropy(model(x_inv), y) < F.cross_entropy(model(x), y)


def test_attacks_restore_model_mode(model_and_batch):
    model, x, y = model_and_batch
    model.train()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    attacks.pgd(model, x, y, 8 / 255, 2 / 255, 2, mode="eval")
    hook.remove()
    assert seen and not any(seen) and model.training
    model.eval()


def test_cw_margin_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    y = torch.tensor([1, 0])
    assert attacks.cw_margin_loss(logits, y).tolist() == [-1.0, -4.0]


def test_bad_settings_raise_user_error(model_and_batch):
    from dhat_seg.errors import UserError

    model, x, y = model_and_batch
    with pytest.raises(UserError, match="eps=-1"):
        attacks.pgd(model, x, y, -1, 0.1, 1)
    with pytest.raises(UserError, match="attack loss 'l2'"):
        attacks.pgd(model, x, y, 0.1, 0.1, 1, loss="l2")
