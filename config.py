"""One flat configuration shared by every stage.

Every key has a default and a one-line comment here (``DEFAULTS``); a YAML file under ``configs/``
overrides some of them, and ``--set key=value`` on the command line overrides again. An unknown key
or a value of the wrong type is an error naming the key and the file it came from. The resolved
dictionary is what stages use and what ``manifest.json`` records.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parent

# key: (default, comment). The default's type is the expected type (int accepted for float).
DEFAULTS: dict[str, tuple[Any, str]] = {
    # --- run and data -------------------------------------------------------------------------
    "name": ("default", "run name: artifacts go to model/<name>/ and results/<name>/"),
    "dataset": ("mnist5k", "mnist5k (embedded) | mnist (IDX) | cifar10 (binary) | npz | image_folder (data_path)"),
    "data_dir": ("data/mnist", "folder with the IDX or CIFAR-10 binary files (relative to the repo root)"),
    "data_path": ("", "npz file (dataset npz) or folder with train/ and test/ class subfolders (image_folder)"),
    "n_train": (3500, "training-set size; 0 = everything left after val (mnist/cifar10)"),
    "n_val": (500, "validation-set size (carved from the training pool with split_seed)"),
    "n_test": (1000, "test-set size; 0 = the whole test pool"),
    "split_seed": (0, "seed of the deterministic stratified split"),
    # --- models and training ------------------------------------------------------------------
    "seed": (0, "base seed: model i is trained with seed + i"),
    "n_models": (5, "number of models trained with different seeds"),
    "arch": ("mnist_convnet", "mnist_convnet | cifar_cnn | package.module:ClassName (any nn.Module)"),
    "arch_kwargs": ({}, "keyword arguments of the arch's constructor (a mapping), recorded in each checkpoint"),
    "layer_aliases": ({}, "alias -> module name, overriding the inferred penultimate / logits / last_conv"),
    "n_classes": (10, "number of classes"),
    "batch_size": (128, "training mini-batch size"),
    "learning_rate": (0.001, "Adam learning rate (the seed repository used 0.0002 with 20 epochs)"),
    "num_epochs": (8, "training epochs"),
    "weight_decay": (0.0, "Adam weight decay"),
    "eval_batch_size": (1000, "batch size for evaluation and activations"),
    "device": ("auto", "auto (CUDA when present) | cpu | cuda | cuda:N"),
    "num_threads": (0, "torch CPU threads; 0 = torch's default"),
    # --- where the (stage, variant, seed) units run (executor.py); changes no result ------------
    "executor": ("local", "local (this machine's processes) | ray (Ray tasks)"),
    "local_workers": (0, "local: processes running units at once, each num_threads (or 1) threads; 0 = one per core (1 on GPU)"),
    "ray_address": ("", "Ray cluster to join (e.g. auto or head-ip:6379); empty = start a local instance"),
    "ray_num_cpus": (1, "CPUs Ray reserves per unit (its torch threads when num_threads is 0)"),
    "ray_num_gpus": (0.0, "GPUs Ray reserves per unit (fractions share a GPU); 0 = the unit runs on CPU"),
    "ray_max_retries": (2, "times Ray reruns a unit whose worker died or hit an I/O or GPU-memory error"),
    # --- DeepFool robustness radius (Moosavi-Dezfooli et al., arXiv 1511.04599) ---------------
    "deepfool_num_classes": (10, "candidate labels: top-k classes of the clean logits"),
    "deepfool_overshoot": (0.02, "overshoot: the point moves by (1+overshoot)*sum(r_i)"),
    "deepfool_max_iter": (50, "iterations before an input is reported as not converged"),
    "deepfool_clip": (False, "keep the perturbed point in [0, 1]"),
    "deepfool_n_test": (0, "test inputs measured; 0 = the whole test split"),
    "deepfool_batch_size": (500, "inputs per DeepFool batch"),
    # --- DSA and corner cases (Kim et al. arXiv 1808.08444; Ouyang et al.) --------------------
    "dsa_variants": (["sadl", "centroid_knn"], "DSA variants computed: sadl | centroid_knn"),
    "dsa_layers": (["penultimate"], "layers whose activations feed DSA (aliases or layer names)"),
    "dsa_k": (20, "k of centroid_knn: mean of the k nearest reference activations per class"),
    "dsa_group_by": ("pred", "class groups by predicted label (pred) or true label (label)"),
    "dsa_chunk_size": (2048, "query rows per distance chunk (bounds memory)"),
    "dsa_top": (200, "size of each model's top-DSA set of training inputs"),
    "cc_variant": ("sadl", "DSA variant that ranks corner cases"),
    "cc_layer": ("penultimate", "layer whose DSA ranks corner cases"),
    "remove_count": (100, "corner cases removed from the training set; 0 = use remove_fraction"),
    "remove_fraction": (0.0, "fraction of the training set removed when remove_count is 0"),
    "bootstrap": (1000, "bootstrap resamples for 95% confidence intervals"),
    # --- training variants: subset rule x regime (DESIGN.md, "Variants") ----------------------
    "variants": (["baseline", "corner_cases", "random"],
                 "variants: rule[+regime]; rules baseline|corner_cases|random|least_surprising|"
                 "random_class_matched; regimes standard|pgd_at|sep"),
    "remove_counts": ([], "doses N: every removal rule runs at each; [] = [remove_count]"),
    # --- model mutation and LCR (Wang et al. arXiv 1812.05793) --------------------------------
    "mutation_operators": (["NAI"], "operators: GF | WS | NAI | NS | GF_filter | NAI_filter"),
    "mutation_rates": ([0.01], "mutation rates gamma, each in [0, 1]"),
    "n_mutants": (100, "accepted mutants per operator, rate and model"),
    "max_draws": (1000, "mutants drawn at most while looking for n_mutants accepted ones"),
    "mutation_threshold": (0.9, "accept a mutant when val accuracy >= threshold * original's"),
    "lcr_splits": (["val", "test"], "splits whose LCR is computed"),
    # --- conductance (captum LayerConductance; Wu et al. arXiv 1910.00387) --------------------
    "conductance_layer": ("last_conv", "layer whose conductance toward the predicted class is taken"),
    "conductance_n_steps": (25, "integration steps (Gauss-Legendre; completeness error ~1.4% here, 0.7% at 50)"),
    "conductance_baseline": (0.0, "constant pixel value of the baseline image"),
    "conductance_internal_batch_size": (500, "captum internal batch size (bounds memory)"),
    "conductance_splits": (["val", "test"], "splits whose conductance is computed"),
    # --- detector scoring ----------------------------------------------------------------------
    "detector_lcr_operator": ("NAI", "mutation operator whose LCR the detectors use"),
    "detector_lcr_rate": (0.01, "mutation rate whose LCR the detectors use"),
    "detector_mlp_hidden": ([200, 200], "hidden layers of the conductance MLP (Wu et al.: 200-200)"),
    # --- adversarial evaluation ----------------------------------------------------------------
    "adv_eps_linf": ([0.0, 0.1, 0.2, 0.3], "L-inf epsilon grid (FGSM and PGD)"),
    "adv_eps_l2": ([0.0, 1.0, 2.0, 3.0], "L2 epsilon grid (PGD-L2)"),
    "pgd_steps": (40, "PGD iterations"),
    "pgd_step_size": (0.01, "PGD L-inf step size"),
    "pgd_l2_step_factor": (2.5, "PGD L2 step size = factor * eps / steps"),
    "pgd_random_start": (True, "PGD starts from a uniform random point in the eps-ball"),
    "adv_target_accuracy": (0.5, "robustness margin: smallest eps with accuracy below this"),
    "adv_n_test": (100, "test inputs attacked per model; 0 = the whole test split"),
    "adv_transfer_eps": (0.1, "L-inf eps of the transfer matrix (nearest positive grid value)"),
    "adv_report_eps": (0.1, "L-inf eps at which variant tables report PGD accuracy (nearest grid value)"),
    "adv_margin_steps": (4, "bisection steps per model refining each PGD robustness margin (to grid step/16); 0 = grid only"),
    # --- training regimes and explanation robustness (Chen et al. arXiv 2403.06013) -----------
    "pgd_at_eps": (0.1, "pgd_at regime: L-inf radius (Madry et al. MNIST 0.3 does not train in a few epochs here)"),
    "pgd_at_steps": (10, "pgd_at regime: PGD steps per mini-batch (Madry et al. MNIST: 40)"),
    "pgd_at_step_size": (0.0, "pgd_at regime: L-inf step; 0 = 2.5*eps/steps (Madry et al.'s rule)"),
    "sep_reg_weight": (2000.0, "sep regime: penalty weight (> 0 flattens explanations; ~CE/penalty at init)"),
    "sep_sharp_reg_weight": (-100.0, "sep_sharp regime: penalty weight (< 0 sharpens explanations)"),
    "sep_sigma": (0.1, "sep regimes: std of the Gaussian input noise x + sigma*xi"),
    "sep_base": ("standard", "sep regimes: base loss standard | pgd_at"),
    "sep_explanation_method": ("saliency", "sep regimes: map in the penalty, saliency | input_x_gradient"),
    "run_explanation": (False, "make reproduce also runs explanation.py (explanation robustness)"),
    "explanation_methods": (["saliency"], "maps attacked and measured: saliency | input_x_gradient | integrated_gradients"),
    "explanation_n_steps": (16, "integrated gradients: integration steps"),
    "explanation_n_inputs": (100, "test inputs for sensitivity and the top-k attack"),
    "explanation_pairs": (["random", "cluster"], "victim/target pair rules of the targeted attack: random | cluster"),
    "explanation_n_pairs": (20, "victim/target pairs per pair rule"),
    "explanation_n_clusters": (10, "cluster pairs: KMeans clusters on the reference model's penultimate layer"),
    "explanation_eps": (0.1, "L-inf radius of the explanation attacks and of the random-sign baseline"),
    "explanation_steps": (100, "explanation attack steps"),
    "explanation_step_size": (0.01, "explanation attack L-inf step"),
    "explanation_gamma": (1e5, "targeted attack: weight of the map term (Dombrowski et al.)"),
    "explanation_beta": ([10.0, 100.0], "softplus beta of the attacks: [start, end], geometric schedule"),
    "explanation_topk": (50, "k of the top-k attack and intersection (pixels)"),
    "explanation_sensitivity_radius": (0.02, "captum sensitivity_max perturbation radius (L-inf)"),
    "explanation_sensitivity_samples": (10, "captum sensitivity_max perturbation samples"),
    "explanation_permutations": (10000, "permutations for the across-model correlation p-values"),
}

# Element type of list keys whose default is empty (so the element type cannot be read off it).
LIST_ITEM_TYPES: dict[str, Any] = {"remove_counts": 0}

# A number written as YAML 1.1 does not read it (``1e-3``: no dot before the exponent) arrives as a
# string; it is accepted wherever a float is expected.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


# ``arch: package.module:ClassName`` (the class is imported when a model is built, cnnmodel.py).
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the file."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_type(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` coerced to the default's type, or raise a ConfigError naming the key."""
    def fail(expected: str):
        raise ConfigError(f"{source}: key {key!r} expects {expected}, got {value!r} ({_type_name(value)})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("a boolean (true/false)")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            fail("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            fail("a list")
        item = default[0] if default else LIST_ITEM_TYPES.get(key.split("[")[0])
        if item is not None:
            return [_check_type(f"{key}[{i}]", v, item, source) for i, v in enumerate(value)]
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail("a mapping with string keys")
        return value
    raise AssertionError(f"unsupported default type for {key}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    cfg = {key: (type(d)(d) if isinstance(d, (list, dict)) else d) for key, (d, _) in DEFAULTS.items()}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in data.items():
            cfg[key] = _validate(key, value, str(path))
    for text in overrides:
        key, value = _parse_override(text)
        cfg[key] = _validate(key, value, "--set")
    _check_ranges(cfg, str(path) if path is not None else "config")
    return cfg


def _validate(key: str, value: Any, source: str) -> Any:
    if key not in DEFAULTS:
        raise ConfigError(f"{source}: unknown config key {key!r}")
    return _check_type(key, value, DEFAULTS[key][0], source)


def _check_ranges(cfg: dict[str, Any], source: str) -> None:
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{source}: key {key!r} must be {what}, got {cfg[key]!r}")

    need(cfg["dataset"] in ("mnist5k", "mnist", "cifar10", "npz", "image_folder"), "dataset",
         "mnist5k, mnist, cifar10, npz or image_folder")
    need(cfg["dataset"] not in ("npz", "image_folder") or cfg["data_path"] != "", "data_path",
         f"set for dataset {cfg['dataset']} (an .npz file or a folder with train/ and test/)")
    for key in ("n_models", "batch_size", "num_epochs", "n_classes", "eval_batch_size",
                "deepfool_max_iter", "deepfool_batch_size", "dsa_k", "dsa_chunk_size", "dsa_top",
                "n_mutants", "max_draws", "conductance_n_steps", "conductance_internal_batch_size",
                "pgd_steps"):
        need(cfg[key] >= 1, key, ">= 1")
    for key in ("n_train", "n_val", "n_test", "remove_count", "bootstrap", "deepfool_n_test",
                "adv_n_test", "num_threads"):
        need(cfg[key] >= 0, key, ">= 0")
    need(cfg["learning_rate"] > 0, "learning_rate", "> 0")
    need(0.0 <= cfg["remove_fraction"] < 1.0, "remove_fraction", "in [0, 1)")
    need(0.0 < cfg["mutation_threshold"] <= 1.0, "mutation_threshold", "in (0, 1]")
    need(all(0.0 <= r <= 1.0 for r in cfg["mutation_rates"]), "mutation_rates", "rates in [0, 1]")
    need(0.0 <= cfg["detector_lcr_rate"] <= 1.0, "detector_lcr_rate", "in [0, 1]")
    need(cfg["dsa_group_by"] in ("pred", "label"), "dsa_group_by", "pred or label")
    need(set(cfg["dsa_variants"]) <= {"sadl", "centroid_knn"} and cfg["dsa_variants"] != [],
         "dsa_variants", "a non-empty list of sadl / centroid_knn")
    need(cfg["cc_variant"] in cfg["dsa_variants"], "cc_variant", "one of dsa_variants")
    need(cfg["cc_layer"] in cfg["dsa_layers"], "cc_layer", "one of dsa_layers")
    ops = {"GF", "WS", "NAI", "NS", "GF_filter", "NAI_filter"}
    need(set(cfg["mutation_operators"]) <= ops and cfg["mutation_operators"] != [],
         "mutation_operators", f"a non-empty list of {sorted(ops)}")
    need(cfg["device"] == "auto" or cfg["device"] == "cpu" or cfg["device"].startswith("cuda"),
         "device", "auto, cpu or cuda[:N]")
    need(cfg["executor"] in ("local", "ray"), "executor", "local or ray")
    need(cfg["local_workers"] >= 0, "local_workers", ">= 0 (0 = one per CPU core)")
    need(cfg["ray_num_cpus"] >= 1, "ray_num_cpus", ">= 1")
    need(cfg["ray_num_gpus"] >= 0, "ray_num_gpus", ">= 0")
    need(cfg["ray_max_retries"] >= 0, "ray_max_retries", ">= 0")
    need(cfg["executor"] != "ray" or not cfg["device"].startswith("cuda") or cfg["ray_num_gpus"] > 0,
         "ray_num_gpus", "> 0 when device is cuda and executor is ray (Ray gives a unit a GPU only on request)")
    need(cfg["arch"] in ("mnist_convnet", "cifar_cnn") or bool(_IMPORT_PATH.match(cfg["arch"])), "arch",
         "mnist_convnet, cifar_cnn or an import path package.module:ClassName")
    need(all(isinstance(v, str) and v for v in cfg["layer_aliases"].values()), "layer_aliases",
         "a mapping alias -> module name (non-empty strings)")
    for key in ("lcr_splits", "conductance_splits"):
        need(all(s in ("train", "val", "test") for s in cfg[key]), key, "splits among train, val, test")
    need(all(n >= 1 for n in cfg["remove_counts"]), "remove_counts", "a list of counts >= 1")
    need(cfg["adv_margin_steps"] >= 0, "adv_margin_steps", ">= 0")
    methods = {"saliency", "input_x_gradient", "integrated_gradients"}
    need(set(cfg["explanation_methods"]) <= methods and cfg["explanation_methods"] != [], "explanation_methods",
         f"a non-empty list of {sorted(methods)}")
    need(set(cfg["explanation_pairs"]) <= {"random", "cluster"}, "explanation_pairs", "a list of random / cluster")
    need(len(cfg["explanation_beta"]) == 2 and min(cfg["explanation_beta"]) > 0, "explanation_beta",
         "[start, end], both > 0")
    need(cfg["sep_base"] in ("standard", "pgd_at"), "sep_base", "standard or pgd_at")
    need(cfg["sep_explanation_method"] in ("saliency", "input_x_gradient"), "sep_explanation_method",
         "saliency or input_x_gradient")
    for key in ("explanation_n_inputs", "explanation_n_pairs", "explanation_n_clusters", "explanation_steps",
                "explanation_topk", "explanation_sensitivity_samples", "explanation_n_steps", "pgd_at_steps"):
        need(cfg[key] >= 1, key, ">= 1")
    for key in ("pgd_at_eps", "explanation_eps", "explanation_step_size", "sep_sigma"):
        need(cfg[key] > 0, key, "> 0")
    from variants import VariantError, parse_variant_specs  # noqa: PLC0415 - variants imports config

    try:
        parse_variant_specs(cfg["variants"])
    except VariantError as exc:
        raise ConfigError(f"{source}: key 'variants': {exc}") from None


def config_hash(cfg: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    """Short SHA-256 of the (selected) resolved config, stored with artifacts to detect drift."""
    chosen = {k: cfg[k] for k in (keys if keys is not None else sorted(cfg))}
    blob = json.dumps(chosen, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Keys that determine a trained model: a checkpoint is stale when any of these changes.
# The model's own seed is stored in its checkpoint, so ``seed``/``n_models`` are not listed.
TRAINING_KEYS = ("dataset", "data_dir", "data_path", "n_train", "n_val", "n_test", "split_seed", "arch",
                 "arch_kwargs", "n_classes", "batch_size", "learning_rate", "num_epochs", "weight_decay")


def output_root() -> Path:
    """Where ``model/`` and ``results/`` live: the repo root, or ``$PIPELINE_OUTPUT_ROOT`` when set
    (the tests point it at a temporary folder so they never touch the repo's artifacts)."""
    env = os.environ.get("PIPELINE_OUTPUT_ROOT")
    return Path(env) if env else ROOT


def anchored(path: str | Path) -> Path:
    """A config path anchored at the repo root (absolute paths stay as they are)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def resolve_device(cfg: dict[str, Any]):
    """``device: auto`` picks CUDA when present, else CPU."""
    import torch

    if cfg["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg['device']!r} requested but CUDA is not available")
    return torch.device(cfg["device"])


def stage_parser(description: str):
    """The command line every stage shares: ``--config`` and repeatable ``--set key=value``."""
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(anchored("configs/default.yaml")),
                        help="experiment YAML (configs/*.yaml); relative paths from the working directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    return parser


def load_stage_config(args) -> dict[str, Any]:
    """Resolve a stage's config from its parsed ``--config``/``--set`` and apply ``num_threads``."""
    cfg = load_config(args.config, args.set)
    if cfg["num_threads"]:
        import torch

        torch.set_num_threads(cfg["num_threads"])
    return cfg
