"""Benchmark: bootstrap intervals of ``metrics.auroc_ci``, vectorised vs the scikit-learn loop it replaced.

    python bench/bench_metrics.py [--n-inputs 1000 --n-positive 27 --n-boot 1000]
                                  [--detectors 6 --models 5] [--loop-pairs 30]

The workload of the detector stage: for each of ``--models`` models and ``--detectors`` detectors,
``auroc_ci(wrong, score, n_boot, seed=model seed)`` on ``--n-inputs`` test inputs of which about
``--n-positive`` are wrong predictions. Scores are synthetic, shaped like the stage's detectors
(continuous, heavily tied like the Label Change Rate, saturating like max-softmax, ±inf like DSA).

Peer, measured in the same run on the same inputs: ``loop_auroc_ci``, a plain copy of the old
``auroc_ci`` (one ``roc_auc_score`` / ``average_precision_score`` call per resample). With
``--loop-pairs`` below detectors × models, the loop runs on that many (detector, model) pairs and
its time is scaled to all of them (printed as such). Both draw the same resamples from the same
seed, so their interval endpoints should differ by rounding only; the Monte-Carlo error (two seeds
of the vectorised path) is printed for scale. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metrics import auroc_ci  # noqa: E402


# ---------------------------------------------------------------------------------------------
# peer: the loop auroc_ci used before vectorisation (copied as it was)
# ---------------------------------------------------------------------------------------------
def loop_bootstrap(metric, labels, scores, n_boot, seed, level):
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


def loop_auroc_ci(labels, scores, n_boot=1000, seed=0, level=0.95) -> dict:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isinf(s).any():
        finite = s[np.isfinite(s)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
        s = np.where(s == np.inf, hi + 1.0, np.where(s == -np.inf, lo - 1.0, s))
    out = {"auroc": float(roc_auc_score(y, s)), "aupr": float(average_precision_score(y, s))}
    out["auroc_ci"] = list(loop_bootstrap(roc_auc_score, y, s, n_boot, seed, level))
    out["aupr_ci"] = list(loop_bootstrap(average_precision_score, y, s, n_boot, seed, level))
    return out


# ---------------------------------------------------------------------------------------------
# synthetic detector-stage inputs
# ---------------------------------------------------------------------------------------------
def detector_scores(kind: int, wrong: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, w = len(wrong), wrong.astype(np.float64)
    kind %= 6
    if kind == 0:   # max-softmax (negated): saturates, many scores tie at the top
        return -np.minimum(1.0, np.round(1 - rng.exponential(0.02 + 0.2 * w), 6))
    if kind == 1:   # Label Change Rate over 100 mutants: k / 100, mostly 0
        return rng.binomial(100, 0.01 + 0.25 * w) / 100
    if kind == 2:   # DSA: positive, continuous, the odd +inf (dist_b = 0)
        s = rng.lognormal(0.8 * w, 0.5)
        s[rng.random(n) < 0.002] = np.inf
        return s
    return rng.normal(size=n) + (0.6 + 0.3 * kind) * w  # fitted detectors (logreg / MLP on features)


def workload(n_inputs, n_positive, n_detectors, n_models):
    pairs = []
    for seed in range(n_models):
        rng = np.random.default_rng(1000 + seed)
        wrong = rng.random(n_inputs) < n_positive / n_inputs
        for d in range(n_detectors):
            pairs.append((seed, d, wrong, detector_scores(d, wrong, rng)))
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-inputs", type=int, default=1000)
    p.add_argument("--n-positive", type=int, default=27, help="expected wrong predictions per model")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--detectors", type=int, default=6)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--loop-pairs", type=int, default=None,
                   help="(detector, model) pairs timed in the loop (default: all); scaled to all")
    p.add_argument("--repeats", type=int, default=3, help="runs of the vectorised path (median shown)")
    args = p.parse_args(argv)

    pairs = workload(args.n_inputs, args.n_positive, args.detectors, args.models)
    n_loop = min(args.loop_pairs or len(pairs), len(pairs))
    print(f"[bench_metrics] auroc_ci on {args.models} models × {args.detectors} detectors, {args.n_inputs} inputs "
          f"(mean {np.mean([w.sum() for _, _, w, _ in pairs]):.1f} wrong), {args.n_boot} resamples; "
          f"numpy {np.__version__}, scikit-learn {sklearn.__version__}")

    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        new = [auroc_ci(w, s, args.n_boot, seed=seed) for seed, _, w, s in pairs]
        times.append(time.perf_counter() - t)
    t_new = float(np.median(times))

    t = time.perf_counter()
    old = [loop_auroc_ci(w, s, args.n_boot, seed=seed) for seed, _, w, s in pairs[:n_loop]]
    t_old = (time.perf_counter() - t) * len(pairs) / n_loop

    other_seed = [auroc_ci(w, s, args.n_boot, seed=seed + 10_000) for seed, _, w, s in pairs[:n_loop]]
    diff = max(abs(a - b) for o, r in zip(old, new) for k in ("auroc_ci", "aupr_ci") for a, b in zip(o[k], r[k]))
    point = max(abs(o[k] - r[k]) for o, r in zip(old, new) for k in ("auroc", "aupr"))
    mc = {k: max(abs(a - b) for o, r in zip(other_seed, new) for a, b in zip(o[k], r[k])) for k in ("auroc_ci", "aupr_ci")}

    note = "" if n_loop == len(pairs) else f" (timed on {n_loop} of {len(pairs)} pairs, scaled)"
    print(f"  scikit-learn loop (old) {t_old:8.2f} s{note}")
    print(f"  vectorised (new)        {t_new:8.3f} s   (median of {args.repeats})")
    print(f"  speed-up ×{t_old / t_new:.0f}")
    print(f"  max |endpoint difference|, same seeds (same resamples): {diff:.2e}; point estimates: {point:.2e}")
    print(f"  for scale, Monte-Carlo error — max |endpoint difference| between two seeds of the new path: "
          f"AUROC {mc['auroc_ci']:.4f}, AUPR {mc['aupr_ci']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
