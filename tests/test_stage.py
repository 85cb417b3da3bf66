"""The stage runner: each stage sees only the config keys it declares, records them with their hash
in the manifest, and its Make stamp changes only when one of those keys changes."""
import json
import os

import pytest

import stage
from config import DEFAULTS, config_hash, load_config


def test_every_declared_key_exists():
    for name, keys in stage.STAGE_KEYS.items():
        unknown = [k for k in keys if k not in DEFAULTS]
        assert not unknown, (name, unknown)


def test_stage_config_refuses_undeclared_keys():
    cfg = stage.stage_config("adversarial", load_config(None))
    assert cfg["adv_n_test"] == DEFAULTS["adv_n_test"][0] and "learning_rate" in cfg  # checkpoints are checked against it
    with pytest.raises(stage.UndeclaredConfigKey, match="stage 'adversarial' read config key 'dsa_top'"):
        cfg["dsa_top"]


def test_stamp_changes_only_with_the_stage_keys(isolated_outputs):
    base = load_config(None)
    paths = {s: stage.stamp(s, base) for s in ("train", "adversarial", "report")}
    before = {s: (p.read_text(), os.stat(p).st_mtime_ns) for s, p in paths.items()}
    changed = load_config(None, ["adv_n_test=50"])
    for s in paths:
        stage.stamp(s, changed)
    after = {s: (p.read_text(), os.stat(p).st_mtime_ns) for s, p in paths.items()}
    assert after["train"] == before["train"] and after["report"] == before["report"]  # untouched file
    assert after["adversarial"][0] != before["adversarial"][0]
    data = json.loads(after["adversarial"][0])
    assert data["config"]["adv_n_test"] == 50
    assert data["config_hash"] == config_hash(stage.stage_config("adversarial", changed))
    # a key no stage of the three reads changes none of their stamps
    for s in paths:
        stage.stamp(s, load_config(None, ["adv_n_test=50", "dsa_k=7"]))
    assert {s: p.read_text() for s, p in paths.items()} == {s: a[0] for s, a in after.items()}


def test_runner_records_each_stage_config_and_hash(isolated_outputs, capsys):
    full = load_config(None, ["name=runner_t"])
    seen = {}

    def compute(ctx):
        seen["keys"] = set(ctx.cfg)
        return 41

    def write(ctx, result):
        ctx.info["answer"] = result + 1
        return "wrote nothing"

    assert stage.run("compare", full, compute, write) == 41
    stage.run("report", full, lambda ctx: None, lambda ctx, r: "ok")
    manifest = json.loads((isolated_outputs / "results" / "runner_t" / "manifest.json").read_text())
    for name in ("compare", "report"):
        entry = manifest["stages"][name]
        assert set(entry["config"]) == set(stage.STAGE_KEYS[name])
        assert entry["config_hash"] == config_hash(entry["config"])
    assert manifest["stages"]["compare"]["answer"] == 42
    assert seen["keys"] == set(stage.STAGE_KEYS["compare"])
    assert "[compare] wrote nothing (" in capsys.readouterr().out


def test_run_folder_from_before_variants_is_a_one_line_error(isolated_outputs, capsys):
    import main as main_script

    old = isolated_outputs / "model" / "smoke" / "cnn_s0.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old checkpoint")
    assert main_script.main(["--config", "configs/smoke.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cnn_s0.pt: this run folder predates training variants" in err
    assert not (isolated_outputs / "model" / "smoke" / "baseline_s0.pt").exists()


def test_stage_cli_lists_keys_and_writes_stamps(isolated_outputs, capsys):
    assert stage.main(["keys", "adversarial"]) == 0
    assert "adv_n_test" in capsys.readouterr().out
    assert stage.main(["stamp", "train", "--config", "configs/smoke.yaml"]) == 0
    assert (isolated_outputs / "results" / "smoke" / ".stamps" / "train.json").is_file()
    assert stage.main(["stamp", "nosuch"]) == 2


def _record_stages(args):
    root, worker, n = args
    os.environ["PIPELINE_OUTPUT_ROOT"] = root
    import artifacts

    cfg = {"name": "concurrent_t"}
    for i in range(n):
        artifacts.update_manifest(cfg, f"stage_{worker}_{i}", 0.0)


@pytest.mark.skipif(os.name != "posix", reason="the manifest lock uses fcntl")
def test_stages_finishing_at_once_keep_every_manifest_entry(isolated_outputs):
    """make reproduce runs independent stages together: concurrent read-modify-writes of the manifest
    must not drop each other's entries."""
    import multiprocessing

    n = 25
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_record_stages, [(str(isolated_outputs), w, n) for w in range(4)])
    manifest = json.loads((isolated_outputs / "results" / "concurrent_t" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {f"stage_{w}_{i}" for w in range(4) for i in range(n)}
