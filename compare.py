"""Compare the training variants, paired by seed: does variant V change measure M, and does removing
corner cases change it more than removing the same number of random inputs?

    python compare.py [--config configs/X.yaml] [--set key=value ...]

Reads each variant's ``train.json``, ``robustness.json`` (the index of robustness.py) and, when
present, ``adversarial.json``; writes ``variants.json`` (everything, machine-readable),
``variants.md`` and ``dose_response.png``. ``python main.py -is_retrain True`` writes the seed
workflow's two-variant version of the same comparison, ``compare.{json,md,png}``.

For every measure (test accuracy, mean DeepFool radius, ρ_adv, PGD-L∞ accuracy at ``adv_report_eps``,
PGD-L∞ and PGD-L2 robustness margins, DSA's AUROC for wrong predictions against the model's own
training inputs):
- each variant's mean over seeds with a 95% interval (Student t; accuracies: t on the empirical
  logit, so the interval stays inside [0, 1] — metrics.proportion_ci; AUROC: t on the logit,
  metrics.unit_interval_ci);
- every variant − baseline, paired by seed: mean difference with its 95% t interval, paired t-test
  and Wilcoxon signed-rank test (exact; with 5 seeds its smallest two-sided p is 0.0625);
- the contrasts that answer the corner-case question: corner_cases − <other removal rule> at the same
  N and regime, paired by seed (``random`` is the control; the class-matched and least-surprising
  rules when configured);
- Holm's step-down correction over the whole family of tests above, next to the raw p-values.
"""
from __future__ import annotations

import math
import sys


import artifacts
import stage
from metrics import mean_ci, paired_difference
from variants import REMOVAL_RULES, Variant, parse_variant_name

# measure key: (label, kind); "proportion" measures get a bounded interval
MEASURES = {
    "accuracy": ("test accuracy", "proportion"),
    "mean_radius": ("mean DeepFool radius ‖r̂‖₂", "continuous"),
    "rho_adv": ("ρ_adv", "continuous"),
    "pgd_accuracy": ("PGD-L∞ accuracy", "proportion"),
    "pgd_linf_margin": ("PGD-L∞ robustness margin", "continuous"),
    "pgd_l2_margin": ("PGD-L2 robustness margin", "continuous"),
    "dsa_auroc": ("DSA AUROC (wrong vs right test predictions)", "unit"),
}


def _holm(pvalues: list[float]) -> list[float]:
    from metrics import holm

    return holm(pvalues)


def summary_ci(values: list[float], kind: str, totals: list[int] | None) -> dict:
    if kind == "proportion" and totals:
        from metrics import proportion_ci

        return proportion_ci([int(round(v * n)) for v, n in zip(values, totals)], totals)
    if kind == "unit":  # a mean of values in [0, 1] (AUROC): t interval on the logit, inside [0, 1]
        from metrics import unit_interval_ci

        return unit_interval_ci(values)
    return mean_ci(values)


def report_eps(grid: list[float], wanted: float) -> float | None:
    positive = [e for e in grid if e > 0]
    return min(positive, key=lambda e: (abs(e - wanted), e)) if positive else None


def collect(cfg: dict, names: list[str], with_adversarial: bool = True) -> dict:
    """Per (variant, seed) values of every measure, read from the artifacts."""
    rdir = artifacts.results_dir(cfg)
    rob = artifacts.load_json(rdir / "robustness.json", ("variants",), made_by="python robustness.py")
    adv = None
    if with_adversarial and (rdir / "adversarial.json").is_file():
        adv = artifacts.load_json(rdir / "adversarial.json", ("per_model", "variants"), made_by="python adversarial.py")
    eps = report_eps(adv["attacks"]["pgd_linf"]["eps"], cfg["adv_report_eps"]) if adv else None
    out = {}
    for name in names:
        train = artifacts.load_json(artifacts.variant_dir(cfg, name) / "train.json", ("models",),
                                    made_by=f"python main.py --variant {name}")
        if name not in rob["variants"]:
            raise artifacts.ArtifactError(f"{rdir / 'robustness.json'}: no radius for variant {name!r} "
                                          "(run `python robustness.py`)")
        r = rob["variants"][name]
        by_seed = {m["seed"]: m for m in train["models"]}
        radius = dict(zip(r["seeds"], r["mean_radius_l2"]))
        rho = dict(zip(r["seeds"], r["rho_adv"]))
        seeds = sorted(set(by_seed) & set(radius))
        values = {"accuracy": [by_seed[s]["test_accuracy"] for s in seeds],
                  "mean_radius": [radius[s] for s in seeds], "rho_adv": [rho[s] for s in seeds]}
        totals = {"accuracy": [by_seed[s].get("n_test", 0) for s in seeds]}
        auroc = dict(zip(r["seeds"], r.get("dsa_auroc", [])))
        if all(s in auroc and auroc[s] is not None for s in seeds):  # robustness.json from before: no AUROC
            values["dsa_auroc"] = [auroc[s] for s in seeds]
        if adv is not None and name in adv["per_model"]:
            pm = {m["seed"]: m for m in adv["per_model"][name]}
            seeds_adv = [s for s in seeds if s in pm]
            if seeds_adv == seeds:
                j = adv["attacks"]["pgd_linf"]["eps"].index(eps)
                values["pgd_accuracy"] = [pm[s]["attacks"]["pgd_linf"]["accuracy"][j] for s in seeds]
                totals["pgd_accuracy"] = [pm[s].get("n", adv["n_test"]) for s in seeds]
                for attack in ("pgd_linf", "pgd_l2"):
                    margins = [pm[s]["attacks"][attack]["robustness_margin"] for s in seeds]
                    values[f"{attack}_margin"] = [math.nan if m is None else m for m in margins]
        v = parse_variant_name(name)
        out[name] = {"rule": v.rule, "n_remove": v.n_remove, "regime": v.regime, "seeds": seeds,
                     "n_train": sorted({m["n_train"] for m in train["models"]}), "per_seed": values,
                     "summary": {m: summary_ci(vals, MEASURES[m][1], totals.get(m)) for m, vals in values.items()}}
    return {"variants": out, "report_eps_linf": eps}


def _pair(data: dict, a: str, b: str, measure: str) -> dict | None:
    va, vb = data[a], data[b]
    if measure not in va["per_seed"] or measure not in vb["per_seed"]:
        return None
    sa = dict(zip(va["seeds"], va["per_seed"][measure]))
    sb = dict(zip(vb["seeds"], vb["per_seed"][measure]))
    seeds = [s for s in sorted(set(sa) & set(sb)) if not (math.isnan(sa[s]) or math.isnan(sb[s]))]
    if len(seeds) < 1:
        return None
    res = paired_difference([sa[s] for s in seeds], [sb[s] for s in seeds])
    return {"seeds": seeds, **res}


def comparisons(data: dict) -> list[dict]:
    """Every variant − baseline and corner_cases − other rule (same N, same regime), every measure,
    with Holm-adjusted p-values over the whole family."""
    variants = {name: parse_variant_name(name) for name in data}
    pairs = [("vs_baseline", "baseline", name) for name in data if name != "baseline"]
    for name, v in variants.items():
        if v.rule != "corner_cases":
            continue
        for rule in REMOVAL_RULES:
            other = Variant(rule, v.n_remove, v.regime).name
            if rule != "corner_cases" and other in data:
                pairs.append((f"corner_cases_vs_{rule}", other, name))
    rows = []
    for kind, a, b in pairs:
        for measure in MEASURES:
            res = _pair(data, a, b, measure)
            if res is not None:
                rows.append({"comparison": kind, "measure": measure, "a": a, "b": b,
                             "description": f"{b} − {a}", **res})
    for test in ("t_pvalue", "wilcoxon_pvalue"):
        adjusted = _holm([r[test] for r in rows])
        for r, p in zip(rows, adjusted):
            r[f"{test}_holm"] = p
    return rows


def dose_response(data: dict) -> dict:
    """Per removal rule and regime: N → summary of each measure (N = 0 is the baseline)."""
    out: dict[str, dict] = {}
    for name, d in data.items():
        if d["rule"] == "baseline":
            continue
        key = d["rule"] if d["regime"] == "standard" else f"{d['rule']}+{d['regime']}"
        out.setdefault(key, {})[d["n_remove"]] = name
    curves = {}
    for key, by_n in out.items():
        ns = sorted(by_n)
        regime = key.partition("+")[2] or "standard"
        base = "baseline" if regime == "standard" else f"baseline+{regime}"
        names = ([base] if base in data else []) + [by_n[n] for n in ns]
        curves[key] = {"n_remove": ([0] if base in data else []) + ns, "variants": names,
                       "summary": {m: [data[v]["summary"].get(m) for v in names] for m in MEASURES}}
    return curves


def compute_comparison(cfg: dict, names: list[str], with_adversarial: bool = True) -> dict:
    collected = collect(cfg, names, with_adversarial)
    data = collected["variants"]
    return {"run": cfg["name"], "seeds": sorted({s for d in data.values() for s in d["seeds"]}),
            "report_eps_linf": collected["report_eps_linf"],
            "measures": {k: {"label": lab, "kind": kind} for k, (lab, kind) in MEASURES.items()},
            "interval_methods": {"continuous": "Student t over seeds",
                                 "proportion": "Student t over seeds on the empirical logit, back-transformed "
                                               "(inside [0, 1]); metrics.proportion_ci",
                                 "difference": "Student t over the paired per-seed differences",
                                 "multiplicity": "Holm step-down over every test in `comparisons`"},
            "variants": data, "comparisons": comparisons(data), "dose_response": dose_response(data)}


# ---------------------------------------------------------------------------------------------
# text and plots
# ---------------------------------------------------------------------------------------------
def fmt_ci(m: dict | None, digits: int = 4, signed: bool = False) -> str:
    if not m or m.get("n", 0) == 0 or m.get("mean") is None or math.isnan(m["mean"]):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(m['mean'])} [{f.format(m['ci_low'])}, {f.format(m['ci_high'])}]"


def fmt_p(p) -> str:
    return "n/a" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3g}"


def variants_markdown(cmp: dict) -> str:
    eps = cmp.get("report_eps_linf")
    cols = [m for m in MEASURES if any(m in d["summary"] for d in cmp["variants"].values())]
    label = {m: MEASURES[m][0] + (f" (ε = {eps:g})" if m == "pgd_accuracy" and eps is not None else "") for m in cols}
    lines = [f"Mean [95% CI] over {len(cmp['seeds'])} seeds ({cmp['seeds']}); accuracies: t interval on the "
             "empirical logit (stays inside [0, 1]).", "",
             "| variant | n_train | " + " | ".join(label[m] for m in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, d in cmp["variants"].items():
        lines.append(f"| {name} | {'/'.join(map(str, d['n_train']))} | "
                     + " | ".join(fmt_ci(d["summary"].get(m), 3 if "accuracy" in m else 4) for m in cols) + " |")
    n = len(cmp["seeds"])
    lines += ["", "Paired by seed: difference = b − a, mean [95% t CI]; p-values raw and Holm-adjusted over all "
              f"{len(cmp['comparisons'])} tests below (Wilcoxon signed-rank is exact; with {n} seeds its smallest "
              f"two-sided p is {2 / 2 ** n:.3g}).", "",
              "| comparison | measure | difference | t p | t p (Holm) | Wilcoxon p | Wilcoxon p (Holm) |",
              "|---|---|---|---|---|---|---|"]
    for r in cmp["comparisons"]:
        lines.append(f"| {r['description']} | {MEASURES[r['measure']][0]} | "
                     f"{fmt_ci(r['difference'], 4, signed=True)} | {fmt_p(r['t_pvalue'])} | {fmt_p(r['t_pvalue_holm'])} | "
                     f"{fmt_p(r['wilcoxon_pvalue'])} | {fmt_p(r['wilcoxon_pvalue_holm'])} |")
    return "\n".join(lines) + "\n"


def dose_response_plot(cmp: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("mean_radius", "rho_adv", "pgd_accuracy") if
              any(m in d["summary"] for d in cmp["variants"].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, measure in zip(axes[0], panels):
        for i, (key, curve) in enumerate(sorted(cmp["dose_response"].items())):
            pts = [(n, s) for n, s in zip(curve["n_remove"], curve["summary"][measure]) if s]
            if not pts:
                continue
            n = [p[0] for p in pts]
            ax.plot(n, [p[1]["mean"] for p in pts], "o-", color=f"C{i}", label=key)
            ax.fill_between(n, [p[1]["ci_low"] for p in pts], [p[1]["ci_high"] for p in pts], color=f"C{i}", alpha=0.15)
        title = MEASURES[measure][0]
        if measure == "pgd_accuracy" and cmp.get("report_eps_linf") is not None:
            title += f" (ε = {cmp['report_eps_linf']:g})"
        ax.set_title(title)
        ax.set_xlabel("training inputs removed (N)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds, 95% CI band")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    artifacts.atomic_savefig(fig, path)


def paired_plot(cmp: dict, path) -> None:
    """Seed workflow: baseline vs one variant, a line per seed, mean and CI per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cmp["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, measure in zip(axes, ("accuracy", "mean_radius", "rho_adv")):
        a, b = (cmp["variants"][n] for n in names)
        for va, vb in zip(a["per_seed"][measure], b["per_seed"][measure]):
            ax.plot([0, 1], [va, vb], color="0.7", marker="o", zorder=1)
        for i, d in enumerate((a, b)):
            m = d["summary"][measure]
            ax.errorbar([i], [m["mean"]], yerr=[[m["mean"] - m["ci_low"]], [m["ci_high"] - m["mean"]]],
                        fmt="s", color="C3", capsize=5, zorder=2)
        ax.set_xticks([0, 1], names, fontsize=8)
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(MEASURES[measure][0])
    fig.suptitle(f"{names[0]} vs {names[1]} (lines pair the same seed; red: mean, 95% CI)")
    fig.tight_layout()
    artifacts.atomic_savefig(fig, path)


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------
def _headline(cmp: dict) -> str:
    rows = [r for r in cmp["comparisons"] if r["measure"] == "mean_radius"
            and r["comparison"] in ("vs_baseline", "corner_cases_vs_random")]
    return "; ".join(f"{r['description']} radius {fmt_ci(r['difference'], 4, True)} (p {fmt_p(r['t_pvalue'])}, "
                     f"Holm {fmt_p(r['t_pvalue_holm'])})" for r in rows[:4])


def compute(ctx: stage.Context) -> dict:
    names, missing = artifacts.trained_variants(ctx.cfg)
    if missing:
        raise artifacts.ArtifactError(f"{artifacts.model_dir(ctx.cfg)}: variants not trained: {', '.join(missing)} "
                                      "(run `python main.py --variant all`)")
    return compute_comparison(ctx.cfg, names)


def write(ctx: stage.Context, cmp: dict) -> str:
    rdir = ctx.results
    artifacts.atomic_write_json(rdir / "variants.json", cmp)
    artifacts.atomic_write_text(rdir / "variants.md", variants_markdown(cmp))
    dose_response_plot(cmp, rdir / "dose_response.png")
    ctx.info["n_tests"] = len(cmp["comparisons"])
    return f"{len(cmp['variants'])} variants, {len(cmp['comparisons'])} paired tests; {_headline(cmp)} → {rdir / 'variants.md'}"


def write_seed_comparison(ctx: stage.Context, variant: Variant) -> str:
    """``main.py -is_retrain True``: baseline vs the corner-case variant, ``compare.{json,md,png}``."""
    cmp = compute_comparison(ctx.cfg, ["baseline", variant.name], with_adversarial=False)
    rdir = ctx.results
    artifacts.atomic_write_json(rdir / "compare.json", cmp)
    artifacts.atomic_write_text(rdir / "compare.md", variants_markdown(cmp))
    paired_plot(cmp, rdir / "compare.png")
    return f"{_headline(cmp)} → {rdir / 'compare.md'}"


main = stage.script("compare", compute, write, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
