"""One report of a run: ``results/<run>/REPORT.md``, every number read from the artifacts.

    python report.py [--config configs/default.yaml] [--set key=value ...]

Sections: configuration and environment; the training variants compared paired by seed (accuracy,
DeepFool radius, ρ_adv, PGD accuracy and margins; differences vs baseline and corner_cases − random
with CIs, raw and Holm-adjusted p-values; dose–response); DSA corner-case AUROC; misprediction
detectors; adversarial accuracy and transferability. A section whose artifacts are missing stops the
report with a message naming the missing file (run the stage that writes it).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import stage
from artifacts import atomic_write_text, load_json

# Published figures quoted for comparison (not computed here): Wu et al. arXiv 1910.00387, CIFAR-10.
WU_ET_AL_CIFAR10_AUROC = {"conductance": 0.927, "lcr": 0.887, "lcr+conductance": 0.933}


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
             f"Run `{man['run']}` on dataset `{cfg.get('dataset')}` (fingerprint `{man.get('dataset_fingerprint', 'n/a')}`), "
             f"architecture `{cfg.get('arch')}`, {cfg.get('n_models')} models per variant with seeds {man.get('seeds')}; "
             f"commit `{man['git_commit']}`.", "",
             f"Environment: Python {ver.get('python')}, torch {ver.get('torch')}, numpy {ver.get('numpy')}, "
             f"scikit-learn {ver.get('scikit-learn')}, captum {ver.get('captum')} on {ver.get('platform')}.", "",
             "Each stage ran with the config keys it reads; their hash is below (full values in `manifest.json`).", "",
             "| stage | command | config hash | wall time (s) |", "|---|---|---|---|"]
    for name, st in man["stages"].items():
        lines.append(f"| {name} | `{st['command']}` | `{st.get('config_hash', 'n/a')}` | {st['seconds']:.1f} |")
    keys = ("n_train", "n_val", "n_test", "num_epochs", "batch_size", "learning_rate", "variants", "remove_counts",
            "remove_count", "deepfool_overshoot", "deepfool_max_iter", "dsa_variants", "cc_variant", "cc_layer",
            "mutation_operators", "mutation_rates", "n_mutants", "conductance_layer", "conductance_n_steps",
            "adv_n_test", "adv_margin_steps")
    lines += ["", "Key settings: " + ", ".join(f"`{k}={cfg[k]}`" for k in keys if k in cfg) + "."]
    return lines


def section_variants(rdir: Path) -> list[str]:
    from compare import MEASURES, fmt_ci, fmt_p, variants_markdown

    cmp = load_json(rdir / "variants.json", ("variants", "comparisons", "dose_response"), made_by="compare.py")
    lines = ["## Training variants, paired by seed", "",
             "Does removing the most surprising training inputs (corner cases, by DSA) change robustness more than "
             "removing the same number of random inputs? Each variant trains the same seeds as the baseline; every "
             "comparison pairs models of the same seed. Larger radius, ρ_adv, PGD accuracy and margin = more robust.", "",
             variants_markdown(cmp).rstrip(), ""]
    answer = [r for r in cmp["comparisons"] if r["comparison"] == "corner_cases_vs_random"]
    if answer:
        lines += ["**The contrast that answers the question** (corner_cases − random at the same N, paired by seed):", ""]
        for r in answer:
            d = r["difference"]
            verdict = ("interval excludes 0" if d["n"] > 1 and (d["ci_low"] > 0 or d["ci_high"] < 0)
                       else "interval contains 0")
            lines.append(f"- {r['description']}, {MEASURES[r['measure']][0]}: {fmt_ci(d, 4, True)} ({verdict}; "
                         f"t p = {fmt_p(r['t_pvalue'])}, Holm {fmt_p(r['t_pvalue_holm'])})")
        lines.append("")
    if any(len(c["n_remove"]) > 2 for c in cmp["dose_response"].values()):
        lines += ["Dose–response (N = 0 is the baseline):", "", "![dose-response](dose_response.png)", ""]
    else:
        lines += ["![variants](dose_response.png)", ""]
    return lines


def section_robustness(rdir: Path) -> list[str]:
    rob = load_json(rdir / "robustness.json", ("variants",), made_by="robustness.py")
    lines = ["## DeepFool robustness radius per variant", "",
             "The robustness radius of an input is the norm of the minimal perturbation DeepFool finds to change the "
             "model's prediction (Moosavi-Dezfooli et al., arXiv 1511.04599); ρ_adv is its mean relative to ‖x‖₂ "
             "(the DeepFool paper reports 0.20 for LeNet on MNIST). Mean [95% CI] over seeds.", "",
             "| variant | mean radius | median radius | ρ_adv | non-converged fraction |", "|---|---|---|---|---|"]
    for name, data in rob["variants"].items():
        s = data["across_models"]
        lines.append(f"| {name} | {ci(s.get('mean_radius_l2', {}))} | {ci(s.get('median_radius_l2', {}))} | "
                     f"{ci(s.get('rho_adv', {}))} | {ci(s.get('nonconverged_fraction', {}))} |")
    lines += ["", "![radius histogram, baseline](variants/baseline/robustness.png)"]
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
             "grows, mean [95% CI over seeds; t on the empirical logit, inside [0, 1]]; the robustness margin is the "
             f"smallest ε at which accuracy falls below {adv.get('target_accuracy', 'the target')}, bracketed by the "
             f"grid and refined per model by {adv.get('margin_steps', 0)} bisection steps; transferability evaluates "
             "inputs crafted on one variant's model on every variant's model of the same seed.", ""]
    lines += adversarial_tables(adv)
    lines += ["", "![accuracy vs eps](adversarial.png)"]
    return lines


def adversarial_tables(adv: dict) -> list[str]:
    """Accuracy per attack and ε (mean [95% CI] over models) for each model set, the robustness
    margin, and the transfer matrix — all from adversarial.json (written by adversarial.py)."""
    titles = {"fgsm": "FGSM (L∞)", "pgd_linf": f"PGD-L∞ ({adv['pgd']['steps']} steps)",
              "pgd_l2": f"PGD-L2 ({adv['pgd']['steps']} steps)"}
    kinds = adv["variants"]
    lines = [f"Attacked: {adv['n_test']} test inputs per model.", ""]
    for attack, info in adv["attacks"].items():
        lines += [f"**{titles.get(attack, attack)}**: accuracy (success rate among clean-correct inputs)", "",
                  "| ε | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for j, eps in enumerate(info["eps"]):
            cells = []
            for kind in kinds:
                block = adv["per_variant"][kind][attack]
                cells.append(f"{ci(block['accuracy'][j], 3)} ({block['success_rate'][j]['mean']:.3f})")
            lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
        margins = []
        for kind in kinds:
            block = adv["per_variant"][kind][attack]
            missing = block.get("n_models_without_margin", 0)
            margins.append(f"{kind} {ci(block['robustness_margin'], 3)}"
                           + (f" ({missing} models never below target)" if missing else ""))
        lines += ["", f"Robustness margin (smallest ε with accuracy < {adv['target_accuracy']}, bisection-refined): "
                  + "; ".join(margins) + ".", ""]
    tr = adv.get("transfer") or {}
    if tr.get("matrix_mean_accuracy"):
        tk = tr["kinds"]
        lines += [f"**Transferability** ({tr['attack']}, ε = {tr['eps_linf']:g}): accuracy of the target model on "
                  "inputs crafted on the source model of the same seed (mean [95% CI] over seeds; diagonal = white-box).",
                  "", "| source ↓ / target → | " + " | ".join(tk) + " |", "|---|" + "---|" * len(tk)]
        for src in tk:
            lines.append(f"| {src} | " + " | ".join(ci(tr["mean"][src][dst], 3) for dst in tk) + " |")

    return lines


def section_explanation(rdir: Path) -> list[str]:
    """Explanation robustness vs classification robustness (only when explanation.py ran)."""
    if not (rdir / "explanation.json").is_file():
        return []
    from explanation import explanation_markdown

    res = load_json(rdir / "explanation.json", ("models", "correlation", "seed_table"), made_by="explanation.py")
    lines = ["## Explanation robustness vs classification robustness", "",
             "Chen et al. (arXiv 2403.06013) claim that training that flattens or sharpens the explanation loss landscape "
             "(SEP) moves explanation robustness a lot while adversarial accuracy hardly moves, so the two are not strongly "
             "correlated. Larger L_e^end and top-k intersection = a harder-to-manipulate explanation; larger "
             "sensitivity = a less robust one.", "", explanation_markdown(res).rstrip(), ""]
    lines += ["What this run's data says about the claim:", ""]
    for c in res["correlation"]:
        if c["classification"] != "pgd_accuracy" or not math.isfinite(c.get("spearman", math.nan)):
            continue
        lo, hi = c["spearman_ci"]
        strength = ("strong" if abs(c["spearman"]) >= 0.7 else "moderate" if abs(c["spearman"]) >= 0.4 else "weak")
        excl = "excludes 0" if (lo > 0 or hi < 0) else "contains 0"
        lines.append(f"- PGD accuracy vs {c['explanation']} ({c['method']}): Spearman {c['spearman']:+.2f} "
                     f"[{lo:+.2f}, {hi:+.2f}] ({strength}; the interval {excl}; permutation p = {c['spearman_perm_p']:.3g}) "
                     f"over {c['n_models']} models.")
    lines += ["", "![explanation vs classification robustness](explanation.png)"]
    return lines


SECTIONS = (section_environment, section_variants, section_robustness, section_dsa, section_detectors,
            section_adversarial, section_explanation)


def build_report(rdir: Path) -> str:
    parts = [f"# Robustness report: `{rdir.name}`", "",
             "Generated by `python report.py` from the artifacts in this folder; every number below is read from them.", ""]
    for section in SECTIONS:
        parts += section(rdir) + [""]
    return "\n".join(parts)


def compute(ctx: stage.Context) -> str:
    return build_report(ctx.results)


def write(ctx: stage.Context, text: str) -> str:
    atomic_write_text(ctx.results / "REPORT.md", text)
    return f"{ctx.results / 'REPORT.md'} ({len(text.splitlines())} lines)"


main = stage.script("report", compute, write, "Write results/<run>/REPORT.md from the run's artifacts.")


if __name__ == "__main__":
    sys.exit(main())
