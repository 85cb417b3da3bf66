"""Layer conductance toward the predicted class, as a misprediction signal.

Wu et al. ("Leveraging Model Interpretability and Stability to increase Model Robustness",
arXiv 1910.00387) feed the conductance of a hidden layer's neurons toward the predicted class to a
detector of wrong predictions. Conductance (Dhamdhere et al., "How important is a neuron?",
arXiv 1805.12233, Eq. 2) of hidden unit y_j for input x, baseline x' and output F is

    Cond_j(x) = ∫_0^1 ∂F/∂y_j(x' + α(x − x')) · ∂y_j(x' + α(x − x'))/∂α dα,

computed here with captum's ``LayerConductance``: the path integral is approximated on the
``n_steps + 1`` points of captum's quadrature (Gauss-Legendre by default) as a Riemann-Stieltjes
sum Σ_k ∂F/∂y_j(α_k) · (y_j(α_{k+1}) − y_j(α_k)).

Completeness (Dhamdhere et al., Prop. 1; captum's ``compute_convergence_delta``): summed over all
neurons of the layer, conductance equals F_target(x) − F_target(baseline); captum's ``delta`` is
the gap Σ_j Cond_j − (F_target(x) − F_target(baseline)) of the discrete approximation. It shrinks
as ``n_steps`` grows (for a ReLU network it comes from the kinks the discrete path steps over).

Per-channel features: a conv layer's attributions N×C×H×W are averaged over H×W to N×C (the
spatial treatment of conv activations that DSA also uses); a dense layer's N×D stay as they are.

CLI: ``python conductance.py [--config configs/X.yaml] [--set key=value ...]`` writes
``results/<run>/conductance_<split>.npz`` for every split in ``conductance_splits``: ``seeds`` (M,),
``labels`` (N,), ``pred`` (M, N) int64, ``features`` (M, N, C) float32 per-channel conductance toward
``pred``, ``delta`` (M, N) float64, ``f_diff`` (M, N) float64 = F_pred(x) − F_pred(baseline), and
``layer``, ``dataset_fingerprint``, ``config_hash`` (strings).
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from captum.attr import LayerConductance
from torch import nn
from tqdm import tqdm

import artifacts
import cnnmodel
import stage
from config import config_hash


# ---------------------------------------------------------------------------------------------
# the computation
# ---------------------------------------------------------------------------------------------
def _layer_module(model: nn.Module, layer: str | nn.Module,
                  aliases: dict[str, str] | None = None) -> tuple[nn.Module, bool]:
    """(module, on_input) addressed by ``layer``: a module (its output), or an alias / module name
    resolved by ``cnnmodel.find_layer`` (``aliases`` = config ``layer_aliases``; an inferred
    ``penultimate`` of a user model is the input of its last Linear: ``on_input``)."""
    if isinstance(layer, nn.Module):
        return layer, False
    from cnnmodel import find_layer

    ref = find_layer(model, layer, aliases)
    return ref.module, ref.on_input


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``x`` (CPU float32), in batches, model in eval mode."""
    device = device or next(model.parameters()).device
    parts = [model(x[s:s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def endpoint_difference(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                        baseline: float = 0.0, batch_size: int = 1000,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """F_target(x) − F_target(baseline) per input, with plain forward calls (float64): the total
    that completeness says the layer's conductance sums to."""
    was_training = model.training
    model.eval()
    try:
        fx = predict(model, x, batch_size, device).double()
        fb = predict(model, torch.full_like(x, float(baseline)), batch_size, device).double()
    finally:
        model.train(was_training)
    t = target.long().cpu()[:, None]
    return (fx.gather(1, t) - fb.gather(1, t))[:, 0]


def layer_conductance(model: nn.Module, x: torch.Tensor, layer: str | nn.Module = "last_conv",
                      target: torch.Tensor | int | None = None, baseline: float = 0.0,
                      n_steps: int = 50, internal_batch_size: int = 500,
                      batch_size: int | None = None, device: torch.device | str | None = None,
                      method: str = "gausslegendre", progress: bool = False,
                      aliases: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conductance of every neuron of ``layer`` toward ``target`` for inputs ``x`` (N×C×H×W).

    ``target`` defaults to the model's predicted class. ``baseline`` is a constant pixel value.
    Returns ``(attributions, delta)`` on the CPU: attributions of the layer's output shape
    (N×C×H×W for a conv layer, N×D for a dense one), float32; ``delta`` (N,) float64 is captum's
    convergence delta Σ_j Cond_j − (F_target(x) − F_target(baseline)).

    captum evaluates ``(n_steps + 1) × inputs`` points per call, split into chunks of at most
    ``internal_batch_size``; each chunk evaluates one step more than it advances (conductance
    takes differences of consecutive steps). ``batch_size`` (inputs per captum call) defaults to
    ``internal_batch_size // (n_steps + 1)`` so that each call is exactly one chunk with no
    repeated step. The model is run in eval mode (its previous mode is restored); gradients are
    taken with ``torch.autograd.grad`` so no ``.grad`` is left on the parameters.
    """
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"x: expected a non-empty batch N×..., got shape {tuple(x.shape)}")
    if n_steps < 1:
        raise ValueError(f"n_steps: expected >= 1, got {n_steps}")
    if internal_batch_size < 2:
        raise ValueError(f"internal_batch_size: expected >= 2, got {internal_batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_size is None:
        batch_size = max(1, internal_batch_size // (n_steps + 1))
    module, on_input = _layer_module(model, layer, aliases)
    was_training = model.training
    model.eval()
    try:
        if target is None:
            target = predict(model, x, max(batch_size, 256), device).argmax(1)
        elif isinstance(target, int):
            target = torch.full((len(x),), target, dtype=torch.long)
        target = torch.as_tensor(target).long().cpu()
        if target.shape != (len(x),):
            raise ValueError(f"target: expected {len(x)} labels, got shape {tuple(target.shape)}")
        cond = LayerConductance(model, module)
        attrs, deltas = [], []
        starts = range(0, len(x), batch_size)
        for s in tqdm(starts, desc="conductance", disable=not progress, leave=False):
            xb = x[s:s + batch_size].to(device)
            tb = target[s:s + batch_size].to(device)
            with warnings.catch_warnings():
                # captum warns when internal_batch_size < 2·len(xb); we pass a valid setting or
                # accept its documented fallback (chunks of two steps) for a caller's batch_size.
                warnings.simplefilter("ignore", UserWarning)
                attr, delta = cond.attribute(xb, baselines=float(baseline), target=tb,
                                             attribute_to_layer_input=on_input,
                                             n_steps=n_steps, method=method,
                                             internal_batch_size=internal_batch_size,
                                             return_convergence_delta=True)
            attrs.append(attr.detach().float().cpu())
            deltas.append(delta.detach().double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(attrs), torch.cat(deltas)


def channel_features(attr: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Per-channel conductance: mean over the spatial positions H×W of N×C×H×W → N×C; a dense
    layer's N×D is returned unchanged."""
    if attr.ndim == 4:
        return attr.mean(axis=(2, 3)) if isinstance(attr, np.ndarray) else attr.mean(dim=(2, 3))
    if attr.ndim == 2:
        return attr
    raise ValueError(f"attr: expected N×C×H×W or N×D, got shape {tuple(attr.shape)}")


def delta_summary(delta: np.ndarray, f_diff: np.ndarray) -> dict:
    """Convergence-delta summary: |delta| absolute and relative to |F(x) − F(baseline)|."""
    delta = np.abs(np.asarray(delta, dtype=np.float64)).ravel()
    scale = np.abs(np.asarray(f_diff, dtype=np.float64)).ravel()
    rel = delta / np.maximum(scale, 1e-12)
    return {"median_abs_delta": float(np.median(delta)), "max_abs_delta": float(delta.max()),
            "median_rel_delta": float(np.median(rel)), "max_rel_delta": float(rel.max()),
            "n": int(delta.size)}


MODEL_ARRAYS = ("pred", "features", "delta", "f_diff")  # what conductance_model returns per model


def conductance_model(model: nn.Module, x: torch.Tensor, cfg: dict, device) -> dict[str, np.ndarray]:
    """One model: predictions, per-channel conductance toward the prediction, delta, F(x)−F(x')."""
    model, x = cnnmodel.channels_last(model, x)  # ~13% faster on CPU, same values up to rounding
    p = predict(model, x, cfg["eval_batch_size"], device).argmax(1)
    attr, delta = layer_conductance(
        model, x, cfg["conductance_layer"], target=p, baseline=cfg["conductance_baseline"],
        n_steps=cfg["conductance_n_steps"], internal_batch_size=cfg["conductance_internal_batch_size"],
        device=device, progress=True, aliases=cfg["layer_aliases"])
    return {"pred": p.numpy().astype(np.int64), "features": channel_features(attr).numpy().astype(np.float32),
            "delta": delta.numpy().astype(np.float64),
            "f_diff": endpoint_difference(model, x, p, cfg["conductance_baseline"], cfg["eval_batch_size"],
                                          device).numpy()}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def compute(ctx: stage.Context) -> dict:
    cfg, seeds = ctx.cfg, artifacts.model_seeds(ctx.cfg)
    # fail fast (before loading data) with the missing checkpoint's name
    for seed in seeds:
        path = artifacts.checkpoint_path(cfg, seed, "baseline")
        if not path.is_file():
            raise artifacts.ArtifactError(f"{path}: no trained model (run `python main.py --config ...` first)")
    import executor

    ds = ctx.dataset
    # one unit per model (executor.py: worker processes or Ray); each writes its arrays to a part
    units = [executor.Unit("conductance", "baseline", s, conductance_unit) for s in seeds]
    executor.run_units(ctx, units, "conductance (model)")
    parts = [executor.read_part(ctx, unit)[1] for unit in units]
    out = {"seeds": np.array(seeds, dtype=np.int64), "splits": {}}
    for split in cfg["conductance_splits"]:
        y = getattr(ds, f"y_{split}")
        out["splits"][split] = (np.asarray(y, dtype=np.int64),
                                {k: np.stack([p[f"{split}/{k}"] for p in parts])
                                 for k in MODEL_ARRAYS})
    return out


def conductance_unit(ctx: stage.Context, unit) -> None:
    """One baseline model's conductance on every configured split."""
    import executor

    model = executor.load_unit_model(ctx, unit)
    arrays = {}
    for split in ctx.cfg["conductance_splits"]:
        res = conductance_model(model, getattr(ctx.dataset, f"x_{split}"), ctx.cfg, ctx.device)
        arrays.update({f"{split}/{k}": v for k, v in res.items()})
    executor.write_part(ctx, unit, {}, **arrays)


def write(ctx: stage.Context, res: dict) -> str:
    cfg, out_dir = ctx.cfg, ctx.results
    summary = {}
    for split, (labels, arrays) in res["splits"].items():
        artifacts.atomic_savez(out_dir / f"conductance_{split}.npz", seeds=res["seeds"], labels=labels, **arrays,
                               layer=np.array(cfg["conductance_layer"]),
                               dataset_fingerprint=np.array(ctx.fingerprint),
                               config_hash=np.array(config_hash(cfg)))
        summary[split] = delta_summary(arrays["delta"], arrays["f_diff"])
        s = summary[split]
        print(f"[conductance] {split}: {arrays['features'].shape[0]} models x {arrays['features'].shape[1]} inputs "
              f"x {arrays['features'].shape[2]} channels of {cfg['conductance_layer']}; |delta|/|F(x)-F(x')| "
              f"median {s['median_rel_delta']:.2e}, max {s['max_rel_delta']:.2e}")
    ctx.info.update({"layer": cfg["conductance_layer"], "n_steps": cfg["conductance_n_steps"],
                     "convergence_delta": summary})
    return (f"{len(res['seeds'])} models, splits {cfg['conductance_splits']} "
            f"→ {out_dir}/conductance_{{{','.join(cfg['conductance_splits'])}}}.npz")


# KeyError: an unknown conductance_layer
main = stage.script("conductance", compute, write, __doc__.split("\n\n")[0], (ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
