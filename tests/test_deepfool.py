"""Known-answer tests of the batched DeepFool (deepfool.py) and the robustness stage (robustness.py).

References written plainly here: the closed-form minimal perturbation of an affine classifier
(DeepFool paper, arXiv 1511.04599, eq. 4 and Algorithm 2 with one step), and a one-image-at-a-time
transcription of the LTS4 reference loop with one backward per class.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import artifacts  # noqa: E402
import robustness  # noqa: E402
from config import load_config  # noqa: E402
import deepfool as deepfool_module  # noqa: E402
from deepfool import _SequentialJacobian, deepfool  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread avoids OpenMP barriers stalling on a busy machine
    (runs after conftest's per-test thread setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# models and references
# ------------------------------------------------------------------------------------------------
def small_cnn(seed: int = 0, n_classes: int = 6, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, n_classes))
    return model.to(dtype).eval()


def reference_deepfool(model, image, num_classes, overshoot, max_iter, clip=None):
    """The LTS4 loop for one image: candidates from the clean logits, one backward per class."""
    with torch.no_grad():
        clean = model(image[None])[0]
    order = torch.argsort(clean, descending=True)[:num_classes]
    label = int(order[0])
    r_tot = torch.zeros_like(image)
    point = image.clone()
    k_i, loop_i = label, 0
    while k_i == label and loop_i < max_iter:
        xv = point.clone().requires_grad_(True)
        fs = model(xv[None])[0]
        grads = [torch.autograd.grad(fs[order[k]], xv, retain_graph=True)[0] for k in range(num_classes)]
        pert, w = math.inf, None
        for k in range(1, num_classes):
            w_k = grads[k] - grads[0]
            f_k = float((fs[order[k]] - fs[order[0]]).detach())
            pert_k = abs(f_k) / float(w_k.norm())
            if pert_k < pert:
                pert, w = pert_k, w_k
        r_tot = r_tot + (pert + 1e-4) * w / w.norm()
        point = image + (1 + overshoot) * r_tot
        if clip is not None:
            point = point.clamp(*clip)
        with torch.no_grad():
            k_i = int(model(point[None])[0].argmax())
        loop_i += 1
    return point - image, loop_i, label, k_i


def assert_candidate_gradients_equal_autograd(model, x, cand, got):
    """``got[i, j]`` (N, K−1, ...) is ∇(f_cand[i, j+1] − f_cand[i, 0]) at x[i], by plain autograd
    on ``model`` (no interception)."""
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    for i in range(len(x)):
        for j in range(cand.shape[1] - 1):
            (want,) = torch.autograd.grad(out[i, cand[i, j + 1]] - out[i, cand[i, 0]], xr, retain_graph=True)
            torch.testing.assert_close(got[i, j], want[i], atol=1e-12, rtol=1e-10)


def random_images(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# affine classifiers: closed form
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_classes,num_classes", [(2, 2), (5, 5), (7, 4)])
def test_affine_classifier_matches_closed_form(n_classes, num_classes):
    torch.manual_seed(3)
    d = 12
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes)).double().eval()
    x = torch.randn(20, 1, 3, 4, dtype=torch.float64)
    overshoot = 0.02
    out = deepfool(model, x, num_classes=num_classes, overshoot=overshoot, max_iter=50)

    W = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    for i in range(len(x)):
        xi = x[i].numpy().ravel()
        f = W @ xi + b
        top = np.argsort(-f)[:num_classes]
        o = top[0]
        # distance to each linear boundary f_k = f_o: |f_k - f_o| / ||w_k - w_o|| (eq. 4 / Alg. 2)
        dists = [abs(f[k] - f[o]) / np.linalg.norm(W[k] - W[o]) for k in top[1:]]
        j = int(np.argmin(dists))
        l = top[1:][j]
        direction = (W[l] - W[o]) / np.linalg.norm(W[l] - W[o])
        expected = (1 + overshoot) * (dists[j] + 1e-4) * direction
        got = out.perturbation[i].numpy().ravel()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert int(out.orig_label[i]) == o
        assert int(out.iterations[i]) == 1 and bool(out.converged[i])
        # one step suffices for an affine model: f_l exceeds f_o at x + r̂
        assert (W[l] - W[o]) @ (xi + expected) + b[l] - b[o] > 0
        assert int(out.adv_label[i]) == int(np.argmax(W @ (xi + expected) + b))


def test_two_class_affine_radius_is_distance_to_hyperplane():
    # f(x) = w·x + c as two logits (0, w·x + c): the minimal perturbation is |f(x)|/‖w‖ (eq. 3)
    w = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ‖w‖ = 5
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(2, dtype=torch.float64), w]))
        lin.bias.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [2.0, 0.5]], dtype=torch.float64)  # f = -4 and 5
    out = deepfool(lin.eval(), x, num_classes=2, overshoot=0.0)
    radius = out.perturbation.norm(dim=1)
    np.testing.assert_allclose(radius.numpy(), [4 / 5 + 1e-4, 5 / 5 + 1e-4], atol=1e-9)


# ------------------------------------------------------------------------------------------------
# batched = per-image reference
# ------------------------------------------------------------------------------------------------
def test_batched_matches_reference_any_batch_size_and_order():
    model = small_cnn()
    x = random_images(24)
    num_classes, overshoot, max_iter = 4, 0.02, 50
    refs = [reference_deepfool(model, x[i], num_classes, overshoot, max_iter) for i in range(len(x))]
    assert max(r[1] for r in refs) >= 2, "fixture should need several iterations for some inputs"

    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for batch_size, order in [(None, torch.arange(len(x))), (5, torch.arange(len(x))), (7, perm), (1, perm)]:
        out = deepfool(model, x[order], num_classes=num_classes, overshoot=overshoot,
                       max_iter=max_iter, batch_size=batch_size)
        for pos, i in enumerate(order.tolist()):
            r_hat, iters, label, k_i = refs[i]
            np.testing.assert_allclose(out.perturbation[pos].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
            assert int(out.iterations[pos]) == iters
            assert int(out.orig_label[pos]) == label
            assert int(out.adv_label[pos]) == k_i
            assert bool(out.converged[pos]) == (k_i != label)


class Wrapped(nn.Module):
    """Hides the Sequential, so deepfool takes its generic autograd path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_autograd_path_matches_reference():
    model = small_cnn(seed=1)
    x = random_images(10, seed=3)
    out = deepfool(Wrapped(model), x, num_classes=5, batch_size=4)
    for i in range(len(x)):
        r_hat, iters, label, k_i = reference_deepfool(model, x[i], 5, 0.02, 50)
        np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
        assert (int(out.iterations[i]), int(out.orig_label[i]), int(out.adv_label[i])) == (iters, label, k_i)


def test_mnist_convnet_float32_fast_path_agrees_with_autograd_path():
    from cnnmodel import build_model
    torch.manual_seed(0)
    model = build_model("mnist_convnet").eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    fast = deepfool(model, x)
    slow = deepfool(Wrapped(model), x)
    assert torch.equal(fast.iterations, slow.iterations) and torch.equal(fast.adv_label, slow.adv_label)
    torch.testing.assert_close(fast.perturbation, slow.perturbation, atol=1e-4, rtol=1e-4)
    assert fast.converged.all()


def wide_cnn(seed: int = 0) -> nn.Module:
    """A second convolution with more than GROUPED_MAX_IN input channels: transposed in
    channels_last, its pool routed in channels_last, the dense layer's product permuted to match."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 6)).double().eval()


def odd_cnn(seed: int = 0) -> nn.Module:
    """Strided convolution (input size recovered by output_padding), overlapping max-pool (two
    windows may route to one position: gradients add up), a 1×1 convolution and a floor-mode pool
    that drops a row and a column: the scatter routing."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 5, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(5, 6, 1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double().eval()


def mlp(seed: int = 0) -> nn.Module:
    """The first transposed layer writes into a reused buffer: the gradients must not live there."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 5)).double().eval()


def pool_first(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48, 5)).double().eval()


def pool3_cnn(seed: int = 0) -> nn.Module:
    """Non-overlapping pools other than 2×2 (3×3, then 1×3): the per-offset routing masks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d((1, 3)),
                         nn.Flatten(), nn.Linear(15, 5)).double().eval()


def rect_cnn(seed: int = 0) -> nn.Module:
    """Two convolutions with few input channels (both transposed grouped, in NCHW): a ReLU mask
    written straight in NCHW, and a 1×2 pool routed in NCHW (the cotangent repeated over the
    window's columns by a product; the grouped convolution below it keeps the pool and the
    convolution from being fused)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d((1, 2)),
                         nn.Flatten(), nn.Linear(4 * 8 * 4, 5)).double().eval()


def pool_conv_cnn(seed: int = 0) -> nn.Module:
    """Both pools fused with the few-channel convolution below them (``pool_conv``): an even
    kernel whose output (10×10 from 11×11) leaves the input's last row and column past the
    pooled grid; a 3×3 pool over a convolution that is not the image layer and has no padding."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 4, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3),
                         nn.Flatten(), nn.Linear(4, 5)).double().eval()


def pool_conv_rect(seed: int = 0) -> nn.Module:
    """A 2×1 pool fused with a 3×5 convolution padded (1, 2), a Dropout between them; no ReLU
    folded into the pool."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, (3, 5), padding=(1, 2)), nn.Dropout(0.5), nn.MaxPool2d((2, 1)),
                         nn.Flatten(), nn.Linear(2 * 4 * 8, 5)).double().eval()


def linear_on_rows(seed: int = 0) -> nn.Module:
    """A Linear acting on the last dimension of an N×1×8×8 input."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)).double().eval()


@pytest.mark.parametrize("make,size,clip", [(wide_cnn, 8, None), (wide_cnn, 8, (0.0, 1.0)),
                                            (odd_cnn, 10, None), (odd_cnn, 10, (0.0, 1.0)),
                                            (mlp, 8, None), (mlp, 8, (0.0, 1.0)),
                                            (pool_first, 8, (0.0, 1.0)), (linear_on_rows, 8, None),
                                            (pool3_cnn, 9, None), (pool3_cnn, 9, (0.0, 1.0)),
                                            (rect_cnn, 8, None), (rect_cnn, 8, (0.0, 1.0)),
                                            (pool_conv_cnn, 11, None), (pool_conv_cnn, 11, (0.0, 1.0)),
                                            (pool_conv_rect, 8, None), (pool_conv_rect, 8, (0.0, 1.0))])
def test_sequential_backward_variants_match_reference(make, size, clip, monkeypatch):
    if make is pool_conv_cnn:  # (its second pool is fused only when the cost rule is lifted)
        monkeypatch.setattr(deepfool_module, "POOL_CONV_MAX_COST", math.inf)
    model = make()
    plan = _SequentialJacobian(_SequentialJacobian.supports(model))
    if make is wide_cnn:  # the test is only worth something if these paths run
        assert set(plan.conv_mode.values()) == {"grouped", "cl"} and plan.flatten_cl
    if make is pool3_cnn:
        assert set(plan.route_layout.values()) == {"nchw", "cl"}
    if make is rect_cnn:
        assert plan.relu_to_nchw == {1} and plan.route_layout == {5: "nchw"} and not plan.pool_conv
    if make is pool_conv_cnn:
        assert plan.pool_conv == {2: 0, 5: 3}
    if make is pool_conv_rect:  # (cost 2 × 4 × 3 × 2 / 15 = 3.2)
        assert plan.pool_conv == {2: 0}
    if make is wide_cnn:  # a pool fused with the image layer (cost 1 × 4 × 9 / 9 = 4), another not
        assert plan.pool_conv == {2: 0}
    if make is pool3_cnn:  # 3×3 pool over 3×3 taps: cost 1 × 9 × 9 / 9 = 9, routed in NCHW
        assert not plan.pool_conv
    x = torch.rand(14, 1, size, size, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    refs = [reference_deepfool(model, x[i], 4, 0.02, 50, clip=clip) for i in range(len(x))]
    for batch_size in (None, 3):
        out = deepfool(model, x, num_classes=4, clip=clip, batch_size=batch_size)
        for i, (r_hat, iters, label, k_i) in enumerate(refs):
            np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
            assert (int(out.iterations[i]), int(out.orig_label[i]), int(out.adv_label[i])) == (iters, label, k_i)


class ResidualNet(nn.Module):
    """Not sequential: batch norm with running statistics, a residual block, a strided 1×1
    projection on a skip connection, average pooling, a functional ReLU."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(4, 6, 1, stride=2)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        for bn in (self.bn0, self.bn1):  # non-trivial running statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
        self.double().eval()

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.conv1(h)) + h)
        h = torch.relu(self.conv2(h) + self.proj(h))
        return self.fc(torch.flatten(nn.functional.avg_pool2d(h, 2), 1))


class ViewAfterConv(nn.Module):
    """``.view`` on a convolution's output: rejects channels_last activations (the generic path
    then runs the model with them off)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding="same")  # string padding: left to the model
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, dilation=1, groups=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.double().eval()

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("make,seed,clip", [(ResidualNet, 0, None), (ResidualNet, 2, (0.0, 1.0)),
                                            (ResidualNet, 3, (0.0, 1.0)), (ViewAfterConv, 0, (0.0, 1.0))])
def test_generic_path_non_sequential_matches_reference_with_small_chunks(make, seed, clip, monkeypatch):
    model = make(seed)
    assert _SequentialJacobian.supports(model) is None
    x = torch.rand(17, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    refs = [reference_deepfool(model, x[i], 4, 0.02, 50, clip=clip) for i in range(len(x))]
    assert len({r[1] for r in refs}) >= 3, "fixture should finish inputs at different iterations"
    for rows in (3, 8, 128):  # small chunks: graphs dropped, carried and forwarded again as rows finish
        monkeypatch.setattr(deepfool_module, "GRAPH_CHUNK_ROWS", rows)
        out = deepfool(model, x, num_classes=4, clip=clip)
        for i, (r_hat, iters, label, k_i) in enumerate(refs):
            np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
            assert (int(out.iterations[i]), int(out.orig_label[i]), int(out.adv_label[i])) == (iters, label, k_i)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_batch_norm_of_a_convolution_is_folded_into_its_input_gradient(monkeypatch):
    """The generic path differentiates bn(conv(x)) straight to x (the scale folded into the
    transposed weight): its candidate gradients equal plain autograd's on the unwrapped model."""
    calls = []
    fold = deepfool_module._ConvBatchNormEvalInputGrad.apply
    monkeypatch.setattr(deepfool_module._ConvBatchNormEvalInputGrad, "apply",
                        lambda *args: calls.append(1) or fold(*args))
    model = ResidualNet(1)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    jac = deepfool_module._AutogradJacobian(model, 4)
    logits = jac.forward(x, True, 4)
    cand = logits.topk(4, dim=1).indices
    got, norms, idx = jac.vjp(deepfool_module._grad_outputs(cand, logits.shape[1], x.dtype))
    assert idx is None and torch.equal(norms, got.flatten(2).norm(dim=2))
    assert len(calls) == 2  # bn0(stem(x)) and bn1(conv1(h))
    assert_candidate_gradients_equal_autograd(model, x, cand, got)


@pytest.mark.parametrize("c_in,kernel,padding,pool,size", [
    (1, (5, 5), (2, 2), (2, 2), (12, 12)), (2, (3, 3), (0, 0), (2, 2), (9, 9)),    # (9×9 trimmed to 8×8)
    (3, (4, 2), (1, 0), (3, 2), (11, 9)), (1, (1, 1), (0, 0), (2, 3), (8, 9)),      # 10×9: rows past the grid
    (4, (3, 5), (2, 1), (1, 2), (7, 8)), (2, (2, 2), (1, 1), (3, 3), (8, 8))])     # pool wider than taps
def test_pool_fused_with_convolution_below_equals_autograd(c_in, kernel, padding, pool, size, monkeypatch):
    """``pool_conv``: the routing of a non-overlapping max-pool and the transposed product of the
    few-channel convolution below it, as one matrix product at the pooled size, give plain
    autograd's candidate gradients (ReLU folded into the pool, shapes that leave input rows and
    columns past the pooled grid, rectangular kernels and pools; fused whatever the cost rule)."""
    monkeypatch.setattr(deepfool_module, "POOL_CONV_MAX_COST", math.inf)
    torch.manual_seed(3)
    conv = nn.Conv2d(c_in, 3, kernel, padding=padding)
    out_hw = [size[d] + 2 * padding[d] - kernel[d] + 1 for d in range(2)]
    out_hw = [o - o % p for o, p in zip(out_hw, pool)]  # trim the input so that the pool tiles it
    size = [o - 2 * padding[d] + kernel[d] - 1 for d, o in enumerate(out_hw)]
    pooled = out_hw[0] // pool[0] * (out_hw[1] // pool[1]) * 3
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(pool), nn.Flatten(), nn.Linear(pooled, 6)).double().eval()
    plan = _SequentialJacobian(_SequentialJacobian.supports(model))
    assert plan.pool_conv == {2: 0}
    x = torch.rand(5, c_in, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    logits = plan.forward(x, True, 4)
    assert plan.saved[2][0] == "offsets"
    cand = logits.topk(4, dim=1).indices
    got, _, idx = plan.vjp(deepfool_module._grad_outputs(cand, 6, x.dtype))
    assert idx is None
    assert_candidate_gradients_equal_autograd(model, x, cand, got)


def test_pool_fused_with_convolution_only_where_measured_faster():
    """The cost rule (``POOL_CONV_MAX_COST``): MnistConvNet's image layer (1 channel, 5×5 taps:
    4 offsets × 9 shifts / 25 taps = 1.44) is fused, a 3-channel 3×3 one (3 × 4 × 9 / 9 = 12) is
    not, nor is a strided convolution."""
    from cnnmodel import build_model
    plan = _SequentialJacobian(_SequentialJacobian.supports(build_model("mnist_convnet")))
    assert plan.pool_conv == {2: 0} and plan.route_layout == {2: "nchw", 5: "cl"}
    for conv, fused in ((nn.Conv2d(3, 8, 3, padding=1), False), (nn.Conv2d(1, 8, 3, padding=1), True),
                        (nn.Conv2d(3, 8, 5, padding=2), True), (nn.Conv2d(1, 8, 5, stride=2, padding=2), False)):
        model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        assert bool(_SequentialJacobian(_SequentialJacobian.supports(model)).pool_conv) is fused, conv


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,dilation,groups,size", [
    (1, 5, 3, 1, 1, 1, 1, 8), (1, 4, 5, 2, 2, 1, 1, 9), (3, 4, 3, 1, 0, 2, 1, 9),  # few input channels: fold
    (6, 4, 3, 2, 1, 1, 1, 9), (6, 4, 3, 1, 1, 1, 2, 8), (8, 3, 1, 2, 0, 1, 1, 7)])  # transposed convolution
def test_conv2d_input_gradient_equals_autograd(c_in, c_out, k, stride, padding, dilation, groups, size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, c_in, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=torch.float64)
    y = nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(y, x, cot)[0]
    got = deepfool_module._conv2d_input_grad(cot, w, x.shape, (stride, stride), (padding, padding),
                                             (dilation, dilation), groups)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding,dilation,size", [
    ((2, 3), (2, 1), (1, 0), (1, 2), (9, 8)), ((3, 1), (1, 3), (0, 2), (2, 1), (7, 10)),
    ((1, 1), (2, 2), (0, 0), (1, 1), (5, 6)), ((2, 2), (3, 3), (0, 0), (1, 1), (8, 8))])
def test_fold_by_strided_adds_equals_torch_fold(kernel, stride, padding, dilation, size):
    """_fold (one strided add per kernel tap) against F.fold on non-square, per-axis settings,
    including strides larger than the kernel (positions no window reads stay zero)."""
    n, c = 2, 3
    ho, wo = (math.floor((size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) / stride[d]) + 1
              for d in range(2))
    cols = torch.randn(n, c, kernel[0], kernel[1], ho, wo, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    expected = nn.functional.fold(cols.reshape(n, c * kernel[0] * kernel[1], ho * wo), size, kernel,
                                  dilation=dilation, padding=padding, stride=stride)
    got = deepfool_module._fold(cols, size, dilation, padding, stride)
    assert torch.equal(got, expected)


def _routed_by_loops(g: torch.Tensor, mask: torch.Tensor, kernel) -> torch.Tensor:
    """Max-pool routing written plainly: each pooled cotangent copied over its window, times the mask."""
    n, k1, c, h, w = g.shape
    kh, kw = kernel
    out = torch.zeros(n, k1, c, h * kh, w * kw, dtype=g.dtype)
    for i in range(h):
        for j in range(w):
            out[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw] = g[..., i:i + 1, j:j + 1]
    return out * mask.unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("precision", ["default", "legacy high", "per-backend tf32"])
def test_nchw_pool_routing_is_exact_under_any_matmul_precision(dtype, precision):
    """The NCHW routing repeats the cotangent by a 0/1 product only where products are exact,
    else by a gather; either way it equals plain routing, and no precision setting breaks it
    (the legacy getter raises once a per-backend ``fp32_precision`` is set)."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(2, 3, 4, 3, 5, generator=gen, dtype=dtype)
    mask = (torch.rand(2, 4, 6, 10, generator=gen) > 0.6).to(dtype)
    expected = _routed_by_loops(g, mask, (2, 2))
    model, x = rect_cnn().to(dtype), torch.rand(3, 1, 8, 8, generator=gen, dtype=dtype)
    before = deepfool(model, x, num_classes=4)
    try:
        if precision == "legacy high":
            torch.set_float32_matmul_precision("high")
        elif precision == "per-backend tf32":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        got = deepfool_module._unpool_mask(g, mask, (2, 2), "nchw")
        assert torch.equal(got, expected)
        out = deepfool(model, x, num_classes=4)  # runs (float32 products elsewhere may round differently)
        assert torch.isfinite(out.perturbation).all()
        if dtype == torch.float64:  # no setting touches float64 products
            assert torch.equal(out.perturbation, before.perturbation)
            assert torch.equal(out.iterations, before.iterations)
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")


def test_conv2d_subclass_with_its_own_forward_takes_the_generic_path():
    """The hand-written path reproduces plain Conv2d only: a subclass overriding forward (here a
    weight standardisation) must run through autograd, and match the reference."""

    class StandardisedConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(1)
    model = nn.Sequential(StandardisedConv(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 4)).double().eval()
    assert _SequentialJacobian.supports(model) is None
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = deepfool(model, x, num_classes=4)
    for i in range(len(x)):
        r_hat, iters, label, k_i = reference_deepfool(model, x[i], 4, 0.02, 50)
        np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
        assert (int(out.iterations[i]), int(out.orig_label[i]), int(out.adv_label[i])) == (iters, label, k_i)


@pytest.mark.parametrize("opts", [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), count_include_pad=False),
    dict(kernel_size=2, stride=1, divisor_override=3)])
def test_generic_path_average_pool_gradient_equals_autograd(opts):
    """The channels_last average-pool backward of the generic path, for every pooling option,
    against plain autograd's candidate gradients."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.fc = nn.LazyLinear(4)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.avg_pool2d(torch.relu(self.conv(x)), **opts), 1))

    model = Pooled().double()
    x = torch.rand(5, 1, 7, 9, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    model(x)  # materialise the lazy layer
    model.eval()
    calls = []
    fn = deepfool_module._AvgPool2dChannelsLastGrad.apply
    try:
        deepfool_module._AvgPool2dChannelsLastGrad.apply = lambda *a: calls.append(1) or fn(*a)
        jac = deepfool_module._AutogradJacobian(model, 4)
        logits = jac.forward(x, True, 4)
        cand = logits.topk(4, dim=1).indices
        got, _, _ = jac.vjp(deepfool_module._grad_outputs(cand, 4, x.dtype))
    finally:
        deepfool_module._AvgPool2dChannelsLastGrad.apply = fn
    assert calls  # the channels_last pool ran
    assert_candidate_gradients_equal_autograd(model, x, cand, got)


def test_sequential_chunked_backward_matches_reference(monkeypatch):
    monkeypatch.setattr(deepfool_module, "SEQUENTIAL_CHUNK_BYTES", 1)  # chunks of 16 inputs
    model = wide_cnn(seed=1)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = deepfool(model, x, num_classes=5, clip=(0.0, 1.0))
    assert len(out.stats["resumed_at"]) > 1  # backward passes still restart below the top
    for i in range(len(x)):
        r_hat, iters, label, k_i = reference_deepfool(model, x[i], 5, 0.02, 50, clip=(0.0, 1.0))
        np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
        assert (int(out.iterations[i]), int(out.orig_label[i]), int(out.adv_label[i])) == (iters, label, k_i)


def test_overlapping_pool_gradient_adds_both_windows():
    # 1-D case inside a 2-D pool: windows [0,1,2] and [2,3,4] both pick position 2 (the maximum)
    pool_model = nn.Sequential(nn.MaxPool2d((1, 3), stride=(1, 2)), nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        pool_model[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[[[0.1, 0.2, 0.9, 0.3, 0.0]]]])
    jac = _SequentialJacobian(_SequentialJacobian.supports(pool_model))
    jac.forward(x, True, 2)
    w, norms, idx = jac.vjp(torch.tensor([[[-1.0, 1.0]]]))  # ∇(f_1 − f_0) = −∇(x_2 + x_2)
    assert idx is None and torch.equal(w.flatten(), torch.tensor([0.0, 0.0, -2.0, 0.0, 0.0]))
    assert torch.equal(norms, torch.tensor([[2.0]]))


def test_clipped_run_resumes_backward_below_the_top_and_stays_exact():
    model = wide_cnn(seed=0)
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = deepfool(model, x, num_classes=6, clip=(0.0, 1.0))
    assert out.converged.all() and out.iterations.float().mean() > 3
    # some rows kept their gradients, some redid only the layers below the first pool
    assert out.stats["backward_rows"] < out.stats["gradient_rows"]
    assert out.stats["resumed_at"].get("2:MaxPool2d", 0) > 0
    for i in range(len(x)):
        r_hat, iters, _, _ = reference_deepfool(model, x[i], 6, 0.02, 50, clip=(0.0, 1.0))
        np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
        assert int(out.iterations[i]) == iters


def test_converged_flips_and_previous_step_did_not():
    model = small_cnn(seed=2)
    x = random_images(16, seed=5)
    out = deepfool(model, x, num_classes=6, max_iter=50)
    assert out.converged.all()
    with torch.no_grad():
        assert (model(x + out.perturbation).argmax(1) != out.orig_label).all()
    multi = out.iterations >= 2
    assert multi.any()
    for t in sorted(set(out.iterations[multi].tolist())):
        rows = out.iterations == t
        before = deepfool(model, x[rows], num_classes=6, max_iter=t - 1)
        assert not before.converged.any()
        assert (before.iterations == t - 1).all()
        with torch.no_grad():
            assert (model(x[rows] + before.perturbation).argmax(1) == out.orig_label[rows]).all()


def test_max_iter_reached_means_not_converged():
    model = small_cnn()
    x = random_images(24)
    full = deepfool(model, x, num_classes=4)
    needs_more = full.iterations >= 2
    assert needs_more.any()
    one = deepfool(model, x[needs_more], num_classes=4, max_iter=1)
    assert (~one.converged).all() and (one.iterations == 1).all()
    assert (one.adv_label == one.orig_label).all()


class NeverFlips(nn.Module):
    """Logits (10 + ‖x‖², 0): class 0 wins everywhere, so DeepFool can never succeed."""

    def forward(self, x):
        s = 10 + (x.flatten(1) ** 2).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_model_that_never_flips_runs_to_max_iter():
    x = random_images(3) + 0.5
    out = deepfool(NeverFlips(), x, num_classes=2, max_iter=7)
    assert (~out.converged).all()
    assert (out.iterations == 7).all()
    assert (out.adv_label == 0).all()


# ------------------------------------------------------------------------------------------------
# side effects, clipping, input checks
# ------------------------------------------------------------------------------------------------
class ModeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.inner(x)


def test_no_parameter_gradients_and_mode_restored():
    model = ModeRecorder(small_cnn())
    model.train()
    deepfool(model, random_images(6), num_classes=4)
    assert model.training and all(m.training for m in model.modules())
    assert model.modes and not any(model.modes), "the forward passes must run in eval mode"
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    deepfool(model, random_images(2), num_classes=4)
    assert not model.training


def test_clip_keeps_adversarial_in_box_and_matches_reference():
    model = small_cnn(seed=4)
    x = random_images(12, seed=7)
    out = deepfool(model, x, num_classes=4, clip=(0.0, 1.0))
    assert out.adversarial.min() >= 0.0 and out.adversarial.max() <= 1.0
    torch.testing.assert_close(out.adversarial, x + out.perturbation, atol=1e-12, rtol=0)
    with torch.no_grad():
        labels = model(out.adversarial).argmax(1)
    assert torch.equal(labels[out.converged] != out.orig_label[out.converged],
                       torch.ones(int(out.converged.sum()), dtype=torch.bool))
    for i in range(len(x)):
        r_hat, iters, _, _ = reference_deepfool(model, x[i], 4, 0.02, 50, clip=(0.0, 1.0))
        np.testing.assert_allclose(out.perturbation[i].numpy(), r_hat.numpy(), atol=1e-5, rtol=0)
        assert int(out.iterations[i]) == iters


def test_bad_inputs_raise_clear_errors():
    model = small_cnn()
    x = random_images(2)
    with pytest.raises(ValueError, match="x"):
        deepfool(model, torch.rand(2, 1, 7, 9, dtype=torch.float64))  # does not fit the network
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        deepfool(model, bad)
    with pytest.raises(ValueError, match="num_classes"):
        deepfool(model, x, num_classes=7)  # the model has 6 logits
    with pytest.raises(ValueError, match="x"):
        deepfool(model, torch.rand(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        deepfool(model, x, max_iter=0, num_classes=4)
    from cnnmodel import build_model
    with pytest.raises(ValueError, match="28"):
        deepfool(build_model("mnist_convnet"), torch.rand(2, 1, 27, 27))


# ------------------------------------------------------------------------------------------------
# robustness stage on a tiny model
# ------------------------------------------------------------------------------------------------
def test_measure_and_write_robustness(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_OUTPUT_ROOT", str(tmp_path))
    cfg = load_config(None, ["name=tiny", "deepfool_num_classes=4", "deepfool_n_test=10",
                             "deepfool_batch_size=4", "device=cpu"])
    x = random_images(14, seed=9)
    per_model = []
    for seed in (0, 1, 2):
        model = small_cnn(seed=seed)
        with torch.no_grad():
            pred = model(x).argmax(1)
        y = pred.clone()
        y[:3] = (pred[:3] + 1) % 6  # three wrong labels
        records, summary = robustness.measure_robustness(model, x, y, cfg, torch.device("cpu"))
        assert summary["n"] == 10 and len(records["index"]) == 10
        np.testing.assert_array_equal(records["pred"], pred[:10].numpy())
        ref = deepfool(model, x[:10], num_classes=4)
        radius = ref.perturbation.flatten(1).norm(dim=1).numpy()
        np.testing.assert_allclose(records["radius_l2"], radius, rtol=1e-6)
        rho = radius / x[:10].flatten(1).norm(dim=1).numpy()
        np.testing.assert_allclose(summary["rho_adv"], rho.mean(), rtol=1e-6)
        correct = records["label"] == records["pred"]
        assert summary["n_correct"] == 7
        np.testing.assert_allclose(summary["rho_adv_correct"], rho[correct].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["median_radius_l2"], np.median(radius), rtol=1e-6)
        per_model.append((seed, records, summary))

    out = robustness.write_robustness(cfg, "baseline", per_model)
    folder = tmp_path / "results" / "tiny" / "variants" / "baseline"
    with open(folder / "robustness.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["seed", "index", "label", "pred", "radius_l2", "rho", "iterations",
                       "adv_label", "converged"]
    assert len(rows) == 1 + 3 * 10
    assert sorted({r[0] for r in rows[1:]}) == ["0", "1", "2"]
    data = json.loads((folder / "robustness.json").read_text())
    assert data == json.loads(json.dumps(out))
    assert len(data["models"]) == 3
    agg = data["across_models"]["rho_adv"]
    values = [s["rho_adv"] for _, _, s in per_model]
    assert agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
    np.testing.assert_allclose(agg["mean"], np.mean(values), rtol=1e-9)
    assert (folder / "robustness.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="per_model"):
        robustness.write_robustness(cfg, "baseline", [])
