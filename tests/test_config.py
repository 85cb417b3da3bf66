"""config + main's command line: defaults, unknown keys, types, overrides, boolean flags."""
import re

import pytest

from config import DEFAULTS, ConfigError, config_hash, load_config
from main import parse_args, resolve_config


def test_default_yaml_lists_every_key_with_a_comment():
    text = open("configs/default.yaml").read()
    keys = [line.split(":")[0] for line in text.splitlines() if re.match(r"^[a-z_0-9]+:", line)]
    assert keys == list(DEFAULTS)
    for line in text.splitlines():
        if re.match(r"^[a-z_0-9]+:", line):
            assert "#" in line, line
    assert load_config("configs/default.yaml") == load_config(None)


@pytest.mark.parametrize("name", ["smoke", "mnist_full", "cifar10", "dose", "explanation"])
def test_shipped_configs_load_and_comment_every_key(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg["name"] == name
    for line in open(f"configs/{name}.yaml").read().splitlines():
        if re.match(r"^[a-z_0-9]+:", line):
            assert "#" in line, line


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\nnum_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown config key 'num_epoch'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: unknown config key 'lr'"):
        load_config(None, ["lr=0.1"])


@pytest.mark.parametrize("text,message", [
    ("num_epochs: 2.5", r"'num_epochs' expects an integer, got 2.5"),
    ("num_epochs: true", r"'num_epochs' expects an integer"),
    ("learning_rate: fast", r"'learning_rate' expects a number"),
    ("dsa_layers: penultimate", r"'dsa_layers' expects a list"),
    ("mutation_rates: [0.01, 2]", r"'mutation_rates' must be rates in \[0, 1\]"),
    ("n_models: 0", r"'n_models' must be >= 1"),
])
def test_wrong_types_and_ranges(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_int_accepted_for_float_and_override_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\nnum_epochs: 4\n")
    cfg = load_config(path, ["num_epochs=6"])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["num_epochs"] == 6


def test_is_retrain_false_means_false():
    assert parse_args(["-is_retrain", "False"]).is_retrain is False
    assert parse_args(["-is_retrain", "false"]).is_retrain is False
    assert parse_args(["-is_retrain", "True"]).is_retrain is True
    assert parse_args([]).is_retrain is False
    with pytest.raises(SystemExit):
        parse_args(["-is_retrain", "maybe"])


def test_seed_flags_override_config():
    args = parse_args(["--config", "configs/smoke.yaml", "-num_epochs", "7", "-batch_size", "16",
                       "-learning_rate", "0.01", "--set", "n_models=3"])
    cfg = resolve_config(args)
    assert (cfg["num_epochs"], cfg["batch_size"], cfg["learning_rate"], cfg["n_models"]) == (7, 16, 0.01, 3)
    assert cfg["name"] == "smoke"


def test_config_hash_changes_with_values():
    cfg = load_config(None)
    assert config_hash(cfg) == config_hash(dict(cfg))
    assert config_hash(cfg) != config_hash(dict(cfg, seed=1))
