"""Known-answer tests of regimes.py: standard = nn.CrossEntropyLoss; PGD-AT examples in the ε-ball
and [0, 1], crafted in eval mode; the SEP penalty in closed form on a linear model, its
second-order parameter gradient against finite differences; SEP with reg_weight 0 trains bit for
bit like the base regime (and a nonzero weight does not)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import regimes as R


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_cnn(seed=0, dtype=torch.float32):
    """Conv, ReLU, max-pool, dropout, dense ReLU, dense: the ConvNet's ingredients on 1×8×8."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _batch(n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_regime_keys_have_defaults_and_comments():
    from config import DEFAULTS

    for key in R.REGIME_KEYS:
        default, comment = DEFAULTS[key]
        assert isinstance(comment, str) and comment and default is not None, key
    assert DEFAULTS["sep_base"][0] in ("standard", "pgd_at")


def test_standard_is_cross_entropy_value_and_gradients():
    model, (x, y) = _tiny_cnn().train(), _batch()
    torch.manual_seed(5)  # the same dropout mask for both forward passes
    out = R.training_loss("standard", model, x, y, {})
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.manual_seed(5)
    ref = nn.CrossEntropyLoss()(model(x), y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.equal(out.loss, ref) and out.penalty is None
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_pgd_at_examples_stay_in_the_ball_and_the_pixel_range():
    model, (x, y) = _tiny_cnn().train(), _batch()
    settings = {"pgd_at_eps": 0.2, "pgd_at_steps": 5, "pgd_at_step_size": 0.1}
    x_adv = R.pgd_at_examples(model, x, y, settings, torch.Generator().manual_seed(0))
    assert model.training  # crafted in eval mode, mode restored
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.19  # the attack moved (step 0.1 > the room left)
    again = R.pgd_at_examples(model, x, y, settings, torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)  # eval mode: no dropout randomness in the crafting
    with torch.no_grad():  # the attack raises the loss of the eval-mode model
        ce = nn.functional.cross_entropy
        model.eval()
        assert ce(model(x_adv), y) > ce(model(x), y)
        model.train()
    torch.manual_seed(3)
    out = R.training_loss("pgd_at", model, x, y, settings, torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    assert torch.equal(out.loss, nn.functional.cross_entropy(model(x_adv), y))
    assert model.training


def test_default_pgd_step_size_follows_the_rule():
    model, (x, y) = _tiny_cnn().eval(), _batch(4)
    settings = {"pgd_at_eps": 0.1, "pgd_at_steps": 1, "pgd_at_step_size": 0.0}
    # one step of 2.5·ε/1 from any start reaches a face of the ε-box in every pixel with a
    # nonzero gradient: |δ| = ε exactly wherever the box is not cut by [0, 1]
    x = 0.3 + 0.4 * x
    x_adv = R.pgd_at_examples(model, x, y, settings, torch.Generator().manual_seed(0))
    moved = (x_adv - x).abs()
    assert ((moved - 0.1).abs() < 1e-6).float().mean() > 0.9


def test_sep_penalty_on_a_linear_model_has_its_closed_form():
    """Saliency of a linear model is |w_c| for every input: penalty 0. Input×gradient is
    |x ⊙ w_c| normalised: the penalty follows from the same noise in numpy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, _ = _batch(6)
    assert R.sep_penalty(model, x, 0.3, "saliency", torch.Generator().manual_seed(2)).item() == 0.0
    pen = R.sep_penalty(model, x, 0.3, "input_x_gradient", torch.Generator().manual_seed(2))
    w = model[1].weight.detach().double().numpy()
    xs = x.flatten(1).double().numpy()
    cls = (xs @ w.T + model[1].bias.detach().double().numpy()).argmax(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).flatten(1).double().numpy()

    def h(v, c):
        a = np.abs(v * w[c])
        return a / a.sum()

    ref = np.mean([((h(xs[i] + 0.3 * noise[i], cls[i]) - h(xs[i], cls[i])) ** 2).sum() for i in range(6)])
    assert ref > 1e-4
    assert pen.item() == pytest.approx(ref, rel=1e-5)


def test_sep_penalty_parameter_gradient_matches_finite_differences():
    """Double backpropagation through the ReLU net's saliency: d/dθ along a random direction,
    against a central difference in float64 (activation patterns do not change at 1e-6)."""
    model = _tiny_cnn(3, torch.float64).eval()
    x, _ = _batch(4, dtype=torch.float64)
    params = list(model.parameters())

    def penalty():
        return R.sep_penalty(model, x, 0.2, "saliency", torch.Generator().manual_seed(4))

    grads = torch.autograd.grad(penalty(), params, allow_unused=True, materialize_grads=True)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((d * gr).sum() for d, gr in zip(direction, grads)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = penalty().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = penalty().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-4)


def _train(regime, settings, steps=3):
    """A few Adam steps of the tiny CNN from seed 0 in train mode (dropout on)."""
    model = _tiny_cnn(0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(7)  # the dropout masks
    for step in range(steps):
        x, y = _batch(16, seed=step)
        opt.zero_grad()
        R.training_loss(regime, model, x, y, settings, gen).loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("base", ["standard", "pgd_at"])
def test_sep_with_zero_weight_trains_bit_for_bit_like_its_base(base):
    settings = {"sep_base": base, "sep_sigma": 0.1, "pgd_at_eps": 0.1, "pgd_at_steps": 2}
    ref = _train(base, settings)
    zero = _train("sep", {**settings, "sep_reg_weight": 0.0})
    for (name, a), b in zip(ref.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    live = _train("sep", {**settings, "sep_reg_weight": 100.0})  # the penalty is live
    assert not torch.equal(ref[0].weight, live[0].weight)


def test_sep_penalty_has_no_side_effects():
    """Eval mode inside, mode restored, no global RNG draw (the base loss's dropout masks stay
    those of the base regime), no .grad left on the parameters."""
    model, (x, _) = _tiny_cnn().train(), _batch()
    state = torch.get_rng_state()
    R.sep_penalty(model, x, 0.1, "saliency", torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert model.training and all(p.grad is None for p in model.parameters())


def test_sep_penalty_is_reported_and_weights_sign_is_free():
    model, (x, y) = _tiny_cnn().train(), _batch()
    pos = R.training_loss("sep", model, x, y, {"sep_reg_weight": 10.0}, torch.Generator().manual_seed(0))
    neg = R.training_loss("sep", model, x, y, {"sep_reg_weight": -10.0}, torch.Generator().manual_seed(0))
    assert pos.penalty.item() > 0 and pos.penalty.item() == neg.penalty.item() <= 2.0
    assert model.training


def test_unknown_regime_and_bad_settings_are_errors():
    model, (x, y) = _tiny_cnn(), _batch(2)
    with pytest.raises(ValueError, match="regime"):
        R.training_loss("mixup", model, x, y, {})
    with pytest.raises(ValueError, match="sep_base"):
        R.training_loss("sep", model, x, y, {"sep_base": "sep"})
    with pytest.raises(ValueError, match="sep_explanation_method"):
        R.training_loss("sep", model, x, y, {"sep_explanation_method": "integrated_gradients"})
