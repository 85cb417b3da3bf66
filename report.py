"""One report of a run: ``results/<run>/REPORT.md``, every number read from the artifacts.

    python report.py [--config configs/default.yaml] [--set key=value ...]

Sections: configuration and environment; accuracy; DeepFool robustness radius original vs
retrained; DSA corner-case AUROC; the removed corner cases; misprediction detectors; adversarial
accuracy and transferability. A section whose artifacts are missing stops the report with a
message naming the missing file (run the stage that writes it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from artifacts import atomic_write_text, load_json, results_dir, stage_main, update_manifest
from config import load_stage_config, stage_parser

# Published figures quoted for comparison (not computed here): Wu et al. arXiv 1910.00387, CIFAR-10.
WU_ET_AL_CIFAR10_AUROC = {"conductance": 0.927, "lcr": 0.887, "lcr+conductance": 0.933}


def parse_args(argv=None) -> argparse.Namespace:
    p = stage_parser("Write results/<run>/REPORT.md from the run's artifacts.")
    return p.parse_args(argv)


def ci(m: dict, digits: int = 4, signed: bool = False) -> str:
    """``mean [low, high]`` from a metrics.mean_ci dict."""
    if not m or m.get("n", 0) == 0 or m.get("mean") is None or math.isnan(m["mean"]):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(m['mean'])} [{f.format(m['ci_low'])}, {f.format(m['ci_high'])}]"


def num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def section_environment(rdir: Path) -> list[str]:
    man = load_json(rdir / "manifest.json", ("config", "git_commit", "versions", "stages"))
    cfg, ver = man["config"], man["versions"]
    lines = ["## Configuration and environment", "",
             f"Run `{man['run']}` on dataset `{cfg['dataset']}` (fingerprint `{man.get('dataset_fingerprint', 'n/a')}`), "
             f"architecture `{cfg['arch']}`, {cfg['n_models']} models with seeds {man['seeds']}; "
             f"commit `{man['git_commit']}`, config hash `{man['config_hash']}`.", "",
             f"Environment: Python {ver.get('python')}, torch {ver.get('torch')}, numpy {ver.get('numpy')}, "
             f"scikit-learn {ver.get('scikit-learn')}, captum {ver.get('captum')} on {ver.get('platform')}.", "",
             "| stage | command | wall time (s) |", "|---|---|---|"]
    for name, st in man["stages"].items():
        lines.append(f"| {name} | `{st['command']}` | {st['seconds']:.1f} |")
    keys = ("n_train", "n_val", "n_test", "num_epochs", "batch_size", "learning_rate", "deepfool_overshoot",
            "deepfool_max_iter", "dsa_variants", "cc_variant", "cc_layer", "remove_count", "mutation_operators",
            "mutation_rates", "n_mutants", "conductance_layer", "conductance_n_steps")
    lines += ["", "Key settings: " + ", ".join(f"`{k}={cfg[k]}`" for k in keys if k in cfg) + "."]
    return lines


def section_accuracy(rdir: Path) -> list[str]:
    orig = load_json(rdir / "train.json", ("models", "test_accuracy"), made_by="main.py")
    retr = load_json(rdir / "train_retrained.json", ("models", "test_accuracy"), made_by="main.py -is_retrain True")
    by_seed = {m["seed"]: m for m in retr["models"]}
    lines = ["## Accuracy", "",
             f"Test accuracy of each model trained on all {orig['n_train']} training inputs (original) and on the "
             f"{retr['n_train']} kept after removing corner cases (retrained, same seed).", "",
             "| seed | original | retrained |", "|---|---|---|"]
    for m in orig["models"]:
        r = by_seed.get(m["seed"], {})
        lines.append(f"| {m['seed']} | {num(m['test_accuracy'])} | {num(r.get('test_accuracy'))} |")
    lines.append(f"| mean [95% CI] | {ci(orig['test_accuracy'])} | {ci(retr['test_accuracy'])} |")
    return lines


def section_robustness(rdir: Path) -> list[str]:
    from main import comparison_markdown

    cmp = load_json(rdir / "compare.json", ("metrics", "seeds", "n_train"), made_by="main.py -is_retrain True")
    rob = {k: load_json(rdir / f"robustness_{k}.json", ("across_models",), made_by="main.py")
           for k in ("original", "retrained")}
    lines = ["## DeepFool robustness radius: original vs retrained", "",
             "The robustness radius of an input is the norm of the minimal perturbation DeepFool finds to change the "
             "model's prediction (Moosavi-Dezfooli et al., arXiv 1511.04599); ρ_adv is its mean relative to ‖x‖₂ "
             "(the DeepFool paper reports 0.20 for LeNet on MNIST), and the corner-case paper (Ouyang et al.) compares "
             "the mean radius before and after removing corner cases. Larger means more robust.", "",
             comparison_markdown(cmp).rstrip(), "",
             "| model set | non-converged fraction | median radius |", "|---|---|---|"]
    for kind, data in rob.items():
        s = data["across_models"]
        lines.append(f"| {kind} | {ci(s.get('nonconverged_fraction', {}))} | {ci(s.get('median_radius_l2', {}))} |")
    lines += ["", "![robustness comparison](compare.png)", "",
              "![radius histogram, original](robustness_original.png)"]
    return lines


def section_dsa(rdir: Path) -> list[str]:
    cc = load_json(rdir / "corner_cases.json", ("auroc_summary", "removed", "n_removed"), made_by="cc_remove.py")
    lines = ["## Corner cases: DSA", "",
             "Distance-based surprise adequacy (Kim et al., arXiv 1808.08444) measures how much closer an input's "
             "activation lies to another class than to its own; as a corner-case descriptor (Ouyang et al.) it should "
             "rank wrong test predictions above right ones. AUROC 0.5 is chance, 1.0 perfect.", "",
             "| variant | layer | AUROC (mean [95% CI] over models) | AUPR | wrong test predictions (mean) |",
             "|---|---|---|---|---|"]
    for row in cc["auroc_summary"]:
        lines.append(f"| {row['variant']} | {row['layer']} | {ci(row['auroc'], 3)} | {ci(row['aupr'], 3)} | "
                     f"{row['n_wrong_mean']:.1f} |")
    freq = [r["frequency"] for r in cc["removed"]]
    lines += ["", f"Removed {cc['n_removed']} of {cc['n_train']} training inputs ranked by `{cc['variant']}` DSA at "
                  f"`{cc['layer']}` (grouped by {cc['group_by']}): those most often in the models' top-{cc['dsa_top']} "
                  f"sets; in between {min(freq)} and {max(freq)} of {cc['threshold']['n_models']} models' sets.", "",
              "![removed corner cases](corner_cases.png)", "", "![DSA of correct vs wrong](dsa_hist.png)"]
    return lines


def section_detectors(rdir: Path) -> list[str]:
    from detectors import detectors_markdown

    det = load_json(rdir / "detectors.json", ("summary", "per_model", "seeds"), made_by="detectors.py")
    lines = ["## Misprediction detectors", "",
             "Each detector scores how likely a test prediction is wrong: max-softmax (baseline), DSA, the label change "
             "rate under model mutation (LCR, Wang et al. arXiv 1812.05793) and classifiers on layer conductance "
             "(Wu et al. arXiv 1910.00387), alone and combined with LCR. AUROC 0.5 is chance, 1.0 perfect.", "",
             detectors_markdown(det).rstrip(), "",
             "Published for comparison (Wu et al., CIFAR-10, their CNN): "
             + ", ".join(f"{k} {v:.3f}" for k, v in WU_ET_AL_CIFAR10_AUROC.items())
             + ". Our figures differ in dataset (MNIST subset unless configured), model and split sizes; with few wrong "
               "validation predictions the fitted detectors have little to learn from.", "",
             "![ROC curves](roc.png)"]
    man = load_json(rdir / "manifest.json", ("stages",))
    delta = man["stages"].get("conductance", {}).get("convergence_delta", {}).get("test")
    if delta:
        lines += ["", f"Conductance completeness (captum's convergence delta, test split): the layer's conductance "
                      f"sums to F(x) − F(baseline) within a median {100 * delta['median_rel_delta']:.2f}% "
                      f"(max {100 * delta['max_rel_delta']:.2f}%) over {delta['n']} model-input pairs."]
    return lines


def section_adversarial(rdir: Path) -> list[str]:
    adv = load_json(rdir / "adversarial.json", made_by="adversarial.py")
    lines = ["## Adversarial evaluation", "",
             "Accuracy under FGSM (Goodfellow et al., arXiv 1412.6572) and PGD (Madry et al., arXiv 1706.06083) as ε "
             "grows; the robustness margin is the smallest ε in the grid at which accuracy falls below "
             f"{adv.get('target_accuracy', 'the target')}; transferability evaluates inputs crafted on one model on the "
             "other model of the same seed.", ""]
    lines += adversarial_tables(adv)
    lines += ["", "![accuracy vs eps](adversarial.png)"]
    return lines


def adversarial_tables(adv: dict) -> list[str]:
    """Accuracy per attack and ε (mean [95% CI] over models) for each model set, the robustness
    margin, and the transfer matrix — all from adversarial.json (written by adversarial.py)."""
    titles = {"fgsm": "FGSM (L∞)", "pgd_linf": f"PGD-L∞ ({adv['pgd']['steps']} steps)",
              "pgd_l2": f"PGD-L2 ({adv['pgd']['steps']} steps)"}
    kinds = adv["kinds"]
    lines = [f"Attacked: {adv['n_test']} test inputs per model.", ""]
    for attack, info in adv["attacks"].items():
        lines += [f"**{titles.get(attack, attack)}**: accuracy (success rate among clean-correct inputs)", "",
                  "| ε | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for j, eps in enumerate(info["eps"]):
            cells = []
            for kind in kinds:
                block = adv["per_kind"][kind][attack]
                cells.append(f"{ci(block['accuracy'][j], 3)} ({block['success_rate'][j]['mean']:.3f})")
            lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
        margins = []
        for kind in kinds:
            block = adv["per_kind"][kind][attack]
            missing = block.get("n_models_without_margin", 0)
            margins.append(f"{kind} {ci(block['robustness_margin'], 3)}"
                           + (f" ({missing} models never below target)" if missing else ""))
        lines += ["", f"Robustness margin (smallest ε with accuracy < {adv['target_accuracy']}): "
                  + "; ".join(margins) + ".", ""]
    tr = adv.get("transfer") or {}
    if tr.get("matrix_mean_accuracy"):
        tk = tr["kinds"]
        lines += [f"**Transferability** ({tr['attack']}, ε = {tr['eps_linf']:g}): accuracy of the target model on "
                  "inputs crafted on the source model of the same seed (mean [95% CI] over seeds; diagonal = white-box).",
                  "", "| source ↓ / target → | " + " | ".join(tk) + " |", "|---|" + "---|" * len(tk)]
        for src in tk:
            lines.append(f"| {src} | " + " | ".join(ci(tr["mean"][src][dst], 3) for dst in tk) + " |")
    elif tr.get("note") or adv.get("note"):
        lines.append(f"Transferability: {tr.get('note') or adv.get('note')}")
    return lines


SECTIONS = (section_environment, section_accuracy, section_robustness, section_dsa, section_detectors,
            section_adversarial)


def build_report(rdir: Path) -> str:
    parts = [f"# Robustness report: `{rdir.name}`", "",
             "Generated by `python report.py` from the artifacts in this folder; every number below is read from them.", ""]
    for section in SECTIONS:
        parts += section(rdir) + [""]
    return "\n".join(parts)


@stage_main()
def main(argv=None) -> int:
    cfg = load_stage_config(parse_args(argv))
    start = time.perf_counter()
    rdir = results_dir(cfg)
    text = build_report(rdir)
    atomic_write_text(rdir / "REPORT.md", text)
    update_manifest(cfg, "report", time.perf_counter() - start)
    print(f"[report] {rdir / 'REPORT.md'} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
