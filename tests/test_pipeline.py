"""End to end on the smoke config: every stage runs, every artifact exists, parses and agrees with
its neighbours; retraining refuses foreign kept indices; stages name missing inputs; the report
carries the artifacts' numbers."""
import json
import os

import numpy as np
import pytest

SMOKE = ["--config", "configs/smoke.yaml"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run the whole chain once (in-process, through each script's main) into a temporary root."""
    import adversarial
    import cc_remove
    import conductance
    import detectors
    import main as train
    import mutation
    import report

    root = tmp_path_factory.mktemp("smoke")
    old = os.environ.get("PIPELINE_OUTPUT_ROOT")
    os.environ["PIPELINE_OUTPUT_ROOT"] = str(root)
    try:
        steps = [("train", train.main, SMOKE), ("cc_remove", cc_remove.main, SMOKE),
                 ("retrain", train.main, SMOKE + ["-is_retrain", "True"]), ("mutation", mutation.main, SMOKE),
                 ("conductance", conductance.main, SMOKE), ("detectors", detectors.main, SMOKE),
                 ("adversarial", adversarial.main, SMOKE), ("report", report.main, SMOKE)]
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
    from config import load_config
    from mnistload import load_dataset

    cfg = load_config("configs/smoke.yaml")
    ds = load_dataset(cfg)
    seeds = [0, 1]
    res = smoke_run / "results" / "smoke"
    for name in ["train.json", "train_retrained.json", "robustness_original.csv", "robustness_original.json",
                 "robustness_original.png", "robustness_retrained.json", "compare.json", "compare.md",
                 "compare.png", "dsa_train.npz", "dsa_test.npz", "corner_cases.json", "corner_cases.png",
                 "dsa_hist.png", "kept_indices.json", "lcr_val.npz", "lcr_test.npz", "conductance_val.npz",
                 "conductance_test.npz", "detectors.json", "detectors.md", "roc.png", "adversarial.json",
                 "adversarial.csv", "adversarial.png", "transfer.json", "manifest.json", "REPORT.md"]:
        assert (res / name).is_file() and (res / name).stat().st_size > 0, name
    for kind in ("cnn", "retrained"):
        for seed in seeds:
            assert (smoke_run / "model" / "smoke" / f"{kind}_s{seed}.pt").is_file()
    assert not list(res.glob(".*.tmp")), "a temporary file was left behind"

    manifest = _json(smoke_run, "manifest.json")
    assert manifest["dataset_fingerprint"] == ds.fingerprint
    assert set(manifest["stages"]) >= {"train_original", "robustness_original", "cc_remove", "train_retrained",
                                       "robustness_retrained", "mutation", "conductance", "detectors",
                                       "adversarial", "report"}
    assert [m["seed"] for m in _json(smoke_run, "train.json")["models"]] == seeds
    assert _json(smoke_run, "train.json")["test_accuracy"]["mean"] > 0.5
    for name in ("corner_cases.json", "kept_indices.json", "detectors.json", "adversarial.json"):
        assert _json(smoke_run, name)["dataset_fingerprint"] == ds.fingerprint, name
    for tag in ("original", "retrained"):
        rob = _json(smoke_run, f"robustness_{tag}.json")
        assert [m["seed"] for m in rob["models"]] == seeds
        assert all(m["n"] == len(ds.x_test) for m in rob["models"])
        assert all(m["flipped_fraction"] > 0.9 for m in rob["models"])
    csv_lines = (res / "robustness_original.csv").read_text().splitlines()
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
    assert adv["n_test"] == 100 and adv["kinds"] == ["original", "retrained"]


def test_kept_indices_and_comparison(smoke_run):
    kept = _json(smoke_run, "kept_indices.json")
    cc = _json(smoke_run, "corner_cases.json")
    assert kept["n_train"] == 600 and cc["n_removed"] == 30
    assert len(kept["indices"]) == kept["n_train"] - cc["n_removed"]
    assert set(kept["indices"]).isdisjoint(r["index"] for r in cc["removed"])
    assert _json(smoke_run, "train_retrained.json")["n_train"] == 570
    cmp = _json(smoke_run, "compare.json")
    for metric in ("accuracy", "mean_radius", "rho_adv"):
        block = cmp["metrics"][metric]
        assert len(block["per_seed"]["original"]) == len(block["per_seed"]["retrained"]) == 2
        diff = np.mean(block["per_seed"]["retrained"]) - np.mean(block["per_seed"]["original"])
        assert block["paired"]["difference"]["mean"] == pytest.approx(diff)
    rob = _json(smoke_run, "robustness_original.json")
    assert cmp["metrics"]["rho_adv"]["per_seed"]["original"] == [m["rho_adv"] for m in rob["models"]]


def test_retrain_refuses_altered_fingerprint(smoke_run, monkeypatch, capsys):
    import main as train

    root = smoke_run.parent / "altered"
    monkeypatch.setenv("PIPELINE_OUTPUT_ROOT", str(root))
    kept = _json(smoke_run, "kept_indices.json")
    kept["dataset_fingerprint"] = "0" * 24
    (root / "results" / "smoke").mkdir(parents=True)
    (root / "results" / "smoke" / "kept_indices.json").write_text(json.dumps(kept))
    assert train.main(SMOKE + ["-is_retrain", "True"]) == 2
    err = capsys.readouterr().err
    assert "kept_indices.json: dataset fingerprint '000000000000000000000000' does not match" in err
    assert not (root / "model" / "smoke").exists()  # nothing trained, no partial artifact


@pytest.mark.parametrize("module,missing", [("cc_remove", "cnn_s0.pt"), ("mutation", "cnn_s0.pt"),
                                            ("detectors", "cnn_s0.pt"), ("report", "manifest.json")])
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
    for heading in ("## Configuration and environment", "## Accuracy", "## DeepFool robustness radius",
                    "## Corner cases: DSA", "## Misprediction detectors", "## Adversarial evaluation"):
        assert heading in text
    train = _json(smoke_run, "train.json")
    assert f"{train['models'][0]['test_accuracy']:.4f}" in text
    cmp = _json(smoke_run, "compare.json")
    assert f"{cmp['metrics']['rho_adv']['original']['mean']:.4f}" in text
    cc = _json(smoke_run, "corner_cases.json")
    assert f"{cc['auroc_summary'][0]['auroc']['mean']:.3f}" in text
    det = _json(smoke_run, "detectors.json")
    assert f"{det['summary'][0]['auroc']['mean']:.3f}" in text
    adv = _json(smoke_run, "adversarial.json")
    assert f"{adv['per_kind']['original']['fgsm']['accuracy'][1]['mean']:.3f}" in text
    assert f"{adv['transfer']['mean']['original']['retrained']['mean']:.3f}" in text
    for image in ("compare.png", "corner_cases.png", "roc.png", "adversarial.png"):
        assert f"({image})" in text
