"""metrics + detector scoring: known answers (perfect score, constant score, hand-made tables)."""
import math

import numpy as np
import pytest
from scipy import stats

from detectors import fit_and_score
from metrics import auroc_ci, mean_ci, paired_difference


def test_auroc_perfect_constant_and_reversed():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    perfect = auroc_ci(labels, labels * 2.0 + 0.5, n_boot=200)
    assert perfect["auroc"] == 1.0 and perfect["aupr"] == 1.0
    assert perfect["auroc_ci"] == [1.0, 1.0]
    assert auroc_ci(labels, np.ones(8), n_boot=50)["auroc"] == 0.5
    assert auroc_ci(labels, -labels.astype(float), n_boot=0)["auroc"] == 0.0
    assert math.isnan(auroc_ci(np.zeros(5), np.arange(5.0))["auroc"])  # one class: undefined
    with pytest.raises(ValueError, match="differ in length"):
        auroc_ci(labels, np.ones(3))


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    pos, neg = scores[labels == 1], scores[labels == 0]
    # AUROC = P(score_pos > score_neg), counted over all pairs (no ties in continuous scores)
    expected = np.mean([p > n for p in pos for n in neg])
    res = auroc_ci(labels, scores, n_boot=300, seed=1)
    assert res["auroc"] == pytest.approx(expected)
    assert res["auroc_ci"][0] <= res["auroc"] <= res["auroc_ci"][1]


def test_mean_ci_t_interval():
    values = [1.0, 2.0, 4.0]
    res = mean_ci(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert res["mean"] == pytest.approx(7 / 3) and res["ci_high"] - res["mean"] == pytest.approx(half)
    assert mean_ci([5.0]) == {"mean": 5.0, "ci_low": 5.0, "ci_high": 5.0, "std": 0.0, "n": 1}


def test_paired_difference():
    before, after = [1.0, 2.0, 3.0, 4.0], [1.5, 2.4, 3.6, 4.3]
    res = paired_difference(before, after)
    assert res["difference"]["mean"] == pytest.approx(0.45)
    assert res["t_pvalue"] == pytest.approx(stats.ttest_rel(after, before).pvalue)
    assert res["difference"]["ci_low"] > 0  # every seed went up by a similar amount


def test_fitted_detector_learns_a_separable_signal():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 4)) + 3.0 * y[:, None]
    for kind in ("logreg", "mlp"):
        s = fit_and_score(kind, x[:100], y[:100], x[100:], seed=0, hidden=(16,))
        assert auroc_ci(y[100:], s, n_boot=0)["auroc"] > 0.95
    with pytest.raises(ValueError, match="single class"):
        fit_and_score("logreg", x[:10], np.zeros(10, int), x, seed=0)


def test_infinite_scores_keep_their_rank():
    labels = np.array([0, 0, 1, 1, 0])
    with_inf = auroc_ci(labels, np.array([0.1, 0.2, np.inf, 0.9, -np.inf]), n_boot=0)
    finite = auroc_ci(labels, np.array([0.1, 0.2, 5.0, 0.9, -5.0]), n_boot=0)
    assert with_inf["auroc"] == finite["auroc"] == 1.0
    assert with_inf["aupr"] == finite["aupr"]
