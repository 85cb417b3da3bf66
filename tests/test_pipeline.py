"""End to end on the smoke config, through each script's main: the seed workflow (train, cc_remove,
-is_retrain True) and the variants (random control), every measuring stage, the comparison and the
report. Every artifact exists, parses and agrees with its neighbours; the manifest holds each
stage's config and hash; stages name missing inputs."""
import json
import os

import numpy as np
import pytest

SMOKE = ["--config", "configs/smoke.yaml"]
VARIANTS = ["baseline", "corner_cases_n30", "random_n30"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run the whole chain once (in-process, through each script's main) into a temporary root."""
    import adversarial
    import cc_remove
    import compare
    import conductance
    import detectors
    import main as train
    import mutation
    import report
    import robustness

    root = tmp_path_factory.mktemp("smoke")
    old = os.environ.get("PIPELINE_OUTPUT_ROOT")
    os.environ["PIPELINE_OUTPUT_ROOT"] = str(root)
    try:
        steps = [("train", train.main, SMOKE), ("cc_remove", cc_remove.main, SMOKE),
                 ("retrain", train.main, SMOKE + ["-is_retrain", "True"]),
                 ("random", train.main, SMOKE + ["--variant", "random_n30", "--no-measure"]),
                 ("robustness", robustness.main, SMOKE + ["--variant", "random_n30"]),
                 ("mutation", mutation.main, SMOKE), ("conductance", conductance.main, SMOKE),
                 ("detectors", detectors.main, SMOKE), ("adversarial", adversarial.main, SMOKE),
                 ("compare", compare.main, SMOKE), ("report", report.main, SMOKE)]
        for name, fn, argv in steps:
            assert fn(argv) in (0, None), f"stage {name} failed"
    finally:
        if old is None:
            os.environ.pop("PIPELINE_OUTPUT_ROOT", None)
        else:
            os.environ["PIPELINE_OUTPUT_ROOT"] = old
    return root


def _json(root, name):
    return json.loads((root / "results" / "smoke" / name).read_text())


def _npz(root, name):
    with np.load(root / "results" / "smoke" / name, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_every_artifact_exists_and_agrees(smoke_run):
    import torch

    from config import load_config
    from mnistload import load_dataset

    cfg = load_config("configs/smoke.yaml")
    ds = load_dataset(cfg)
    seeds = [0, 1]
    res = smoke_run / "results" / "smoke"
    for name in ["compare.json", "compare.md", "compare.png", "dsa_train.npz", "dsa_test.npz", "corner_cases.json",
                 "corner_cases.png", "dsa_hist.png", "kept_indices.json", "subsets.json", "robustness.json",
                 "lcr_val.npz", "lcr_test.npz", "conductance_val.npz", "conductance_test.npz", "detectors.json",
                 "detectors.md", "roc.png", "adversarial.json", "adversarial.csv", "adversarial.png", "transfer.json",
                 "variants.json", "variants.md", "dose_response.png", "manifest.json", "REPORT.md"] + \
            [f"variants/{v}/{f}" for v in VARIANTS for f in ("train.json", "robustness.json", "robustness.csv",
                                                             "robustness.png")]:
        assert (res / name).is_file() and (res / name).stat().st_size > 0, name
    for v in VARIANTS:
        for seed in seeds:
            ckpt = torch.load(smoke_run / "model" / "smoke" / f"{v}_s{seed}.pt", weights_only=True)
            assert ckpt["meta"]["variant"] == v and ckpt["meta"]["seed"] == seed
            assert ckpt["meta"]["n_train"] == (600 if v == "baseline" else 570)
    assert not list(res.rglob(".*.tmp")), "a temporary file was left behind"

    manifest = _json(smoke_run, "manifest.json")
    assert manifest["dataset_fingerprint"] == ds.fingerprint
    assert set(manifest["stages"]) >= {"train", "robustness:baseline", "cc_remove", "train_variants:corner_cases_n30",
                                       "robustness:corner_cases_n30", "compare:is_retrain", "train_variants:random_n30",
                                       "robustness", "mutation", "conductance", "detectors", "adversarial", "compare",
                                       "report"}
    import stage
    from config import config_hash
    for name, entry in manifest["stages"].items():
        declared = stage.STAGE_KEYS[name.split(":")[0]]
        assert set(entry["config"]) == set(declared), name  # the config this stage ran with, nothing else
        assert entry["config_hash"] == config_hash(entry["config"]), name
    assert "adv_n_test" not in manifest["stages"]["train"]["config"]
    assert manifest["stages"]["adversarial"]["config"]["adv_n_test"] == 100
    assert manifest["stages"]["train"]["config"]["learning_rate"] == 0.002
    base_train = _json(smoke_run, "variants/baseline/train.json")
    assert [m["seed"] for m in base_train["models"]] == seeds and base_train["test_accuracy"]["mean"] > 0.5
    for name in ("corner_cases.json", "kept_indices.json", "subsets.json", "detectors.json", "adversarial.json"):
        assert _json(smoke_run, name)["dataset_fingerprint"] == ds.fingerprint, name
    rob = _json(smoke_run, "robustness.json")
    assert sorted(rob["variants"]) == VARIANTS
    for v in VARIANTS:
        per = _json(smoke_run, f"variants/{v}/robustness.json")
        assert [m["seed"] for m in per["models"]] == seeds
        assert all(m["n"] == len(ds.x_test) and m["flipped_fraction"] > 0.9 for m in per["models"])
        assert rob["variants"][v]["rho_adv"] == [m["rho_adv"] for m in per["models"]]
    csv_lines = (res / "variants/baseline/robustness.csv").read_text().splitlines()
    assert csv_lines[0] == "seed,index,label,pred,radius_l2,rho,iterations,adv_label,converged"
    assert len(csv_lines) == 1 + len(seeds) * len(ds.x_test)
    for split, n in (("train", len(ds.x_train)), ("test", len(ds.x_test))):
        d = _npz(smoke_run, f"dsa_{split}.npz")
        assert d["seeds"].tolist() == seeds and d["dsa_sadl_penultimate"].shape == (2, n)
        assert np.isfinite(d["dsa_sadl_penultimate"]).all() and (d["dsa_sadl_penultimate"] > 0).all()
    for split, n in (("val", len(ds.x_val)), ("test", len(ds.x_test))):
        lcr = _npz(smoke_run, f"lcr_{split}.npz")
        cond = _npz(smoke_run, f"conductance_{split}.npz")
        assert lcr["seeds"].tolist() == cond["seeds"].tolist() == seeds
        assert lcr["lcr_NAI_0.01"].shape == (2, n) and cond["features"].shape[:2] == (2, n)
        np.testing.assert_array_equal(lcr["pred"], cond["pred"])  # both stages saw the same models
        assert ((lcr["lcr_NAI_0.01"] >= 0) & (lcr["lcr_NAI_0.01"] <= 1)).all()
    adv = _json(smoke_run, "adversarial.json")
    assert adv["n_test"] == 100 and adv["variants"] == VARIANTS and adv["not_trained"] == []


def test_dsa_auroc_per_variant_is_cc_removes_for_the_baseline(smoke_run):
    """A variant's DSA AUROC uses its own training inputs as DSA's reference; for the baseline that is
    the whole training split, so it must equal cc_remove.py's AUROC of the same model, DSA variant and
    layer (computed there through another code path). The removal variants' references are smaller."""
    cc = _json(smoke_run, "corner_cases.json")
    rows = {r["seed"]: r["auroc"] for r in cc["auroc"] if (r["variant"], r["layer"]) == (cc["variant"], cc["layer"])}
    base = _json(smoke_run, "variants/baseline/robustness.json")["models"]
    assert [m["seed"] for m in base] == sorted(rows)
    for m in base:
        assert m["dsa_auroc"] == pytest.approx(rows[m["seed"]], abs=1e-12)
        assert (m["dsa_variant"], m["dsa_layer"]) == (cc["variant"], cc["layer"])
    n_train = _json(smoke_run, "subsets.json")["n_train"]
    for v in VARIANTS[1:]:
        for m in _json(smoke_run, f"variants/{v}/robustness.json")["models"]:
            assert m["n_train_reference"] == n_train - 30 and 0.0 <= m["dsa_auroc"] <= 1.0


def test_subsets_and_seed_workflow_comparison(smoke_run):
    kept = _json(smoke_run, "kept_indices.json")
    cc = _json(smoke_run, "corner_cases.json")
    subsets = _json(smoke_run, "subsets.json")
    assert kept["n_train"] == 600 and cc["n_removed"] == 30 and subsets["is_retrain_variant"] == "corner_cases_n30"
    assert len(kept["indices"]) == kept["n_train"] - cc["n_removed"]
    assert set(kept["indices"]).isdisjoint(r["index"] for r in cc["removed"])
    corner = subsets["subsets"]["corner_cases_n30"]["per_seed"]
    assert sorted(corner["0"]["removed"]) == sorted(corner["1"]["removed"]) == sorted(r["index"] for r in cc["removed"])
    rnd = subsets["subsets"]["random_n30"]["per_seed"]
    assert rnd["0"]["removed"] != rnd["1"]["removed"] and rnd["0"]["draw_seed"] != rnd["1"]["draw_seed"]
    cmp = _json(smoke_run, "compare.json")  # written by main.py -is_retrain True
    assert list(cmp["variants"]) == ["baseline", "corner_cases_n30"]
    assert cmp["variants"]["corner_cases_n30"]["n_train"] == [570]
    for metric in ("accuracy", "mean_radius", "rho_adv"):
        row = next(r for r in cmp["comparisons"] if r["measure"] == metric)
        a = cmp["variants"]["baseline"]["per_seed"][metric]
        b = cmp["variants"]["corner_cases_n30"]["per_seed"][metric]
        assert row["difference"]["mean"] == pytest.approx(np.mean(b) - np.mean(a))
    per = _json(smoke_run, "variants/baseline/robustness.json")
    assert cmp["variants"]["baseline"]["per_seed"]["rho_adv"] == [m["rho_adv"] for m in per["models"]]


def test_variants_comparison(smoke_run):
    var = _json(smoke_run, "variants.json")
    assert list(var["variants"]) == VARIANTS
    adv = _json(smoke_run, "adversarial.json")
    j = adv["attacks"]["pgd_linf"]["eps"].index(var["report_eps_linf"])
    for v in VARIANTS:
        d = var["variants"][v]
        assert set(d["summary"]) == {"accuracy", "mean_radius", "rho_adv", "pgd_accuracy", "pgd_linf_margin",
                                     "pgd_l2_margin", "dsa_auroc"}
        for m in ("accuracy", "pgd_accuracy", "dsa_auroc"):  # bounded intervals for proportions and AUROC
            s = d["summary"][m]
            assert 0.0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1.0, (v, m, s)
        assert d["per_seed"]["pgd_accuracy"] == [m["attacks"]["pgd_linf"]["accuracy"][j] for m in adv["per_model"][v]]
    kinds = {(r["comparison"], r["b"]) for r in var["comparisons"]}
    assert kinds == {("vs_baseline", "corner_cases_n30"), ("vs_baseline", "random_n30"),
                     ("corner_cases_vs_random", "corner_cases_n30")}
    for r in var["comparisons"]:
        assert np.isnan(r["t_pvalue"]) or r["t_pvalue_holm"] >= r["t_pvalue"]
    text = (smoke_run / "results" / "smoke" / "variants.md").read_text()
    assert "corner_cases_n30 − random_n30" in text


def test_retrain_refuses_altered_fingerprint(smoke_run, monkeypatch, capsys):
    import main as train

    root = smoke_run.parent / "altered"
    monkeypatch.setenv("PIPELINE_OUTPUT_ROOT", str(root))
    subsets = _json(smoke_run, "subsets.json")
    subsets["dataset_fingerprint"] = "0" * 24
    (root / "results" / "smoke").mkdir(parents=True)
    (root / "results" / "smoke" / "subsets.json").write_text(json.dumps(subsets))
    assert train.main(SMOKE + ["-is_retrain", "True"]) == 2
    err = capsys.readouterr().err
    assert "subsets.json: dataset fingerprint '000000000000000000000000' does not match" in err
    assert not (root / "model" / "smoke").exists()  # nothing trained, no partial artifact


@pytest.mark.parametrize("module,missing", [("cc_remove", "baseline_s0.pt"), ("mutation", "baseline_s0.pt"),
                                            ("detectors", "baseline_s0.pt"), ("adversarial", "baseline_s0.pt"),
                                            ("robustness", "baseline_s0.pt"), ("compare", "baseline_s0.pt"),
                                            ("report", "manifest.json")])
def test_stage_with_missing_input_names_the_file(module, missing, capsys):
    import importlib

    code = importlib.import_module(module).main(SMOKE)
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert missing in err and err.startswith("error: ")


def test_detectors_name_missing_lcr(smoke_run, monkeypatch, capsys, tmp_path):
    import shutil

    import detectors

    root = tmp_path / "copy"
    shutil.copytree(smoke_run, root)
    (root / "results" / "smoke" / "lcr_val.npz").unlink()
    monkeypatch.setenv("PIPELINE_OUTPUT_ROOT", str(root))
    assert detectors.main(SMOKE) == 2
    assert "lcr_val.npz: required artifact is missing (written by mutation.py)" in capsys.readouterr().err


def test_report_contains_the_artifacts_numbers(smoke_run):
    text = (smoke_run / "results" / "smoke" / "REPORT.md").read_text()
    for heading in ("## Configuration and environment", "## Training variants, paired by seed",
                    "## DeepFool robustness radius per variant", "## Corner cases: DSA", "## Misprediction detectors",
                    "## Adversarial evaluation"):
        assert heading in text
    var = _json(smoke_run, "variants.json")
    assert f"{var['variants']['random_n30']['summary']['accuracy']['mean']:.3f}" in text
    contrast = next(r for r in var["comparisons"] if r["comparison"] == "corner_cases_vs_random"
                    and r["measure"] == "mean_radius")
    assert f"{contrast['difference']['mean']:+.4f}" in text
    rob = _json(smoke_run, "robustness.json")
    assert f"{rob['variants']['baseline']['across_models']['rho_adv']['mean']:.4f}" in text
    cc = _json(smoke_run, "corner_cases.json")
    assert f"{cc['auroc_summary'][0]['auroc']['mean']:.3f}" in text
    det = _json(smoke_run, "detectors.json")
    assert f"{det['summary'][0]['auroc']['mean']:.3f}" in text
    adv = _json(smoke_run, "adversarial.json")
    assert f"{adv['per_variant']['baseline']['fgsm']['accuracy'][1]['mean']:.3f}" in text
    assert f"{adv['transfer']['mean']['baseline']['random_n30']['mean']:.3f}" in text
    for image in ("dose_response.png", "corner_cases.png", "roc.png", "adversarial.png"):
        assert f"({image})" in text
