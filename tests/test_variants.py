"""Variants: names, the plan a config expands to, the removal rules, and the paired comparison."""
import math

import numpy as np
import pytest

import variants as V
from config import ConfigError, load_config


def test_names_round_trip_and_bad_names():
    for v in (V.BASELINE, V.Variant("corner_cases", 100), V.Variant("random", 7, "pgd_at"),
              V.Variant("baseline", 0, "sep"), V.Variant("random_class_matched", 30)):
        assert V.parse_variant_name(v.name) == v
    assert V.Variant("random", 100).name == "random_n100"
    assert V.Variant("corner_cases", 50, "sep").name == "corner_cases_n50+sep"
    for bad in ("random", "baseline_n10", "corner_cases_n0x", "random_n10+adam", "foo_n3"):
        with pytest.raises(V.VariantError):
            V.parse_variant_name(bad)


def test_plan_expands_rules_over_doses_with_baseline_first():
    cfg = load_config(None, ["variants=[corner_cases, random, random+pgd_at]", "remove_counts=[200, 50]"])
    names = [v.name for v in V.plan(cfg)]
    assert names == ["baseline", "corner_cases_n50", "corner_cases_n200", "random_n50", "random_n200",
                     "random_n50+pgd_at", "random_n200+pgd_at"]
    # remove_counts empty: the seed workflow's remove_count is the one dose
    assert [v.name for v in V.plan(load_config(None))] == ["baseline", "corner_cases_n100", "random_n100"]


def test_bad_variant_specs_are_config_errors():
    with pytest.raises(ConfigError, match=r"key 'variants': unknown subset rule 'corners'"):
        load_config(None, ["variants=[baseline, corners]"])
    with pytest.raises(ConfigError, match=r"key 'variants': unknown regime 'adam'"):
        load_config(None, ["variants=[random+adam]"])
    with pytest.raises(ConfigError, match=r"key 'remove_counts' must be a list of counts >= 1"):
        load_config(None, ["remove_counts=[10, 0]"])


def test_removal_sets_follow_their_rules():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 5, n)
    ranking = rng.permutation(n)  # most surprising first
    plan = [V.BASELINE, V.Variant("corner_cases", 20), V.Variant("random", 20), V.Variant("least_surprising", 20),
            V.Variant("random_class_matched", 20), V.Variant("random", 20, "pgd_at")]
    sets = V.removal_sets(plan, [0, 1, 2], n, labels, ranking)
    assert set(sets) == {"corner_cases_n20", "random_n20", "least_surprising_n20", "random_class_matched_n20"}
    cc = {s: sorted(e["removed"]) for s, e in sets["corner_cases_n20"]["per_seed"].items()}
    assert cc["0"] == cc["1"] == cc["2"] == sorted(ranking[:20].tolist())  # pooled over models: one set
    assert sorted(sets["least_surprising_n20"]["per_seed"]["0"]["removed"]) == sorted(ranking[-20:].tolist())
    rnd = sets["random_n20"]["per_seed"]
    assert len({tuple(e["removed"]) for e in rnd.values()}) == 3  # a fresh draw per seed
    for seed, e in rnd.items():
        assert len(set(e["removed"])) == 20 and e["draw_seed"] == V.draw_seed("random", 20, int(seed))
        np.testing.assert_array_equal(e["removed"], V.random_removal(n, 20, e["draw_seed"]))  # recorded, replayable
    hist = np.bincount(labels[ranking[:20]], minlength=5)
    for e in sets["random_class_matched_n20"]["per_seed"].values():
        assert np.array_equal(np.bincount(labels[e["removed"]], minlength=5), hist)
        assert len(set(e["removed"])) == 20
    with pytest.raises(V.VariantError, match="needs the DSA ranking"):
        V.removal_sets([V.Variant("corner_cases", 5)], [0], n)


def test_random_draws_are_reproducible_and_uniform():
    a = V.random_removal(1000, 100, 42)
    assert np.array_equal(a, V.random_removal(1000, 100, 42))
    counts = np.zeros(10)
    for s in range(400):
        counts += np.bincount(V.random_removal(1000, 100, s) // 100, minlength=10)
    # each decile holds 10% of the removed inputs (binomial sd ≈ 0.15% of 40,000)
    assert np.allclose(counts / counts.sum(), 0.1, atol=0.006)


def _data(per_seed: dict) -> dict:
    out = {}
    for name, values in per_seed.items():
        v = V.parse_variant_name(name)
        out[name] = {"rule": v.rule, "n_remove": v.n_remove, "regime": v.regime, "seeds": [0, 1, 2, 3, 4],
                     "per_seed": {"mean_radius": values}, "summary": {}}
    return out


def test_comparisons_pair_by_seed_and_apply_holm():
    from compare import comparisons
    from scipy import stats

    base = [1.0, 1.2, 0.9, 1.1, 1.05]
    cc = [1.1, 1.25, 1.0, 1.3, 1.1]
    rnd = [0.95, 1.25, 0.92, 1.12, 1.0]
    rows = comparisons(_data({"baseline": base, "corner_cases_n10": cc, "random_n10": rnd}))
    got = {(r["a"], r["b"]): r for r in rows}
    assert set(got) == {("baseline", "corner_cases_n10"), ("baseline", "random_n10"), ("random_n10", "corner_cases_n10")}
    contrast = got[("random_n10", "corner_cases_n10")]
    assert contrast["comparison"] == "corner_cases_vs_random"
    assert contrast["difference"]["mean"] == pytest.approx(np.mean(np.subtract(cc, rnd)))
    assert contrast["t_pvalue"] == pytest.approx(stats.ttest_rel(cc, rnd).pvalue)
    # Holm over the family of 3: the smallest p times 3, then step-down, monotone, capped at 1
    ps = sorted(r["t_pvalue"] for r in rows)
    expected = [min(1, max(3 * ps[0], 0)), None, None]
    expected[1] = min(1, max(expected[0], 2 * ps[1]))
    expected[2] = min(1, max(expected[1], ps[2]))
    assert sorted(r["t_pvalue_holm"] for r in rows) == pytest.approx(expected)


def test_unpaired_seeds_are_not_compared():
    from compare import _pair

    data = _data({"baseline": [1.0, 2.0, 3.0, 4.0, 5.0], "random_n5": [1.5, 2.0, 3.5, 4.0, math.nan]})
    res = _pair(data, "baseline", "random_n5", "mean_radius")
    assert res["seeds"] == [0, 1, 2, 3] and res["difference"]["mean"] == pytest.approx(0.25)
