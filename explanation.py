"""Explanation robustness vs classification robustness (Chen et al., arXiv 2403.06013).

    python explanation.py [--config configs/explanation.yaml] [--set key=value ...]

The stage (bottom of this file) measures, for every trained (variant, seed) model, how easily its
explanation maps move: max-sensitivity, Dombrowski et al.'s targeted manipulation on fixed
victim/target pairs (``explanation_pairs.json``, written once, reused by every model), and
Ghorbani et al.'s top-k attack — each attack next to a random-sign perturbation of the same ε. It
then correlates explanation robustness with classification robustness (PGD-L∞ accuracy, ρ_adv)
across models (Spearman, Kendall, permutation p-value, bootstrap CI) and, within each model, per
input with the DeepFool radius. Writes ``explanation.{json,md,png}``.

The library part: explanation maps, their sensitivity, and attacks that manipulate them.

Definitions (DESIGN.md, "Definitions the stages must agree on"; Chen et al., arXiv 2403.06013):

- **Explanation map** h(x) of an input x (N×C×H×W, pixels in [0, 1]): the attribution of the
  predicted class c = argmax f(x) by captum's Saliency, InputXGradient or IntegratedGradients
  (zero baseline), |·| summed over channels and normalised to sum 1 over the H×W pixels
  (Dombrowski et al., arXiv 1906.07983, Sec. 2). An all-zero attribution gives the uniform map.
- **L_e(x, t)** = MSE(h(x), h(t)): the mean over the H·W pixels of the squared difference.
- **Top-k intersection** (Ghorbani et al., arXiv 1710.10547, Sec. 3): |top_k(h) ∩ top_k(h')| / k.
- **Spearman rank correlation** of two maps over their pixels (average ranks for ties, as
  ``scipy.stats.spearmanr``).
- **Max-sensitivity** (Yeh et al., arXiv 1901.09392, Def. 3.1, via captum.metrics.sensitivity_max):
  max over δ sampled uniformly in the L∞ ball of radius r of ‖h(x+δ) − h(x)‖_F / ‖h(x)‖_F.

ReLU networks are piecewise linear, so their input gradient is piecewise constant in x and the
gradient of a map-based loss with respect to x is zero almost everywhere. Both attacks therefore
differentiate a copy of the network whose ReLUs are replaced by softplus_β(z) = log(1 + e^{βz})/β
(Dombrowski et al., Sec. 4; Ghorbani et al. Sec. 3 do the same), which tends to ReLU as β → ∞
(|softplus_β(z) − relu(z)| ≤ log 2 / β), and evaluate every iterate on the original ReLU model.

- **Targeted manipulation** (Dombrowski et al., Eq. 4): minimise over x_adv
  γ·MSE(h_β(x_adv), h(t)) + MSE(softmax f_β(x_adv), softmax f(x)) within ‖x_adv − x‖∞ ≤ ε and
  [0, 1]^d, with β growing geometrically over the steps (their β schedule).
- **Untargeted top-k attack** (Ghorbani et al., Algorithm 1): minimise the map's mass on the
  original top-k pixels, D(x_adv) = Σ_{i ∈ top_k(h(x))} h_β(x_adv)_i, with the same constraints.

Both attacks take signed-gradient steps (steepest descent for the L∞ norm, as PGD does) and
project onto the ε-ball ∩ [0, 1]^d. Each input keeps its best iterate among those whose ReLU-model
prediction equals the original one (the unperturbed x always qualifies), so the label is kept by
construction and L_e^end ≤ L_e^start; the fraction of iterates that kept the label is reported.

Every function takes the device of its inputs (the model must be on it), draws random numbers
from a seeded ``torch.Generator`` on the CPU (so a seed gives the same draws on every device),
and runs the model in eval mode (restoring its mode afterwards).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from captum.metrics import sensitivity_max
from scipy.stats import rankdata
from torch import nn

from adversarial import _eval_mode

METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
_CAPTUM = {"saliency": Saliency, "input_x_gradient": InputXGradient,
           "integrated_gradients": IntegratedGradients}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected N×C×H×W images, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# explanation maps
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predicted_class(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of the model's output (eval mode), int64 on x's device."""
    with _eval_mode(model):
        return model(x).argmax(dim=1)


def normalise_map(attribution: torch.Tensor) -> torch.Tensor:
    """N×C×H×W attribution → N×H×W map: |·| summed over channels, divided by its sum.

    A map whose attribution is zero everywhere becomes the uniform map 1/(H·W) (no NaN, and no
    NaN in the gradient either: the division only ever sees a positive denominator)."""
    _check_images(attribution, "attribution")
    a = attribution.abs().sum(dim=1)
    total = a.sum(dim=(1, 2), keepdim=True)
    positive = total > 0
    uniform = torch.full_like(a, 1.0 / (a.shape[1] * a.shape[2]))
    return torch.where(positive, a / torch.where(positive, total, torch.ones_like(total)), uniform)


def _default_target(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return predicted_class(model, x)
    target = torch.as_tensor(target, device=x.device, dtype=torch.long)
    return target.expand(len(x)) if target.dim() == 0 else target


def explanation_map(model: nn.Module, x: torch.Tensor, method: str, target=None, n_steps: int = 50,
                    internal_batch_size: int | None = None) -> torch.Tensor:
    """h(x) by captum: N×H×W, each map ≥ 0 and summing to 1, detached, on x's device.

    ``target`` (int or N labels) defaults to the predicted class; ``n_steps`` and
    ``internal_batch_size`` apply to IntegratedGradients (zero baseline, captum's default
    Gauss-Legendre quadrature)."""
    _check_method(method)
    _check_images(x)
    with _eval_mode(model):
        target = _default_target(model, x, target)
        kwargs = {"n_steps": n_steps, "internal_batch_size": internal_batch_size} \
            if method == "integrated_gradients" else {}
        attribution = _CAPTUM[method](model).attribute(x.detach().requires_grad_(True), target=target,
                                                      **kwargs)
    return normalise_map(attribution.detach())


def _attributions(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor,
                  n_steps: int, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw attributions by plain autograd (N×C×H×W) and the logits at x when the forward pass
    computed them (saliency, input×gradient; None for integrated gradients).

    Saliency (Simonyan et al., arXiv 1312.6034): ∂f_c/∂x. Input×gradient: x ⊙ ∂f_c/∂x.
    Integrated gradients (Sundararajan et al., arXiv 1703.01365, Eq. 1, zero baseline):
    x ⊙ ∫_0^1 ∂f_c/∂x(αx) dα, the integral by n_steps-point Gauss-Legendre quadrature on [0, 1]
    (nodes (1+u_i)/2, weights w_i/2 from numpy's ``leggauss``), the rule captum uses by default.
    With ``create_graph`` the result is differentiable with respect to x and the parameters."""
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    if method == "integrated_gradients":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        alphas = torch.as_tensor((nodes + 1) / 2, dtype=x.dtype, device=x.device)
        weights = torch.as_tensor(weights / 2, dtype=x.dtype, device=x.device)
        path = alphas.view(-1, 1, 1, 1, 1) * xg.unsqueeze(0)        # S×N×C×H×W, baseline 0
        out = model(path.flatten(0, 1))
        selected = out.gather(1, target.repeat(n_steps).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, path, create_graph=create_graph)
        return xg * (weights.view(-1, 1, 1, 1, 1) * grad).sum(dim=0), None
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), xg,
                                  create_graph=create_graph)
    return (grad if method == "saliency" else xg * grad), out


def explanation_map_differentiable(model: nn.Module, x: torch.Tensor, method: str, target=None,
                                   n_steps: int = 50, create_graph: bool = True) -> torch.Tensor:
    """h(x) as ``explanation_map`` but by plain autograd, differentiable with respect to x and to
    the parameters when ``create_graph`` (for attack losses and training penalties; captum's
    attribute() detaches its result). Runs the model in the mode it is in."""
    _check_method(method)
    _check_images(x)
    target = _default_target(model, x, target)
    with torch.enable_grad():
        attribution, _ = _attributions(model, x, method, target, n_steps, create_graph)
    return normalise_map(attribution)


def _maps_and_predictions(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor,
                          n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached maps for ``target`` and the predicted labels, sharing one forward pass when the
    method allows (the evaluation step of the attacks; model already in eval mode)."""
    with torch.enable_grad():
        attribution, out = _attributions(model, x, method, target, n_steps, create_graph=False)
    if out is None:
        with torch.no_grad():
            out = model(x)
    return normalise_map(attribution.detach()), out.detach().argmax(dim=1)


# ---------------------------------------------------------------------------------------------
# the softplus-β copy
# ---------------------------------------------------------------------------------------------
def softplus_copy(model: nn.Module, beta: float) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``.

    Only ReLU *modules* are replaced (a functional ``F.relu`` inside a forward() is not seen).
    The copy has its own parameters (equal to the model's) and the model's train/eval mode."""
    if beta <= 0:
        raise ValueError(f"beta: expected > 0, got {beta}")
    net = copy.deepcopy(model)
    if isinstance(net, nn.ReLU):
        return nn.Softplus(beta=beta)
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus(beta=beta))
                replaced += 1
    if not replaced:
        # A model that calls F.relu in forward() would pass through unchanged, and a map attack
        # on it would find zero gradients and report a robust explanation that is not.
        warnings.warn(f"softplus_copy: no nn.ReLU module in {type(model).__name__}; the copy is "
                      "the model itself (a functional relu in forward() is not replaced)", stacklevel=2)
    return net


def set_softplus_beta(net: nn.Module, beta: float) -> None:
    """Set β of every ``nn.Softplus`` in ``net`` in place (the β schedule of the attacks)."""
    for module in net.modules():
        if isinstance(module, nn.Softplus):
            module.beta = float(beta)


def beta_values(beta_schedule, steps: int) -> list[float]:
    """β per step: a number (constant), a pair (β_start, β_end) interpolated geometrically over
    the steps (Dombrowski et al. increase β during the optimisation), or ``steps`` values."""
    if isinstance(beta_schedule, (int, float)):
        values = [float(beta_schedule)] * steps
    elif len(beta_schedule) == 2:  # for steps == 2 this is also the per-step reading
        b0, b1 = map(float, beta_schedule)
        values = [b0 * (b1 / b0) ** (i / max(steps - 1, 1)) for i in range(steps)]
    elif len(beta_schedule) == steps:
        values = [float(b) for b in beta_schedule]
    else:
        raise ValueError(f"beta_schedule: expected a number, (start, end) or {steps} values, "
                         f"got {beta_schedule!r}")
    if any(not (b > 0 and math.isfinite(b)) for b in values):
        raise ValueError(f"beta_schedule: every beta must be finite and > 0, got {beta_schedule!r}")
    return values


# ---------------------------------------------------------------------------------------------
# metrics between maps (all per input: 1-D tensors of length N)
# ---------------------------------------------------------------------------------------------
def map_mse(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of (h1 − h2)²; L_e when h2 is the target's map."""
    return (h1 - h2).pow(2).flatten(1).mean(dim=1)


def topk_intersection(h1: torch.Tensor, h2: torch.Tensor, k: int) -> torch.Tensor:
    """|top_k(h1) ∩ top_k(h2)| / k per input (Ghorbani et al., Sec. 3)."""
    a, b = h1.flatten(1), h2.flatten(1)
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= {a.shape[1]}, got {k}")
    in_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    in_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (in_a & in_b).sum(dim=1).to(h1.dtype) / k


def spearman_maps(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps over their pixels (float64, on h1's
    device): the Pearson correlation of average ranks, as ``scipy.stats.spearmanr``; NaN when a
    map is constant (no ranking to correlate)."""
    r1 = rankdata(h1.detach().flatten(1).double().cpu().numpy(), axis=1)
    r2 = rankdata(h2.detach().flatten(1).double().cpu().numpy(), axis=1)
    r1 -= r1.mean(axis=1, keepdims=True)
    r2 -= r2.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (r1 * r2).sum(1) / np.sqrt((r1 ** 2).sum(1) * (r2 ** 2).sum(1))
    return torch.from_numpy(np.clip(rho, -1.0, 1.0)).to(h1.device)


# ---------------------------------------------------------------------------------------------
# perturbations and sensitivity
# ---------------------------------------------------------------------------------------------
def random_sign_perturbation(x: torch.Tensor, eps: float,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """clip_[0,1](x + ε·s), s uniform in {−1, +1}^d: the random baseline of the same L∞ size
    that every attack metric is reported next to (Ghorbani et al., Sec. 4)."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return (x.detach() + eps * (2 * signs - 1)).clamp(0.0, 1.0)


def perturbation_effect(model: nn.Module, x: torch.Tensor, x_pert: torch.Tensor, method: str,
                        k: int, target_maps: torch.Tensor | None = None,
                        n_steps: int = 50) -> dict[str, torch.Tensor]:
    """What a perturbation x → x_pert did, on the ReLU model, per input: maps of the original
    predicted class before/after, ``topk``, ``spearman``, ``mse`` between them, ``label_kept``,
    and ``l_e`` = MSE(h(x_pert), target_maps) when target maps are given. Applies alike to an
    attack's output and to ``random_sign_perturbation`` (the baseline)."""
    with _eval_mode(model):
        pred = predicted_class(model, x)
        h_before, _ = _maps_and_predictions(model, x, method, pred, n_steps)
        h_after, pred_after = _maps_and_predictions(model, x_pert, method, pred, n_steps)
    result = {"h_before": h_before, "h_after": h_after, "topk": topk_intersection(h_before, h_after, k),
              "spearman": spearman_maps(h_before, h_after), "mse": map_mse(h_before, h_after),
              "label_kept": pred_after == pred}
    if target_maps is not None:
        result["l_e"] = map_mse(h_after, target_maps)
    return result


def sensitivity(model: nn.Module, x: torch.Tensor, method: str, radius: float,
                n_perturb_samples: int = 10, target=None, n_steps: int = 50,
                generator: torch.Generator | None = None, batch_size: int = 100) -> torch.Tensor:
    """Max-sensitivity of h per input (N,), by ``captum.metrics.sensitivity_max`` with the radius
    set explicitly: max over ``n_perturb_samples`` draws δ ~ U[−r, r]^d of
    ‖h(x+δ) − h(x)‖_F / ‖h(x)‖_F, the map always of x's predicted class (``target``).

    The perturbations come from ``generator`` (default: seeded with 0) instead of captum's
    global-RNG default, and x + δ is clipped to [0, 1] (the valid pixel range the other attacks
    also keep). Inputs go through in chunks of ``batch_size``."""
    _check_method(method)
    if not radius >= 0 or n_perturb_samples < 1:
        raise ValueError(f"radius >= 0 and n_perturb_samples >= 1 expected, got {radius}, {n_perturb_samples}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    target = _default_target(model, x, target)

    def explain(inputs, target):  # captum iterates over the result: return a 1-tuple
        xin = inputs[0] if isinstance(inputs, tuple) else inputs
        return (explanation_map(model, xin, method, target=target, n_steps=n_steps),)

    def perturb(inputs, perturb_radius):
        xin = inputs[0] if isinstance(inputs, tuple) else inputs
        noise = torch.rand(xin.shape, generator=generator, dtype=xin.dtype).to(xin.device)
        return (xin + (2 * noise - 1) * perturb_radius).clamp(0.0, 1.0)

    parts = [sensitivity_max(explain, x[s:s + batch_size].detach(), perturb_func=perturb,
                             perturb_radius=radius, n_perturb_samples=n_perturb_samples,
                             target=target[s:s + batch_size])
             for s in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, device=x.device)


# ---------------------------------------------------------------------------------------------
# attacks on explanations
# ---------------------------------------------------------------------------------------------
@dataclass
class TargetedResult:
    """Outcome of ``targeted_attack`` per victim (length-N tensors, maps N×H×W)."""
    x_adv: torch.Tensor
    le_start: torch.Tensor       # MSE(h(x), h(t)) on the ReLU model
    le_end: torch.Tensor         # MSE(h(x_adv), h(t)) on the ReLU model (≤ le_start)
    h_start: torch.Tensor
    h_end: torch.Tensor
    h_target: torch.Tensor
    label_kept: torch.Tensor     # ReLU prediction at x_adv == at x (True by construction; a check)
    output_mse: torch.Tensor     # MSE(softmax f(x_adv), softmax f(x)) on the ReLU model
    kept_fraction: torch.Tensor  # fraction of the iterates whose ReLU prediction kept the label


@dataclass
class TopkResult:
    """Outcome of ``topk_attack`` per input."""
    x_adv: torch.Tensor
    h_before: torch.Tensor
    h_after: torch.Tensor
    topk: torch.Tensor           # top-k intersection of h(x) and h(x_adv) (ReLU model)
    spearman: torch.Tensor       # Spearman rank correlation of h(x) and h(x_adv)
    label_kept: torch.Tensor
    kept_fraction: torch.Tensor


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError("x: expected pixel values in [0, 1]")
    return (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)


def _input_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇_x loss; zero where the loss does not depend on x (e.g. a linear model's saliency)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
    return grad


def _signed_descent(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, h_start: torch.Tensor,
                    objective, score, eps: float, steps: int, step_size: float, beta_schedule,
                    method: str, n_steps: int):
    """The loop both attacks share. Each step differentiates ``objective(h_β, logits_β)`` (a
    per-input loss on the softplus-β copy, maps of class ``pred``) and moves
    x_adv ← Π(x_adv − step_size·sign ∇loss), Π onto {‖x_adv − x‖∞ ≤ ε} ∩ [0, 1]^d. The iterate is
    then evaluated on the ReLU model by ``score(h)`` (per input, lower is better), and each input
    keeps its best iterate among those whose ReLU prediction is still ``pred``, starting from x.
    Returns (x_best, h_best, score_best, fraction of iterates that kept the label)."""
    lower, upper = _box(x.detach(), eps)
    betas = beta_values(beta_schedule, steps)
    net = softplus_copy(model, betas[0] if betas else 1.0).eval()
    net.requires_grad_(False)  # only ∇_x is needed: no parameter gradients are built
    best_x, best_h, best_score = x.detach().clone(), h_start.clone(), score(h_start)
    kept = torch.zeros(len(x), device=x.device)
    x_cur = x.detach().clone()
    for beta in betas:
        set_softplus_beta(net, beta)
        xg = x_cur.clone().requires_grad_(True)
        with torch.enable_grad():
            attribution, logits = _attributions(net, xg, method, pred, n_steps, create_graph=True)
            loss = objective(normalise_map(attribution), logits if logits is not None else net(xg))
            grad = _input_gradient(loss.sum(), xg)
        x_cur = torch.min(torch.max(x_cur - step_size * grad.sign(), lower), upper)
        h_now, pred_now = _maps_and_predictions(model, x_cur, method, pred, n_steps)
        score_now, ok = score(h_now), pred_now == pred
        kept += ok
        better = ok & (score_now < best_score)
        best_x[better], best_h[better], best_score[better] = x_cur[better], h_now[better], score_now[better]
    return best_x, best_h, best_score, kept / max(steps, 1)


def targeted_attack(model: nn.Module, x: torch.Tensor, t: torch.Tensor, eps: float, steps: int = 100,
                    lr: float = 0.01, gamma: float = 1e5, beta_schedule=(10.0, 100.0),
                    method: str = "saliency", n_steps: int = 50) -> TargetedResult:
    """Dombrowski et al.'s targeted manipulation of h(x) toward h(t), victim x[i] → target t[i].

    Loss per input (their Eq. 4 with the output term in probabilities):
        γ·MSE(h_β(x_adv), h(t)) + MSE(softmax f_β(x_adv), softmax f(x)),
    h_β the map of x's predicted class on the softplus-β copy, h(t) the map of t's own
    predicted class on the ReLU model, minimised by signed steps of size ``lr`` within the L∞
    ε-ball and [0, 1]; β follows ``beta_schedule``. Each input keeps its iterate of lowest L_e on
    the ReLU model among those that keep the predicted label (x itself if none does better)."""
    _check_method(method)
    _check_images(x)
    if t.shape != x.shape:
        raise ValueError(f"t: expected the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    with _eval_mode(model):
        with torch.no_grad():
            p_orig = F.softmax(model(x), dim=1)
        pred = p_orig.argmax(dim=1)
        h_target, _ = _maps_and_predictions(model, t, method, predicted_class(model, t), n_steps)
        h_start, _ = _maps_and_predictions(model, x, method, pred, n_steps)

        def objective(h_beta, logits_beta):
            return gamma * map_mse(h_beta, h_target) + (F.softmax(logits_beta, dim=1) - p_orig).pow(2).mean(dim=1)

        x_adv, h_end, le_end, kept = _signed_descent(
            model, x, pred, h_start, objective, lambda h: map_mse(h, h_target), eps, steps, lr,
            beta_schedule, method, n_steps)
        with torch.no_grad():
            p_end = F.softmax(model(x_adv), dim=1)
    return TargetedResult(x_adv=x_adv, le_start=map_mse(h_start, h_target), le_end=le_end,
                          h_start=h_start, h_end=h_end, h_target=h_target,
                          label_kept=p_end.argmax(dim=1) == pred,
                          output_mse=(p_end - p_orig).pow(2).mean(dim=1), kept_fraction=kept)


def topk_attack(model: nn.Module, x: torch.Tensor, k: int, eps: float, steps: int = 100,
                step_size: float = 0.01, beta_schedule=(10.0, 100.0), method: str = "saliency",
                n_steps: int = 50) -> TopkResult:
    """Ghorbani et al.'s untargeted top-k attack (Algorithm 1), keeping the label, within L∞ ε.

    Surrogate D(x_adv) = Σ_{i ∈ B} h_β(x_adv)_i, B the k most important pixels of h(x) on the
    ReLU model and h_β the map (of x's predicted class) on the softplus-β copy, minimised by
    signed steps; each input keeps its iterate of smallest top-k intersection on the ReLU model
    among those that keep the label (Ghorbani et al. also stop at a label change)."""
    _check_method(method)
    _check_images(x)
    with _eval_mode(model):
        pred = predicted_class(model, x)
        h_before, _ = _maps_and_predictions(model, x, method, pred, n_steps)
        top = torch.zeros_like(h_before.flatten(1), dtype=torch.bool)
        top.scatter_(1, h_before.flatten(1).topk(k, dim=1).indices, True)
        x_adv, h_after, topk, kept = _signed_descent(
            model, x, pred, h_before, lambda h_beta, _logits: (h_beta.flatten(1) * top).sum(dim=1),
            lambda h: topk_intersection(h_before, h, k), eps, steps, step_size, beta_schedule,
            method, n_steps)
        label_kept = predicted_class(model, x_adv) == pred
    return TopkResult(x_adv=x_adv, h_before=h_before, h_after=h_after, topk=topk,
                      spearman=spearman_maps(h_before, h_after), label_kept=label_kept,
                      kept_fraction=kept)


# ---------------------------------------------------------------------------------------------
# victim/target pairs for the targeted attack
# ---------------------------------------------------------------------------------------------
def random_pairs(n: int, n_pairs: int, classes, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(victims, targets), int64 of length ``n_pairs``: victims drawn without replacement from
    range(n) (with replacement only when n_pairs > n), each target drawn uniformly among the
    inputs whose class (predicted label, ``classes``) differs from its victim's."""
    classes = (classes.detach().cpu() if torch.is_tensor(classes) else torch.as_tensor(np.asarray(classes))).long()
    if len(classes) != n:
        raise ValueError(f"classes: expected {n} labels, got {len(classes)}")
    if n_pairs < 0 or (n_pairs and len(torch.unique(classes)) < 2):
        raise ValueError("random_pairs: need n_pairs >= 0 and at least two classes")
    if n_pairs <= n:
        victims = torch.randperm(n, generator=generator)[:n_pairs]
    else:
        victims = torch.randint(0, n, (n_pairs,), generator=generator)
    targets = torch.empty_like(victims)
    for i, v in enumerate(victims.tolist()):
        others = torch.nonzero(classes != classes[v]).flatten()
        targets[i] = others[torch.randint(0, len(others), (1,), generator=generator)]
    return victims, targets


def cluster_pairs(activations, n_clusters: int, n_pairs: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(victims, targets) from prototypes of clusters of ``activations`` (N×D, e.g. the
    penultimate activations of one fixed reference model).

    KMeans (scikit-learn, k-means++ with ``n_init=10``, ``random_state=seed``) groups the inputs;
    within each cluster the members are ranked by distance to its centroid (the prototype).
    Pairs are formed rank by rank: at rank r, the r-th nearest member of cluster a is the victim
    and the r-th nearest member of cluster (a + 1 + r mod (K−1)) mod K the target, for a = 0..K−1
    in order (so victim and target always come from different clusters and successive ranks
    pair each cluster with a different partner), until ``n_pairs`` pairs are made."""
    from sklearn.cluster import KMeans

    feats = np.asarray(activations.detach().cpu() if torch.is_tensor(activations) else activations,
                       dtype=np.float64)
    if feats.ndim != 2 or not 2 <= n_clusters <= len(feats):
        raise ValueError(f"cluster_pairs: expected N×D activations and 2 <= n_clusters <= N, "
                         f"got {feats.shape} and {n_clusters}")
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(feats)
    dist = np.linalg.norm(feats - km.cluster_centers_[km.labels_], axis=1)
    ranked = []
    for c in range(n_clusters):
        members = np.flatnonzero(km.labels_ == c)
        ranked.append(members[np.argsort(dist[members], kind="stable")])
    victims, targets = [], []
    for r in range(max(len(m) for m in ranked)):
        for a in range(n_clusters):
            b = (a + 1 + r % (n_clusters - 1)) % n_clusters
            if len(victims) < n_pairs and r < len(ranked[a]) and r < len(ranked[b]):
                victims.append(ranked[a][r])
                targets.append(ranked[b][r])
        if len(victims) >= n_pairs:
            break
    if len(victims) < n_pairs:
        raise ValueError(f"cluster_pairs: only {len(victims)} pairs available, {n_pairs} asked")
    return torch.as_tensor(victims, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)


# =============================================================================================
# the stage
# =============================================================================================
CLASS_MEASURES = {"pgd_accuracy": "PGD-L∞ accuracy", "rho_adv": "ρ_adv"}
EXPL_MEASURES = {"le_end": "L_e^end (targeted attack)", "topk_attack": "top-k intersection after attack",
                 "sensitivity": "max-sensitivity"}
# Larger = more robust for every measure except sensitivity (a larger sensitivity is less robust).


def make_pairs(ctx) -> dict:
    """Victim/target indices into the test split, per pair rule; written once and reused."""
    import artifacts
    from cnnmodel import layer_activations
    from config import config_hash

    cfg, ds = ctx.cfg, ctx.dataset
    keys = ("explanation_pairs", "explanation_n_pairs", "explanation_n_clusters", "seed")
    want = {"dataset_fingerprint": ds.fingerprint, "settings_hash": config_hash(cfg, keys)}
    path = ctx.results / "explanation_pairs.json"
    if path.is_file():
        old = artifacts.load_json(path, ("pairs", "dataset_fingerprint", "settings_hash"))
        if all(old[k] == v for k, v in want.items()):
            return {r: (torch.tensor(p["victims"]), torch.tensor(p["targets"])) for r, p in old["pairs"].items()}
    pairs = {}
    n = len(ds.x_test)
    if "random" in cfg["explanation_pairs"]:
        # classes by the true label, so the pairs do not depend on any model
        v, t = random_pairs(n, cfg["explanation_n_pairs"], ds.y_test, torch.Generator().manual_seed(cfg["seed"]))
        pairs["random"] = (v, t)
    if "cluster" in cfg["explanation_pairs"]:
        # the seed repository's rule: KMeans on the penultimate activations of one fixed reference
        # model (the baseline of the first seed); victims/targets nearest to different prototypes
        ref, _ = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, cfg["seed"], "baseline"), ctx.device)
        acts = layer_activations(ref, ds.x_test, ["penultimate"], cfg["eval_batch_size"], device=ctx.device)
        pairs["cluster"] = cluster_pairs(acts["penultimate"].flatten(1).numpy(), cfg["explanation_n_clusters"],
                                         cfg["explanation_n_pairs"], seed=cfg["seed"])
    artifacts.atomic_write_json(path, {**want, "reference_model": f"baseline seed {cfg['seed']}",
                                       "pairs": {r: {"victims": [int(i) for i in v], "targets": [int(i) for i in t]}
                                                 for r, (v, t) in pairs.items()}})
    return pairs


def measure_model(model: nn.Module, x_in: torch.Tensor, x_test: torch.Tensor, pairs: dict, cfg: dict,
                  seed: int) -> dict:
    """Every explanation measure of one model: per method, per input (sensitivity, top-k attack and
    its random-sign baseline) and per pair (targeted attack and its random-sign baseline)."""
    eps, steps, k = cfg["explanation_eps"], cfg["explanation_steps"], cfg["explanation_topk"]
    beta, n_steps = tuple(cfg["explanation_beta"]), cfg["explanation_n_steps"]
    out = {}
    for method in cfg["explanation_methods"]:
        gen = torch.Generator().manual_seed(seed)
        sens = sensitivity(model, x_in, method, cfg["explanation_sensitivity_radius"],
                           cfg["explanation_sensitivity_samples"], n_steps=n_steps, generator=gen)
        tk = topk_attack(model, x_in, k, eps, steps, cfg["explanation_step_size"], beta, method, n_steps)
        rs = perturbation_effect(model, x_in, random_sign_perturbation(x_in, eps, gen), method, k, n_steps=n_steps)
        per_input = {"sensitivity": sens, "topk_attack": tk.topk, "spearman_attack": tk.spearman,
                     "topk_random_sign": rs["topk"], "spearman_random_sign": rs["spearman"]}
        per_pair = {}
        for rule, (victims, targets) in pairs.items():
            xv, xt = x_test[victims].to(x_in.device), x_test[targets].to(x_in.device)
            ta = targeted_attack(model, xv, xt, eps, steps, cfg["explanation_step_size"], cfg["explanation_gamma"],
                                 beta, method, n_steps)
            rsv = perturbation_effect(model, xv, random_sign_perturbation(xv, eps, gen), method, k,
                                      target_maps=ta.h_target, n_steps=n_steps)
            per_pair[rule] = {"victims": victims.long(), "le_start": ta.le_start, "le_end": ta.le_end,
                              "le_random_sign": rsv["l_e"], "kept_fraction": ta.kept_fraction}
        out[method] = {"per_input": {k2: v.detach().cpu().double().numpy() for k2, v in per_input.items()},
                       "per_pair": {r: {k2: (v.detach().cpu().numpy() if k2 == "victims" else
                                             v.detach().cpu().double().numpy() if torch.is_tensor(v) else v)
                                        for k2, v in d.items()} for r, d in per_pair.items()}}
    return out


def _nanmean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def summarise_model(meas: dict) -> dict:
    """Per method: model-level means of every measure (L_e over the pairs of every rule)."""
    out = {}
    for method, m in meas.items():
        pi, pp = m["per_input"], m["per_pair"]
        row = {name: _nanmean(v) for name, v in pi.items()}
        for key in ("le_start", "le_end", "le_random_sign"):
            row[key] = _nanmean(np.concatenate([d[key] for d in pp.values()])) if pp else math.nan
            for rule, d in pp.items():
                row[f"{key}_{rule}"] = _nanmean(d[key])
        out[method] = row
    return out


def spearman_ci(a, b, level: float = 0.95) -> dict:
    """Spearman's ρ with a Fisher-z interval (standard error √(1.06/(n−3)), Fieller et al. 1957)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = len(a)
    if n < 4 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"rho": math.nan, "ci": [math.nan, math.nan], "pvalue": math.nan, "n": n}
    res = stats.spearmanr(a, b)
    z, half = math.atanh(min(max(res.statistic, -0.999999), 0.999999)), \
        stats.norm.ppf(0.5 + level / 2) * math.sqrt(1.06 / (n - 3))
    return {"rho": float(res.statistic), "ci": [math.tanh(z - half), math.tanh(z + half)],
            "pvalue": float(res.pvalue), "n": n}


def across_models(rows: list[dict], n_perm: int, seed: int, n_boot: int = 2000) -> dict:
    """Spearman and Kendall between a classification and an explanation measure over models, with a
    permutation p-value (two-sided, ``n_perm`` shuffles of one vector) and a percentile bootstrap
    CI over models."""
    from scipy import stats

    a = np.asarray([r[0] for r in rows], np.float64)
    b = np.asarray([r[1] for r in rows], np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = len(a)
    out = {"n_models": n, "spearman": math.nan, "kendall": math.nan, "spearman_perm_p": math.nan,
           "kendall_perm_p": math.nan, "spearman_ci": [math.nan, math.nan], "kendall_ci": [math.nan, math.nan]}
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    rng = np.random.default_rng(seed)
    for name, fn in (("spearman", lambda u, v: stats.spearmanr(u, v).statistic),
                     ("kendall", lambda u, v: stats.kendalltau(u, v).statistic)):
        obs = float(fn(a, b))
        perm = np.array([fn(a, rng.permutation(b)) for _ in range(n_perm)])
        boot = []
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            if np.ptp(a[idx]) > 0 and np.ptp(b[idx]) > 0:
                boot.append(fn(a[idx], b[idx]))
        out[name] = obs
        out[f"{name}_perm_p"] = float((np.sum(np.abs(perm) >= abs(obs) - 1e-12) + 1) / (n_perm + 1))
        out[f"{name}_ci"] = [float(q) for q in np.nanpercentile(boot, [2.5, 97.5])] if boot else [math.nan] * 2
    return out


def compute(ctx) -> dict:
    import artifacts
    from tqdm import tqdm

    cfg, ds, device = ctx.cfg, ctx.dataset, ctx.device
    names, missing = artifacts.trained_variants(cfg)
    rob = artifacts.load_json(ctx.results / "robustness.json", ("variants",), made_by="python robustness.py")
    adv = artifacts.load_json(ctx.results / "adversarial.json", ("per_model",), made_by="python adversarial.py")
    grid = adv["attacks"]["pgd_linf"]["eps"]
    positive = [e for e in grid if e > 0]
    report_eps = min(positive, key=lambda e: (abs(e - cfg["adv_report_eps"]), e)) if positive else 0.0
    j = grid.index(report_eps)
    pairs = make_pairs(ctx)
    n = min(cfg["explanation_n_inputs"], len(ds.x_test))
    x_in = ds.x_test[:n].to(device)
    models, per_input = [], {}
    jobs = [(v, s) for v in names for s in artifacts.model_seeds(cfg)]
    for v, seed in tqdm(jobs, desc="explanation (variant, seed)", disable=None):
        model, meta = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, seed, v), device)
        meas = measure_model(model, x_in, ds.x_test, pairs, cfg, seed)
        radius = _radius(ctx, v, seed)
        pgd = {m["seed"]: m for m in adv["per_model"].get(v, [])}.get(seed)
        rho = dict(zip(rob["variants"][v]["seeds"], rob["variants"][v]["rho_adv"])).get(seed, math.nan)
        row = {"variant": v, "seed": seed, "clean_accuracy": meta.get("test_accuracy"),
               "pgd_accuracy": pgd["attacks"]["pgd_linf"]["accuracy"][j] if pgd else math.nan,
               "rho_adv": rho, "explanation": summarise_model(meas)}
        within = {}
        for method, m in meas.items():
            w = {name: spearman_ci(radius[:n], vals) for name, vals in m["per_input"].items()}
            for rule, d in m["per_pair"].items():
                w[f"le_end_{rule}"] = spearman_ci(radius[np.asarray(d["victims"], dtype=np.int64)], d["le_end"])
            within[method] = w
        row["within_model_vs_radius"] = within
        models.append(row)
        per_input[(v, seed)] = meas
        print(f"[explanation] {v} seed {seed}: " + ", ".join(
            f"{meth} L_e {r['le_start']:.3g}→{r['le_end']:.3g}, top-k {r['topk_attack']:.3f} "
            f"(random sign {r['topk_random_sign']:.3f}), sensitivity {r['sensitivity']:.3g}"
            for meth, r in row["explanation"].items()))
    correlation = []
    for method in cfg["explanation_methods"]:
        for cm in CLASS_MEASURES:
            for em in EXPL_MEASURES:
                rows = [(r[cm], r["explanation"][method][em]) for r in models]
                correlation.append({"method": method, "classification": cm, "explanation": em,
                                    **across_models(rows, cfg["explanation_permutations"], cfg["seed"])})
    return {"report_eps_linf": report_eps, "n_inputs": n, "variants": names, "not_trained": missing,
            "pairs": {r: len(v) for r, (v, _) in pairs.items()}, "models": models,
            "correlation": correlation, "seed_table": seed_table(models, cfg["explanation_methods"][0]),
            "settings": {k: cfg[k] for k in ("explanation_methods", "explanation_eps", "explanation_steps",
                                             "explanation_topk", "explanation_gamma", "explanation_beta",
                                             "explanation_sensitivity_radius")}}


def _radius(ctx, variant: str, seed: int) -> np.ndarray:
    """DeepFool radius per test input of one model (robustness.py's CSV; index = test position)."""
    import csv

    import artifacts

    path = artifacts.variant_dir(ctx.cfg, variant) / "robustness.csv"
    artifacts.require_file(path, "python robustness.py")
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["seed"]) == seed]
    out = np.full(len(ctx.dataset.x_test), np.nan)
    for r in rows:
        out[int(r["index"])] = float(r["radius_l2"])
    return out


def seed_table(models: list[dict], method: str) -> dict:
    """Chen et al.'s table per variant: mean [95% CI] over seeds of L_e^start, L_e^end (×1e7, their
    unit), clean and adversarial accuracy (%)."""
    from metrics import mean_ci

    out = {}
    for v in dict.fromkeys(r["variant"] for r in models):
        rows = [r for r in models if r["variant"] == v]
        out[v] = {"le_start_1e7": mean_ci([1e7 * r["explanation"][method]["le_start"] for r in rows]),
                  "le_end_1e7": mean_ci([1e7 * r["explanation"][method]["le_end"] for r in rows]),
                  "clean_accuracy_pct": mean_ci([100 * r["clean_accuracy"] for r in rows]),
                  "adv_accuracy_pct": mean_ci([100 * r["pgd_accuracy"] for r in rows]), "n_models": len(rows)}
    return out


CHEN_ET_AL_MNIST = (  # their Table (MNIST ConvNet, single runs; L_e in 1e-7), quoted for comparison
    ("normal", 261.2, 204.8, 99.29, 0.00), ("adversarial training", 373.3, 298.7, 99.00, 89.92),
    ("SEP, positive weight", 93.0, 61.5, 98.8, 89.4), ("SEP, negative weight", 806.2, 657.2, 98.97, 90.34))


def explanation_markdown(res: dict) -> str:
    from compare import fmt_ci

    method = res["settings"]["explanation_methods"][0]
    eps = res["report_eps_linf"]
    lines = [f"Explanation map: {method}; attacks within L∞ ε = {res['settings']['explanation_eps']} "
             f"({res['settings']['explanation_steps']} steps), top-k with k = {res['settings']['explanation_topk']}; "
             f"{res['n_inputs']} test inputs, pairs {res['pairs']}. Mean [95% CI] over seeds.", "",
             f"| variant | L_e^start (1e-7) | L_e^end (1e-7) | clean acc % | PGD-L∞ acc % (ε = {eps:g}) | models |",
             "|---|---|---|---|---|---|"]
    for v, t in res["seed_table"].items():
        lines.append(f"| {v} | {fmt_ci(t['le_start_1e7'], 1)} | {fmt_ci(t['le_end_1e7'], 1)} | "
                     f"{fmt_ci(t['clean_accuracy_pct'], 2)} | {fmt_ci(t['adv_accuracy_pct'], 2)} | {t['n_models']} |")
    lines += ["", "Chen et al. (MNIST ConvNet, single runs, their attack settings): " + "; ".join(
        f"{name} {a} → {b}, clean {c}%, adv {d}%" for name, a, b, c, d in CHEN_ET_AL_MNIST) + ".", "",
              "Per model (means over inputs / pairs):", "",
              "| variant | seed | PGD acc | ρ_adv | L_e^start | L_e^end | L_e random sign | top-k attack | top-k random sign "
              "| Spearman attack | sensitivity |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        e = r["explanation"][method]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['pgd_accuracy']:.3f} | {r['rho_adv']:.4f} | "
                     f"{e['le_start']:.3g} | {e['le_end']:.3g} | {e['le_random_sign']:.3g} | {e['topk_attack']:.3f} | "
                     f"{e['topk_random_sign']:.3f} | {e['spearman_attack']:.3f} | {e['sensitivity']:.3g} |")
    lines += ["", f"Across models (n = {len(res['models'])}): rank correlation between classification and explanation "
                  "robustness, permutation p-value, bootstrap 95% CI over models.", "",
              "| method | classification | explanation | Spearman [CI] | perm. p | Kendall [CI] | perm. p |",
              "|---|---|---|---|---|---|---|"]
    for c in res["correlation"]:
        lines.append(f"| {c['method']} | {CLASS_MEASURES[c['classification']]} | {EXPL_MEASURES[c['explanation']]} | "
                     f"{c['spearman']:+.3f} [{c['spearman_ci'][0]:+.3f}, {c['spearman_ci'][1]:+.3f}] | "
                     f"{c['spearman_perm_p']:.3g} | {c['kendall']:+.3f} [{c['kendall_ci'][0]:+.3f}, "
                     f"{c['kendall_ci'][1]:+.3f}] | {c['kendall_perm_p']:.3g} |")
    lines += ["", "Within each model, per input: Spearman between the DeepFool radius and each explanation measure "
                  "(median over models [range of the per-model ρ]):", ""]
    keys = sorted({k for r in res["models"] for k in r["within_model_vs_radius"][method]})
    for key in keys:
        rhos = [r["within_model_vs_radius"][method][key]["rho"] for r in res["models"]]
        rhos = [x for x in rhos if np.isfinite(x)]
        if rhos:
            lines.append(f"- radius vs {key}: median ρ {np.median(rhos):+.3f} [{min(rhos):+.3f}, {max(rhos):+.3f}]")
    return "\n".join(lines) + "\n"


def scatter_plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import artifacts

    method = res["settings"]["explanation_methods"][0]
    variants = list(dict.fromkeys(r["variant"] for r in res["models"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, em in zip(axes, EXPL_MEASURES):
        for i, v in enumerate(variants):
            rows = [r for r in res["models"] if r["variant"] == v]
            ax.scatter([r["pgd_accuracy"] for r in rows], [r["explanation"][method][em] for r in rows],
                       color=f"C{i}", label=v)
        ax.set_xlabel(f"PGD-L∞ accuracy (ε = {res['report_eps_linf']:g})")
        ax.set_title(EXPL_MEASURES[em])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Explanation robustness vs classification robustness, one point per model")
    fig.tight_layout()
    artifacts.atomic_savefig(fig, path)


def write(ctx, res: dict) -> str:
    import artifacts

    artifacts.atomic_write_json(ctx.results / "explanation.json", res)
    artifacts.atomic_write_text(ctx.results / "explanation.md", explanation_markdown(res))
    scatter_plot(res, ctx.results / "explanation.png")
    c = next((c for c in res["correlation"] if c["classification"] == "pgd_accuracy"
              and c["explanation"] == "le_end"), None)
    corr = f"; Spearman(PGD acc, L_e^end) {c['spearman']:+.3f} (perm. p {c['spearman_perm_p']:.3g})" if c else ""
    return f"{len(res['models'])} models{corr} → {ctx.results / 'explanation.md'}"


def main(argv=None) -> int:
    import stage

    return stage.script("explanation", compute, write, "Explanation robustness vs classification robustness.")(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
