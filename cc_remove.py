"""Corner cases: DSA on the training and test data, corner-case AUROC, removal list.

    python cc_remove.py [--config configs/default.yaml] [--set key=value ...]

Ouyang et al. describe corner cases with distance-based surprise adequacy (DSA, Kim et al. ICSE 2019,
arXiv 1808.08444): an input whose activation lies closer to another class than to its own is
surprising. For every trained model this stage

1. computes DSA of every training input against the training set with the input itself excluded
   (the original code let each point be its own nearest neighbour), and of every test input
   against the training set, for each configured variant and layer;
2. scores DSA as a detector of wrong predictions on test (AUROC with a bootstrap 95% CI);
3. pools the models' top-``dsa_top`` training inputs by DSA (the paper's pooling over models) and
   ranks every training input by it: the first N are the corner cases of dose N;
4. chooses the removed inputs of every removal variant of the config (variants.py: corner cases,
   random control drawn afresh per seed, least surprising, class-matched random) at every dose;
5. writes ``dsa_{train,test}.npz``, ``corner_cases.{json,png}``, ``dsa_hist.png``, ``subsets.json``
   (every variant's removed indices per seed, with the random draws' seeds) and ``kept_indices.json``
   (the seed workflow's kept indices: corner cases at ``remove_count``).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

import stage
from artifacts import atomic_savefig, atomic_savez, atomic_write_json, load_models, model_seeds
from cnnmodel import layer_activations
from config import config_hash
from dif_dsa import dsa
from metrics import auroc_ci
from variants import Variant, plan, removal_sets, seed_workflow_count


def array_key(kind: str, variant: str, layer: str) -> str:
    """Name of an array in dsa_<split>.npz, e.g. ``dsa_sadl_penultimate``."""
    return f"{kind}_{variant}_{layer}"


def model_dsa(model, ds, cfg: dict, device) -> dict:
    """DSA of train (self-excluded) and test against train for one model, every variant and layer."""
    layers = cfg["dsa_layers"]
    acts = {split: layer_activations(model, ds.split(split)[0], layers, cfg["eval_batch_size"],
                                     spatial_mean=True, device=device, aliases=cfg["layer_aliases"])
            for split in ("train", "test")}
    pred = {split: acts[split]["__logits__"].argmax(1).numpy() for split in acts}
    labels = {"train": ds.y_train.numpy(), "test": ds.y_test.numpy()}
    groups = pred if cfg["dsa_group_by"] == "pred" else labels
    out = {"pred": pred, "arrays": {"train": {}, "test": {}}}
    n_train = len(ds.x_train)
    for layer in layers:
        ref = acts["train"][layer].reshape(n_train, -1).numpy()
        for variant in cfg["dsa_variants"]:
            for split in ("train", "test"):
                query = acts[split][layer].reshape(len(groups[split]), -1).numpy()
                res = dsa(query, ref, groups[split], groups["train"], variant=variant, k=cfg["dsa_k"],
                          self_index=np.arange(n_train) if split == "train" else None,
                          chunk_size=cfg["dsa_chunk_size"], device=device, progress=False)
                arrays = out["arrays"][split]
                arrays[array_key("dsa", variant, layer)] = res.dsa
                arrays[array_key("dist_a", variant, layer)] = res.dist_a
                arrays[array_key("dist_b", variant, layer)] = res.dist_b
    return out


def choose_corner_cases(train_dsa: np.ndarray, top: int, n_remove: int) -> dict:
    """Pool the models' top-``top`` DSA sets (M × N_train scores) and rank training inputs by how
    many models put them there; ties broken by mean DSA rank across models (higher DSA first).

    Returns the removed indices (most frequent first), their frequency and the thresholds.
    """
    m, n = train_dsa.shape
    if not 0 < n_remove < n:
        raise ValueError(f"remove_count must be in [1, {n - 1}] for {n} training inputs, got {n_remove}")
    top = min(top, n)
    # rank 0 = highest DSA of that model; stable sort so equal DSA keep index order
    order = np.argsort(-train_dsa, axis=1, kind="stable")
    ranks = np.empty_like(order)
    ranks[np.arange(m)[:, None], order] = np.arange(n)[None, :]
    frequency = (ranks < top).sum(axis=0)
    mean_rank = ranks.mean(axis=0)
    ranking = np.lexsort((np.arange(n), mean_rank, -frequency))
    chosen = ranking[:n_remove]
    per_model_threshold = np.sort(train_dsa, axis=1)[:, n - top]
    return {"removed": chosen, "ranking": ranking, "frequency": frequency, "mean_rank": mean_rank,
            "per_model_threshold": per_model_threshold,
            "min_frequency_removed": int(frequency[chosen].min())}


def compute(ctx: stage.Context) -> dict:
    cfg, ds, device = ctx.cfg, ctx.dataset, ctx.device
    models = load_models(cfg, ds.fingerprint, "baseline", device)
    seeds = [seed for seed, _, _ in models]
    per_model = [model_dsa(model, ds, cfg, device)
                 for _, model, _ in tqdm(models, desc="DSA per model", disable=None)]

    # stack per-model arrays: M × N
    stacked = {split: {key: np.stack([pm["arrays"][split][key] for pm in per_model])
                       for key in per_model[0]["arrays"][split]} for split in ("train", "test")}
    preds = {split: np.stack([pm["pred"][split] for pm in per_model]) for split in ("train", "test")}
    labels = {"train": ds.y_train.numpy(), "test": ds.y_test.numpy()}

    # corner-case AUROC: does DSA tell wrong test predictions from right ones?
    auroc_table = []
    for layer in cfg["dsa_layers"]:
        for variant in cfg["dsa_variants"]:
            key = array_key("dsa", variant, layer)
            for i, seed in enumerate(seeds):
                wrong = preds["test"][i] != labels["test"]
                res = auroc_ci(wrong, stacked["test"][key][i], cfg["bootstrap"], seed=seed)
                auroc_table.append({"variant": variant, "layer": layer, "seed": seed, **res})

    # corner cases: pooled top-DSA training inputs; every removal variant's subsets
    n_train = len(ds.x_train)
    cc_key = array_key("dsa", cfg["cc_variant"], cfg["cc_layer"])
    seed_variant = Variant("corner_cases", seed_workflow_count(cfg, n_train))
    chosen = choose_corner_cases(stacked["train"][cc_key], cfg["dsa_top"], seed_variant.n_remove)
    variants = plan(cfg, n_train)
    subsets = removal_sets(variants + [seed_variant], model_seeds(cfg), n_train, labels["train"],
                           chosen["ranking"])
    return {"seeds": seeds, "stacked": stacked, "preds": preds, "labels": labels, "auroc": auroc_table,
            "chosen": chosen, "cc_key": cc_key, "seed_variant": seed_variant, "subsets": subsets,
            "variants": variants}


def write(ctx: stage.Context, res: dict) -> str:
    cfg, ds, rdir = ctx.cfg, ctx.dataset, ctx.results
    seeds, stacked, preds, labels = res["seeds"], res["stacked"], res["preds"], res["labels"]
    for split in ("train", "test"):
        atomic_savez(rdir / f"dsa_{split}.npz", seeds=np.asarray(seeds, dtype=np.int64), labels=labels[split],
                     pred=preds[split].astype(np.int64), **stacked[split])
    chosen, cc_key = res["chosen"], res["cc_key"]
    removed = chosen["removed"]
    kept = np.setdiff1d(np.arange(len(ds.x_train)), removed)
    removed_rows = [{"index": int(i), "pool_index": int(ds.train_index[i]), "label": int(labels["train"][i]),
                     "pred": [int(p) for p in preds["train"][:, i]], "frequency": int(chosen["frequency"][i]),
                     "mean_rank": float(chosen["mean_rank"][i]),
                     "mean_dsa": float(stacked["train"][cc_key][:, i].mean())} for i in removed]
    summary = {
        "dataset_fingerprint": ds.fingerprint, "config_hash": config_hash(cfg), "seeds": seeds,
        "variant": cfg["cc_variant"], "layer": cfg["cc_layer"], "group_by": cfg["dsa_group_by"],
        "dsa_top": cfg["dsa_top"], "n_train": len(ds.x_train), "n_removed": len(removed),
        "threshold": {"min_frequency_removed": chosen["min_frequency_removed"], "n_models": len(seeds),
                      "per_model_top_dsa_threshold": chosen["per_model_threshold"].tolist()},
        "auroc": res["auroc"], "auroc_summary": summarise_auroc(res["auroc"]),
        "removed": removed_rows,
    }
    atomic_write_json(rdir / "corner_cases.json", summary)
    atomic_write_json(rdir / "subsets.json", {
        "dataset_fingerprint": ds.fingerprint, "n_train": len(ds.x_train), "config_hash": config_hash(cfg),
        "is_retrain_variant": res["seed_variant"].name, "variants": [v.name for v in res["variants"]],
        "surprise_ranking": chosen["ranking"].tolist(), "subsets": res["subsets"], "made_by": "cc_remove.py"})
    atomic_write_json(rdir / "kept_indices.json", {
        "indices": kept.tolist(), "n_train": len(ds.x_train), "n_kept": len(kept),
        "removed": sorted(int(i) for i in removed), "dataset_fingerprint": ds.fingerprint,
        "config_hash": config_hash(cfg), "made_by": "cc_remove.py"})
    corner_case_grid(ds.x_train[torch.from_numpy(removed[:40])], removed_rows[:40], rdir / "corner_cases.png")
    dsa_histogram(stacked["test"][cc_key], preds["test"] != labels["test"][None, :], cfg, rdir / "dsa_hist.png")
    ctx.info.update({"n_removed": len(removed), "subsets": sorted(res["subsets"])})
    aurocs = "; ".join(f"DSA {r['variant']}/{r['layer']} AUROC {r['auroc']['mean']:.3f} "
                       f"[{r['auroc']['ci_low']:.3f}, {r['auroc']['ci_high']:.3f}]" for r in summary["auroc_summary"])
    return (f"{aurocs}; removal sets for {len(res['subsets'])} subset(s); corner cases removed for "
            f"-is_retrain: {len(removed)} of {len(ds.x_train)} → {rdir / 'subsets.json'}")


def summarise_auroc(table: list[dict]) -> list[dict]:
    """Mean AUROC over models per (variant, layer), with the range of the per-model intervals."""
    from metrics import unit_interval_ci

    out = []
    for variant, layer in sorted({(r["variant"], r["layer"]) for r in table}):
        rows = [r for r in table if r["variant"] == variant and r["layer"] == layer]
        out.append({"variant": variant, "layer": layer, "auroc": unit_interval_ci([r["auroc"] for r in rows]),
                    "aupr": unit_interval_ci([r["aupr"] for r in rows]), "n_models": len(rows),
                    "n_wrong_mean": float(np.mean([r["n_positive"] for r in rows]))})
    return out


def corner_case_grid(images: torch.Tensor, rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = 8
    nrows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 1.5, nrows * 1.75), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, row in zip(axes.ravel(), images, rows):
        pic = img.permute(1, 2, 0).numpy()
        ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"y={row['label']} p={row['pred'][0]}\nDSA {row['mean_dsa']:.2f} ×{row['frequency']}",
                     fontsize=7)
    fig.suptitle("Removed corner cases (most frequent first): label y, model-1 prediction p, "
                 "mean DSA, models with it in their top set", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)


def dsa_histogram(test_dsa: np.ndarray, wrong: np.ndarray, cfg: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, float(np.percentile(test_dsa, 99.5)) * 1.05 + 1e-12, 50)
    ax.hist(test_dsa[~wrong], bins=bins, alpha=0.6, density=True, label=f"correct (n={int((~wrong).sum())})")
    ax.hist(test_dsa[wrong], bins=bins, alpha=0.6, density=True, label=f"wrong (n={int(wrong.sum())})")
    ax.set_xlabel(f"DSA ({cfg['cc_variant']}, {cfg['cc_layer']})")
    ax.set_ylabel("density")
    ax.set_title("Test DSA of correct vs wrong predictions (all models pooled)")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)


main = stage.script("cc_remove", compute, write, "DSA corner cases: score, pool over models, choose removals.")


if __name__ == "__main__":
    sys.exit(main())
