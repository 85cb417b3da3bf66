"""Known-answer tests of explanation.py: closed-form maps of linear models, autograd maps against
captum, metrics against scipy and hand-made cases, the softplus-β limit, the attacks on a linear
model (nothing to manipulate) and on the MNIST ConvNet (L_e falls, the label stays, a random-sign
perturbation of the same ε does less), and the pair selection rules."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from scipy.stats import spearmanr
from torch import nn

import explanation as E
from cnnmodel import MnistConvNet
from mnistload import load_mnist5k

C, H, W, K = 2, 5, 6, 4  # linear model on 2×5×6 inputs, 4 classes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches gain nothing from a second thread, and on a shared 2-core machine two
    spinning threads were 25× slower than one (measured); restore conftest's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear(seed=0, zero=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).eval()
    if zero:
        nn.init.zeros_(model[1].weight)
    return model


def _inputs(n, seed=1, shape=(C, H, W), low=0.2, high=0.8):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, *shape, generator=g)


def _linear_saliency_map(model, cls):
    """h = |w_c| summed over channels, normalised: independent of x (numpy, float64)."""
    w = np.abs(model[1].weight.detach().double().numpy()[cls].reshape(C, H, W)).sum(0)
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------
def test_linear_saliency_map_is_the_normalised_weight_of_the_predicted_class():
    model, x = _linear(), _inputs(6)
    h = E.explanation_map(model, x, "saliency")
    pred = (x.flatten(1) @ model[1].weight.T + model[1].bias).argmax(1)
    assert h.shape == (6, H, W)
    for i in range(6):
        np.testing.assert_allclose(h[i].double().numpy(), _linear_saliency_map(model, int(pred[i])),
                                   rtol=1e-5, atol=1e-8)
    h2 = E.explanation_map(model, x, "saliency", target=2)  # an explicit target overrides argmax
    np.testing.assert_allclose(h2[0].double().numpy(), _linear_saliency_map(model, 2), rtol=1e-5)


@pytest.mark.parametrize("method", E.METHODS)
def test_zero_attribution_gives_the_uniform_map_without_nan(method):
    model, x = _linear(zero=True), _inputs(3).requires_grad_(True)
    h = E.explanation_map(model, x.detach(), method, n_steps=4)
    torch.testing.assert_close(h, torch.full_like(h, 1 / (H * W)))
    hd = E.explanation_map_differentiable(model, x, method, n_steps=4)
    (grad,) = torch.autograd.grad(hd.sum(), x, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(hd).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("method, algo", [("saliency", Saliency), ("input_x_gradient", InputXGradient),
                                          ("integrated_gradients", IntegratedGradients)])
def test_autograd_maps_equal_captum_on_the_convnet(method, algo):
    torch.manual_seed(0)
    model = MnistConvNet().eval()
    x = _inputs(3, shape=(1, 28, 28), low=0.0, high=1.0)
    target = torch.tensor([0, 3, 7])
    kwargs = {"n_steps": 8} if method == "integrated_gradients" else {}
    ours = E.explanation_map_differentiable(model, x, method, target, n_steps=8, create_graph=False)
    ref = algo(model).attribute(x.clone().requires_grad_(True), target=target, **kwargs).abs().sum(1)  # captum, normalised here
    ref = ref / ref.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(E.explanation_map(model, x, method, target, n_steps=8), ref,
                               rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours.sum(dim=(1, 2)), torch.ones(3))


def test_differentiable_map_has_a_gradient_with_respect_to_the_input_on_softplus_only():
    torch.manual_seed(0)
    model = MnistConvNet().eval()
    x = _inputs(2, shape=(1, 28, 28), low=0.0, high=1.0).requires_grad_(True)
    loss = E.explanation_map_differentiable(model, x, "saliency").pow(2).sum()
    (g_relu,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
    net = E.softplus_copy(model, 10.0)
    loss = E.explanation_map_differentiable(net, x, "saliency").pow(2).sum()
    (g_soft,) = torch.autograd.grad(loss, x)
    # ReLU + max-pool: piecewise linear, the input gradient is locally constant; only the
    # normalisation (|·|, sum) can move, and |∂f/∂x| does not depend on x inside a linear region
    assert g_relu.abs().max() < 1e-9 < g_soft.abs().max()


# ---------------------------------------------------------------------------------------------
# the softplus-β copy
# ---------------------------------------------------------------------------------------------
def test_softplus_copy_approaches_the_relu_network_as_beta_grows():
    torch.manual_seed(0)
    model = MnistConvNet().eval()
    x = _inputs(8, shape=(1, 28, 28), low=0.0, high=1.0)
    with torch.no_grad():
        ref = model(x)
        errors = [(E.softplus_copy(model, beta)(x) - ref).abs().max().item()
                  for beta in (1.0, 10.0, 100.0, 1000.0)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * ref.abs().max().item(), errors
    copy = E.softplus_copy(model, 5.0)
    assert not any(isinstance(m, nn.ReLU) for m in copy.modules())
    assert sum(isinstance(m, nn.Softplus) for m in copy.modules()) == 3
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3  # the original is untouched
    E.set_softplus_beta(copy, 50.0)
    assert all(m.beta == 50.0 for m in copy.modules() if isinstance(m, nn.Softplus))


def test_beta_schedule_is_geometric_between_its_ends():
    np.testing.assert_allclose(E.beta_values((1.0, 1000.0), 4), [1, 10, 100, 1000], rtol=1e-12)
    assert E.beta_values(3.0, 2) == [3.0, 3.0]
    with pytest.raises(ValueError):
        E.beta_values((1.0, 2.0, 3.0), 5)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_identical_maps_give_topk_one_mse_zero_spearman_one():
    h = E.normalise_map(_inputs(5))
    assert torch.equal(E.topk_intersection(h, h.clone(), 7), torch.ones(5))
    assert torch.equal(E.map_mse(h, h.clone()), torch.zeros(5))
    torch.testing.assert_close(E.spearman_maps(h, h.clone()), torch.ones(5, dtype=torch.float64))


def test_metrics_on_hand_made_maps():
    a = torch.tensor([[[0.4, 0.3], [0.2, 0.1]]])
    b = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])   # ranks reversed
    c = torch.tensor([[[0.4, 0.1], [0.2, 0.3]]])
    assert E.topk_intersection(a, b, 2).item() == 0.0
    assert E.topk_intersection(a, c, 2).item() == 0.5     # {0, 1} ∩ {0, 3}
    assert E.topk_intersection(a, b, 4).item() == 1.0
    assert E.spearman_maps(a, b).item() == pytest.approx(-1.0)
    assert E.map_mse(a, b).item() == pytest.approx((0.3 ** 2 + 0.1 ** 2 + 0.1 ** 2 + 0.3 ** 2) / 4)


def test_spearman_matches_scipy_per_input_with_ties():
    g = torch.Generator().manual_seed(3)
    h1 = torch.randint(0, 6, (7, 4, 5), generator=g).double()  # many ties
    h2 = h1 + torch.randint(0, 4, (7, 4, 5), generator=g).double()
    ours = E.spearman_maps(h1, h2).numpy()
    ref = [spearmanr(h1[i].flatten().numpy(), h2[i].flatten().numpy()).statistic for i in range(7)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_random_sign_perturbation_has_size_eps_and_stays_in_range():
    x = _inputs(4, low=0.0, high=1.0)
    xr = E.random_sign_perturbation(x, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(xr, E.random_sign_perturbation(x, 0.1, torch.Generator().manual_seed(0)))
    assert xr.min() >= 0 and xr.max() <= 1 and (xr - x).abs().max() <= 0.1 + 1e-7
    inner = (x > 0.1) & (x < 0.9)
    torch.testing.assert_close((xr - x).abs()[inner], torch.full_like(x[inner], 0.1))
    signs = torch.sign(xr - x)[inner]
    assert 0.3 < (signs > 0).float().mean() < 0.7


# ---------------------------------------------------------------------------------------------
# sensitivity
# ---------------------------------------------------------------------------------------------
def test_linear_saliency_has_zero_sensitivity():
    model, x = _linear(), _inputs(5)
    sens = E.sensitivity(model, x, "saliency", radius=0.1, n_perturb_samples=6)
    assert sens.shape == (5,) and torch.equal(sens, torch.zeros(5))


def test_input_x_gradient_sensitivity_equals_a_reference_on_the_same_draws():
    """h(x) = |x ⊙ w_c| (summed, normalised) on a linear model; the perturbations are those the
    seeded generator gives, in captum's order (each input repeated n times, then perturbed)."""
    model, x, r, n = _linear(), _inputs(3), 0.15, 5
    sens = E.sensitivity(model, x, "input_x_gradient", radius=r, n_perturb_samples=n,
                         generator=torch.Generator().manual_seed(7))
    w = model[1].weight.detach().double().numpy()
    pred = (x.flatten(1).double().numpy() @ w.T).argmax(1)  # bias is the same for all inputs' logits

    def hmap(xi, cls):
        a = np.abs(xi.reshape(C, H, W) * w[cls].reshape(C, H, W)).sum(0)
        return a / a.sum()

    noise = torch.rand((3 * n, C, H, W), generator=torch.Generator().manual_seed(7)).double().numpy()
    xs = np.repeat(x.double().numpy(), n, axis=0)
    xp = np.clip(xs + (2 * noise - 1) * r, 0, 1)
    ref = []
    for i in range(3):
        h0 = hmap(x[i].double().numpy(), pred[i])
        ref.append(max(np.linalg.norm(hmap(xp[i * n + j], pred[i]) - h0) for j in range(n))
                   / np.linalg.norm(h0))
    assert min(ref) > 0.01
    np.testing.assert_allclose(sens.double().numpy(), ref, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------
def test_targeted_attack_cannot_change_a_linear_models_saliency():
    model, pool = _linear(), _inputs(40)
    victims, targets = E.random_pairs(40, 4, E.predicted_class(model, pool), torch.Generator().manual_seed(0))
    x, t = pool[victims], pool[targets]
    with pytest.warns(UserWarning, match="no nn.ReLU module"):
        res = E.targeted_attack(model, x, t, eps=0.1, steps=5, lr=0.03)
    assert res.le_start.min() > 0
    assert torch.equal(res.le_end, res.le_start)
    assert torch.equal(res.h_end, res.h_start) and res.label_kept.all()
    with pytest.warns(UserWarning, match="no nn.ReLU module"):
        top = E.topk_attack(model, x, k=5, eps=0.1, steps=5, step_size=0.03)
    assert torch.equal(top.topk, torch.ones(4)) and top.label_kept.all()


def _mnist_convnet():
    """The MNIST ConvNet after 60 Adam steps on 32-image batches of the embedded MNIST subset
    (~88% test accuracy; a few seconds on one core), and 40 other images to attack."""
    images, labels = load_mnist5k()
    take = np.random.default_rng(0).permutation(len(images))[:1040]  # the file is sorted by digit
    x = torch.from_numpy(images[take].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels[take])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MnistConvNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(60):
        idx = torch.randint(0, 1000, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), x[1000:], y[1000:]


@pytest.fixture(scope="module")
def convnet():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _mnist_convnet()
    finally:
        torch.set_num_threads(before)


def test_targeted_attack_on_the_convnet_lowers_le_keeps_the_label_and_beats_random_sign(convnet):
    model, x, _ = convnet
    pred = E.predicted_class(model, x)
    assert len(torch.unique(pred)) >= 3
    victims, targets = E.random_pairs(len(x), 6, pred, torch.Generator().manual_seed(0))
    xv, xt = x[victims], x[targets]
    res = E.targeted_attack(model, xv, xt, eps=0.1, steps=20, lr=0.01, gamma=1e5, beta_schedule=(10, 100))
    assert (res.x_adv - xv).abs().max() <= 0.1 + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.label_kept.all()
    assert (res.le_end < res.le_start).float().mean() >= 0.8, (res.le_start, res.le_end)
    assert (res.le_end / res.le_start).mean() < 0.9
    # the reported end state is the ReLU model's own map at x_adv
    torch.testing.assert_close(res.h_end, E.explanation_map(model, res.x_adv, "saliency", pred[victims]))
    rand = E.perturbation_effect(model, xv, E.random_sign_perturbation(xv, 0.1, torch.Generator().manual_seed(1)),
                                 "saliency", k=40, target_maps=res.h_target)
    assert res.le_end.mean() < rand["l_e"].mean()


def test_topk_attack_on_the_convnet_beats_random_sign(convnet):
    model, x, _ = convnet
    x = x[:6]
    res = E.topk_attack(model, x, k=40, eps=0.1, steps=15, step_size=0.01)
    assert res.label_kept.all() and (res.x_adv - x).abs().max() <= 0.1 + 1e-6
    rand = E.perturbation_effect(model, x, E.random_sign_perturbation(x, 0.1, torch.Generator().manual_seed(1)),
                                 "saliency", k=40)
    assert res.topk.mean() < rand["topk"].mean() - 0.05, (res.topk, rand["topk"])
    torch.testing.assert_close(res.topk, E.topk_intersection(res.h_before, res.h_after, 40))
    torch.testing.assert_close(res.spearman, E.spearman_maps(res.h_before, res.h_after))


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------
def test_random_pairs_have_different_classes_and_are_deterministic():
    classes = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    v, t = E.random_pairs(10, 8, classes, torch.Generator().manual_seed(4))
    v2, t2 = E.random_pairs(10, 8, classes, torch.Generator().manual_seed(4))
    assert torch.equal(v, v2) and torch.equal(t, t2)
    assert len(set(v.tolist())) == 8 and (classes[v] != classes[t]).all()
    with pytest.raises(ValueError):
        E.random_pairs(3, 2, [1, 1, 1], torch.Generator().manual_seed(0))


def test_cluster_pairs_take_the_points_nearest_to_prototypes_of_different_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = np.concatenate([c + rng.normal(size=(20, 2)) for c in centres])
    blob = np.repeat(np.arange(3), 20)
    v, t = E.cluster_pairs(feats, 3, 6, seed=0)
    assert torch.equal(v, E.cluster_pairs(feats, 3, 6, seed=0)[0])
    assert (blob[v.numpy()] != blob[t.numpy()]).all()
    # rank 0: each victim is its blob's point nearest to the blob's mean (the k-means prototype)
    nearest = {b: int(np.argmin(np.linalg.norm(feats - feats[blob == b].mean(0), axis=1)
                                + 1e9 * (blob != b))) for b in range(3)}
    assert sorted(v[:3].tolist()) == sorted(nearest.values())
    assert sorted(t[:3].tolist()) == sorted(nearest.values())
    assert len({(int(a), int(b)) for a, b in zip(blob[v.numpy()], blob[t.numpy()])}) == 6  # all 6 ordered cluster pairs
    with pytest.raises(ValueError):
        E.cluster_pairs(feats, 3, 61, seed=0)
