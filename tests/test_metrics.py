"""metrics + detector scoring: known answers (perfect score, constant score, hand-made tables)."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from detectors import fit_and_score
from metrics import _resample_auroc_ap, auroc_ci, holm, mean_ci, paired_difference, proportion_ci


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


# ---------------------------------------------------------------------------------------------
# vectorised bootstrap of auroc_ci against plain scikit-learn loops
# ---------------------------------------------------------------------------------------------
def loop_bootstrap(labels, scores, n_boot, seed, level=0.95):
    """The bootstrap auroc_ci used before vectorisation: scikit-learn called once per resample.
    Returns the (AUROC, AUPR) percentile intervals."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if labels[idx].min() == labels[idx].max():
            continue
        values.append((roc_auc_score(labels[idx], scores[idx]), average_precision_score(labels[idx], scores[idx])))
    if not values:
        return [math.nan, math.nan], [math.nan, math.nan]
    q = np.percentile(values, [100 * (0.5 - level / 2), 100 * (0.5 + level / 2)], axis=0)
    return [float(v) for v in q[:, 0]], [float(v) for v in q[:, 1]]


def detector_like(n=1000, n_positive=27, seed=0):
    """A detector stage's test set: few wrong predictions, scores rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    y[rng.choice(n, n_positive, replace=False)] = 1
    return y, np.round(rng.normal(size=n) + 1.2 * y, 2)


@pytest.mark.parametrize("n,n_values,positive_rate", [(60, 5, 0.3), (40, 3, 0.1), (200, 1000, 0.05), (6, 2, 0.2)])
def test_resample_metrics_equal_sklearn_on_the_same_resamples(n, n_values, positive_rate):
    rng = np.random.default_rng(n)
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    labels[:2] = [0, 1]
    scores = rng.integers(0, n_values, n) / 4.0  # few distinct values: many ties, within and across classes
    indices = rng.integers(0, n, (300, n))
    counts = np.stack([np.bincount(idx, minlength=n) for idx in indices])
    auroc, ap, valid = _resample_auroc_ap(labels, scores, counts)
    for b, idx in enumerate(indices):
        y, s = labels[idx], scores[idx]
        assert valid[b] == (y.min() != y.max())
        if valid[b]:
            assert auroc[b] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert ap[b] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        else:
            assert math.isnan(auroc[b]) and math.isnan(ap[b])
    assert valid.sum() > 100 and (n > 6 or not valid.all())  # the skip path is exercised at n = 6


def test_bootstrap_intervals_agree_with_the_loop():
    y, s = detector_like()
    # the same seed draws the same resamples (integers(0, n, (B, n)) continues the stream of B calls
    # integers(0, n, n)), so the intervals match the loop's to rounding
    same = auroc_ci(y, s, n_boot=200, seed=0)
    loop_auroc, loop_aupr = loop_bootstrap(y, s, 200, seed=0)
    assert same["auroc_ci"] == pytest.approx(loop_auroc, abs=1e-12)
    assert same["aupr_ci"] == pytest.approx(loop_aupr, abs=1e-12)
    # other resamples: agreement within Monte-Carlo error (with 1000 resamples the endpoints' s.d.
    # is ≤ 0.0065 here, measured over 200 seeds; a difference of two has s.d. ≤ 0.009)
    new = auroc_ci(y, s, n_boot=1000, seed=0)
    loop_auroc, loop_aupr = loop_bootstrap(y, s, 1000, seed=1)
    assert new["auroc_ci"] == pytest.approx(loop_auroc, abs=0.035)
    assert new["aupr_ci"] == pytest.approx(loop_aupr, abs=0.035)
    assert new["auroc_ci"][0] < new["auroc"] < new["auroc_ci"][1]


def test_bootstrap_blocks_do_not_change_the_intervals():
    import metrics
    y, s = detector_like(n=300, n_positive=12)
    one_block = metrics._bootstrap(y, s, 500, 3, 0.95)
    assert metrics._bootstrap(y, s, 500, 3, 0.95, block_elements=7 * 300 + 5) == one_block


def test_bootstrap_perfect_reversed_and_constant_scores():
    y, _ = detector_like(n=200, n_positive=10)
    perfect = auroc_ci(y, y * 3.0 - 1.0, n_boot=300)
    assert perfect["auroc_ci"] == [1.0, 1.0] and perfect["aupr_ci"] == [1.0, 1.0]
    assert auroc_ci(y, -y.astype(float), n_boot=300)["auroc_ci"] == [0.0, 0.0]
    constant = auroc_ci(y, np.full(200, 0.7), n_boot=300, seed=5)
    assert constant["auroc_ci"] == [0.5, 0.5]
    # AP of a constant score is the resample's share of positives (one threshold: recall 1 at
    # precision P/n)
    assert constant["aupr_ci"] == pytest.approx(loop_bootstrap(y, np.full(200, 0.7), 300, seed=5)[1], abs=1e-12)
    assert 0.0 < constant["aupr_ci"][0] < 10 / 200 < constant["aupr_ci"][1]
    # two points, one of each class: half the resamples have a single class and are skipped
    two = auroc_ci([0, 1], [0.2, 0.9], n_boot=50)
    assert two["auroc_ci"] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Holm–Bonferroni
# ---------------------------------------------------------------------------------------------
def holm_by_rejection(p):
    """The adjusted p-value as its definition: the smallest family level α at which Holm's step-down
    procedure (reject H_(1), H_(2), … while p_(k) ≤ α / (m − k + 1)) rejects the hypothesis."""
    present = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(present)
    order = sorted(present, key=lambda i: p[i])
    candidates = sorted({min(1.0, (m - k) * p[i]) for k, i in enumerate(order)} | {1.0})
    out = [math.nan] * len(p)
    for i in present:
        out[i] = 1.0  # not rejected at any α ≤ 1: adjusted p-values are capped at 1
        for alpha in candidates:
            rejected = set()
            for k, j in enumerate(order):
                if (m - k) * p[j] > alpha:
                    break
                rejected.add(j)
            if i in rejected:
                out[i] = alpha
                break
    return out


def test_holm_hand_worked():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4) → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max
    # 0.02, 0.03, 0.06, 0.06; the NaN is not counted in m
    assert holm([0.01, math.nan, 0.04, 0.03, 0.005]) == pytest.approx([0.03, math.nan, 0.06, 0.06, 0.02],
                                                                     nan_ok=True)
    assert holm([0.6, 0.9]) == [1.0, 1.0]                 # 1.2 capped at 1
    assert holm([0.4, 0.7, 0.01]) == pytest.approx([0.8, 0.8, 0.03])
    assert holm([0.02]) == [0.02] and holm([]) == [] and math.isnan(holm([math.nan])[0])
    with pytest.raises(ValueError, match="p-values"):
        holm([0.5, 1.5])


def test_holm_matches_the_step_down_definition():
    rng = np.random.default_rng(4)
    for _ in range(50):
        m = int(rng.integers(1, 9))
        p = list(np.round(rng.random(m) ** 3, 2))          # rounding: ties and zeros occur
        p = [math.nan if rng.random() < 0.15 else float(v) for v in p]
        got = holm(p)
        assert got == pytest.approx(holm_by_rejection(p), nan_ok=True)
        present = sorted((v, got[i]) for i, v in enumerate(p) if not math.isnan(v))
        assert all(a[1] <= b[1] for a, b in zip(present, present[1:]))  # monotone in p
        assert all(v <= adj <= 1.0 for v, adj in present)


# ---------------------------------------------------------------------------------------------
# proportion_ci
# ---------------------------------------------------------------------------------------------
def test_proportion_ci_stays_in_the_unit_interval_near_0_and_1():
    k, n = [0, 0, 1, 0, 2], [200] * 5
    assert mean_ci(np.array(k) / 200)["ci_low"] < 0  # the plain t interval leaves [0, 1]
    res = proportion_ci(k, n)
    assert set(res) == set(mean_ci([1.0, 2.0])) | {"method"} and res["n"] == 5
    assert res["mean"] == pytest.approx(0.003) and res["std"] == pytest.approx(np.std(np.array(k) / 200, ddof=1))
    assert 0.0 < res["ci_low"] <= res["mean"] <= res["ci_high"] < 1.0
    high = proportion_ci([200, 199, 200, 198, 200], n)
    assert 0.0 < high["ci_low"] <= high["mean"] <= high["ci_high"] < 1.0
    # mirror symmetry: k → n − k maps the interval to 1 − interval
    assert high["ci_low"] == pytest.approx(1 - proportion_ci([0, 1, 0, 2, 0], n)["ci_high"])
    assert res["method"] == "t on empirical logit, back-transformed"


def test_proportion_ci_known_answer():
    k, n = [3, 7, 5, 0], [100, 120, 90, 100]
    z = [math.log((ki + 0.5) / (ni - ki + 0.5)) for ki, ni in zip(k, n)]
    zbar = sum(z) / 4
    sd = math.sqrt(sum((v - zbar) ** 2 for v in z) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    res = proportion_ci(k, n)
    assert res["ci_low"] == pytest.approx(1 / (1 + math.exp(-(zbar - half))))
    assert res["ci_high"] == pytest.approx(1 / (1 + math.exp(-(zbar + half))))
    assert res["mean"] == pytest.approx((3 / 100 + 7 / 120 + 5 / 90 + 0) / 4)


def test_proportion_ci_matches_the_t_interval_near_one_half():
    k = [4980, 5050, 5010, 4950, 5020]
    res, plain = proportion_ci(k, [10_000] * 5), mean_ci(np.array(k) / 10_000)
    half = plain["ci_high"] - plain["mean"]
    assert res["mean"] == pytest.approx(plain["mean"]) and res["std"] == pytest.approx(plain["std"])
    assert res["ci_low"] == pytest.approx(plain["ci_low"], abs=0.01 * half)
    assert res["ci_high"] == pytest.approx(plain["ci_high"], abs=0.01 * half)


def test_proportion_ci_behaves_monotonically():
    base = np.array([10, 14, 8, 12, 11])
    lows, highs = zip(*[(r["ci_low"], r["ci_high"]) for r in (proportion_ci(base + d, [200] * 5) for d in range(0, 60, 5))])
    assert all(np.diff(lows) > 0) and all(np.diff(highs) > 0)  # more successes → interval moves up
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    assert width(proportion_ci(np.tile(base, 3), [200] * 15)) < width(proportion_ci(base, [200] * 5))  # more seeds
    assert width(proportion_ci([5, 20, 8, 17, 11], [200] * 5)) > width(proportion_ci(base, [200] * 5))  # more spread
    assert width(proportion_ci(base, [200] * 5, level=0.99)) > width(proportion_ci(base, [200] * 5))


def test_proportion_ci_degenerate_and_one_seed():
    zero = proportion_ci([0, 0, 0], [200, 200, 200])  # no spread: widened to reach the point
    assert zero["mean"] == zero["ci_low"] == 0.0 and 0.0 < zero["ci_high"] < 0.01
    z = stats.norm.ppf(0.975)
    one = proportion_ci([0], [10])
    assert one["method"] == "Wilson score (one seed)" and one["n"] == 1 and one["std"] == 0.0
    assert one["ci_low"] == 0.0 and one["ci_high"] == pytest.approx(z * z / (10 + z * z))
    # Wilson endpoints solve (p̂ − p)² = z² p (1 − p) / n
    res = proportion_ci([7], [40])
    for p in (res["ci_low"], res["ci_high"]):
        assert (7 / 40 - p) ** 2 == pytest.approx(z * z * p * (1 - p) / 40)
    assert proportion_ci([], [])["n"] == 0 and math.isnan(proportion_ci([], [])["mean"])
    with pytest.raises(ValueError, match="successes"):
        proportion_ci([5], [4])


def test_unit_interval_ci_stays_inside_and_matches_t_in_the_middle():
    from metrics import mean_ci, unit_interval_ci

    near_one = [0.99, 0.95, 0.999, 0.9, 0.97]
    r = unit_interval_ci(near_one)
    assert mean_ci(near_one)["ci_high"] > 1.0  # the plain t interval leaves [0, 1] here
    assert 0.0 <= r["ci_low"] <= r["mean"] <= r["ci_high"] <= 1.0
    assert r["mean"] == np.mean(near_one)
    middle = [0.49, 0.5, 0.51, 0.5, 0.52]
    m, t = unit_interval_ci(middle), mean_ci(middle)
    assert abs(m["ci_low"] - t["ci_low"]) < 2e-3 and abs(m["ci_high"] - t["ci_high"]) < 2e-3
