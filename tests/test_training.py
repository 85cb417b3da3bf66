"""Training: learns on the smoke config, is bit-for-bit deterministic, retrain checks its input."""
import torch

import main as main_script
from config import load_config
from main import accuracy, train_model
from mnistload import load_dataset


def _smoke(**overrides):
    cfg = load_config("configs/smoke.yaml", [f"{k}={v}" for k, v in overrides.items()])
    return cfg, load_dataset(cfg)


def test_training_on_smoke_config_beats_chance():
    cfg, ds = _smoke()
    model, history = train_model(cfg, ds.x_train, ds.y_train, ds.x_val, ds.y_val, seed=0,
                                 device=torch.device("cpu"))
    acc = accuracy(model, ds.x_test, ds.y_test, 500, "cpu")
    assert acc > 0.6, acc  # chance is 0.1
    assert len(history) == cfg["num_epochs"] and history[-1]["loss"] < history[0]["loss"]
    assert not model.training


def test_same_seed_same_bytes_different_seed_differs():
    cfg, ds = _smoke(num_epochs=1, n_train=200)
    args = (cfg, ds.x_train, ds.y_train, ds.x_val, ds.y_val)
    a, _ = train_model(*args, seed=5, device=torch.device("cpu"))
    b, _ = train_model(*args, seed=5, device=torch.device("cpu"))
    c, _ = train_model(*args, seed=6, device=torch.device("cpu"))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.fc2.weight, c.fc2.weight)


def test_retrain_without_kept_indices_is_a_clear_error(capsys):
    code = main_script.main(["--config", "configs/smoke.yaml", "-is_retrain", "True"])
    err = capsys.readouterr().err
    assert code == 2
    assert "subsets.json: required artifact is missing (written by python cc_remove.py)" in err


def test_sep_with_zero_weight_trains_bit_for_bit_like_standard():
    """Through main.train_model (the pipeline's path): the sep regime with reg_weight 0 adds nothing
    and draws nothing, so the parameters equal the standard regime's bit for bit; a nonzero weight
    changes them."""
    cfg, ds = _smoke(num_epochs=1, n_train=96, sep_reg_weight=0.0)
    args = (cfg, ds.x_train, ds.y_train, ds.x_val, ds.y_val)
    std, _ = train_model(*args, seed=3, device=torch.device("cpu"))
    sep0, _ = train_model(*args, seed=3, device=torch.device("cpu"), regime="sep")
    for key, value in std.state_dict().items():
        assert torch.equal(value, sep0.state_dict()[key]), key
    cfg2, _ = _smoke(num_epochs=1, n_train=96, sep_reg_weight=2000.0)
    sep, _ = train_model(cfg2, ds.x_train, ds.y_train, ds.x_val, ds.y_val, seed=3, device=torch.device("cpu"),
                         regime="sep")
    assert not torch.equal(std.fc2.weight, sep.fc2.weight)
