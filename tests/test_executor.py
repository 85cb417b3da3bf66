"""The (stage, variant, seed) units under ``executor: ray`` (a local Ray instance) and in local worker
processes (``local_workers: 2``): the per-unit stages of the smoke chain give the same artifacts as
the local executor running them in its own process; a unit whose worker process is
killed is rerun and the stage completes with the same numbers; a unit that fails every time stops the
stage with one line naming the unit and its log, and the stage writes nothing. The executor keys
change no config hash or Make stamp."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

# The smoke config made smaller; one torch thread in both runs, so float sums round the same way.
TINY = ["--config", "configs/smoke.yaml"] + [a for kv in (
    "n_train=200", "n_val=50", "n_test=100", "num_epochs=1", "num_threads=1", "deepfool_n_test=20",
    "adv_n_test=20", "adv_eps_l2=[0.0,1.0,2.0]", "adv_margin_steps=2", "variants=[baseline,corner_cases]",
    "remove_count=20", "dsa_top=20", "dsa_variants=[sadl]", "bootstrap=20") for a in ("--set", kv)]
RAY = ["--set", "executor=ray"]
LOCAL = ["--set", "local_workers=1"]  # in the stage's own process, one unit after another
POOL = ["--set", "local_workers=2"]   # two spawned worker processes
VARIANTS = ["baseline", "corner_cases_n20"]
UNIT_FILES = [f"variants/{v}/{f}" for v in VARIANTS for f in ("robustness.csv",)] + \
    ["adversarial.json", "adversarial.csv", "transfer.json"]


class _OutputRoot:
    def __init__(self, root):
        self.root, self.old = str(root), os.environ.get("PIPELINE_OUTPUT_ROOT")

    def __enter__(self):
        os.environ["PIPELINE_OUTPUT_ROOT"] = self.root

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("PIPELINE_OUTPUT_ROOT", None)
        else:
            os.environ["PIPELINE_OUTPUT_ROOT"] = self.old


def _chain(root, extra):
    """The smoke chain's stages that run units (plus cc_remove, which the variants need)."""
    import adversarial
    import cc_remove
    import main as train
    import robustness

    with _OutputRoot(root):
        for name, fn, argv in [("train", train.main, ["--no-measure"]), ("cc_remove", cc_remove.main, []),
                               ("train_variants", train.main, ["--variant", "all", "--no-measure"]),
                               ("robustness", robustness.main, []), ("adversarial", adversarial.main, [])]:
            assert fn(TINY + extra + argv) == 0, f"stage {name} failed"
    return root


@pytest.fixture(scope="module")
def ray_instance():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("local"), LOCAL)


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory, local_run):
    return _chain(tmp_path_factory.mktemp("pool"), POOL)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_instance, local_run):
    return _chain(tmp_path_factory.mktemp("ray"), RAY)


def _res(root, name=""):
    return root / "results" / "smoke" / name


def _json(root, name):
    return json.loads(_res(root, name).read_text())


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def test_ray_gives_the_local_artifacts(local_run, ray_run):
    _same_artifacts(local_run, ray_run)


def test_local_worker_processes_give_the_in_process_artifacts(local_run, pool_run):
    _same_artifacts(local_run, pool_run)
    for stage, variants in [("train_variants", ["corner_cases_n20"]), ("adversarial", VARIANTS)]:
        info = _json(pool_run, "manifest.json")["stages"][stage]["executor"]
        assert (info["executor"], info["local_workers"], info["threads_per_worker"]) == ("local", 2, 1)
        assert sorted(info["units"]) == sorted(f"{stage}/{v}_s{s}" for v in variants for s in (0, 1))
    log = (_res(pool_run) / "logs/units/adversarial/baseline_s1.log").read_text()
    assert log.startswith("--- attempt 1: unit (adversarial, baseline, seed 1)") and "--- done in" in log


def test_a_failing_unit_in_a_worker_process_stops_the_stage_naming_it(pool_run, tmp_path, capsys):
    _broken_checkpoint_stops_the_stage(pool_run, tmp_path, capsys, POOL, 1, "failed: ArtifactError: ")


def _broken_checkpoint_stops_the_stage(run, tmp_path, capsys, opts, seed, failed):
    """An unreadable checkpoint of one unit: the stage exits 2 with one line naming the unit (then
    ``failed``) and its log, the log holds the traceback, and the stage wrote none of its files."""
    import robustness

    root = _fresh_copy(run, tmp_path / "broken")
    (root / "model" / "smoke" / f"corner_cases_n20_s{seed}.pt").write_bytes(b"not a checkpoint")
    with _OutputRoot(root):
        assert robustness.main(TINY + opts) == 2
    err = capsys.readouterr().err.strip().splitlines()
    log = _res(root) / f"logs/units/robustness/corner_cases_n20_s{seed}.log"
    assert len(err) == 1 and err[0].startswith(f"error: unit (robustness, corner_cases_n20, seed {seed}) {failed}"), err
    assert "cannot load checkpoint" in err[0] and err[0].endswith(f"; log: {log}")
    assert "Traceback" in log.read_text() and "cannot load checkpoint" in log.read_text()
    assert not _res(root, "robustness.json").exists() and not list(_res(root).glob("variants/*/robustness.*"))


def _same_artifacts(local_run, ray_run):
    for v in VARIANTS:
        for seed in (0, 1):
            name = f"{v}_s{seed}.pt"
            a = (local_run / "model" / "smoke" / name).read_bytes()
            b = (ray_run / "model" / "smoke" / name).read_bytes()
            if a != b:  # then at least the weights and the metadata must agree
                ca, cb = (torch.load(local_run / "model" / "smoke" / name, weights_only=True),
                          torch.load(ray_run / "model" / "smoke" / name, weights_only=True))
                assert ca["meta"] == cb["meta"], name
                assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"]), name
        assert _without_seconds(_json(local_run, f"variants/{v}/train.json")) == \
            _without_seconds(_json(ray_run, f"variants/{v}/train.json")), v
        assert _without_seconds(_json(local_run, f"variants/{v}/robustness.json")) == \
            _without_seconds(_json(ray_run, f"variants/{v}/robustness.json")), v
    for name in UNIT_FILES:  # per-input radii, every attack's accuracies and margins, the transfer matrix
        assert _res(local_run, name).read_bytes() == _res(ray_run, name).read_bytes(), name
    rob = _json(ray_run, "variants/baseline/robustness.json")
    assert [m["seed"] for m in rob["models"]] == [0, 1] and all(m["n"] == 20 for m in rob["models"])
    assert len(_json(ray_run, "adversarial.json")["per_model"]["corner_cases_n20"]) == 2


def test_every_unit_wrote_a_part_and_the_manifest_says_where_it_ran(local_run, ray_run):
    local_m, ray_m = _json(local_run, "manifest.json"), _json(ray_run, "manifest.json")
    for stage, variants in [("train", ["baseline"]), ("train_variants", ["corner_cases_n20"]),
                            ("robustness", VARIANTS), ("adversarial", VARIANTS)]:
        for root in (local_run, ray_run):
            for v in variants:
                for seed in (0, 1):
                    with np.load(_res(root, f"parts/{stage}/{v}_s{seed}.npz"), allow_pickle=False) as part:
                        meta = json.loads(str(part["meta"]))
                    assert (meta["stage"], meta["variant"], meta["seed"]) == (stage, v, seed)
        # same config hash per stage: the executor is not part of what a stage computes
        assert local_m["stages"][stage]["config_hash"] == ray_m["stages"][stage]["config_hash"], stage
        assert "executor" not in local_m["stages"][stage]
        units = ray_m["stages"][stage]["executor"]["units"]
        assert sorted(units) == sorted(f"{stage}/{v}_s{s}" for v in variants for s in (0, 1))
        assert all(u["attempt"] == 1 for u in units.values())
    assert not (_res(local_run) / "logs" / "units").exists()  # local: the stage's own output, as before
    log = (_res(ray_run) / "logs/units/adversarial/baseline_s1.log").read_text()
    assert log.startswith("--- attempt 1: unit (adversarial, baseline, seed 1)") and "--- done in" in log
    assert not list(_res(ray_run).rglob(".*.tmp")) and not list((ray_run / "model").rglob(".*.tmp"))


def _fresh_copy(src, dst):
    """A copy of a finished run without its robustness outputs."""
    shutil.copytree(src, dst)
    for path in [_res(dst, "robustness.json"), *_res(dst).glob("variants/*/robustness.*"),
                 *_res(dst).glob("parts/robustness/*")]:
        path.unlink()
    return dst


def test_a_killed_worker_is_rerun_and_the_stage_completes(local_run, ray_run, tmp_path, monkeypatch):
    import executor
    import robustness

    root = _fresh_copy(ray_run, tmp_path / "killed")
    monkeypatch.setenv(executor.KILL_ONCE_ENV, "robustness/corner_cases_n20_s1")
    with _OutputRoot(root):
        assert robustness.main(TINY + RAY) == 0
    log = (_res(root) / "logs/units/robustness/corner_cases_n20_s1.log").read_text()
    assert "--- attempt 1:" in log and "--- attempt 2:" in log and log.count("--- done in") == 1
    units = _json(root, "manifest.json")["stages"]["robustness"]["executor"]["units"]
    assert units["robustness/corner_cases_n20_s1"]["attempt"] == 2
    assert units["robustness/baseline_s0"]["attempt"] == 1
    for v in VARIANTS:  # the rerun unit's numbers are the local run's
        name = f"variants/{v}/robustness.csv"
        assert _res(root, name).read_bytes() == _res(local_run, name).read_bytes(), name
    assert not list(_res(root).rglob(".*.tmp"))


def test_a_unit_that_always_fails_stops_the_stage_naming_it_and_its_log(ray_run, tmp_path, capsys):
    _broken_checkpoint_stops_the_stage(ray_run, tmp_path, capsys, RAY, 0, "failed after 1 attempt(s): ArtifactError: ")


def test_executor_keys_change_no_hash_or_stamp(isolated_outputs):
    import stage
    from config import DEFAULTS, ConfigError, config_hash, load_config

    assert all(k in DEFAULTS for k in stage.EXECUTOR_KEYS) and load_config(None)["executor"] == "local"
    local = load_config(None)
    remote = load_config(None, ["executor=ray", "ray_address=auto", "ray_num_cpus=4", "ray_num_gpus=0.5",
                                "local_workers=3"])
    for name in stage.STAGE_KEYS:
        a, b = stage.stage_config(name, local), stage.stage_config(name, remote)
        assert dict(a) == dict(b) and config_hash(a) == config_hash(b), name
        assert stage.stamp(name, local).read_text() == stage.stamp(name, remote).read_text()
        if name in stage.UNIT_STAGES:
            assert (a["executor"], b["executor"], b["ray_num_gpus"]) == ("local", "ray", 0.5)
        else:
            with pytest.raises(stage.UndeclaredConfigKey):
                b["executor"]
    for bad in (["executor=cluster"], ["local_workers=-1"], ["ray_num_cpus=0"], ["ray_num_gpus=-1"], ["ray_max_retries=-1"],
                ["executor=ray", "device=cuda"]):
        with pytest.raises(ConfigError):
            load_config(None, bad)
