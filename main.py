"""Train the CNNs, evaluate them, and measure their DeepFool robustness radius.

    python main.py [--config configs/default.yaml] [--set key=value ...]   # train n_models originals
    python main.py -is_retrain True                                        # retrain without corner cases

Original run: trains ``n_models`` models (seeds seed, seed+1, ...) on the training split, evaluates
on test, saves ``model/<run>/cnn_s<seed>.pt`` and ``results/<run>/train.json``, then measures the
DeepFool robustness radius of every model (``results/<run>/robustness_original.*``).

Retraining (``-is_retrain True``): the same seeds, trained on the training inputs listed in
``results/<run>/kept_indices.json`` (written by ``cc_remove.py``), measured the same way
(``robustness_retrained.*``), and compared with the originals (``compare.{json,md,png}``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from artifacts import (ArtifactError, atomic_savefig, atomic_write_json, atomic_write_text,
                       checkpoint_path, load_json, model_seeds, results_dir, save_checkpoint,
                       set_seed, stage_main, update_manifest, versions)
from cnnmodel import build_model, predict
from config import (TRAINING_KEYS, config_hash, load_stage_config,
                    resolve_device, stage_parser)
from mnistload import Dataset, load_dataset
from metrics import mean_ci, paired_difference


CHECKPOINT_KIND = {"original": "cnn", "retrained": "retrained"}  # model/<run>/<kind>_s<seed>.pt
TRAIN_SUMMARY = {"original": "train.json", "retrained": "train_retrained.json"}


def str2bool(text: str) -> bool:
    """``True``/``False`` (any case, also yes/no/1/0); ``-is_retrain False`` really means false."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y"):
        return True
    if value in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = stage_parser(__doc__.split("\n\n")[0])
    # The seed repository's flags; each overrides the config key of the same name when given.
    p.add_argument("-batch_size", type=int, help="mini-batch size (config key batch_size)")
    p.add_argument("-learning_rate", type=float, help="Adam learning rate (config key learning_rate)")
    p.add_argument("-n_classes", type=int, help="number of classes (config key n_classes)")
    p.add_argument("-num_epochs", type=int, help="training epochs (config key num_epochs)")
    p.add_argument("-is_retrain", type=str2bool, default=False, metavar="True|False",
                   help="retrain on results/<run>/kept_indices.json instead of the full training set")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    overrides = list(args.set)
    for key in ("batch_size", "learning_rate", "n_classes", "num_epochs"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_stage_config(argparse.Namespace(config=args.config, set=overrides))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_model(cfg: dict, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                seed: int, device: torch.device, desc: str = "") -> tuple[nn.Module, list[dict]]:
    """Adam on cross-entropy; mini-batches drawn by a generator seeded with ``seed``.

    Same config, data and seed ⇒ the same parameters bit for bit on CPU.
    """
    set_seed(seed)
    model = build_model(cfg["arch"], cfg["n_classes"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    history = []
    n, bs = len(x), cfg["batch_size"]
    for epoch in range(1, cfg["num_epochs"] + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"{desc} epoch {epoch}/{cfg['num_epochs']}", leave=False,
                   disable=None)
        for start in bar:
            idx = order[start:start + bs]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        val_acc = accuracy(model, x_val, y_val, cfg["eval_batch_size"], device)
        history.append({"epoch": epoch, "loss": total_loss / n, "train_accuracy": correct / n,
                        "val_accuracy": val_acc})
    model.eval()
    return model, history


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x, batch_size, device) == y).float().mean())


# ---------------------------------------------------------------------------------------------
# kept indices (retraining)
# ---------------------------------------------------------------------------------------------
def load_kept_indices(cfg: dict, ds: Dataset) -> np.ndarray:
    """Read ``results/<run>/kept_indices.json`` and check it belongs to this dataset split."""
    path = results_dir(cfg) / "kept_indices.json"
    data = load_json(path, ("indices", "dataset_fingerprint", "n_train"), made_by="python cc_remove.py")
    if data["dataset_fingerprint"] != ds.fingerprint:
        raise ArtifactError(f"{path}: dataset fingerprint {data['dataset_fingerprint']!r} does not match "
                            f"the configured dataset {ds.fingerprint!r} (rerun `python cc_remove.py`)")
    idx = np.asarray(data["indices"], dtype=np.int64)
    n = len(ds.x_train)
    if data["n_train"] != n or idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= n \
            or len(np.unique(idx)) != len(idx):
        raise ArtifactError(f"{path}: expected unique indices in [0, {n}) into the training split")
    return np.sort(idx)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run_training(cfg: dict, ds: Dataset, kind: str, device: torch.device,
                 kept: np.ndarray | None = None) -> dict:
    """Train every model of the run (``kind`` original or retrained); write the checkpoints
    (``cnn_s<seed>.pt`` / ``retrained_s<seed>.pt``) and the training summary."""
    ckpt_kind = CHECKPOINT_KIND[kind]
    x, y = ds.x_train, ds.y_train
    if kept is not None:
        x, y = x[torch.from_numpy(kept)], y[torch.from_numpy(kept)]
    train_hash = config_hash(cfg, TRAINING_KEYS)
    kept_hash = None if kept is None else config_hash({"kept": kept.tolist()})
    models, per_model = [], []
    for seed in tqdm(model_seeds(cfg), desc=f"train {kind}", disable=None):
        start = time.perf_counter()
        model, history = train_model(cfg, x, y, ds.x_val, ds.y_val, seed, device, desc=f"seed {seed}")
        test_acc = accuracy(model, ds.x_test, ds.y_test, cfg["eval_batch_size"], device)
        seconds = time.perf_counter() - start
        meta = {"arch": cfg["arch"], "n_classes": cfg["n_classes"], "seed": seed, "kind": kind,
                "config_hash": config_hash(cfg), "training_config_hash": train_hash,
                "dataset_fingerprint": ds.fingerprint, "n_train": len(x), "kept_indices_hash": kept_hash,
                "test_accuracy": test_acc, "val_accuracy": history[-1]["val_accuracy"],
                "versions": versions()}
        save_checkpoint(checkpoint_path(cfg, seed, ckpt_kind), model, meta)
        print(f"[main] {kind} seed {seed}: test accuracy {test_acc:.4f} ({seconds:.1f} s)")
        models.append((seed, model))
        per_model.append({"seed": seed, "test_accuracy": test_acc, "val_accuracy": history[-1]["val_accuracy"],
                          "seconds": seconds, "history": history})
    summary = {"kind": kind, "n_train": len(x), "dataset_fingerprint": ds.fingerprint,
               "training_config_hash": train_hash, "kept_indices_hash": kept_hash,
               "test_accuracy": mean_ci([m["test_accuracy"] for m in per_model]), "models": per_model}
    atomic_write_json(results_dir(cfg) / TRAIN_SUMMARY[kind], summary)
    return {"models": models, "summary": summary}


def write_comparison(cfg: dict) -> dict:
    """Original vs retrained: accuracy, mean radius and ρ_adv, each mean ± 95% CI over models, and a
    paired test over the same seeds (retrained − original). Reads only the artifacts."""
    rdir = results_dir(cfg)
    sides = {}
    for kind in ("original", "retrained"):
        train = load_json(rdir / TRAIN_SUMMARY[kind], ("models",), made_by="main.py")
        rob = load_json(rdir / f"robustness_{kind}.json", ("models",), made_by="main.py")
        acc = {m["seed"]: m["test_accuracy"] for m in train["models"]}
        rob_by_seed = {m["seed"]: m for m in rob["models"]}
        sides[kind] = {"seeds": sorted(acc), "n_train": train["n_train"],
                       "accuracy": [acc[s] for s in sorted(acc)],
                       "mean_radius": [rob_by_seed[s]["mean_radius_l2"] for s in sorted(acc)],
                       "rho_adv": [rob_by_seed[s]["rho_adv"] for s in sorted(acc)]}
    if sides["original"]["seeds"] != sides["retrained"]["seeds"]:
        raise ArtifactError(f"{rdir}: original seeds {sides['original']['seeds']} and retrained seeds "
                            f"{sides['retrained']['seeds']} differ; cannot pair them")
    metrics = {}
    for metric in ("accuracy", "mean_radius", "rho_adv"):
        a, b = sides["original"][metric], sides["retrained"][metric]
        metrics[metric] = {"original": mean_ci(a), "retrained": mean_ci(b),
                           "paired": paired_difference(a, b), "per_seed": {"original": a, "retrained": b}}
    out = {"seeds": sides["original"]["seeds"], "n_train": {k: v["n_train"] for k, v in sides.items()},
           "metrics": metrics}
    atomic_write_json(rdir / "compare.json", out)
    atomic_write_text(rdir / "compare.md", comparison_markdown(out))
    _comparison_plot(out, rdir / "compare.png")
    return out


def comparison_markdown(cmp: dict) -> str:
    names = {"accuracy": "test accuracy", "mean_radius": "mean DeepFool radius ‖r̂‖₂", "rho_adv": "ρ_adv"}
    lines = [f"Original (n_train={cmp['n_train']['original']}) vs retrained without corner cases "
             f"(n_train={cmp['n_train']['retrained']}), {len(cmp['seeds'])} seeds; mean [95% CI] over models; "
             "difference = retrained − original, paired by seed.", "",
             "| measure | original | retrained | difference | paired t p | Wilcoxon p |",
             "|---|---|---|---|---|---|"]
    for key, m in cmp["metrics"].items():
        o, r, d = m["original"], m["retrained"], m["paired"]["difference"]
        lines.append(f"| {names[key]} | {o['mean']:.4f} [{o['ci_low']:.4f}, {o['ci_high']:.4f}] | "
                     f"{r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
                     f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | "
                     f"{m['paired']['t_pvalue']:.3g} | {m['paired']['wilcoxon_pvalue']:.3g} |")
    return "\n".join(lines) + "\n"


def _comparison_plot(cmp: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, title) in zip(axes, (("accuracy", "test accuracy"), ("mean_radius", "mean ‖r̂‖₂"),
                                       ("rho_adv", "ρ_adv"))):
        per = cmp["metrics"][key]["per_seed"]
        for o, r in zip(per["original"], per["retrained"]):
            ax.plot([0, 1], [o, r], color="0.7", marker="o", zorder=1)
        for i, side in enumerate(("original", "retrained")):
            m = cmp["metrics"][key][side]
            ax.errorbar([i], [m["mean"]], yerr=[[m["mean"] - m["ci_low"]], [m["ci_high"] - m["mean"]]],
                        fmt="s", color="C3", capsize=5, zorder=2)
        ax.set_xticks([0, 1], ["original", "retrained"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(title)
    fig.suptitle("Original vs retrained without corner cases (lines pair the same seed; red: mean, 95% CI)")
    fig.tight_layout()
    atomic_savefig(fig, path)


@stage_main()
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    device = resolve_device(cfg)
    start = time.perf_counter()
    ds = load_dataset(cfg)
    kind = "retrained" if args.is_retrain else "original"
    kept = load_kept_indices(cfg, ds) if args.is_retrain else None
    trained = run_training(cfg, ds, kind, device, kept)
    train_seconds = time.perf_counter() - start
    update_manifest(cfg, f"train_{kind}", train_seconds, ds.fingerprint,
                    {"test_accuracy": trained["summary"]["test_accuracy"]})

    from robustness import measure_robustness, write_robustness

    start = time.perf_counter()
    per_model = []
    for seed, model in trained["models"]:
        records, summary = measure_robustness(model, ds.x_test, ds.y_test, cfg, device)
        per_model.append((seed, records, summary))
        print(f"[main] {kind} seed {seed}: ρ_adv {summary['rho_adv']:.4f}, mean radius "
              f"{summary['mean_radius_l2']:.4f}, not converged {summary['nonconverged_fraction']:.3f}")
    rob = write_robustness(cfg, kind, per_model)
    update_manifest(cfg, f"robustness_{kind}", time.perf_counter() - start, ds.fingerprint)
    acc = trained["summary"]["test_accuracy"]
    print(f"[main] {kind}: {cfg['n_models']} models, test accuracy {acc['mean']:.4f} "
          f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}], ρ_adv {rob['across_models']['rho_adv']['mean']:.4f} "
          f"→ {results_dir(cfg)}")
    if args.is_retrain:
        cmp = write_comparison(cfg)
        d = cmp["metrics"]["mean_radius"]["paired"]["difference"]
        print(f"[main] compare: mean radius retrained − original {d['mean']:+.4f} "
              f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] → {results_dir(cfg) / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
