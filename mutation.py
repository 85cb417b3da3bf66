"""Model mutation and the Label Change Rate (LCR) of each input.

    python mutation.py [--config configs/X.yaml] [--set key=value ...]

Wang et al., "Adversarial Sample Detection for Deep Neural Network through Model Mutation Testing"
(ICSE 2019, arXiv 1812.05793): inputs the model gets wrong are less stable under small random
changes of the model's weights. For every model of the run and every (operator, rate γ):

1. draw mutants (seed 0, 1, 2, ...) of the trained model and **accept** a mutant when its validation
   accuracy is ≥ ``mutation_threshold`` × the original's (Wang et al. §IV-B, threshold 0.9), until
   ``n_mutants`` are accepted or ``max_draws`` are drawn (then the stage fails, naming the
   operator, rate and acceptance rate);
2. the **LCR** of input x is the fraction of accepted mutants whose predicted label differs from the
   original model's prediction on x (Wang et al. Eq. 1 / Def. 1).

Operators (Ma et al., "DeepMutation", arXiv 1805.05206, §III-C model-level operators, as used by
Wang et al.; and the filter-level variant of Wu et al., arXiv 1910.00387). Which layers are touched:
the neuron- and weight-level operators (GF, WS, NAI, NS) mutate every Conv2d and Linear layer **except
the output layer**; the filter-level operators (GF_filter, NAI_filter) mutate every Conv2d layer. A
"neuron" of a Linear layer is an output unit (a row of its weight); of a Conv2d layer it is an output
channel, i.e. a filter (with weight sharing, a single spatial neuron cannot be mutated alone — the
reading of Wang et al.'s reference code). Count rule: on a layer of n neurons at rate γ an operator
touches k = round(γ·n) neurons, rounding halves up (⌊γ·n + ½⌋), chosen uniformly without
replacement; GF, which acts on single weights, touches round(γ·m) entries of every parameter tensor
(weight and bias separately) of m entries.

- ``GF``  Gaussian fuzzing: the chosen entries are **redrawn** from N(μ, σ²), μ and σ the mean and
  (population) standard deviation of that parameter tensor. This is Wang et al.'s reference code,
  whose comment notes the departure from DeepMutation's N(w, σ²) around each weight.
- ``WS``  weight shuffling: the incoming weights of each chosen neuron (its weight row, or its whole
  filter for a conv channel) are permuted at random; biases are kept (as in Wang et al.'s code).
- ``NAI`` neuron activation inverse: weight row and bias of each chosen neuron are negated, so its
  pre-activation changes sign (DeepMutation: "invert the activation status").
- ``NS``  neuron switch: the chosen neurons exchange their incoming weights and biases along a random
  cycle (for two neurons, a swap), so each takes another's role for the next layer. A layer where
  k < 2 is left alone: a switch needs two neurons.
- ``NAI_filter`` (Wu et al.): NAI restricted to conv layers; γ is the fraction of filters.
- ``GF_filter`` (Wu et al.): every weight of each chosen filter redrawn from N(μ, σ²) of that
  layer's weight tensor (its bias kept).

A mutant is a function of (operator, γ, mutant seed) only: its random choices come from
``numpy.random.default_rng(mutant seed)``. Mutants are never stored: the JSON file
``model/<run>/mutants_<op>_<γ>_s<model seed>.json`` keeps the accepted seeds and their validation
accuracies, and the mutants are regenerated from them.

Evaluating many mutants (``mutant_predictions``), chosen by measurement: MnistConvNet, 1,000 MNIST
test inputs, NAI γ = 0.01, 100 mutants, 2 CPU cores, ``python bench/bench_mutation.py`` — idle
machine: deep copy + load_state_dict + forward 50.6 s; ``torch.func.functional_call`` (no copy)
25.5 s; the delta propagation below 0.51 s (×99 and ×50 faster). ``torch.func.vmap`` of
functional_call over the stacked parameters of 4 mutants was slower than functional_call one by one
(1.6–2.3 s vs 1.4 s per mutant, machine shared with other jobs): the same FLOPs, plus
batched-weight convolutions, so no gain on CPU. A mutant changes a few rows of a few layers, and a
NamedCNN is a chain of layers, so the original's activations are computed once per input chunk and a mutant
recomputes only what differs: at its first changed layer just the changed output rows/channels
(none at all for NAI and NS — a negated row outputs minus the original's, a switched row its
source's); after it, channel-wise layers (ReLU, pooling) only on the changed channels, and
Conv2d/Linear layers as original output + the layer applied to the input's change (linearity: an
exact identity up to float rounding order; the tests compare with a deep-copy loop). GF changes a
few weights in nearly every row, so it costs about one full forward pass per mutant. Models that are
not a chain of named layers fall back to ``functional_call``.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import artifacts
import stage
from artifacts import ArtifactError, atomic_savez, atomic_write_json, load_json
from config import config_hash

OPERATORS = ("GF", "WS", "NAI", "NS", "GF_filter", "NAI_filter")
FILTER_OPERATORS = ("GF_filter", "NAI_filter")
MUTATION_VERSION = 1  # bump when an operator's random draws change: stored seeds then mean other mutants


class MutationError(RuntimeError):
    """Not enough mutants pass the acceptance test; the message names operator, rate and rate of acceptance."""


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def check_operator(op: str) -> str:
    if op not in OPERATORS:
        raise ValueError(f"operator: unknown mutation operator {op!r}, expected one of {list(OPERATORS)}")
    return op


def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate: mutation rate must be a number in [0, 1], got {rate!r}")
    return float(rate)


def mutation_count(rate: float, n: int) -> int:
    """round(γ·n) with halves rounded up (Python's round() would round 0.5 to 0 and 2.5 to 2)."""
    return min(n, int(math.floor(check_rate(rate) * n + 0.5)))


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: progress True shows the bar, False hides it, None shows it on a terminal."""
    return None if progress is None else not progress


def rate_tag(rate: float) -> str:
    """γ as it appears in file and array names (``f"{rate:g}"``: 0.01 → ``0.01``, 1e-05 → ``1e-05``)."""
    return f"{float(rate):g}"


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------
def _output_layer(model: nn.Module, affine: list[tuple[str, nn.Module]]) -> str:
    resolve = getattr(model, "resolve_layer", None)
    if resolve is not None:
        try:
            return resolve("logits")
        except KeyError:
            pass
    return affine[-1][0]


def mutation_targets(model: nn.Module, op: str) -> list[str]:
    """Names of the modules ``op`` mutates, in registration (= forward, for NamedCNN) order."""
    check_operator(op)
    affine = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not affine:
        raise ValueError("model: no Conv2d or Linear layer to mutate")
    if op in FILTER_OPERATORS:
        return [n for n, m in affine if isinstance(m, nn.Conv2d)]
    output = _output_layer(model, affine)
    return [n for n, _ in affine if n != output]


def _choose(n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k distinct positions in [0, n) in random order (int64). NumPy's sampler without replacement
    avoids a full permutation when k ≪ n (GF on a 3M-weight layer: ``torch.randperm`` was the slow
    part of a mutant)."""
    return torch.from_numpy(rng.choice(n, size=k, replace=False).astype(np.int64))


def _normal_like(t: torch.Tensor, shape, rng: np.random.Generator) -> torch.Tensor:
    """Draws from N(mean(t), std(t)²) (population std), on t's device and dtype."""
    sigma, mu = torch.std_mean(t.float(), correction=0)
    draws = mu.item() + sigma.item() * rng.standard_normal(shape)
    return torch.from_numpy(draws).to(device=t.device, dtype=t.dtype)


@dataclass
class LayerChange:
    """What a mutant changes in one Conv2d/Linear layer: the parameters of some output rows."""

    rows: torch.Tensor                  # sorted indices of the neurons/filters whose parameters change
    weight: torch.Tensor                # their new weight rows
    bias: torch.Tensor | None           # their new bias entries (None: the layer has no bias)
    negated: bool = False               # NAI: new rows = −old rows, so their outputs are −original's
    source: torch.Tensor | None = None  # NS: row rows[j] now holds old row source[j]'s parameters


@torch.no_grad()
def mutation_plan(model: nn.Module, op: str, rate: float, seed: int) -> dict[str, LayerChange]:
    """The changes of mutant (op, rate, seed), per mutated layer name (layers left alone are absent).

    The single source of the operators' random draws: ``mutate`` applies this plan, and the batched
    evaluation reads it to recompute only what changed. All draws come from
    ``numpy.random.default_rng(seed)`` (PCG64: the same stream on every platform), layer by layer
    in ``mutation_targets`` order.
    """
    check_operator(op)
    rate = check_rate(rate)
    rng = np.random.default_rng(int(seed))
    modules = dict(model.named_modules())
    plan: dict[str, LayerChange] = {}
    for name in mutation_targets(model, op):
        layer = modules[name]
        weight = layer.weight.detach()
        bias = layer.bias.detach() if layer.bias is not None else None
        n = weight.shape[0]
        if op == "GF":  # single weights: round(γ·m) entries of each parameter tensor, redrawn
            k_w = mutation_count(rate, weight.numel())
            k_b = mutation_count(rate, bias.numel()) if bias is not None else 0
            if k_w + k_b == 0:
                continue
            w_new, b_new = weight.clone(), None if bias is None else bias.clone()
            changed = torch.zeros(n, dtype=torch.bool)
            if k_w:
                idx = _choose(weight.numel(), k_w, rng)
                w_new.view(-1)[idx.to(weight.device)] = _normal_like(weight, (k_w,), rng)
                changed[idx // (weight.numel() // n)] = True
            if k_b:
                idx = _choose(bias.numel(), k_b, rng)
                b_new[idx.to(bias.device)] = _normal_like(bias, (k_b,), rng)
                changed[idx] = True
            rows = changed.nonzero().squeeze(1).to(weight.device)
            plan[name] = LayerChange(rows, w_new[rows], None if bias is None else b_new[rows])
            continue
        k = mutation_count(rate, n)
        if k == 0 or (op == "NS" and k < 2):
            continue
        idx = _choose(n, k, rng)
        if op in ("NAI", "NAI_filter"):
            rows = idx.sort().values.to(weight.device)
            plan[name] = LayerChange(rows, -weight[rows], None if bias is None else -bias[rows], negated=True)
        elif op == "WS":
            perm = torch.from_numpy(rng.permuted(np.tile(np.arange(weight[0].numel()), (k, 1)), axis=1))
            order = idx.argsort()
            rows, perm = idx[order].to(weight.device), perm[order].to(weight.device)
            shuffled = weight[rows].reshape(k, -1).gather(1, perm).reshape(weight[rows].shape)
            plan[name] = LayerChange(rows, shuffled, None if bias is None else bias[rows])
        elif op == "NS":
            src = idx.roll(1)  # neuron idx[j] takes the role of idx[j-1]: a random cycle over the chosen
            order = idx.argsort()
            rows, src = idx[order].to(weight.device), src[order].to(weight.device)
            plan[name] = LayerChange(rows, weight[src], None if bias is None else bias[src], source=src)
        elif op == "GF_filter":
            rows = idx.sort().values.to(weight.device)
            plan[name] = LayerChange(rows, _normal_like(weight, (k, *weight.shape[1:]), rng),
                                     None if bias is None else bias[rows])
    return plan


@torch.no_grad()
def mutate(model: nn.Module, op: str, rate: float, seed: int) -> dict[str, torch.Tensor]:
    """The mutated parameters of ``model`` as ``{name: tensor}`` (every parameter of the model).

    The model is never modified: a mutated tensor is a new tensor, an untouched one is the model's own
    (detached) parameter — do not write into the returned tensors. Usable with
    ``torch.func.functional_call(model, params, (x,))`` or ``load_state_dict(strict=False)``.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    for name, change in mutation_plan(model, op, rate, seed).items():
        key = f"{name}.weight"
        params[key] = params[key].index_copy(0, change.rows, change.weight)
        if change.bias is not None:
            key = f"{name}.bias"
            params[key] = params[key].index_copy(0, change.rows, change.bias)
    return params


# ---------------------------------------------------------------------------------------------
# evaluating many mutants: delta propagation through a chain of layers
# ---------------------------------------------------------------------------------------------
# Modules that act on each channel (4-d) or feature (2-d) separately: a change confined to some
# channels stays confined to them. Dropout is the identity in eval mode.
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
                nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as an ordered chain of (name, module), when its forward is exactly that chain."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    names = getattr(model, "layer_names", None)
    if names is None or type(model).forward is not _named_cnn_forward():
        return None
    return [(n, getattr(model, n)) for n in names]


def _named_cnn_forward():
    from cnnmodel import NamedCNN

    return NamedCNN.forward


def _apply_affine(mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)


def _densify(state, base: torch.Tensor) -> torch.Tensor:
    idx, vals = state
    return vals if idx is None else base.index_copy(1, idx, vals)


def _new_rows(mod, x_base, y_base, change: LayerChange) -> torch.Tensor:
    """Outputs of the changed rows on the original input. NAI and NS need no arithmetic: a negated
    row's output is minus the original's, a switched row's is the original output of its source row."""
    if change.negated:
        return y_base.index_select(1, change.rows).neg_()
    if change.source is not None:
        return y_base.index_select(1, change.source)
    return _apply_affine(mod, x_base, change.weight, change.bias)


def _affine_step(mod, x_base, y_base, state, change: LayerChange | None):
    """One Conv2d/Linear layer on a mutant. ``state`` is the change of its input: None (same as the
    original), (idx, values of channels idx) or (None, full tensor). Returns the output's state."""
    if state is None:  # same input, changed rows only
        return change.rows, _new_rows(mod, x_base, y_base, change)
    idx, vals = state
    linear_delta = isinstance(mod, nn.Linear) or (mod.groups == 1 and mod.padding_mode == "zeros")
    if idx is None or not linear_delta:
        w, b = mod.weight, mod.bias
        if change is not None:
            w = w.index_copy(0, change.rows, change.weight)
            b = None if b is None else b.index_copy(0, change.rows, change.bias)
        return None, _apply_affine(mod, _densify(state, x_base), w, b)
    # y' = f(x', W', b') = f(x, W', b') + f(x' − x, W', 0): f is linear in x (zero padding). The
    # first term is the original output except on the changed rows; the second only needs the
    # input channels that changed.
    w_cols = mod.weight.index_select(1, idx)
    y = y_base
    if change is not None:
        w_cols = w_cols.index_copy(0, change.rows, change.weight[:, idx])
        y = y.index_copy(1, change.rows, _new_rows(mod, x_base, y_base, change))
    dx = vals - x_base.index_select(1, idx)
    if isinstance(mod, nn.Linear):
        return None, torch.addmm(y, dx, w_cols.t())
    return None, y + _apply_affine(mod, dx, w_cols, None)


def _trace(chain, x: torch.Tensor, start: int) -> list[torch.Tensor | None]:
    """acts[i] = input of layer i (kept from ``start`` on), acts[-1] = the logits."""
    acts: list[torch.Tensor | None] = []
    for i, (_, mod) in enumerate(chain):
        acts.append(x if i >= start else None)
        if getattr(mod, "inplace", False) and i >= start:
            x = x.clone()  # an in-place layer would overwrite the stored activation
        x = mod(x)
    acts.append(x)
    return acts


def _mutant_logits(chain, acts, diffs, start: int) -> torch.Tensor:
    state = None
    for i in range(start, len(chain)):
        name, mod = chain[i]
        diff = diffs.get(name)
        if state is None and diff is None:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            state = _affine_step(mod, acts[i], acts[i + 1], state, diff)
        elif isinstance(mod, _CHANNELWISE):
            state = (state[0], mod(state[1]))
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            idx, vals = state
            if idx is not None and vals.dim() > 2:  # channel c → features c·HW … c·HW + HW − 1
                hw = math.prod(vals.shape[2:])
                idx = (idx[:, None] * hw + torch.arange(hw, device=idx.device)).reshape(-1)
            state = (idx, vals.flatten(1))
        else:  # any other layer: apply it to the whole changed input
            state = (None, mod(_densify(state, acts[i])))
    return acts[-1] if state is None else _densify(state, acts[-1])


def _first_mutable(chain, model: nn.Module, op: str, rate: float) -> int:
    """Index of the first chain layer that can change under (op, rate): nothing before it is kept."""
    targets = set(mutation_targets(model, op))
    for i, (name, mod) in enumerate(chain):
        if name in targets:
            n = mod.weight.numel() if op == "GF" else mod.weight.shape[0]
            k = mutation_count(rate, n)
            if k >= (2 if op == "NS" else 1) or (op == "GF" and mod.bias is not None
                                                   and mutation_count(rate, mod.bias.numel()) > 0):
                return i
    return len(chain)


@torch.no_grad()
def mutant_predictions(model: nn.Module, x: torch.Tensor, op: str, rate: float, seeds: Sequence[int],
                       batch_size: int = 1000, device: torch.device | str | None = None,
                       progress: bool | None = False, desc: str = "mutants") -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels of the original model and of each mutant ``(op, rate, seed)`` on ``x``.

    Returns ``(pred (N,), mutant_pred (M, N))``, int64. Inputs are processed in chunks of
    ``batch_size``; in each chunk the original's activations are computed once and every mutant is
    regenerated from its seed and evaluated by delta propagation (see the module docstring).
    """
    check_operator(op)
    rate = check_rate(rate)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    chain = _chain(model)
    if chain is not None and not set(mutation_targets(model, op)) <= {name for name, _ in chain}:
        chain = None  # a mutated layer nested inside a block: evaluate mutants with functional_call
    n, m = len(x), len(seeds)
    pred = np.empty(n, dtype=np.int64)
    mutant_pred = np.empty((m, n), dtype=np.int64)
    bar = tqdm(total=m * max(1, math.ceil(n / batch_size)), desc=desc, disable=_no_bar(progress), leave=False)
    try:
        start = _first_mutable(chain, model, op, rate) if chain is not None else 0
        for lo in range(0, n, batch_size):
            xb = x[lo:lo + batch_size].to(device)
            if chain is not None:
                acts = _trace(chain, xb, start)
                pred[lo:lo + len(xb)] = acts[-1].argmax(1).cpu().numpy()
            else:
                pred[lo:lo + len(xb)] = model(xb).argmax(1).cpu().numpy()
            for j, seed in enumerate(seeds):
                if chain is not None:
                    logits = _mutant_logits(chain, acts, mutation_plan(model, op, rate, seed), start)
                else:
                    logits = torch.func.functional_call(model, mutate(model, op, rate, seed), (xb,))
                mutant_pred[j, lo:lo + len(xb)] = logits.argmax(1).cpu().numpy()
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return pred, mutant_pred


def label_change_rate(pred: np.ndarray, mutant_pred: np.ndarray) -> np.ndarray:
    """LCR(x) = |{mutants m : m(x) ≠ f(x)}| / |mutants| (Wang et al. Def. 1); NaN with no mutants."""
    pred, mutant_pred = np.asarray(pred), np.asarray(mutant_pred)
    if mutant_pred.ndim != 2 or mutant_pred.shape[1] != pred.shape[0]:
        raise ValueError(f"mutant_pred: expected shape (M, {pred.shape[0]}), got {mutant_pred.shape}")
    if mutant_pred.shape[0] == 0:
        return np.full(pred.shape[0], np.nan)
    return (mutant_pred != pred[None, :]).mean(axis=0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# acceptance (Wang et al. §IV-B: keep mutants whose accuracy stays ≥ 90% of the original's)
# ---------------------------------------------------------------------------------------------
def accept_mutants(model: nn.Module, op: str, rate: float, x_val: torch.Tensor, y_val: torch.Tensor, *,
                   n_mutants: int, max_draws: int, threshold: float = 0.9, batch_size: int = 1000,
                   device: torch.device | str | None = None, progress: bool | None = False,
                   strict: bool = True, return_predictions: bool = False):
    """Draw mutant seeds 0, 1, 2, ... and accept those with val accuracy ≥ threshold × original's.

    Stops at ``n_mutants`` accepted or ``max_draws`` drawn. Returns a record with the accepted
    ``seeds`` and their ``val_accuracy``, ``draws`` (seeds examined up to the last acceptance, or
    ``max_draws``), ``acceptance_rate`` = accepted / draws, ``original_val_accuracy`` and ``complete``.
    With ``strict`` an incomplete search raises MutationError naming operator, rate and acceptance rate.
    With ``return_predictions`` returns ``(record, (pred, mutant_pred))``: the original's and the
    accepted mutants' val predictions, as ``mutant_predictions`` would give them.
    """
    check_operator(op)
    rate = check_rate(rate)
    if n_mutants < 1 or max_draws < 1:
        raise ValueError(f"n_mutants and max_draws must be >= 1, got {n_mutants} and {max_draws}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in (0, 1], got {threshold!r}")
    y = np.asarray(y_val, dtype=np.int64)
    seeds, accs, drawn, original, pred, kept = [], [], 0, None, None, []
    bar = tqdm(total=n_mutants, desc=f"accept {op} γ={rate_tag(rate)}", disable=_no_bar(progress), leave=False)
    while len(seeds) < n_mutants and drawn < max_draws:
        # Evaluate a block of seeds at once (input chunks are traced once per block); the block is
        # sized from the acceptance so far, and seeds past the n-th acceptance are simply unused.
        need = n_mutants - len(seeds)
        rate_so_far = len(seeds) / drawn if drawn else 1.0
        block = min(max_draws - drawn, max(need, math.ceil(need / max(rate_so_far, 0.05))), 256)
        block_seeds = list(range(drawn, drawn + block))
        block_pred, mpred = mutant_predictions(model, x_val, op, rate, block_seeds, batch_size, device)
        if original is None:
            pred = block_pred
            original = float((pred == y).mean())
        for seed, mp in zip(block_seeds, mpred):
            drawn = seed + 1
            acc = float((mp == y).mean())
            if acc >= threshold * original:
                seeds.append(seed)
                accs.append(acc)
                kept.append(mp)
                bar.update(1)
                if len(seeds) == n_mutants:
                    break
    bar.close()
    record = {"operator": op, "rate": rate, "seeds": seeds, "val_accuracy": accs, "draws": drawn,
              "n_accepted": len(seeds), "acceptance_rate": len(seeds) / drawn,
              "original_val_accuracy": original, "threshold": threshold, "n_mutants": n_mutants,
              "max_draws": max_draws, "complete": len(seeds) == n_mutants,
              "mutation_version": MUTATION_VERSION}
    if strict and not record["complete"]:
        raise MutationError(
            f"operator {op} at rate {rate_tag(rate)}: only {len(seeds)}/{n_mutants} mutants accepted in "
            f"{drawn} draws (acceptance rate {record['acceptance_rate']:.1%}, threshold {threshold:g} × "
            f"original val accuracy {original:.4f}); lower the rate or raise max_draws")
    if return_predictions:
        return record, (pred, np.stack(kept) if kept else np.empty((0, len(y)), dtype=np.int64))
    return record


# ---------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------
def mutants_path(cfg: dict, op: str, rate: float, model_seed: int) -> Path:
    return artifacts.model_dir(cfg) / f"mutants_{op}_{rate_tag(rate)}_s{model_seed}.json"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_accepted(path: Path, expect: dict) -> dict | None:
    """The stored record if it exists and matches ``expect`` (fingerprint, threshold, n_mutants,
    checkpoint, operator, rate, version) and is complete; otherwise None (the caller redraws)."""
    if not path.is_file():
        return None
    record = load_json(path, made_by="python mutation.py")
    if any(record.get(k) != v for k, v in expect.items()) or not record.get("complete"):
        return None  # drawn for another model, data, threshold or operator version: redraw
    seeds = record["seeds"]
    if len(seeds) != expect["n_mutants"] or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ArtifactError(f"{path}: expected {expect['n_mutants']} non-negative integer seeds")
    return record


def get_accepted(cfg: dict, model_seed: int, model: nn.Module, op: str, rate: float, x_val, y_val,
                 fingerprint: str, checkpoint_sha: str, device) -> tuple[dict, bool, tuple | None]:
    """The accepted mutants of one (model, op, rate): reused from the JSON file when it matches,
    otherwise drawn and written. Returns ``(record, reused, val_predictions)``; the val predictions
    of a fresh draw (original, accepted mutants) are returned so that val LCR need not redo them."""
    path = mutants_path(cfg, op, rate, model_seed)
    expect = {"operator": op, "rate": float(rate), "dataset_fingerprint": fingerprint,
              "threshold": cfg["mutation_threshold"], "n_mutants": cfg["n_mutants"],
              "model_seed": model_seed, "checkpoint_sha256": checkpoint_sha,
              "mutation_version": MUTATION_VERSION}
    record = load_accepted(path, expect)
    if record is not None:
        return record, True, None
    record, val_predictions = accept_mutants(
        model, op, rate, x_val, y_val, n_mutants=cfg["n_mutants"], max_draws=cfg["max_draws"],
        threshold=cfg["mutation_threshold"], batch_size=cfg["eval_batch_size"], device=device,
        progress=None, return_predictions=True)
    record.update(expect)
    atomic_write_json(path, record)
    return record, False, val_predictions


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run_mutation(cfg: dict, ds, models: list, device) -> dict:
    """Accept mutants for every (model, op, rate), compute LCR on every split in ``lcr_splits``,
    write ``results/<run>/lcr_<split>.npz``. Returns the per-(op, rate) summary."""
    splits = {s: ds.split(s) for s in cfg["lcr_splits"]}
    m = len(models)
    out = {s: {"seeds": np.array([seed for seed, _, _ in models], dtype=np.int64),
               "labels": y.numpy().astype(np.int64),
               "pred": np.empty((m, len(y)), dtype=np.int64)} for s, (_, y) in splits.items()}
    summary = {}
    for i, (model_seed, model, _meta) in enumerate(models):
        ckpt_sha = file_sha256(artifacts.checkpoint_path(cfg, model_seed))
        for op in cfg["mutation_operators"]:
            for rate in cfg["mutation_rates"]:
                tag = f"{op}_{rate_tag(rate)}"
                record, reused, val_predictions = get_accepted(
                    cfg, model_seed, model, op, rate, ds.x_val, ds.y_val, ds.fingerprint, ckpt_sha, device)
                entry = summary.setdefault(tag, {"acceptance_rate": [], "reused": 0})
                entry["acceptance_rate"].append(record["acceptance_rate"])
                entry["reused"] += int(reused)
                for split, (x, _) in splits.items():
                    if split == "val" and val_predictions is not None:
                        pred, mpred = val_predictions
                    else:
                        pred, mpred = mutant_predictions(model, x, op, rate, record["seeds"],
                                                         cfg["eval_batch_size"], device, progress=None,
                                                         desc=f"s{model_seed} {tag} {split}")
                    arrays = out[split]
                    arrays["pred"][i] = pred
                    arrays.setdefault(f"lcr_{tag}", np.empty((m, len(pred))))[i] = label_change_rate(pred, mpred)
                    arrays.setdefault(f"n_accepted_{tag}", np.zeros(m, dtype=np.int64))[i] = len(record["seeds"])
    report = "test" if "test" in out else next(iter(out))
    arrays = out[report]
    correct = arrays["pred"] == arrays["labels"][None, :]
    for tag, entry in summary.items():
        lcr = arrays[f"lcr_{tag}"]
        entry["acceptance_rate"] = float(np.mean(entry["acceptance_rate"]))
        entry[f"mean_lcr_correct_{report}"] = float(lcr[correct].mean()) if correct.any() else math.nan
        entry[f"mean_lcr_wrong_{report}"] = float(lcr[~correct].mean()) if (~correct).any() else math.nan
    return {"arrays": out, "summary": summary, "n_models": m}


def compute(ctx: stage.Context) -> dict:
    models = artifacts.load_models(ctx.cfg, ctx.dataset.fingerprint, device=ctx.device)
    return run_mutation(ctx.cfg, ctx.dataset, models, ctx.device)


def write(ctx: stage.Context, res: dict) -> str:
    cfg = ctx.cfg
    for split, arrays in res["arrays"].items():
        atomic_savez(ctx.results / f"lcr_{split}.npz", **arrays,
                     dataset_fingerprint=np.array(ctx.fingerprint), config_hash=np.array(config_hash(cfg)))
    summary = res["summary"]
    ctx.info["lcr"] = summary
    split = "test" if "test" in cfg["lcr_splits"] else cfg["lcr_splits"][0]
    for tag, entry in summary.items():
        print(f"[mutation] {tag}: acceptance rate {entry['acceptance_rate']:.3f}"
              f"{' (reused)' if entry['reused'] == res['n_models'] else ''}, mean LCR on {split}: "
              f"correct {entry[f'mean_lcr_correct_{split}']:.4f}, wrong {entry[f'mean_lcr_wrong_{split}']:.4f}")
    return (f"{res['n_models']} models, {len(summary)} operator/rate pairs "
            f"→ {ctx.results}/lcr_{{{','.join(cfg['lcr_splits'])}}}.npz")


main = stage.script("mutation", compute, write, __doc__.split("\n\n")[0], (MutationError,))


if __name__ == "__main__":
    sys.exit(main())
