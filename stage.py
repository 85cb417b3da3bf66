"""One runner for every stage: config → device → data → compute → write → manifest → summary line.

A stage is a name, the config keys it reads, a ``compute(ctx)`` function and a ``write(ctx, result)``
function. The runner gives the stage a view of the config restricted to its declared keys (reading
any other key is a programming error, raised at once), so what the manifest records per stage is
exactly the configuration that stage ran with, with its hash. The same key lists drive the Makefile:
``python stage.py stamp <stage> --config X`` rewrites ``results/<run>/.stamps/<stage>.json`` only when
those keys' values change, and each Make target depends on its stage's stamp rather than on the whole
YAML — so editing ``adv_n_test`` reruns the adversarial stage and the report, not the training.

    python stage.py stamp adversarial --config configs/default.yaml   # used by the Makefile
    python stage.py keys adversarial                                   # the keys a stage reads
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from config import TRAINING_KEYS, config_hash, load_config, output_root, stage_parser

# --- what each stage reads ------------------------------------------------------------------------
RUN_KEYS = ("name", "seed", "n_models", "device", "num_threads", "eval_batch_size")
MODEL_KEYS = RUN_KEYS + TRAINING_KEYS  # a stage that loads checkpoints checks them against TRAINING_KEYS
VARIANT_KEYS = ("variants", "remove_counts", "remove_count", "remove_fraction")
REGIME_KEYS = ("pgd_at_eps", "pgd_at_steps", "pgd_at_step_size", "sep_reg_weight", "sep_sharp_reg_weight",
               "sep_sigma", "sep_base", "sep_explanation_method")  # the training regimes' settings (regimes.py)
EXPLANATION_KEYS = ("explanation_methods", "explanation_n_steps", "explanation_n_inputs", "explanation_pairs",
                    "explanation_n_pairs", "explanation_n_clusters", "explanation_eps", "explanation_steps",
                    "explanation_step_size", "explanation_gamma", "explanation_beta", "explanation_topk",
                    "explanation_sensitivity_radius", "explanation_sensitivity_samples",
                    "explanation_permutations", "adv_report_eps")
DEEPFOOL_KEYS = ("deepfool_num_classes", "deepfool_overshoot", "deepfool_max_iter", "deepfool_clip",
                 "deepfool_n_test", "deepfool_batch_size")
DSA_KEYS = ("dsa_variants", "dsa_layers", "dsa_k", "dsa_group_by", "dsa_chunk_size", "dsa_top",
            "cc_variant", "cc_layer", "bootstrap", "layer_aliases")
MUTATION_KEYS = ("mutation_operators", "mutation_rates", "n_mutants", "max_draws", "mutation_threshold",
                 "lcr_splits")
CONDUCTANCE_KEYS = ("conductance_layer", "conductance_n_steps", "conductance_baseline",
                    "conductance_internal_batch_size", "conductance_splits", "layer_aliases")
DETECTOR_KEYS = ("detector_lcr_operator", "detector_lcr_rate", "detector_mlp_hidden", "cc_variant",
                 "cc_layer", "bootstrap")
ADV_KEYS = ("adv_eps_linf", "adv_eps_l2", "pgd_steps", "pgd_step_size", "pgd_l2_step_factor",
            "pgd_random_start", "adv_target_accuracy", "adv_n_test", "adv_transfer_eps", "adv_margin_steps")

# How a stage's (stage, variant, seed) units run (executor.py), not what they compute. The stages that
# run units may read these keys, but they stay outside the config view's items: they change no config
# hash, manifest config, Make stamp or checkpoint, so a run under ``executor: ray`` has the same bytes
# as a local one and switching executor reruns nothing.
EXECUTOR_KEYS = ("executor", "local_workers", "ray_address", "ray_num_cpus", "ray_num_gpus", "ray_max_retries")
UNIT_STAGES = ("train", "train_variants", "robustness", "adversarial", "conductance")

STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "train": MODEL_KEYS,                                           # the baseline models
    "train_variants": MODEL_KEYS + VARIANT_KEYS + REGIME_KEYS,     # every other variant
    "robustness": MODEL_KEYS + VARIANT_KEYS + DEEPFOOL_KEYS + ("cc_variant", "cc_layer", "dsa_k", "dsa_group_by",
                                                               "dsa_chunk_size", "layer_aliases"),
    "cc_remove": MODEL_KEYS + VARIANT_KEYS + DSA_KEYS,
    "mutation": MODEL_KEYS + MUTATION_KEYS,
    "conductance": MODEL_KEYS + CONDUCTANCE_KEYS,
    "detectors": MODEL_KEYS + DETECTOR_KEYS,
    "adversarial": MODEL_KEYS + VARIANT_KEYS + ADV_KEYS,
    "explanation": MODEL_KEYS + VARIANT_KEYS + EXPLANATION_KEYS,
    "compare": ("name", "seed", "n_models") + VARIANT_KEYS + ("adv_report_eps", "adv_target_accuracy"),
    "report": ("name",),
}


class UndeclaredConfigKey(LookupError):
    """A stage read a config key missing from its STAGE_KEYS entry (a bug, not a user error)."""


class StageConfig(dict):
    """The resolved config restricted to one stage's keys (its items), plus, for a stage that runs
    units, the executor settings: readable as ``cfg["executor"]`` but not items, so never hashed."""

    def __init__(self, stage: str, full: dict[str, Any], keys: tuple[str, ...]):
        super().__init__({k: full[k] for k in dict.fromkeys(keys)})
        self.stage = stage
        self.settings = {k: full[k] for k in EXECUTOR_KEYS if k in full} if stage in UNIT_STAGES else {}

    def __missing__(self, key):
        if key in self.settings:
            return self.settings[key]
        raise UndeclaredConfigKey(f"stage {self.stage!r} read config key {key!r}, which is not in "
                                  f"stage.STAGE_KEYS[{self.stage!r}]")


def stage_config(stage: str, full: dict[str, Any]) -> StageConfig:
    if stage not in STAGE_KEYS:
        raise KeyError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_KEYS)}")
    return StageConfig(stage, full, STAGE_KEYS[stage])


@dataclass
class Context:
    """What a stage's compute and write functions get: its config view, device, data, folders."""
    stage: str
    cfg: StageConfig
    args: argparse.Namespace | None = None
    info: dict = field(default_factory=dict)  # extra manifest fields the stage wants recorded

    @cached_property
    def device(self):
        from config import resolve_device

        return resolve_device(self.cfg)

    @cached_property
    def dataset(self):
        from mnistload import load_dataset

        return load_dataset(self.cfg)

    @property
    def results(self) -> Path:
        from artifacts import results_dir

        return results_dir(self.cfg)

    @property
    def fingerprint(self) -> str | None:
        return self.__dict__["dataset"].fingerprint if "dataset" in self.__dict__ else None


def run(stage: str, full_cfg: dict[str, Any], compute: Callable[[Context], Any],
        write: Callable[[Context, Any], str], args: argparse.Namespace | None = None,
        label: str | None = None) -> Any:
    """Run one stage and record it in the manifest under ``label`` (default: the stage name).

    ``write`` returns the stage's summary line; the runner prints it with the wall time.
    """
    import artifacts

    cfg = stage_config(stage, full_cfg)
    if "num_threads" in cfg and cfg["num_threads"]:
        import torch

        torch.set_num_threads(cfg["num_threads"])
    artifacts.check_layout(cfg)
    if "seed" in cfg:
        artifacts.set_seed(cfg["seed"])
    ctx = Context(stage, cfg, args)
    start = time.perf_counter()
    result = compute(ctx)
    line = write(ctx, result)
    seconds = time.perf_counter() - start
    artifacts.update_manifest(cfg, label or stage, seconds, ctx.fingerprint, ctx.info)
    print(f"[{label or stage}] {line} ({seconds:.1f} s)")
    return result


def script(stage: str, compute: Callable, write: Callable, description: str,
           extra_errors: tuple[type[BaseException], ...] = ()) -> Callable:
    """``main(argv=None)`` of a one-stage script: ``--config``/``--set``, one-line errors, exit 2."""
    from artifacts import stage_main

    @stage_main(*extra_errors)
    def main(argv=None) -> int:
        args = stage_parser(description).parse_args(argv)
        run(stage, load_config(args.config, args.set), compute, write, args)
        return 0
    return main


# --- Make stamps -----------------------------------------------------------------------------------
def stamp(stage: str, full_cfg: dict[str, Any]) -> Path:
    """Write ``results/<run>/.stamps/<stage>.json`` (the stage's keys and values) only if it changed,
    so its modification time moves only when a key the stage reads changes."""
    cfg = stage_config(stage, full_cfg)
    text = json.dumps({"stage": stage, "config_hash": config_hash(cfg), "config": dict(cfg)},
                      indent=1, sort_keys=True) + "\n"
    path = output_root() / "results" / cfg["name"] / ".stamps" / f"{stage}.json"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic; imports no torch, so the Makefile's stamps stay cheap
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("stamp", "keys"))
    p.add_argument("stages", nargs="+", help=f"stage names: {', '.join(STAGE_KEYS)}")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    from config import ConfigError

    try:
        cfg = load_config(args.config, args.set)
        for stage in args.stages:
            if args.action == "keys":
                print(f"{stage}: {' '.join(stage_config(stage, cfg))}")
            else:
                stamp(stage, cfg)
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    sys.exit(main())
