"""Train the CNNs of every training variant, evaluate them, and measure their DeepFool radius.

    python main.py [--config configs/default.yaml] [--set key=value ...]   # the baseline models
    python main.py -is_retrain True                                        # without the corner cases
    python main.py --variant random_n100                                   # any one variant
    python main.py --variant all                                           # every variant of the config

A variant (variants.py, DESIGN.md "Variants") is a training subset × a training regime. ``n_models``
models are trained per variant with seeds seed, seed+1, ... — the same seeds for every variant, so
comparisons pair by seed. Each model is saved as ``model/<run>/<variant>_s<seed>.pt``, its variant's
training summary as ``results/<run>/variants/<variant>/train.json``; then (unless ``--no-measure``)
the DeepFool robustness radius of every model is measured (robustness.py).

``-is_retrain True`` is the seed workflow's name for the corner-case variant at ``remove_count``:
it trains on the training inputs kept by ``cc_remove.py`` (``subsets.json``), measures the radius
and writes the paired comparison with the baseline (``compare.{json,md,png}``).

A training run whose loss or parameters stop being finite stops with an error naming the seed and
epoch, and writes no checkpoint.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import stage
from artifacts import (ArtifactError, atomic_write_json, checkpoint_path, load_json, model_seeds,
                       results_dir, save_checkpoint, set_seed, stage_main, variant_dir, versions)
from cnnmodel import build_model, predict
from config import TRAINING_KEYS, config_hash, load_stage_config, stage_parser
from metrics import proportion_ci
from mnistload import Dataset
from variants import BASELINE, Variant, VariantError, parse_variant_name, plan


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN/inf; the message names the seed and the epoch."""


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
                   help="train the corner-case variant at remove_count (needs cc_remove.py) and compare")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="train this variant (e.g. random_n100, corner_cases_n50+pgd_at), or 'all' for "
                        "every variant of the config except the baseline")
    p.add_argument("--no-measure", action="store_true", help="train only; robustness.py measures later")
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
def _check_finite(model: nn.Module, loss: torch.Tensor | None, seed: int, epoch: int, what: str) -> None:
    bad = loss is not None and not torch.isfinite(loss)
    if bad or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        value = f"loss {float(loss):g}" if bad else "non-finite parameters"
        raise TrainingDiverged(f"seed {seed}, epoch {epoch}: training diverged ({value} {what}); "
                               "lower learning_rate — no checkpoint was written")


# An epoch whose mean training loss exceeds this many times chance level (ln n_classes) has diverged
# even when every number is still finite (e.g. Adam at learning_rate 1e6: logits of 1e9, accuracy 10%).
DIVERGED_LOSS_FACTOR = 10.0


def train_model(cfg: dict, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                seed: int, device: torch.device, desc: str = "",
                regime: str = "standard") -> tuple[nn.Module, list[dict]]:
    """Adam on the regime's loss (``standard``: cross-entropy); mini-batches drawn by a generator
    seeded with ``seed``. Same config, data and seed ⇒ the same parameters bit for bit on CPU.
    Raises TrainingDiverged (naming seed and epoch) when the loss or the parameters blow up."""
    set_seed(seed)
    model = build_model(cfg["arch"], cfg["n_classes"], cfg["arch_kwargs"]).to(device)
    # channels-last trains the shipped ConvNet ~13% faster on CPU (cnnmodel.channels_last); the
    # layout is undone before returning, so checkpoints hold ordinary contiguous tensors
    layout = torch.channels_last if any(p.dim() == 4 for p in model.parameters()) else torch.contiguous_format
    model.to(memory_format=layout)
    # the fused kernel updates every parameter in one pass: ~13% faster training of the shipped ConvNet
    # at 1 thread (its Adam step over 3.2M parameters was ~12% of a mini-batch); elementwise, so thread-count free
    fused = torch.device(device).type in ("cpu", "cuda") or None
    opt = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    regime_loss = None
    if regime != "standard":
        import regimes  # noqa: PLC0415 - only the non-standard regimes need it

        regime_gen = torch.Generator().manual_seed(seed + 1_000_003)  # its own stream: batch order unchanged
        settings = {k: cfg[k] for k in regimes.REGIME_KEYS}
        if regime == "sep_sharp":  # the sep loss with the sharpening weight
            settings["sep_reg_weight"] = cfg["sep_sharp_reg_weight"]

        def regime_loss(m, xb, yb):
            res = regimes.training_loss("sep" if regime == "sep_sharp" else regime, m, xb, yb, settings, regime_gen)
            return res.loss, res.logits
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
            if xb.dim() == 4:
                xb = xb.contiguous(memory_format=layout)
            opt.zero_grad(set_to_none=True)
            if regime_loss is None:
                logits = model(xb)
                loss = loss_fn(logits, yb)
            else:
                loss, logits = regime_loss(model, xb, yb)
            _check_finite(model, loss.detach(), seed, epoch, "in a mini-batch")
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == yb).sum())
        _check_finite(model, None, seed, epoch, "after the epoch")
        if total_loss / n > DIVERGED_LOSS_FACTOR * math.log(cfg["n_classes"]):
            raise TrainingDiverged(
                f"seed {seed}, epoch {epoch}: training diverged (mean loss {total_loss / n:.3g}, more than "
                f"{DIVERGED_LOSS_FACTOR:g}× chance level); lower learning_rate — no checkpoint was written")
        val_acc = accuracy(model, x_val, y_val, cfg["eval_batch_size"], device)
        history.append({"epoch": epoch, "loss": total_loss / n, "train_accuracy": correct / n,
                        "val_accuracy": val_acc})
    model.eval()
    return model.to(memory_format=torch.contiguous_format), history


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x, batch_size, device) == y).float().mean())


# ---------------------------------------------------------------------------------------------
# which training inputs each variant keeps
# ---------------------------------------------------------------------------------------------
def load_subsets(cfg: dict, ds: Dataset) -> dict:
    """``results/<run>/subsets.json`` (cc_remove.py), checked against this dataset split."""
    path = results_dir(cfg) / "subsets.json"
    data = load_json(path, ("subsets", "dataset_fingerprint", "n_train"), made_by="python cc_remove.py")
    if data["dataset_fingerprint"] != ds.fingerprint:
        raise ArtifactError(f"{path}: dataset fingerprint {data['dataset_fingerprint']!r} does not match "
                            f"the configured dataset {ds.fingerprint!r} (rerun `python cc_remove.py`)")
    if data["n_train"] != len(ds.x_train):
        raise ArtifactError(f"{path}: written for {data['n_train']} training inputs, the split has {len(ds.x_train)}")
    return data["subsets"]


def kept_indices(variant: Variant, seed: int, subsets: dict | None, n_train: int, path_hint: str) -> np.ndarray:
    """Training indices a (variant, seed) model trains on: all, minus the variant's removed set."""
    if variant.rule == "baseline":
        return np.arange(n_train)
    entry = (subsets or {}).get(variant.subset)
    if entry is None or str(seed) not in entry["per_seed"]:
        raise ArtifactError(f"{path_hint}: no removal set for {variant.subset} seed {seed} (add the rule to "
                            "`variants` and N to `remove_counts`, then rerun `python cc_remove.py`)")
    removed = np.asarray(entry["per_seed"][str(seed)]["removed"], dtype=np.int64)
    if removed.ndim != 1 or len(np.unique(removed)) != len(removed) or len(removed) != variant.n_remove \
            or (len(removed) and (removed.min() < 0 or removed.max() >= n_train)):
        raise ArtifactError(f"{path_hint}: {variant.subset} seed {seed}: expected {variant.n_remove} unique "
                            f"indices in [0, {n_train})")
    return np.setdiff1d(np.arange(n_train), removed)


# ---------------------------------------------------------------------------------------------
# the stage: train every (variant, seed) unit
# ---------------------------------------------------------------------------------------------
def train_unit(cfg: dict, ds: Dataset, variant: Variant, seed: int, kept: np.ndarray, device) -> tuple[nn.Module, dict]:
    """One (variant, seed) model: train on ``kept``, write its checkpoint, return (model, record)."""
    sel = torch.from_numpy(kept)
    start = time.perf_counter()
    model, history = train_model(cfg, ds.x_train[sel], ds.y_train[sel], ds.x_val, ds.y_val, seed, device,
                                 desc=f"{variant.name} s{seed}", regime=variant.regime)
    test_acc = accuracy(model, ds.x_test, ds.y_test, cfg["eval_batch_size"], device)
    seconds = time.perf_counter() - start
    kept_hash = config_hash({"kept": kept.tolist()})
    meta = {"arch": cfg["arch"], "arch_kwargs": cfg["arch_kwargs"], "n_classes": cfg["n_classes"], "seed": seed,
            "variant": variant.name, "rule": variant.rule, "n_remove": variant.n_remove, "regime": variant.regime,
            "config_hash": config_hash(cfg), "training_config_hash": config_hash(cfg, TRAINING_KEYS),
            "dataset_fingerprint": ds.fingerprint, "n_train": len(kept), "kept_indices_hash": kept_hash,
            "test_accuracy": test_acc, "val_accuracy": history[-1]["val_accuracy"], "versions": versions()}
    save_checkpoint(checkpoint_path(cfg, seed, variant.name), model, meta)
    print(f"[main] {variant.name} seed {seed}: test accuracy {test_acc:.4f} ({seconds:.1f} s)")
    return model, {"seed": seed, "n_train": len(kept), "kept_indices_hash": kept_hash, "test_accuracy": test_acc,
                   "n_test": len(ds.x_test), "n_test_correct": int(round(test_acc * len(ds.x_test))),
                   "val_accuracy": history[-1]["val_accuracy"], "seconds": seconds, "history": history}


def train_variants(ctx: stage.Context, targets: list[Variant]) -> dict:
    """Train every (variant, seed) of ``targets`` as a unit (executor.py: in this process or on Ray);
    each writes its checkpoint and its record part. Returns ``{variant: {"models", "records"}}`` read
    back from those files (models only when they are measured next)."""
    import executor

    cfg, ds = ctx.cfg, ctx.dataset
    needs_subsets = any(v.rule != "baseline" for v in targets)
    subsets = load_subsets(cfg, ds) if needs_subsets else None
    hint = str(results_dir(cfg) / "subsets.json")
    # check every unit's subset before the first (long) training starts
    pairs = [(v, s) for v in targets for s in model_seeds(cfg)]
    units = [executor.Unit(ctx.stage, v.name, s, train_variant_unit,
                           {"kept": kept_indices(v, s, subsets, len(ds.x_train), hint)}) for v, s in pairs]
    executor.run_units(ctx, units, "train (variant, seed)")
    measured_next = not getattr(ctx.args, "no_measure", False)
    out = {}
    for (v, s), unit in zip(pairs, units):
        out.setdefault(v, {"models": [], "records": []})
        out[v]["records"].append(executor.read_part(ctx, unit)[0]["record"])
        if measured_next:
            out[v]["models"].append((s, executor.load_unit_model(ctx, unit)))
    return out


def train_variant_unit(ctx: stage.Context, unit) -> None:
    """One training unit: the checkpoint (train_unit) and the record part."""
    import executor

    _, record = train_unit(ctx.cfg, ctx.dataset, parse_variant_name(unit.variant), unit.seed, unit.args["kept"],
                           ctx.device)
    executor.write_part(ctx, unit, {"record": record})


def write_training(ctx: stage.Context, trained: dict) -> str:
    cfg, ds = ctx.cfg, ctx.dataset
    parts = []
    for v, entry in trained.items():
        recs = entry["records"]
        summary = {"variant": v.name, "rule": v.rule, "n_remove": v.n_remove, "regime": v.regime,
                   "n_train": sorted({r["n_train"] for r in recs}), "dataset_fingerprint": ds.fingerprint,
                   "training_config_hash": config_hash(cfg, TRAINING_KEYS),
                   "test_accuracy": proportion_ci([r["n_test_correct"] for r in recs], [r["n_test"] for r in recs]),
                   "models": recs}
        atomic_write_json(variant_dir(cfg, v.name) / "train.json", summary)
        acc = summary["test_accuracy"]
        parts.append(f"{v.name} accuracy {acc['mean']:.4f} [{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]")
    ctx.info["variants"] = [v.name for v in trained]
    return f"{cfg['n_models']} seeds × {len(trained)} variant(s): " + "; ".join(parts)


def measure_variants(ctx: stage.Context, trained: dict) -> dict:
    """DeepFool radius of the just-trained models (robustness.py's measurement, same stage name)."""
    from robustness import measure_robustness

    from robustness import dsa_auroc, variant_kept

    kept = variant_kept(ctx, list(trained))
    out = {}
    for v, entry in trained.items():
        out[v] = []
        for seed, model in entry["models"]:
            records, summary = measure_robustness(model, ctx.dataset.x_test, ctx.dataset.y_test, ctx.cfg, ctx.device)
            summary.update(dsa_auroc(model, ctx.dataset, kept[v.name, seed], ctx.cfg, ctx.device))
            out[v].append((seed, records, summary))
    return out


def targets_from_args(args: argparse.Namespace, cfg: dict) -> list[Variant]:
    if args.is_retrain and args.variant:
        raise VariantError("-is_retrain True and --variant are exclusive (-is_retrain trains corner_cases_n<remove_count>)")
    if args.is_retrain:  # the corner-case variant cc_remove.py chose at remove_count / remove_fraction
        path = results_dir(cfg) / "subsets.json"
        return [parse_variant_name(load_json(path, ("is_retrain_variant",), made_by="python cc_remove.py")
                                   ["is_retrain_variant"])]
    if args.variant == "all":
        return [v for v in plan(cfg) if v != BASELINE]
    if args.variant:
        return [parse_variant_name(args.variant)]
    return [BASELINE]


@stage_main(VariantError, TrainingDiverged)
def main(argv=None) -> int:
    from robustness import write_measurements

    args = parse_args(argv)
    cfg = resolve_config(args)
    targets = targets_from_args(args, cfg)
    name = "train" if targets == [BASELINE] else "train_variants"
    label = name if targets == [BASELINE] or args.variant == "all" else f"{name}:{targets[0].name}"
    trained = stage.run(name, cfg, lambda ctx: train_variants(ctx, targets), write_training, args, label)
    if not args.no_measure:
        rlabel = "robustness:" + ",".join(v.name for v in targets) if len(targets) == 1 else "robustness"
        stage.run("robustness", cfg, lambda ctx: measure_variants(ctx, trained), write_measurements, args, rlabel)
    if args.is_retrain:
        from compare import write_seed_comparison

        stage.run("compare", cfg, lambda ctx: targets[0], write_seed_comparison, args, "compare:is_retrain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
