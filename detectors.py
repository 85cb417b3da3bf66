"""Misprediction detectors scored side by side (Wu et al., arXiv 1910.00387).

    python detectors.py [--config configs/default.yaml] [--set key=value ...]

Positive class = the model's prediction is wrong. For every original model, each detector gives a
score per test input (higher = more likely wrong):

- ``max_softmax``: 1 − max softmax probability (Hendrycks & Gimpel's baseline);
- ``dsa``: DSA of the test input against the training set (from cc_remove.py, raw score);
- ``lcr``: label change rate under model mutation (Wang et al. arXiv 1812.05793; from mutation.py);
- ``conductance_mlp`` / ``conductance_logreg``: a classifier on the per-channel layer conductance
  (from conductance.py), MLP 200-200 as Wu et al. or logistic regression, fitted on the validation split;
- ``lcr+conductance``: the same MLP on conductance features plus LCR (Wu et al.'s combination).

Fitted detectors are fitted on the validation split and evaluated on test. AUROC and AUPR with
bootstrap 95% intervals per model, and mean ± 95% CI over models. Writes ``detectors.json``,
``detectors.md`` and ``roc.png``.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch

import stage
from artifacts import (ArtifactError, atomic_savefig, atomic_write_json, atomic_write_text, load_models,
                       load_npz, results_dir)
from cnnmodel import predict_logits
from metrics import auroc_ci, mean_ci, unit_interval_ci

DETECTORS = ("max_softmax", "dsa", "lcr", "conductance_logreg", "conductance_mlp", "lcr+conductance")


def fit_and_score(kind: str, x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, seed: int,
                  hidden: tuple[int, ...] = (200, 200)) -> np.ndarray:
    """Fit a classifier of ``kind`` (``mlp`` or ``logreg``) on standardised features and return the
    probability of the positive class (wrong prediction) on ``x_eval``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_fit)) < 2:
        raise ValueError("the validation split has a single class (no wrong or no right prediction)")
    if kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=500, random_state=seed)
    elif kind == "logreg":
        clf = LogisticRegression(max_iter=2000, class_weight="balanced")
    else:
        raise ValueError(f"unknown classifier {kind!r}")
    pipe = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny validation sets
        pipe.fit(x_fit, y_fit)
    return pipe.predict_proba(x_eval)[:, 1]


def detector_scores(inputs: dict, seed: int, hidden: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Test scores of every detector for one model. ``inputs`` holds, per split (val/test):
    ``wrong`` (bool), ``softmax`` (N×C), ``lcr`` (N), ``conductance`` (N×C'), and ``dsa`` (test only)."""
    val, test = inputs["val"], inputs["test"]
    scores = {"max_softmax": 1.0 - test["softmax"].max(axis=1), "dsa": test["dsa"], "lcr": test["lcr"]}
    y_fit = val["wrong"].astype(int)
    both_val = np.column_stack([val["conductance"], val["lcr"]])
    both_test = np.column_stack([test["conductance"], test["lcr"]])
    for name, kind, x_fit, x_eval in (("conductance_logreg", "logreg", val["conductance"], test["conductance"]),
                                      ("conductance_mlp", "mlp", val["conductance"], test["conductance"]),
                                      ("lcr+conductance", "mlp", both_val, both_test)):
        try:
            scores[name] = fit_and_score(kind, x_fit, y_fit, x_eval, seed, hidden)
        except ValueError as exc:
            print(f"[detectors] seed {seed}: {name} not fitted: {exc}")
            scores[name] = np.full(len(test["wrong"]), np.nan)
    return scores


def _lcr_key(cfg: dict) -> str:
    return f"lcr_{cfg['detector_lcr_operator']}_{cfg['detector_lcr_rate']:g}"


def load_inputs(cfg: dict, ds, models) -> list[dict]:
    """Read the artifacts of the earlier stages and check that they agree with the models."""
    rdir = results_dir(cfg)
    seeds = [s for s, _, _ in models]
    lcr_key = _lcr_key(cfg)
    cc_key = f"dsa_{cfg['cc_variant']}_{cfg['cc_layer']}"
    files = {
        ("lcr", "val"): (rdir / "lcr_val.npz", [lcr_key], "mutation.py"),
        ("lcr", "test"): (rdir / "lcr_test.npz", [lcr_key], "mutation.py"),
        ("conductance", "val"): (rdir / "conductance_val.npz", ["features"], "conductance.py"),
        ("conductance", "test"): (rdir / "conductance_test.npz", ["features"], "conductance.py"),
        ("dsa", "test"): (rdir / "dsa_test.npz", [cc_key], "cc_remove.py"),
    }
    loaded = {}
    for (what, split), (path, keys, made_by) in files.items():
        data = load_npz(path, ["seeds", "pred", "labels", *keys], made_by=made_by)
        if data["seeds"].tolist() != seeds:
            raise ArtifactError(f"{path}: seeds {data['seeds'].tolist()} differ from the models' {seeds} "
                                f"(rerun {made_by})")
        _, y = ds.split(split)
        if not np.array_equal(data["labels"], y.numpy()):
            raise ArtifactError(f"{path}: labels differ from the configured {split} split (rerun {made_by})")
        loaded[(what, split)] = data

    per_model = []
    for i, (seed, model, _) in enumerate(models):
        entry = {"seed": seed}
        for split in ("val", "test"):
            x, y = ds.split(split)
            logits = predict_logits(model, x, cfg["eval_batch_size"])
            pred = logits.argmax(1).numpy()
            for (what, s), data in loaded.items():
                if s == split and not np.array_equal(data["pred"][i], pred):
                    raise ArtifactError(f"{files[(what, s)][0]}: predictions of seed {seed} differ from the "
                                        f"model's (stale artifact; rerun {files[(what, s)][2]})")
            entry[split] = {"wrong": pred != y.numpy(), "softmax": torch.softmax(logits, 1).numpy(),
                            "lcr": loaded[("lcr", split)][lcr_key][i],
                            "conductance": loaded[("conductance", split)]["features"][i].reshape(len(y), -1)}
        entry["test"]["dsa"] = loaded[("dsa", "test")][cc_key][i]
        per_model.append(entry)
    return per_model


def compute(ctx: stage.Context) -> dict:
    cfg, ds, device = ctx.cfg, ctx.dataset, ctx.device
    models = load_models(cfg, ds.fingerprint, "baseline", device)
    per_model = load_inputs(cfg, ds, models)
    hidden = tuple(cfg["detector_mlp_hidden"])
    rows, curves = [], {}
    for entry in per_model:
        seed, wrong = entry["seed"], entry["test"]["wrong"]
        scores = detector_scores(entry, seed, hidden)
        lcr = entry["test"]["lcr"]
        for name in DETECTORS:
            s = scores[name]
            res = auroc_ci(wrong, s, cfg["bootstrap"], seed=seed) if not np.isnan(s).any() else \
                {"n": int(len(s)), "n_positive": int(wrong.sum()), "auroc": float("nan"),
                 "auroc_ci": [float("nan")] * 2, "aupr": float("nan"), "aupr_ci": [float("nan")] * 2}
            rows.append({"detector": name, "seed": seed, **res})
            if seed == per_model[0]["seed"]:
                curves[name] = (wrong, s)
        rows.append({"detector": "_lcr_means", "seed": seed,
                     "lcr_correct": float(lcr[~wrong].mean()) if (~wrong).any() else float("nan"),
                     "lcr_wrong": float(lcr[wrong].mean()) if wrong.any() else float("nan")})
    summary = []
    for name in DETECTORS:
        sel = [r for r in rows if r["detector"] == name]
        summary.append({"detector": name, "auroc": unit_interval_ci([r["auroc"] for r in sel]),
                        "aupr": unit_interval_ci([r["aupr"] for r in sel]), "n_models": len(sel)})
    lcr_rows = [r for r in rows if r["detector"] == "_lcr_means"]
    out = {"dataset_fingerprint": ds.fingerprint, "seeds": [e["seed"] for e in per_model],
           "lcr_source": _lcr_key(cfg), "dsa_source": f"{cfg['cc_variant']}/{cfg['cc_layer']}",
           "fit_split": "val", "eval_split": "test",
           "n_test": len(ds.x_test), "n_val": len(ds.x_val),
           "n_wrong_test": [int(e["test"]["wrong"].sum()) for e in per_model],
           "n_wrong_val": [int(e["val"]["wrong"].sum()) for e in per_model],
           "per_model": [r for r in rows if r["detector"] != "_lcr_means"],
           "summary": summary,
           "lcr_means": {"correct": mean_ci([r["lcr_correct"] for r in lcr_rows]),
                         "wrong": mean_ci([r["lcr_wrong"] for r in lcr_rows]), "per_model": lcr_rows}}
    return {"out": out, "curves": curves}


def write(ctx: stage.Context, res: dict) -> str:
    out, rdir = res["out"], ctx.results
    atomic_write_json(rdir / "detectors.json", out)
    atomic_write_text(rdir / "detectors.md", detectors_markdown(out))
    roc_plot(res["curves"], out["seeds"][0], rdir / "roc.png")
    best = max((r for r in out["summary"] if not np.isnan(r["auroc"]["mean"])),
               key=lambda r: r["auroc"]["mean"], default=None)
    text = ", ".join(f"{r['detector']} {r['auroc']['mean']:.3f}" for r in out["summary"])
    return f"AUROC: {text}; best {best['detector'] if best else 'n/a'} → {rdir / 'detectors.md'}"


def _fmt_ci(m: dict) -> str:
    if m["n"] == 0 or np.isnan(m["mean"]):
        return "n/a"
    return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def detectors_markdown(out: dict) -> str:
    per_model = out["per_model"]
    first = out["seeds"][0]
    lines = [f"Misprediction detection on the test split (positive = wrong prediction; "
             f"{np.mean(out['n_wrong_test']):.1f} wrong of {out['n_test']} on average), fitted detectors "
             f"trained on the validation split ({np.mean(out['n_wrong_val']):.1f} wrong of {out['n_val']}). "
             f"Mean [95% CI] over {len(out['seeds'])} models; bootstrap 95% CI for seed {first}.", "",
             f"| detector | AUROC (models) | AUPR (models) | AUROC seed {first} [bootstrap] |",
             "|---|---|---|---|"]
    for row in out["summary"]:
        own = next(r for r in per_model if r["detector"] == row["detector"] and r["seed"] == first)
        boot = "n/a" if np.isnan(own["auroc"]) else \
            f"{own['auroc']:.3f} [{own['auroc_ci'][0]:.3f}, {own['auroc_ci'][1]:.3f}]"
        lines.append(f"| {row['detector']} | {_fmt_ci(row['auroc'])} | {_fmt_ci(row['aupr'])} | {boot} |")
    lm = out["lcr_means"]
    lines += ["", f"Mean LCR ({out['lcr_source']}): correct inputs {_fmt_ci(lm['correct'])}, "
                  f"wrong inputs {_fmt_ci(lm['wrong'])}."]
    return "\n".join(lines) + "\n"


def roc_plot(curves: dict, seed: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for name, (wrong, score) in curves.items():
        if np.isnan(score).any() or wrong.all() or not wrong.any():
            continue
        fpr, tpr, _ = roc_curve(wrong, score)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(wrong, score):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="chance")
    ax.set_xlabel("false-positive rate (right predictions flagged)")
    ax.set_ylabel("true-positive rate (wrong predictions caught)")
    ax.set_title(f"Misprediction detectors, test split, seed {seed}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, path)


main = stage.script("detectors", compute, write, "Score misprediction detectors (AUROC/AUPR with CIs).")


if __name__ == "__main__":
    sys.exit(main())
