"""Statistics shared by the stages: confidence intervals, AUROC/AUPR with bootstrap, paired tests."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean with a Student-t confidence interval over independent runs (e.g. models/seeds).

    With one value the interval collapses to the value (no spread can be estimated).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "std": math.nan, "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "std": 0.0, "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "std": std, "n": n}


def _bootstrap(metric, labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int,
               level: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if labels[idx].min() == labels[idx].max():
            continue  # a resample with one class has no AUROC; skip it (percentile of the rest)
        values.append(metric(labels[idx], scores[idx]))
    if not values:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [100 * (0.5 - level / 2), 100 * (0.5 + level / 2)])
    return float(lo), float(hi)


def auroc_ci(labels, scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUROC (positive class = label 1, higher score = more likely positive) and AUPR, each with a
    percentile-bootstrap interval. Undefined (NaN) when only one class is present."""
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError(f"labels ({len(y)}) and scores ({len(s)}) differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if np.isinf(s).any():
        # e.g. DSA with dist_b = 0; AUROC/AUPR depend only on the order, so map ±inf just past the
        # finite range (scikit-learn rejects infinite scores)
        finite = s[np.isfinite(s)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
        s = np.where(s == np.inf, hi + 1.0, np.where(s == -np.inf, lo - 1.0, s))
    out = {"n": int(len(y)), "n_positive": int(y.sum()), "auroc": math.nan, "auroc_ci": [math.nan, math.nan],
           "aupr": math.nan, "aupr_ci": [math.nan, math.nan]}
    if len(y) == 0 or y.min() == y.max():
        return out
    out["auroc"] = float(roc_auc_score(y, s))
    out["aupr"] = float(average_precision_score(y, s))
    if n_boot > 0:
        out["auroc_ci"] = list(_bootstrap(roc_auc_score, y, s, n_boot, seed, level))
        out["aupr_ci"] = list(_bootstrap(average_precision_score, y, s, n_boot, seed, level))
    return out


def paired_difference(before, after, level: float = 0.95) -> dict:
    """Paired comparison of ``after - before`` over the same seeds: mean difference with a t
    interval, the paired t-test and the Wilcoxon signed-rank test (exact for small n)."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    diff = b - a
    out = {"difference": mean_ci(diff, level), "t_statistic": math.nan, "t_pvalue": math.nan,
           "wilcoxon_pvalue": math.nan, "n": int(len(diff))}
    # a t statistic needs spread: differences equal up to rounding give no test (avoid scipy's
    # catastrophic-cancellation warning and a meaningless p-value)
    spread = np.ptp(diff) if len(diff) else 0.0
    if len(diff) >= 2 and spread > 1e-12 * max(1.0, float(np.abs(diff).max())):
        t = stats.ttest_rel(b, a)
        out["t_statistic"], out["t_pvalue"] = float(t.statistic), float(t.pvalue)
    if len(diff) >= 1 and np.any(diff != 0):
        out["wilcoxon_pvalue"] = float(stats.wilcoxon(b, a).pvalue)
    return out
