"""Statistics shared by the stages: confidence intervals, AUROC/AUPR with bootstrap, paired tests."""
from __future__ import annotations

import math

import numpy as np
from scipy import special, stats
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


def _wilson(k: float, n: float, level: float) -> tuple[float, float]:
    """Wilson score interval of one binomial proportion k/n (Wilson 1927)."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    p, z2 = k / n, z * z / n
    centre = (p + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_ci(successes, totals, level: float = 0.95) -> dict:
    """Mean of per-seed proportions p_i = k_i / n_i with an interval that stays inside [0, 1].

    The point is the arithmetic mean of the p_i (as ``mean_ci``; ``std`` is their spread, ``n`` the
    number of seeds). The interval is a Student-t interval over seeds on the empirical-logit scale
    z_i = log((k_i + ½) / (n_i − k_i + ½)), mapped back with the logistic function; when the point
    falls outside it (e.g. every p_i = 0: no spread on any scale), the interval is widened to reach
    the point. With one seed there is no spread across seeds: the Wilson score interval of k/n.
    """
    k = np.asarray(successes, dtype=np.float64).ravel()
    n = np.asarray(totals, dtype=np.float64).ravel()
    if k.shape != n.shape:
        raise ValueError(f"successes ({len(k)}) and totals ({len(n)}) differ in length")
    if not (np.isfinite(k).all() and np.isfinite(n).all()) or (n <= 0).any() or (k < 0).any() or (k > n).any():
        raise ValueError("need finite counts with 0 <= successes <= totals and totals > 0")
    seeds = len(k)
    if seeds == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "std": math.nan, "n": 0,
                "method": "none (no seeds)"}
    p = k / n
    mean = float(p.mean())
    if seeds == 1:
        low, high = _wilson(float(k[0]), float(n[0]), level)
        std, method = 0.0, "Wilson score (one seed)"
    else:
        z = np.log((k + 0.5) / (n - k + 0.5))
        half = float(stats.t.ppf(0.5 + level / 2, df=seeds - 1)) * float(z.std(ddof=1)) / math.sqrt(seeds)
        low, high = (float(special.expit(z.mean() + h)) for h in (-half, half))
        std, method = float(p.std(ddof=1)), "t on empirical logit, back-transformed"
    return {"mean": mean, "ci_low": min(low, mean), "ci_high": max(high, mean), "std": std, "n": seeds,
            "method": method}


def unit_interval_ci(values, level: float = 0.95, eps: float = 1e-6) -> dict:
    """Mean over models of a score bounded in [0, 1] (AUROC, AUPR) with an interval inside [0, 1]:
    the Student-t interval on the logit scale (values clamped to [eps, 1 − eps]), mapped back, and
    widened to reach the arithmetic mean. Same keys as ``mean_ci`` plus ``method``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    out = mean_ci(v, level)
    out["method"] = "t on logit, back-transformed"
    if len(v) >= 2:
        z = special.logit(np.clip(v, eps, 1 - eps))
        half = float(stats.t.ppf(0.5 + level / 2, df=len(v) - 1)) * float(z.std(ddof=1)) / math.sqrt(len(v))
        low, high = (float(special.expit(z.mean() + h)) for h in (-half, half))
        out["ci_low"], out["ci_high"] = min(low, out["mean"]), max(high, out["mean"])
    return out


def _resample_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """How often each of the ``n`` points is drawn in each of ``rows`` bootstrap resamples
    (multinomial counts, shape rows × n). Drawn as indices, row by row from the same stream as
    ``rng.integers(0, n, n)`` per resample, then counted."""
    idx = rng.integers(0, n, (rows, n))
    idx += (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)


def _resample_auroc_ap(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray):
    """AUROC and average precision of each bootstrap resample given by its counts (row b, column i:
    how often point i is drawn), all rows at once from the ranks of the distinct scores.

    Per group j of tied scores holding a positive (ascending; groups of negatives only never add to
    either sum), P_j / N_j = positives / negatives drawn into it, P / N the totals.
    AUROC is Mann–Whitney with ties counted ½ (= scikit-learn's ``roc_auc_score``):
    Σ_j P_j (N_{<j} + ½ N_j) / (P·N). AP is scikit-learn's ``average_precision_score``: one threshold
    per distinct score, Σ_j ΔRecall_j · Precision_j with ΔRecall_j = P_j / P and
    Precision_j = P_{≥j} / (P_{≥j} + N_{≥j}).
    Returns (auroc, ap, valid), each of length B; rows with a single class are not valid (NaN).
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    new_group = np.r_[True, s[1:] != s[:-1]]
    group_start = np.flatnonzero(new_group)
    group_end = np.r_[group_start[1:], len(s)] - 1
    positives = np.flatnonzero(y == 1)  # sorted positions
    held, first = np.unique((np.cumsum(new_group) - 1)[positives], return_index=True)  # groups with a positive
    last = np.r_[first[1:], len(positives)] - 1  # last positive of each such group
    c = counts[:, order]
    drawn_to = np.cumsum(c, axis=1)  # draws at sorted positions ≤ i; the only pass over B × n
    start = group_start[held]
    all_le = drawn_to[:, group_end[held]].astype(np.float64)
    all_lt = np.where(start > 0, drawn_to[:, np.maximum(start - 1, 0)], 0).astype(np.float64)
    pos_le = np.cumsum(c[:, positives], axis=1)[:, last].astype(np.float64)
    pos = np.diff(pos_le, axis=1, prepend=0.0)
    neg = all_le - all_lt - pos
    neg_lt = all_lt - (pos_le - pos)
    n_pos, total = pos_le[:, -1], drawn_to[:, -1].astype(np.float64)
    n_neg = total - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = (pos * (neg_lt + 0.5 * neg)).sum(1) / (n_pos * n_neg)
        # at threshold u_j: P_{≥j} = P − P_{≤j} + P_j drawn positives among total − (draws below u_j)
        precision = np.divide(n_pos[:, None] - pos_le + pos, total[:, None] - all_lt,
                              out=np.zeros_like(pos), where=pos > 0)
        ap = (pos * precision).sum(1) / n_pos
    auroc[~valid] = math.nan
    ap[~valid] = math.nan
    return auroc, ap, valid


def _bootstrap(labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int, level: float,
               block_elements: int = 1 << 20) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile-bootstrap intervals of AUROC and AUPR from the same ``n_boot`` resamples, drawn
    and scored a block of rows at a time (a few arrays of ``block_elements`` float64 each).
    A resample with one class has no AUROC; it is skipped (percentile of the rest)."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, block_elements // max(n, 1)))
    aurocs, aps = [], []
    for start in range(0, n_boot, rows):
        counts = _resample_counts(rng, n, min(rows, n_boot - start))
        auroc, ap, valid = _resample_auroc_ap(labels, scores, counts)
        aurocs.append(auroc[valid])
        aps.append(ap[valid])
    q = [100 * (0.5 - level / 2), 100 * (0.5 + level / 2)]
    out = []
    for values in (np.concatenate(aurocs), np.concatenate(aps)):
        out.append((math.nan, math.nan) if len(values) == 0 else tuple(float(v) for v in np.percentile(values, q)))
    return out[0], out[1]


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
        auroc_interval, aupr_interval = _bootstrap(y, s, n_boot, seed, level)
        out["auroc_ci"], out["aupr_ci"] = list(auroc_interval), list(aupr_interval)
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


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979), in the input order: with the m non-NaN
    p-values sorted, p_(1) ≤ … ≤ p_(m), adjusted p_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))
    (step-down, so monotone in p). NaN entries stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    present = np.flatnonzero(~np.isnan(p))
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(len(p), math.nan)
    m = len(present)
    order = present[np.argsort(p[present], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return [float(v) for v in out]
