"""Papercuts found trying the pipeline (issue: variants and stage runner, item 6): one test each."""
import numpy as np
import pytest

import main as main_script
from config import ConfigError, load_config

SMOKE = ["--config", "configs/smoke.yaml"]


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "+1e-3", "1.0e-3"])
def test_yaml_1_1_float_is_accepted_in_yaml_and_set(tmp_path, text):
    # PyYAML reads `1e-3` (no dot) as a string: a float key must still accept it
    path = tmp_path / "lr.yaml"
    path.write_text(f"learning_rate: {text}\nmutation_rates: [{text}, 0.01]\n")
    cfg = load_config(path)
    assert cfg["learning_rate"] == 0.001 and isinstance(cfg["learning_rate"], float)
    assert cfg["mutation_rates"] == [0.001, 0.01]
    assert load_config(None, [f"learning_rate={text}"])["learning_rate"] == 0.001


def test_non_numeric_string_is_still_rejected_for_a_float():
    with pytest.raises(ConfigError, match=r"--set: key 'learning_rate' expects a number, got 'fast'"):
        load_config(None, ["learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"'num_epochs' expects an integer"):
        load_config(None, ["num_epochs=1e3"])  # floats-as-text are for float keys only


def test_diverging_training_stops_naming_seed_and_epoch_and_writes_no_checkpoint(isolated_outputs, capsys):
    code = main_script.main(SMOKE + ["--set", "learning_rate=1000000.0", "--set", "n_models=1",
                                     "--set", "num_epochs=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: seed 0, epoch 1: training diverged")
    assert not list(isolated_outputs.rglob("*.pt")), "a diverged run wrote a checkpoint"
    assert not list(isolated_outputs.rglob("robustness*.json")), "later artifacts were written"


def test_train_model_raises_on_nan_loss():
    import torch

    from mnistload import load_dataset

    cfg = load_config("configs/smoke.yaml", ["n_train=64", "num_epochs=1"])
    ds = load_dataset(cfg)
    x = ds.x_train.clone()
    x[3] = float("nan")  # a NaN input makes the first mini-batch loss NaN
    with pytest.raises(main_script.TrainingDiverged, match=r"seed 7, epoch 1: training diverged \(loss nan"):
        main_script.train_model(cfg, x, ds.y_train, ds.x_val, ds.y_val, seed=7, device=torch.device("cpu"))


def test_bad_conductance_splits_is_reported_under_its_own_name():
    with pytest.raises(ConfigError, match=r"key 'conductance_splits' must be splits among train, val, test"):
        load_config(None, ["conductance_splits=[val, tset]"])
    with pytest.raises(ConfigError, match=r"key 'lcr_splits' must be"):
        load_config(None, ["lcr_splits=[vall]"])


def test_n_test_zero_is_the_whole_test_pool():
    from mnistload import load_dataset

    ds = load_dataset(load_config(None, ["n_test=0", "n_train=1000", "n_val=500"]))
    # mnist5k: 5,000 images; what the training and validation splits leave is the test pool
    assert len(ds.x_test) == 5000 - 1000 - 500
    assert len(np.intersect1d(ds.test_index, np.concatenate([ds.train_index, ds.val_index]))) == 0
    # the documented default is unchanged: n_test 1000 with the default sizes
    assert len(load_dataset(load_config(None, ["n_test=0"])).x_test) == 1000


def test_detector_bootstrap_matches_a_plain_resampling_loop():
    """The vectorised bootstrap (metrics.auroc_ci) gives the same percentile interval as resampling
    with scikit-learn one resample at a time, on the same resample indices."""
    from sklearn.metrics import roc_auc_score

    from metrics import auroc_ci

    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.05).astype(int)
    s = np.round(rng.normal(size=400) + 1.5 * y, 1)  # ties, as real detector scores have
    res = auroc_ci(y, s, n_boot=300, seed=11)
    ref_rng = np.random.default_rng(11)
    values = []
    for _ in range(300):
        idx = ref_rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            values.append(roc_auc_score(y[idx], s[idx]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    assert res["auroc_ci"] == pytest.approx([lo, hi], abs=1e-12)
