"""Training regimes: the loss of one mini-batch under standard, PGD adversarial or SEP training.

- ``standard``: cross-entropy of the logits, exactly ``nn.CrossEntropyLoss()(model(xb), yb)``.
- ``pgd_at`` (Madry et al., arXiv 1706.06083, Eq. 2.1): cross-entropy on PGD-L∞ examples, i.e. the
  inner maximisation max_{‖δ‖∞ ≤ ε} L(θ, x + δ, y) approximated by ``adversarial.pgd_linf`` from a
  random start in the ball. The examples are crafted with the model in eval mode (dropout off, so
  the attack sees the function being evaluated; ``pgd_linf`` restores the mode), and the loss is
  then taken in the caller's mode (train).
- ``sep`` (the explanation-smoothness penalty of Chen et al., arXiv 2403.06013): the base loss
  (``standard`` or ``pgd_at``, setting ``sep_base``) plus
      reg_weight · mean_i ‖h(x_i + σξ_i) − h(x_i)‖²,  ξ_i ~ N(0, I),
  h the differentiable explanation map (explanation.py: |attribution| of the clean input's
  predicted class, summed over channels, normalised to sum 1), the squared L2 norm over pixels.
  Positive reg_weight flattens the explanation's input landscape, negative sharpens it. Because
  maps sum to 1, ‖h − h'‖² ≤ 2: a negative weight cannot drive the loss to −∞. The penalty is
  taken on the clean batch also when the base is pgd_at.

  Which network's map: **the model itself (ReLU), with create_graph=True**, not a softplus copy.
  The penalty's gradient is taken with respect to the *parameters*: for a fixed input a ReLU
  net's input gradient is a product of weight matrices masked by the activation pattern, which
  is differentiable in θ almost everywhere, so double backpropagation gives the exact gradient of
  the penalty of the network being trained. (The softplus trick is needed only for ∇_x of a
  map, which is zero a.e. for ReLU nets — the attacks' problem, not this one; and a deep-copied
  softplus net would not share the parameters being trained.)
  The maps are computed in eval mode (dropout off): with dropout on, h(x) and h(x + σξ) would
  see different masks and the penalty would measure dropout noise, not input smoothness; eval
  mode also draws nothing from the global RNG (tested), so the dropout masks of the base loss
  are those the base regime would draw. ξ comes from ``generator`` (on the CPU). With
  reg_weight = 0 the penalty is not computed and no ξ is drawn: the parameter updates are bit for
  bit those of the base regime (tested, for both bases).

``settings`` is the resolved config (a plain dict); the keys read here are ``REGIME_KEYS``, with
their defaults in ``config.DEFAULTS`` (a key missing from ``settings`` takes that default).
Why the defaults: pgd_at_eps 0.1 — Madry et al.'s 0.3 stayed at chance loss (2.30, 46% clean
accuracy) for 3 epochs on the 3,500-image split while 0.1 reached 97% clean (measured);
sep_reg_weight 2e3 ≈ CE/penalty of the MNIST ConvNet at initialisation (saliency, σ 0.1), so the
penalty starts as large as the cross-entropy; a negative weight needs |w| far smaller (the penalty
can grow to ~0.1-1 and then outweighs the cross-entropy): −100 kept accuracy, −2e3 collapsed.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adversarial import _eval_mode, pgd_linf
from config import DEFAULTS
from stage import REGIME_KEYS as REGIME_SETTINGS
from explanation import explanation_map_differentiable, predicted_class

REGIMES = ("standard", "pgd_at", "sep")
SEP_METHODS = ("saliency", "input_x_gradient")

# The settings read here: their defaults and comments live in config.DEFAULTS (one table for
# every key); the training stage declares the same names (stage.REGIME_KEYS).
REGIME_KEYS = REGIME_SETTINGS


class RegimeLoss(NamedTuple):
    loss: torch.Tensor              # the scalar to backpropagate
    logits: torch.Tensor            # logits the cross-entropy used (adversarial ones for pgd_at)
    penalty: torch.Tensor | None    # SEP: mean ‖h(x+σξ) − h(x)‖², detached; None otherwise
                                    # (and None for SEP with reg_weight 0: not computed)


def _setting(settings: dict, key: str) -> Any:
    return settings.get(key, DEFAULTS[key][0])


def pgd_at_examples(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, settings: dict,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Madry et al.'s training examples: PGD-L∞ from a random start, crafted in eval mode."""
    eps, steps = float(_setting(settings, "pgd_at_eps")), int(_setting(settings, "pgd_at_steps"))
    step_size = float(_setting(settings, "pgd_at_step_size")) or 2.5 * eps / max(steps, 1)
    return pgd_linf(model, xb, yb, eps, steps=steps, step_size=step_size, random_start=True,
                    generator=generator)


def sep_penalty(model: nn.Module, xb: torch.Tensor, sigma: float, method: str,
                generator: torch.Generator | None) -> torch.Tensor:
    """mean_i ‖h(x_i + σξ_i) − h(x_i)‖² (differentiable in the parameters), both maps of x_i's
    predicted class, computed in eval mode with the model's own (ReLU) input gradients."""
    if method not in SEP_METHODS:
        raise ValueError(f"sep_explanation_method: expected one of {list(SEP_METHODS)}, got {method!r}")
    # x + σξ is not clipped to [0, 1]: the penalty is the literal ‖h(x + σξ) − h(x)‖² (as in
    # SmoothGrad's noisy copies, Smilkov et al. arXiv 1706.03825), defined for any input.
    noise = torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
    with _eval_mode(model):
        target = predicted_class(model, xb)
        maps = explanation_map_differentiable(model, torch.cat([xb, xb + sigma * noise]), method,
                                              target.repeat(2), create_graph=True)
    h_clean, h_noisy = maps.chunk(2)
    return (h_noisy - h_clean).pow(2).flatten(1).sum(dim=1).mean()


def training_loss(regime: str, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                  settings: dict, generator: torch.Generator | None = None) -> RegimeLoss:
    """The loss of one mini-batch under ``regime`` (standard | pgd_at | sep); see the module
    docstring. The model stays in the mode the caller put it in (train) for the loss itself."""
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {list(REGIMES)}, got {regime!r}")
    base = _setting(settings, "sep_base") if regime == "sep" else regime
    if base not in ("standard", "pgd_at"):
        raise ValueError(f"sep_base: expected standard or pgd_at, got {base!r}")
    x_fit = pgd_at_examples(model, xb, yb, settings, generator) if base == "pgd_at" else xb
    logits = model(x_fit)
    loss = F.cross_entropy(logits, yb)
    if regime != "sep":
        return RegimeLoss(loss, logits, None)
    reg_weight = float(_setting(settings, "sep_reg_weight"))
    method = _setting(settings, "sep_explanation_method")
    if method not in SEP_METHODS:  # checked here too, so a zero weight does not hide a typo
        raise ValueError(f"sep_explanation_method: expected one of {list(SEP_METHODS)}, got {method!r}")
    if reg_weight == 0.0:
        # Nothing to add: skip the (≈6× a standard step) penalty and draw no ξ, so the generator
        # stream — PGD-AT's random starts — and hence the parameters match the base regime's.
        return RegimeLoss(loss, logits, None)
    penalty = sep_penalty(model, xb, float(_setting(settings, "sep_sigma")), method, generator)
    return RegimeLoss(loss + reg_weight * penalty, logits, penalty.detach())
