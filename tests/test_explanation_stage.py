"""The explanation stage end to end on a tiny config: two regimes × two seeds, every per-model
measure, the fixed pairs artifact, and the correlation block."""
import json

import numpy as np
import pytest

TINY = ["--config", "configs/smoke.yaml", "--set", "n_train=200", "--set", "n_test=60", "--set", "num_epochs=1",
        "--set", "variants=[baseline, baseline+sep]", "--set", "adv_n_test=30", "--set", "adv_eps_l2=[0.0, 1.0]",
        "--set", "explanation_n_inputs=12", "--set", "explanation_n_pairs=4", "--set", "explanation_steps=5",
        "--set", "explanation_n_clusters=3", "--set", "explanation_permutations=200", "--set", "adv_margin_steps=2"]


def test_explanation_stage_on_two_regimes(isolated_outputs):
    import adversarial
    import explanation
    import main as train
    import robustness

    assert train.main(TINY) == 0
    assert train.main(TINY + ["--variant", "baseline+sep", "--no-measure"]) == 0
    assert robustness.main(TINY + ["--variant", "baseline+sep"]) == 0
    assert adversarial.main(TINY) == 0
    assert explanation.main(TINY) == 0
    res = isolated_outputs / "results" / "smoke"
    out = json.loads((res / "explanation.json").read_text())
    assert [(m["variant"], m["seed"]) for m in out["models"]] == [("baseline", 0), ("baseline", 1),
                                                                  ("baseline+sep", 0), ("baseline+sep", 1)]
    adv = json.loads((res / "adversarial.json").read_text())
    for m in out["models"]:
        e = m["explanation"]["saliency"]
        # the attack keeps its best label-preserving iterate: it never ends above where it started
        assert e["le_end"] <= e["le_start"] + 1e-12
        assert 0.0 <= e["topk_attack"] <= 1.0 and 0.0 <= e["topk_random_sign"] <= 1.0
        assert e["sensitivity"] >= 0
        pgd = next(r for r in adv["per_model"][m["variant"]] if r["seed"] == m["seed"])
        j = pgd["attacks"]["pgd_linf"]["eps"].index(out["report_eps_linf"])
        assert m["pgd_accuracy"] == pgd["attacks"]["pgd_linf"]["accuracy"][j]
    pairs = json.loads((res / "explanation_pairs.json").read_text())["pairs"]
    assert set(pairs) == {"random", "cluster"} and all(len(p["victims"]) == 4 for p in pairs.values())
    y = None
    from config import load_config
    from mnistload import load_dataset
    y = load_dataset(load_config("configs/smoke.yaml", ["n_train=200", "n_test=60"])).y_test.numpy()
    r = pairs["random"]
    assert np.all(y[r["victims"]] != y[r["targets"]])  # random pairs cross classes
    corr = out["correlation"]
    assert {(c["classification"], c["explanation"]) for c in corr} == {
        (a, b) for a in ("pgd_accuracy", "rho_adv") for b in ("le_end", "topk_attack", "sensitivity")}
    assert all(c["n_models"] == 4 for c in corr)
    assert set(out["seed_table"]) == {"baseline", "baseline+sep"}
    assert (res / "explanation.png").stat().st_size > 0 and "L_e^end" in (res / "explanation.md").read_text()
    # pairs are written once and reused: a second run leaves the artifact as it was
    before = (res / "explanation_pairs.json").stat().st_mtime_ns
    assert explanation.main(TINY) == 0
    assert (res / "explanation_pairs.json").stat().st_mtime_ns == before


def test_across_model_correlation_known_answers():
    from explanation import across_models, spearman_ci

    perfect = across_models([(i, 2 * i + 1) for i in range(8)], n_perm=500, seed=0)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall"] == pytest.approx(1.0)
    assert perfect["spearman_perm_p"] < 0.01  # 8! orderings: only the identity is as extreme (two-sided: 2)
    reverse = across_models([(i, -i) for i in range(8)], n_perm=500, seed=0)
    assert reverse["spearman"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noise = across_models([(a, b) for a, b in rng.normal(size=(12, 2))], n_perm=500, seed=0)
    assert noise["spearman_ci"][0] < noise["spearman"] < noise["spearman_ci"][1]
    s = spearman_ci(np.arange(50), np.arange(50) ** 3)
    assert s["rho"] == 1.0 or s["rho"] > 0.999
