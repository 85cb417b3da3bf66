"""Robustness radius of trained models: the DeepFool measurement of every training variant
(DESIGN.md, "Robustness radius"). ``main.py`` runs it right after training; the Makefile runs it as
its own stage, so that changing a DeepFool key does not retrain:

    python robustness.py [--config configs/X.yaml] [--variant NAME|all]

For each test input x: r̂(x) = DeepFool's minimal perturbation for the model's own prediction,
radius_l2 = ‖r̂‖₂ (what the corner-case paper averages) and ρ = ‖r̂‖₂/‖x‖₂ (the DeepFool paper's
ρ_adv = mean ρ over the test set, arXiv 1511.04599 eq. 15). Inputs DeepFool did not flip within
deepfool_max_iter keep the perturbation it reached and are counted in ``nonconverged_fraction``.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

import artifacts
from deepfool import deepfool
from metrics import mean_ci

COLUMNS = ("index", "label", "pred", "radius_l2", "rho", "iterations", "adv_label", "converged")
# Summary fields averaged across models (mean ± 95% t-interval over seeds).
ACROSS_MODEL_FIELDS = ("mean_radius_l2", "median_radius_l2", "rho_adv", "mean_radius_l2_correct",
                       "median_radius_l2_correct", "rho_adv_correct", "nonconverged_fraction",
                       "flipped_fraction", "mean_iterations")


def _mean(v: np.ndarray) -> float:
    return float(np.mean(v)) if len(v) else math.nan


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if len(v) else math.nan


def measure_robustness(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict,
                       device: torch.device | str) -> tuple[dict[str, np.ndarray], dict]:
    """DeepFool radius of the first ``deepfool_n_test`` inputs (0 = all) of ``x`` with labels ``y``.

    Returns per-input records (columns ``COLUMNS``, index = position in ``x``) and a summary.
    """
    if len(x) != len(y):
        raise ValueError(f"x ({len(x)}) and y ({len(y)}) differ in length")
    n = len(x) if cfg["deepfool_n_test"] == 0 else min(cfg["deepfool_n_test"], len(x))
    clip = (0.0, 1.0) if cfg["deepfool_clip"] else None
    batch = cfg["deepfool_batch_size"]
    model = model.to(device)
    parts = {k: [] for k in ("pred", "radius_l2", "rho", "iterations", "adv_label", "converged")}
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch), desc="deepfool", unit="batch", leave=False):
        xb = x[lo:min(lo + batch, n)]
        out = deepfool(model, xb.to(device), num_classes=cfg["deepfool_num_classes"],
                       overshoot=cfg["deepfool_overshoot"], max_iter=cfg["deepfool_max_iter"],
                       clip=clip)
        # Norms in float64 so that ρ does not depend on the summation order of float32.
        radius = out.perturbation.detach().flatten(1).double().norm(dim=1).cpu().numpy()
        norm_x = xb.detach().flatten(1).double().norm(dim=1).cpu().numpy()
        parts["pred"].append(out.orig_label.cpu().numpy())
        parts["radius_l2"].append(radius)
        with np.errstate(divide="ignore", invalid="ignore"):
            parts["rho"].append(radius / norm_x)
        parts["iterations"].append(out.iterations.cpu().numpy())
        parts["adv_label"].append(out.adv_label.cpu().numpy())
        parts["converged"].append(out.converged.cpu().numpy())
    seconds = time.perf_counter() - start

    def cat(key, dtype):
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(0, dtype)

    records = {
        "index": np.arange(n, dtype=np.int64),
        "label": np.asarray(y[:n].cpu() if torch.is_tensor(y) else y[:n]).astype(np.int64),
        "pred": cat("pred", np.int64),
        "radius_l2": cat("radius_l2", np.float64),
        "rho": cat("rho", np.float64),
        "iterations": cat("iterations", np.int64),
        "adv_label": cat("adv_label", np.int64),
        "converged": cat("converged", bool),
    }
    return records, summarize(records, seconds)


def dsa_auroc(model: torch.nn.Module, ds, kept: np.ndarray, cfg: dict, device) -> dict:
    """How well DSA tells this model's wrong test predictions from its right ones (AUROC), with the
    model's own training inputs (``kept``: the variant's subset) as DSA's reference — the measure
    cc_remove.py computes for the baseline models, for any variant. DSA variant and layer are
    ``cc_variant`` and ``cc_layer`` (the ones that rank the corner cases)."""
    from sklearn.metrics import roc_auc_score

    from cnnmodel import layer_activations
    from dif_dsa import dsa

    layer = cfg["cc_layer"]
    sel = torch.from_numpy(np.asarray(kept, dtype=np.int64))
    acts = {split: layer_activations(model, x, [layer], cfg["eval_batch_size"], spatial_mean=True, device=device,
                                     aliases=cfg["layer_aliases"])
            for split, x in (("train", ds.x_train[sel]), ("test", ds.x_test))}
    pred = {split: a["__logits__"].argmax(1).numpy() for split, a in acts.items()}
    labels = {"train": ds.y_train[sel].numpy(), "test": ds.y_test.numpy()}
    groups = pred if cfg["dsa_group_by"] == "pred" else labels
    wrong = pred["test"] != labels["test"]
    out = {"dsa_variant": cfg["cc_variant"], "dsa_layer": layer, "n_train_reference": len(sel),
           "n_test_wrong": int(wrong.sum())}
    ref_classes = set(np.unique(groups["train"]).tolist())
    if len(ref_classes) < 2 or not set(np.unique(groups["test"]).tolist()) <= ref_classes:
        # DSA is undefined (e.g. an untrained model that predicts one class): no AUROC, said why
        return {**out, "dsa_auroc": math.nan,
                "dsa_note": f"DSA undefined: the model's training inputs fall in classes {sorted(ref_classes)}"}
    ref = acts["train"][layer].reshape(len(sel), -1).numpy()
    query = acts["test"][layer].reshape(len(ds.x_test), -1).numpy()
    scores = dsa(query, ref, groups["test"], groups["train"], variant=cfg["cc_variant"], k=cfg["dsa_k"],
                 chunk_size=cfg["dsa_chunk_size"], device=device, progress=False).dsa
    ok = np.isfinite(scores)
    auroc = float(roc_auc_score(wrong[ok], scores[ok])) if 0 < wrong[ok].sum() < ok.sum() else math.nan
    return {**out, "dsa_auroc": auroc}


def summarize(records: dict[str, np.ndarray], seconds: float = math.nan) -> dict:
    """Summary of one model's records: over all inputs and over the correctly classified ones."""
    correct = records["label"] == records["pred"]
    radius, rho = records["radius_l2"], records["rho"]
    n = len(radius)
    return {
        "n": int(n),
        "n_correct": int(correct.sum()),
        "accuracy": _mean(correct.astype(np.float64)),
        "mean_radius_l2": _mean(radius),
        "median_radius_l2": _median(radius),
        "rho_adv": _mean(rho),
        "mean_radius_l2_correct": _mean(radius[correct]),
        "median_radius_l2_correct": _median(radius[correct]),
        "rho_adv_correct": _mean(rho[correct]),
        "nonconverged_fraction": _mean((~records["converged"]).astype(np.float64)),
        "flipped_fraction": _mean((records["adv_label"] != records["pred"]).astype(np.float64)),
        "mean_iterations": _mean(records["iterations"].astype(np.float64)),
        "seconds": float(seconds),
    }


def _check_records(seed: int, records: dict) -> int:
    missing = [c for c in COLUMNS if c not in records]
    if missing:
        raise ValueError(f"per_model: records of seed {seed} lack columns {missing}")
    lengths = {len(records[c]) for c in COLUMNS}
    if len(lengths) != 1:
        raise ValueError(f"per_model: records of seed {seed} have columns of different lengths {lengths}")
    return lengths.pop()


def write_robustness(cfg: dict, tag: str, per_model: list[tuple[int, dict, dict]]) -> dict:
    """Write ``results/<run>/variants/<tag>/robustness.{csv,json,png}`` (``tag``: the variant's name)
    for ``[(seed, records, summary)]`` and return the JSON content."""
    if not per_model:
        raise ValueError("per_model: expected at least one (seed, records, summary)")
    folder = artifacts.variant_dir(cfg, tag)
    lengths = [_check_records(seed, rec) for seed, rec, _ in per_model]

    rows = []
    for (seed, rec, _), n in zip(per_model, lengths):
        for i in range(n):
            rows.append([int(seed)] + [
                int(rec["converged"][i]) if c == "converged" else
                float(rec[c][i]) if c in ("radius_l2", "rho") else int(rec[c][i])
                for c in COLUMNS])
    artifacts.atomic_write_csv(folder / "robustness.csv", ["seed", *COLUMNS], rows)

    result = {
        "run": cfg["name"],
        "variant": tag,
        "deepfool": {k: cfg[k] for k in ("deepfool_num_classes", "deepfool_overshoot",
                                         "deepfool_max_iter", "deepfool_clip", "deepfool_n_test")},
        "models": [{"seed": int(seed), **summary} for seed, _, summary in per_model],
        "across_models": {f: mean_ci([s[f] for _, _, s in per_model]) for f in ACROSS_MODEL_FIELDS
                          if all(f in s for _, _, s in per_model)},
    }
    artifacts.atomic_write_json(folder / "robustness.json", result)
    _plot_histogram(folder / "robustness.png", tag, cfg["name"], per_model)
    return result


def _plot_histogram(path, tag: str, run: str, per_model) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = [np.asarray(rec["radius_l2"], dtype=np.float64) for _, rec, _ in per_model]
    finite = np.concatenate([r[np.isfinite(r)] for r in radii])
    hi = float(finite.max()) if len(finite) else 1.0
    bins = np.linspace(0.0, hi if hi > 0 else 1.0, 41)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (seed, _, summary), r in zip(per_model, radii):
        ax.hist(r[np.isfinite(r)], bins=bins, histtype="step", linewidth=1.2,
                label=f"seed {seed} (mean {summary.get('mean_radius_l2', float('nan')):.3f})")
    ax.set_xlabel("DeepFool robustness radius ‖r̂‖₂")
    ax.set_ylabel("test inputs")
    ax.set_title(f"DeepFool radius, {tag} ({run})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.atomic_savefig(fig, path)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def write_measurements(ctx, measured: dict) -> str:
    """Write each variant's files and merge its summary into ``results/<run>/robustness.json``
    (the index the comparison stage reads)."""
    index_path = ctx.results / "robustness.json"
    index = artifacts.load_json(index_path) if index_path.is_file() else {}
    variants = index.get("variants", {})
    parts = []
    for v, per_model in measured.items():
        res = write_robustness(ctx.cfg, v.name, per_model)
        variants[v.name] = {"across_models": res["across_models"], "deepfool": res["deepfool"],
                            "seeds": [m["seed"] for m in res["models"]],
                            "rho_adv": [m["rho_adv"] for m in res["models"]],
                            "mean_radius_l2": [m["mean_radius_l2"] for m in res["models"]],
                            "dsa_auroc": [m.get("dsa_auroc", math.nan) for m in res["models"]]}
        a = res["across_models"]
        parts.append(f"{v.name} ρ_adv {a['rho_adv']['mean']:.4f}, mean radius {a['mean_radius_l2']['mean']:.4f}, "
                     f"not converged {a['nonconverged_fraction']['mean']:.3f}")
    artifacts.atomic_write_json(index_path, {"run": ctx.cfg["name"], "dataset_fingerprint": ctx.fingerprint,
                                             "variants": dict(sorted(variants.items()))})
    ctx.info["variants"] = [v.name for v in measured]
    return "; ".join(parts)


def measure_trained(ctx, names: list[str] | None = None) -> dict:
    """Measure every planned variant's models (or ``names``'): one unit per (variant, seed)
    (executor.py), each writing its records to a part; returns ``{variant: [(seed, records, summary)]}``
    read back from the parts."""
    import executor
    from variants import parse_variant_name

    targets = [parse_variant_name(n) for n in (names or artifacts.trained_variants(ctx.cfg)[0])]
    pairs = [(v, s) for v in targets for s in artifacts.model_seeds(ctx.cfg)]
    kept = variant_kept(ctx, targets)
    units = [executor.Unit("robustness", v.name, s, measure_unit, {"kept": kept[v.name, s]}) for v, s in pairs]
    executor.require_checkpoints(ctx.cfg, units)
    executor.run_units(ctx, units, "robustness (variant, seed)")
    out = {}
    for (v, s), unit in zip(pairs, units):
        meta, records = executor.read_part(ctx, unit)
        out.setdefault(v, []).append((s, records, meta["summary"]))
    return out


def variant_kept(ctx, targets) -> dict[tuple[str, int], np.ndarray]:
    """The training indices each (variant, seed) model was trained on (main.kept_indices, from
    cc_remove.py's subsets.json when a removal variant is among ``targets``)."""
    from main import kept_indices, load_subsets

    ds = ctx.dataset
    subsets = load_subsets(ctx.cfg, ds) if any(v.rule != "baseline" for v in targets) else None
    hint = str(ctx.results / "subsets.json")
    return {(v.name, s): kept_indices(v, s, subsets, len(ds.x_train), hint)
            for v in targets for s in artifacts.model_seeds(ctx.cfg)}


def measure_unit(ctx, unit) -> None:
    """One unit: the DeepFool radius of one (variant, seed) model on the test split, and DSA's
    AUROC for its wrong predictions against its own training inputs."""
    import executor

    model = executor.load_unit_model(ctx, unit)
    records, summary = measure_robustness(model, ctx.dataset.x_test, ctx.dataset.y_test, ctx.cfg, ctx.device)
    summary.update(dsa_auroc(model, ctx.dataset, unit.args["kept"], ctx.cfg, ctx.device))
    executor.write_part(ctx, unit, {"summary": summary}, **records)


@artifacts.stage_main()
def main(argv=None) -> int:
    import stage
    from config import load_config, stage_parser

    p = stage_parser("DeepFool robustness radius of every trained variant.")
    p.add_argument("--variant", action="append", default=None, metavar="NAME",
                   help="measure only this variant (repeatable); default: every variant of the config")
    args = p.parse_args(argv)
    stage.run("robustness", load_config(args.config, args.set), lambda ctx: measure_trained(ctx, args.variant),
              write_measurements, args)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
