"""Adversarial evaluation: accuracy under FGSM and PGD, attack success rate, robustness margin and
transferability between the original and the retrained models.

Attacks (inputs in [0, 1], model in eval mode, gradients taken with ``torch.autograd.grad`` so no
``.grad`` is left on the parameters):

- FGSM (Goodfellow et al., arXiv 1412.6572, Eq. 3): x' = clip_[0,1](x + ε·sign(∇_x L(x, y))).
- PGD (Madry et al., arXiv 1706.06083, Eq. 2 and Sec. 5 / their ``mnist_challenge`` code):
  x^{t+1} = Π_{B_ε(x) ∩ [0,1]^d}(x^t + α·s(∇_x L(x^t, y))), with s = sign for L∞ and
  s(g) = g/‖g‖₂ for L2, starting from a uniform random point of the ε-ball (``random_start``).
  The L2 step defaults to 2.5·ε/steps (the step rule of Madry et al.'s ``robustness`` library).
  After the ε-ball projection the point is clipped to [0, 1]; since x ∈ [0, 1], clipping only
  shrinks each coordinate of x' − x, so the result stays in the ball.

L is the cross-entropy of the logits; its sum over the batch is differentiated, so each input's
gradient is its own (the batch size does not change the attack).

Metrics:
- accuracy under attack at each ε of the configured grids (ε = 0 is the clean accuracy). An input
  counts as broken by PGD when any iterate (the random start included) is misclassified, as in
  Croce & Hein's APGD; an input leaves the batch at its first misclassified iterate (``_pgd``:
  early stopping changes no outcome, only the work). Only the PGD-L∞ run at the transfer ε runs
  every input for all steps, since its last iterates are the transfer inputs;
- attack success rate: the fraction of inputs classified correctly before the attack that are
  misclassified after it;
- robustness margin: the smallest ε at which the accuracy drops below ``adv_target_accuracy``
  (None when it never does in the grid). The grid brackets it; ``adv_margin_steps`` bisection steps
  then narrow the bracket per model, to (grid step)/2^steps. A bisection step attacks only the
  inputs whose outcome the bracket leaves open — those robust at its low end and broken at its high
  end — assuming, as minimal-ε searches do, that an input broken at ε is broken at every larger ε;
  the grid's accuracies are computed on every input as before.
- transferability: PGD-L∞ inputs crafted on the model of one variant and seed, evaluated on the
  model of every variant with the same seed (a source × target matrix over the variants).

CLI: ``python adversarial.py [--config configs/X.yaml] [--set key=value ...]`` evaluates every
trained variant of the config and writes ``results/<run>/adversarial.{json,csv,png}`` and
``transfer.json``.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import artifacts
import cnnmodel
import stage
from config import ConfigError
from metrics import mean_ci

# ε (L∞) of the transferability matrix: the grid value of ``adv_eps_linf`` nearest to this.
# 0.1 suits MNIST; a config key (``adv_transfer_eps``) would let CIFAR-10 runs choose e.g. 8/255.
TRANSFER_EPS_LINF = 0.1



# ---------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------
@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    if x.dim() < 2 or len(x) != len(y):
        raise ValueError(f"x, y: expected N×... inputs and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x: expected pixel values in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]")


def _per_input_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input, shaped N×1×...×1 for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (L∞): clip_[0,1](x + eps·sign(∇_x CE(model(x), y)))."""
    _check_inputs(x, y, eps)
    if eps == 0:
        return x.detach().clone()
    with _eval_mode(model):
        grad = _logits_and_gradient(model, x, y)[1]
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def _uniform_noise(shape, generator, device, dtype) -> torch.Tensor:
    """U[0, 1) drawn on the CPU (so a seeded generator gives the same start on every device)."""
    return torch.rand(shape, generator=generator, dtype=dtype).to(device)


def _logits_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at ``x`` and ∇_x of the summed cross-entropy (one forward, one backward)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


def _pgd(model: nn.Module, y: torch.Tensor, x_start: torch.Tensor, steps: int, update: Callable,
         early_stop: bool, final_check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PGD loop: ``steps`` times, x ← update(x, ∇_x L, rows). Returns ``(x_adv, fooled)``, where
    ``fooled`` marks the inputs misclassified at any iterate, the start and (``final_check``) the
    last one included; without ``final_check`` and ``early_stop`` it is None.

    ``early_stop``: an input leaves the batch at its first misclassified iterate and is returned
    there. Since the loss gradient of one input does not depend on the others, the inputs that stay
    follow the same path as without early stopping, so ``fooled`` is the same either way; only the
    points returned for fooled inputs differ (first vs last iterate). Counting an input as broken
    when any iterate is misclassified is the convention of Croce & Hein's APGD (AutoAttack, arXiv
    2003.01690), which returns the best adversarial point found rather than the last iterate."""
    x_adv = x_start.clone()
    track = early_stop or final_check
    fooled = torch.zeros(len(y), dtype=torch.bool, device=y.device) if track else None
    rows = torch.arange(len(y), device=y.device) if early_stop else slice(None)
    with _eval_mode(model):
        for _ in range(steps):
            if early_stop:
                rows = rows[~fooled[rows]]
                if not len(rows):
                    break
            logits, grad = _logits_and_gradient(model, x_adv[rows], y[rows])
            if track:
                wrong = logits.argmax(1) != y[rows]
                fooled[rows] |= wrong
            if early_stop:  # the fooled ones stay at this iterate
                rows, grad = rows[~wrong], grad[~wrong]
            x_adv[rows] = update(x_adv[rows], grad, rows)
        if final_check and (not early_stop or len(rows)):
            with torch.no_grad():
                fooled[rows] |= model(x_adv[rows]).argmax(1) != y[rows]
    return x_adv.detach(), fooled


def _pgd_linf(model, x, y, eps, steps=40, step_size=0.01, random_start=True, generator=None, early_stop=False,
              final_check=True):
    _check_inputs(x, y, eps)
    if steps < 0 or step_size < 0:
        raise ValueError(f"steps, step_size: expected >= 0, got {steps}, {step_size}")
    x0 = x.detach()
    if eps == 0:
        return x0.clone(), _misclassified(model, x0, y)
    lower, upper = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    if random_start:
        noise = (2 * _uniform_noise(x0.shape, generator, x0.device, x0.dtype) - 1) * eps
        x_start = torch.min(torch.max(x0 + noise, lower), upper)
    else:
        x_start = x0
    return _pgd(model, y, x_start, steps,
                lambda xa, g, rows: torch.min(torch.max(xa + step_size * g.sign(), lower[rows]), upper[rows]),
                early_stop, final_check)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40,
             step_size: float = 0.01, random_start: bool = True,
             generator: torch.Generator | None = None, early_stop: bool = False) -> torch.Tensor:
    """PGD in the L∞ ball (Madry et al. 2018): ``steps`` signed-gradient steps of ``step_size``,
    each followed by projection onto {‖x' − x‖∞ ≤ eps} ∩ [0, 1]^d. ``early_stop``: an input stops
    at its first misclassified iterate (see ``_pgd``)."""
    return _pgd_linf(model, x, y, eps, steps, step_size, random_start, generator, early_stop, False)[0]


def _project_l2(x_adv: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L2 ball of radius eps around x0, then clip to [0, 1]."""
    delta = x_adv - x0
    scale = (eps / _per_input_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    return (x0 + delta * scale).clamp(0.0, 1.0)


def _pgd_l2(model, x, y, eps, steps=40, step_size=None, random_start=True, generator=None, early_stop=False,
            final_check=True):
    _check_inputs(x, y, eps)
    if steps < 0:
        raise ValueError(f"steps: expected >= 0, got {steps}")
    x0 = x.detach()
    if eps == 0:
        return x0.clone(), _misclassified(model, x0, y)
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    if step_size < 0:
        raise ValueError(f"step_size: expected >= 0, got {step_size}")
    if random_start:
        d = x0[0].numel()
        direction = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        direction = direction / _per_input_norm(direction).clamp(min=1e-12)
        radius = eps * _uniform_noise((len(x0),), generator, x0.device, x0.dtype) ** (1.0 / d)
        x_start = _project_l2(x0 + direction * radius.view(-1, *([1] * (x0.dim() - 1))), x0, eps)
    else:
        x_start = x0

    def update(xa, g, rows):
        g = g / _per_input_norm(g).clamp(min=1e-12)  # a zero gradient makes no step
        return _project_l2(xa + step_size * g, x0[rows], eps)

    return _pgd(model, y, x_start, steps, update, early_stop, final_check)


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40,
           step_size: float | None = None, random_start: bool = True,
           generator: torch.Generator | None = None, early_stop: bool = False) -> torch.Tensor:
    """PGD in the L2 ball: ``steps`` normalised-gradient steps g/‖g‖₂ of ``step_size``
    (default 2.5·eps/steps), each followed by projection onto {‖x' − x‖₂ ≤ eps} and [0, 1]^d.
    The random start is uniform in the ball: a Gaussian direction and radius eps·U^(1/d).
    ``early_stop``: an input stops at its first misclassified iterate (see ``_pgd``)."""
    return _pgd_l2(model, x, y, eps, steps, step_size, random_start, generator, early_stop, False)[0]


@torch.no_grad()
def _misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with _eval_mode(model):
        return model(x).argmax(1) != y


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def success_rate(clean_correct, adv_correct) -> float:
    """Fraction of the inputs classified correctly before the attack that are wrong after it
    (NaN when no input was correct before)."""
    clean = np.asarray(clean_correct).astype(np.bool_).ravel()
    adv = np.asarray(adv_correct).astype(np.bool_).ravel()
    if clean.shape != adv.shape:
        raise ValueError(f"clean_correct ({clean.size}) and adv_correct ({adv.size}) differ in length")
    if not clean.any():
        return math.nan
    return float(np.mean(~adv[clean]))


def robustness_margin(eps_grid, accuracies, target: float) -> float | None:
    """Smallest ε of the grid at which the accuracy is below ``target``; None if it never is."""
    eps = np.asarray(eps_grid, dtype=np.float64).ravel()
    acc = np.asarray(accuracies, dtype=np.float64).ravel()
    if eps.shape != acc.shape:
        raise ValueError(f"eps_grid ({eps.size}) and accuracies ({acc.size}) differ in length")
    below = eps[acc < target]
    return float(below.min()) if below.size else None


# ---------------------------------------------------------------------------------------------
# evaluation of one model
# ---------------------------------------------------------------------------------------------
ATTACKS = ("fgsm", "pgd_linf", "pgd_l2")
NORMS = {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2"}


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> np.ndarray:
    with _eval_mode(model):
        parts = [model(x[s:s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


def make_attack(name: str, cfg: dict, early_stop: bool = True) -> Callable:
    """The attack ``name`` with the config's PGD settings: ``f(model, x, y, eps, generator)`` →
    ``(x_adv, fooled)``, ``fooled`` marking the inputs misclassified at any PGD iterate (FGSM: at
    ``x_adv``). ``early_stop``: PGD stops each input at its first misclassified iterate (the same
    ``fooled``, less work; ``_pgd``)."""
    if name == "fgsm":
        def attack(model, x, y, eps, generator=None):
            x_adv = fgsm(model, x, y, eps)
            return x_adv, _misclassified(model, x_adv, y)
        return attack
    if name == "pgd_linf":
        return lambda model, x, y, eps, generator=None: _pgd_linf(
            model, x, y, eps, cfg["pgd_steps"], cfg["pgd_step_size"], cfg["pgd_random_start"], generator,
            early_stop)
    if name == "pgd_l2":
        return lambda model, x, y, eps, generator=None: _pgd_l2(
            model, x, y, eps, cfg["pgd_steps"], cfg["pgd_l2_step_factor"] * eps / cfg["pgd_steps"],
            cfg["pgd_random_start"], generator, early_stop)
    raise ValueError(f"attack: unknown {name!r}; expected one of {list(ATTACKS)}")


def run_attack(model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor, eps: float,
               batch_size: int, device, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(x_adv, fooled)`` for all of ``x`` (CPU tensor, boolean array), in batches; random starts
    drawn from a generator seeded with ``seed``, so a (model seed, attack, ε) always gets the same
    start."""
    generator = torch.Generator().manual_seed(seed)
    out, fooled = [], []
    for s in range(0, len(x), batch_size):
        x_adv, f = attack(model, x[s:s + batch_size].to(device), y[s:s + batch_size].to(device), eps,
                          generator=generator)
        out.append(x_adv.cpu())
        fooled.append(f.cpu())
    if not out:
        return x.clone(), np.zeros(0, dtype=np.bool_)
    return torch.cat(out), torch.cat(fooled).numpy()


def grids(cfg: dict) -> dict[str, list[float]]:
    return {"fgsm": list(cfg["adv_eps_linf"]), "pgd_linf": list(cfg["adv_eps_linf"]),
            "pgd_l2": list(cfg["adv_eps_l2"])}


def transfer_eps(eps_grid, wanted: float = TRANSFER_EPS_LINF) -> float | None:
    """The positive grid value nearest to ``wanted`` (config ``adv_transfer_eps``; None if the
    grid has no positive value)."""
    positive = [e for e in eps_grid if e > 0]
    return min(positive, key=lambda e: (abs(e - wanted), e)) if positive else None


def refine_margin(model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor, target: float,
                  lo: float, hi: float, robust_lo: np.ndarray, robust_hi: np.ndarray, steps: int,
                  batch_size: int, device, seed: int) -> dict:
    """Bisection on ε between ``lo`` (accuracy ≥ target) and ``hi`` (accuracy < target).

    ``robust_lo``/``robust_hi``: per input, correct under the attack at lo / hi. Only the inputs
    robust at lo and broken at hi are attacked at the midpoint (monotonicity in ε, see the module
    docstring). Returns the final bracket, the margin (its high end: the smallest ε found with
    accuracy below the target) and every (ε, accuracy) evaluated."""
    evaluations, attacked = [], 0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        robust_mid = robust_hi.copy()
        open_ = np.flatnonzero(robust_lo & ~robust_hi)
        if len(open_):
            sel = torch.from_numpy(open_)
            _, fooled = run_attack(model, attack, x[sel], y[sel], mid, batch_size, device, seed)
            robust_mid[open_] = ~fooled
            attacked += len(open_)
        acc = float(robust_mid.mean())
        evaluations.append([mid, acc])
        if acc < target:
            hi, robust_hi = mid, robust_mid
        else:
            lo, robust_lo = mid, robust_mid
    return {"margin": hi, "bracket": [lo, hi], "evaluations": evaluations, "inputs_attacked": attacked}


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict, device, seed: int,
                   keep_eps: float | None = None, desc: str = "") -> tuple[dict, torch.Tensor | None]:
    """Accuracy and success rate of every attack at every ε, plus the robustness margins (refined by
    bisection, ``adv_margin_steps``). Returns ``(result, x_adv)`` with the PGD-L∞ inputs at
    ``keep_eps`` (for transferability)."""
    y_np = y.numpy()
    clean_correct = predict_labels(model, x, cfg["eval_batch_size"], device) == y_np
    result = {"seed": seed, "n": int(len(y_np)), "clean_accuracy": float(clean_correct.mean()), "attacks": {}}
    kept = None
    correct_at: dict[tuple[str, float], np.ndarray] = {}
    jobs = [(a, e) for a, grid in grids(cfg).items() for e in grid]
    per_attack = {a: {"eps": grids(cfg)[a], "accuracy": [], "success_rate": []} for a in ATTACKS}
    for name, eps in tqdm(jobs, desc=desc or f"attacks s{seed}", leave=False):
        if eps == 0:  # every attack is the identity at ε = 0
            adv_correct = clean_correct
        else:
            # the transfer inputs are PGD's last iterates (no early stop); accuracy counts an input as
            # broken when any iterate is misclassified, with or without early stopping
            keep = name == "pgd_linf" and keep_eps is not None and eps == keep_eps
            x_adv, fooled = run_attack(model, make_attack(name, cfg, early_stop=not keep), x, y, eps,
                                       cfg["eval_batch_size"], device, seed)
            adv_correct = ~fooled
            if keep:
                kept = x_adv
        correct_at[(name, eps)] = adv_correct
        per_attack[name]["accuracy"].append(float(adv_correct.mean()))
        per_attack[name]["success_rate"].append(success_rate(clean_correct, adv_correct))
    target = cfg["adv_target_accuracy"]
    for name, entry in per_attack.items():
        grid_margin = robustness_margin(entry["eps"], entry["accuracy"], target)
        entry["robustness_margin_grid"] = grid_margin
        entry["robustness_margin"] = grid_margin
        entry["margin_bracket"] = None
        eps_sorted = sorted(entry["eps"])
        if grid_margin is not None and grid_margin > 0 and cfg["adv_margin_steps"] > 0:
            below = [e for e in eps_sorted if e < grid_margin]
            lo = below[-1] if below else 0.0
            robust_lo = correct_at.get((name, lo), clean_correct if lo == 0 else None)
            if robust_lo is not None and float(robust_lo.mean()) >= target:
                ref = refine_margin(model, make_attack(name, cfg), x, y, target, lo, grid_margin, robust_lo,
                                    correct_at[(name, grid_margin)], cfg["adv_margin_steps"],
                                    cfg["eval_batch_size"], device, seed)
                entry["robustness_margin"] = ref["margin"]
                entry["margin_bracket"] = ref["bracket"]
                entry["margin_evaluations"] = ref["evaluations"]
                entry["margin_inputs_attacked"] = ref["inputs_attacked"]
        result["attacks"][name] = entry
    return result, kept


# ---------------------------------------------------------------------------------------------
# aggregation and outputs
# ---------------------------------------------------------------------------------------------
def _nan_if_none(v):
    return math.nan if v is None else v


def summarise(per_model: dict[str, list[dict]], cfg: dict) -> dict:
    """Means with 95% intervals over models, per variant, attack and ε (paired comparisons between
    variants are compare.py's)."""
    summary = {}
    for variant, results in per_model.items():
        out = {"clean_accuracy": accuracy_ci([r["clean_accuracy"] for r in results], results)}
        for name in ATTACKS:
            acc = np.array([r["attacks"][name]["accuracy"] for r in results])
            sr = np.array([r["attacks"][name]["success_rate"] for r in results], dtype=np.float64)
            margins = [r["attacks"][name]["robustness_margin"] for r in results]
            out[name] = {"eps": grids(cfg)[name],
                         "accuracy": [accuracy_ci(acc[:, j], results) for j in range(acc.shape[1])],
                         "success_rate": [mean_ci(sr[:, j]) for j in range(sr.shape[1])],
                         "robustness_margin": mean_ci([_nan_if_none(m) for m in margins]),
                         "n_models_without_margin": sum(m is None for m in margins)}
        summary[variant] = out
    return {"per_variant": summary}


def accuracy_ci(values, results: list[dict]) -> dict:
    """Mean accuracy over models with an interval inside [0, 1] (metrics.proportion_ci)."""
    try:
        from metrics import proportion_ci
    except ImportError:  # pragma: no cover - older metrics.py
        return mean_ci(values)
    n = [r["n"] for r in results]
    return proportion_ci([int(round(v * m)) for v, m in zip(values, n)], n)


def transfer_matrix(models: dict[str, dict[int, nn.Module]], adv: dict[str, dict[int, torch.Tensor]],
                    y: torch.Tensor, batch_size: int, device) -> dict:
    """Accuracy of each target kind's model on the PGD-L∞ inputs crafted on the source kind's
    model of the same seed: per seed and averaged over seeds (rows = source, columns = target)."""
    kinds = [k for k in models if k in adv and adv[k]]
    y_np = y.numpy()
    per_seed = {}
    for seed in sorted(set.intersection(*(set(adv[k]) for k in kinds))):
        per_seed[seed] = {src: {tgt: float((predict_labels(models[tgt][seed], adv[src][seed], batch_size,
                                                            device) == y_np).mean())
                                for tgt in kinds} for src in kinds}
    mean = {src: {tgt: mean_ci([per_seed[s][src][tgt] for s in per_seed]) for tgt in kinds}
            for src in kinds}
    matrix = [[mean[src][tgt]["mean"] for tgt in kinds] for src in kinds]
    return {"kinds": kinds, "matrix_mean_accuracy": matrix, "mean": mean,
            "per_seed": {str(s): v for s, v in per_seed.items()}}


def csv_rows(per_model: dict[str, list[dict]]):
    for variant, results in per_model.items():
        for r in results:
            for name in ATTACKS:
                entry = r["attacks"][name]
                for eps, acc, sr in zip(entry["eps"], entry["accuracy"], entry["success_rate"]):
                    yield [variant, r["seed"], name, NORMS[name], float(eps), float(acc), float(sr)]


def plot(summary: dict, cfg: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"fgsm": "FGSM (L∞)", "pgd_linf": "PGD (L∞)", "pgd_l2": "PGD (L2)"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes, ATTACKS):
        for i, (variant, block) in enumerate(summary["per_variant"].items()):
            colour = f"C{i % 10}"
            entry = block[name]
            eps = entry["eps"]
            mean = [c["mean"] for c in entry["accuracy"]]
            ax.plot(eps, mean, "o-", color=colour, label=f"{variant} (n={entry['accuracy'][0]['n']})")
            ax.fill_between(eps, [c["ci_low"] for c in entry["accuracy"]],
                            [c["ci_high"] for c in entry["accuracy"]], color=colour, alpha=0.2)
        ax.axhline(cfg["adv_target_accuracy"], color="grey", ls="--", lw=0.8)
        ax.set_title(titles[name])
        ax.set_xlabel("ε (" + ("L∞" if NORMS[name] == "linf" else "L2") + ")")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean, 95% CI over models)")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    artifacts.atomic_savefig(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _check_config(cfg: dict) -> None:
    for key in ("adv_eps_linf", "adv_eps_l2"):
        if not cfg[key] or any(e < 0 for e in cfg[key]):
            raise ConfigError(f"config: key {key!r} must be a non-empty list of eps >= 0, got {cfg[key]!r}")
    for key in ("pgd_step_size", "pgd_l2_step_factor"):
        if cfg[key] <= 0:
            raise ConfigError(f"config: key {key!r} must be > 0, got {cfg[key]!r}")


def compute(ctx: stage.Context) -> dict:
    """One unit per (variant, seed) (executor.py) attacks its model and writes a part: its results and
    its PGD-L∞ inputs at the transfer ε; the transfer matrix needs every variant's model and inputs of
    a seed, so it is computed here, from those parts."""
    import executor

    cfg = ctx.cfg
    _check_config(cfg)
    seeds = artifacts.model_seeds(cfg)
    # fail fast, before loading data, with the name of a missing baseline checkpoint
    for seed in seeds:
        path = artifacts.checkpoint_path(cfg, seed, "baseline")
        if not path.is_file():
            raise artifacts.ArtifactError(f"{path}: no trained model (run `python main.py --config ...` first)")
    variants, missing = artifacts.trained_variants(cfg)
    ds, device = ctx.dataset, ctx.device
    n = cfg["adv_n_test"] or len(ds.x_test)
    y = ds.y_test[:n]
    t_eps = transfer_eps(cfg["adv_eps_linf"], cfg["adv_transfer_eps"])
    units = [executor.Unit("adversarial", v, s, evaluate_unit) for v in variants for s in seeds]
    executor.run_units(ctx, units, "adversarial (variant, seed)")
    per_model, adv = {}, {}
    for unit in units:
        meta, arrays = executor.read_part(ctx, unit)
        per_model.setdefault(unit.variant, []).append(meta["result"])
        if "x_adv" in arrays:
            adv.setdefault(unit.variant, {})[unit.seed] = torch.from_numpy(arrays["x_adv"])
    summary = summarise(per_model, cfg)
    transfer = {"eps_linf": t_eps, "attack": "pgd_linf", "n_test": int(n)}
    if t_eps is not None:
        models = {v: {s: m for s, m, _ in artifacts.load_models(cfg, ds.fingerprint, v, device)} for v in variants}
        transfer.update(transfer_matrix(models, adv, y, cfg["eval_batch_size"], device))
    return {
        "n_test": int(n), "variants": variants, "not_trained": missing,
        "target_accuracy": cfg["adv_target_accuracy"], "margin_steps": cfg["adv_margin_steps"],
        "attacks": {a: {"norm": NORMS[a], "eps": grids(cfg)[a]} for a in ATTACKS},
        "pgd": {"steps": cfg["pgd_steps"], "step_size_linf": cfg["pgd_step_size"],
                "l2_step_factor": cfg["pgd_l2_step_factor"], "random_start": cfg["pgd_random_start"]},
        "dataset_fingerprint": ds.fingerprint,
        "per_model": per_model, **summary, "transfer": transfer,
    }


def evaluate_unit(ctx: stage.Context, unit) -> None:
    """One unit: every attack at every ε on one (variant, seed) model, with its robustness margins."""
    import executor

    cfg, ds = ctx.cfg, ctx.dataset
    n = cfg["adv_n_test"] or len(ds.x_test)
    t_eps = transfer_eps(cfg["adv_eps_linf"], cfg["adv_transfer_eps"])
    # channels-last: the same attack, ~25% less time on CPU (cnnmodel.channels_last)
    model, x = cnnmodel.channels_last(executor.load_unit_model(ctx, unit), ds.x_test[:n])
    result, kept = evaluate_model(model, x, ds.y_test[:n], cfg, ctx.device, unit.seed, t_eps,
                                  desc=f"{unit.variant} s{unit.seed}")
    print(f"[adversarial] {unit.variant} seed {unit.seed}: clean {result['clean_accuracy']:.4f}, " + ", ".join(
        f"{a} margin {_fmt_margin(result['attacks'][a]['robustness_margin'])}" for a in ATTACKS))
    executor.write_part(ctx, unit, {"result": result},
                        **({} if kept is None else {"x_adv": kept.contiguous().numpy()}))


def _fmt_margin(m) -> str:
    return "none" if m is None else f"{m:.4g}"


def write(ctx: stage.Context, report: dict) -> str:
    out = ctx.results
    artifacts.atomic_write_json(out / "adversarial.json", report)
    artifacts.atomic_write_csv(out / "adversarial.csv",
                               ["variant", "seed", "attack", "norm", "eps", "accuracy", "success_rate"],
                               csv_rows(report["per_model"]))
    plot(report, ctx.cfg, out / "adversarial.png")
    artifacts.atomic_write_json(out / "transfer.json", report["transfer"])
    margins = {v: {a: report["per_variant"][v][a]["robustness_margin"]["mean"] for a in ATTACKS}
               for v in report["variants"]}
    ctx.info.update({"variants": report["variants"], "n_test": report["n_test"],
                     "transfer_eps_linf": report["transfer"]["eps_linf"], "mean_robustness_margin": margins})
    missing = f" (not trained, skipped: {', '.join(report['not_trained'])})" if report["not_trained"] else ""
    return (f"{len(report['variants'])} variant(s) × {ctx.cfg['n_models']} models, {report['n_test']} inputs; "
            "PGD-L∞ margin " + ", ".join(f"{v} {margins[v]['pgd_linf']:.4g}" for v in report["variants"])
            + f"{missing} → {out / 'adversarial.json'}")


main = stage.script("adversarial", compute, write, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
