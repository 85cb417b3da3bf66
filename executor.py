"""Units of work and where they run (DESIGN.md, "Variants"): ``executor: local`` runs them on this
machine — in the stage's own process one after another (``local_workers: 1``) or in a pool of spawned
worker processes (``local_workers: N``; 0 = one per CPU core, each with ``num_threads`` or 1 torch
threads: on a CPU, a small model's torch threads scale far worse than separate processes) —
``executor: ray`` runs each as a Ray task, on a local Ray instance or on a cluster (``ray_address``).

A **unit** is one (stage, variant, seed): train one model, measure one model's DeepFool radius,
attack one model. It reads its inputs from the output root (the dataset from the config, the
checkpoints), writes its own **part** atomically,

    results/<run>/parts/<stage>/<variant>_s<seed>.npz    (a JSON ``meta`` entry plus arrays)

(a training unit also writes its checkpoint), and returns nothing. The stage then reads every part
back (``read_part``, checked against the unit, the stage's config hash and the dataset fingerprint)
and writes its per-run files from them, as before. A result never travels through Ray: a local and a
Ray run aggregate the same bytes, and the same config gives the same artifacts under both, provided
the units run with the same number of torch threads (``num_threads``; when it is 0, a local stage
uses torch's default and a Ray unit ``ray_num_cpus`` threads, and float sums may round differently).

Ray: each unit is a task reserving ``ray_num_cpus`` CPUs and ``ray_num_gpus`` GPUs (a unit that
reserves none runs on the CPU under ``device: auto``, so it never takes a GPU Ray did not give it).
A unit whose worker process dies (killed, out of memory, node lost) or that raises an I/O or GPU
out-of-memory error is rerun up to ``ray_max_retries`` times; any other exception is deterministic
(same inputs, same failure), so it stops the stage at once, cancelling the units not yet finished,
with one line naming the unit and its log, ``results/<run>/logs/units/<stage>/<variant>_s<seed>.log``
(every attempt's output and traceback). Parts and checkpoints are written atomically, so a killed
attempt leaves no half file, and the stage writes nothing of its own until every unit succeeded.
Workers import the project from the repo path of the driver and write under its output root
(``PIPELINE_OUTPUT_ROOT``): on a cluster both must be the same path on every node (shared storage).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

import artifacts
from config import DEFAULTS, ROOT, TRAINING_KEYS, config_hash, output_root

# Test hook: ``<stage>/<variant>_s<seed>`` — that unit's worker kills itself (SIGKILL) on the first
# attempt of a run, so the tests can check that Ray reruns it (tests/test_executor.py).
KILL_ONCE_ENV = "PIPELINE_TEST_KILL_UNIT"


class UnitFailed(artifacts.ArtifactError):
    """A unit failed on Ray; the message names the unit (stage, variant, seed) and its log. An
    ArtifactError, so a stage ends with that one line (exit code 2): the unit's artifact is missing."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One (stage, variant, seed). ``fn(ctx, unit)`` does the work and writes ``unit.part(cfg)``;
    it must be a module-level function (a Ray worker imports it by name). ``args``: small inputs the
    stage computed (e.g. the kept training indices)."""
    stage: str
    variant: str
    seed: int
    fn: Callable | None
    args: dict = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.variant}_s{self.seed}"

    def describe(self) -> str:
        return f"({self.stage}, {self.variant}, seed {self.seed})"

    def part(self, cfg: dict) -> Path:
        return artifacts.results_dir(cfg) / "parts" / self.stage / f"{self.variant}_s{self.seed}.npz"

    def log(self, cfg: dict) -> Path:
        return artifacts.results_dir(cfg) / "logs" / "units" / self.stage / f"{self.variant}_s{self.seed}.log"


def settings(cfg) -> dict[str, Any]:
    """The executor keys of a stage's config view (stage.EXECUTOR_KEYS; their defaults when absent)."""
    from stage import EXECUTOR_KEYS

    own = getattr(cfg, "settings", {})
    return {k: own.get(k, DEFAULTS[k][0]) for k in EXECUTOR_KEYS}


def local_workers(cfg, opts: dict, n_units: int) -> int:
    """Processes the local executor runs units in: ``local_workers``, or when it is 0, one per CPU
    core this process may use divided by the threads a unit runs (``num_threads``, else 1) — and one
    on a GPU, whose memory the workers would otherwise share; never more than there are units."""
    wanted = opts["local_workers"]
    if not wanted:
        from config import resolve_device

        if resolve_device(cfg).type != "cpu":
            return 1
        wanted = max(1, len(os.sched_getaffinity(0)) // max(1, cfg["num_threads"]))
    return max(1, min(wanted, n_units))


def run_units(ctx, units: list[Unit], desc: str) -> None:
    """Run every unit (each writes its part); returns when all succeeded, raises on the first failure."""
    opts = settings(ctx.cfg)
    if not units:
        return
    if opts["executor"] == "ray":
        _run_ray(ctx, units, opts)
        return
    workers = local_workers(ctx.cfg, opts, len(units))
    if workers == 1:
        for unit in tqdm(units, desc=desc, disable=None):  # in this process, in order
            unit.fn(ctx, unit)
        return
    _run_pool(ctx, units, opts, workers, desc)


def _run_pool(ctx, units: list[Unit], opts: dict, workers: int, desc: str) -> None:
    """``workers`` spawned processes, each running units with ``num_threads`` (else 1) torch threads:
    on a CPU, torch's threads speed one small model up far less than separate processes do. A unit's
    output goes to its log, as on Ray; the first failure stops the stage with one line naming the
    unit and its log (units already running finish; the others are cancelled)."""
    import concurrent.futures as cf
    import multiprocessing

    threads = ctx.cfg["num_threads"] or 1
    if not ctx.cfg["num_threads"]:
        print(f"[{ctx.stage}] {workers} worker processes, 1 torch thread each (num_threads is 0; set it for artifacts "
              "identical to a run with other workers or threads)", flush=True)
    view = (ctx.stage, dict(ctx.cfg), opts, {"threads": threads, "device_from_config": True})
    env = {"PIPELINE_OUTPUT_ROOT": str(output_root())}
    start, timings = time.perf_counter(), {}
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {}
        for unit in units:
            unit.log(ctx.cfg).unlink(missing_ok=True)  # the log holds this run's attempt only
            futures[pool.submit(_task, _fn_name(unit.fn), view, dataclasses.replace(unit, fn=None), env)] = unit
        for future in tqdm(cf.as_completed(futures), total=len(units), desc=f"{desc}, {workers} processes",
                           disable=None):
            unit = futures[future]
            try:
                info = future.result()
            except BaseException as exc:  # noqa: BLE001 - reported as one line naming the unit
                text = str(exc).strip().splitlines()
                why = f"{type(exc).__name__}: {text[0][:400] if text else ''}"
                if isinstance(exc, cf.process.BrokenProcessPool):
                    why = "its worker process died (killed, or out of memory)"
                raise UnitFailed(f"unit {unit.describe()} failed: {why}; log: {unit.log(ctx.cfg)}") from None
            timings[unit.id] = info
            print(f"[{ctx.stage}] {unit.variant} seed {unit.seed}: {info['seconds']:.1f} s", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ctx.info["executor"] = {"executor": "local", "local_workers": workers, "threads_per_worker": threads,
                            "seconds": round(time.perf_counter() - start, 3), "units": timings}


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------
def write_part(ctx, unit: Unit, meta: dict, **arrays: Any) -> Path:
    """``unit``'s part: ``meta`` (JSON) with the unit, the stage's config hash and the dataset
    fingerprint, plus ``arrays``; one atomic write."""
    head = {"stage": unit.stage, "variant": unit.variant, "seed": unit.seed, "config_hash": config_hash(ctx.cfg),
            "dataset_fingerprint": ctx.dataset.fingerprint}
    text = json.dumps({**head, **meta}, default=artifacts._json_default, allow_nan=True)
    return artifacts.atomic_savez(unit.part(ctx.cfg), meta=np.asarray(text), **arrays)


def read_part(ctx, unit: Unit) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of ``unit``'s part, checked: the same unit, config and dataset as this stage."""
    path = unit.part(ctx.cfg)
    data = artifacts.load_npz(path, ("meta",), made_by=f"unit {unit.describe()}")
    meta = json.loads(str(data.pop("meta")))
    expected = {"stage": unit.stage, "variant": unit.variant, "seed": unit.seed, "config_hash": config_hash(ctx.cfg),
                "dataset_fingerprint": ctx.dataset.fingerprint}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise artifacts.ArtifactError(f"{path}: written for another unit, config or dataset ({wrong}; expected "
                                      f"{ {k: expected[k] for k in wrong} })")
    return meta, data


def require_checkpoints(cfg: dict, units: list[Unit]) -> None:
    """Fail before the first unit starts when a checkpoint a unit needs is missing."""
    for unit in units:
        path = artifacts.checkpoint_path(cfg, unit.seed, unit.variant)
        if not path.is_file():
            made_by = "python main.py" if unit.variant == "baseline" else f"python main.py --variant {unit.variant}"
            raise artifacts.ArtifactError(f"{path}: no trained model (run `{made_by} --config ...` first)")


def load_unit_model(ctx, unit: Unit):
    """The unit's model, with every check ``artifacts.load_models`` makes (fingerprint, training config)."""
    one = {**ctx.cfg, "seed": unit.seed, "n_models": 1}
    (_, model, _), = artifacts.load_models(one, ctx.dataset.fingerprint, unit.variant, ctx.device)
    return model


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------
def _retried_exceptions() -> list[type[BaseException]]:
    """Exceptions worth another attempt: the environment's, not the computation's."""
    import torch

    return [OSError, MemoryError, torch.OutOfMemoryError]


def _connect(opts: dict) -> None:
    """Join ``ray_address``, or start a local instance with this machine's CPUs (once per process)."""
    import ray

    if ray.is_initialized():
        return
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    common = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}, "include_dashboard": False,
              "log_to_driver": False, "logging_level": "warning"}
    if opts["ray_address"]:
        ray.init(address=opts["ray_address"], **common)
    else:
        ray.init(num_cpus=len(os.sched_getaffinity(0)), **common)


def _fn_name(fn: Callable) -> str:
    module = fn.__module__
    if module == "__main__":  # `python robustness.py`: the worker imports the file as `robustness`
        module = Path(sys.modules["__main__"].__file__).stem
    return f"{module}:{fn.__qualname__}"


def _run_ray(ctx, units: list[Unit], opts: dict) -> None:
    import ray

    if not ctx.cfg["num_threads"]:
        print(f"[{ctx.stage}] note: num_threads is 0, so each Ray unit runs {opts['ray_num_cpus']} torch thread(s) "
              "where a local run uses torch's default; float sums may round differently (set num_threads for "
              "artifacts identical to a local run)", flush=True)
    start = time.perf_counter()
    _connect(opts)
    ready = time.perf_counter() - start
    task = ray.remote(_task)
    options = {"num_cpus": opts["ray_num_cpus"], "num_gpus": opts["ray_num_gpus"],
               "max_retries": opts["ray_max_retries"], "retry_exceptions": _retried_exceptions()}
    env = {"PIPELINE_OUTPUT_ROOT": str(output_root())}
    if os.environ.get(KILL_ONCE_ENV):
        env[KILL_ONCE_ENV] = os.environ[KILL_ONCE_ENV]
    view = (ctx.stage, dict(ctx.cfg), opts, {"threads": ctx.cfg["num_threads"] or opts["ray_num_cpus"],
                                             "device_from_config": opts["ray_num_gpus"] > 0})
    refs = {}
    for unit in units:
        for stale in (unit.log(ctx.cfg), unit.log(ctx.cfg).with_suffix(".killed")):
            stale.unlink(missing_ok=True)  # the log holds this run's attempts only
        bare = dataclasses.replace(unit, fn=None)
        refs[task.options(name=unit.id, **options).remote(_fn_name(unit.fn), view, bare, env)] = unit
    pending, timings = list(refs), {}
    with tqdm(total=len(units), desc=f"{ctx.stage} units on Ray", disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            unit = refs[done[0]]
            try:
                info = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                for ref in pending:
                    ray.cancel(ref)
                raise UnitFailed(_failure(ctx, unit, exc, opts)) from None
            timings[unit.id] = info
            bar.update()
            print(f"[{ctx.stage}] {unit.variant} seed {unit.seed}: {info['seconds']:.1f} s on {info['host']} "
                  f"(attempt {info['attempt']})", flush=True)
    ctx.info["executor"] = {"executor": "ray", "ray_address": opts["ray_address"] or "local instance",
                            "ray_num_cpus": opts["ray_num_cpus"], "ray_num_gpus": opts["ray_num_gpus"],
                            "connect_seconds": round(ready, 3), "units": timings}


def _failure(ctx, unit: Unit, exc: BaseException, opts: dict) -> str:
    import ray

    log = unit.log(ctx.cfg)
    attempts = log.read_text(errors="replace").count("--- attempt ") if log.is_file() else 0
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        text = str(cause).strip().splitlines()
        why = f"{type(cause).__name__}: {text[0][:400] if text else ''}"
    else:  # the worker process died on every attempt (or the node, or Ray itself)
        why = f"{type(exc).__name__} (its worker process died; ray_max_retries={opts['ray_max_retries']})"
    return f"unit {unit.describe()} failed after {attempts} attempt(s): {why}; log: {log}"


@contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (Python's and the file descriptors) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    old = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
        try:
            yield
        finally:
            fh.flush()
            sys.stdout, sys.stderr = old
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# A worker's last stage context and last dataset: a worker running several units (of one stage, or of
# the stages of one process) loads the dataset once.
_CONTEXT: tuple[tuple, Any] | None = None
_DATASET: tuple[str, Any] | None = None


def _worker_context(stage_name: str, items: dict, opts: dict, worker: dict):
    """The stage's context in a worker: the same config view, seed and device rule as the driver's
    ``stage.run``, with ``worker["threads"]`` torch threads; without ``worker["device_from_config"]``
    (a Ray unit that reserved no GPU) ``device: auto`` means the CPU."""
    global _CONTEXT, _DATASET
    import torch

    import stage

    key = (stage_name, config_hash(items), json.dumps([opts, worker], sort_keys=True), str(output_root()))
    if _CONTEXT is None or _CONTEXT[0] != key:
        cfg = stage.StageConfig(stage_name, {**items, **opts}, tuple(items))
        torch.set_num_threads(worker["threads"])
        ctx = stage.Context(stage_name, cfg)
        if not worker["device_from_config"] and cfg["device"] == "auto":
            ctx.__dict__["device"] = torch.device("cpu")  # no GPU reserved, none used
        data_key = config_hash(items, TRAINING_KEYS)  # the keys that define the split, among others
        if _DATASET is None or _DATASET[0] != data_key:
            _DATASET = (data_key, ctx.dataset)
        ctx.__dict__["dataset"] = _DATASET[1]
        _CONTEXT = (key, ctx)
    artifacts.set_seed(_CONTEXT[1].cfg["seed"])
    return _CONTEXT[1]


def _task(fn_name: str, view: tuple, unit: Unit, env: dict) -> dict:
    """One unit in a worker process (Ray's or the local pool's): its output goes to the unit's log;
    returns timing only."""
    os.environ.update(env)
    stage_name, items, opts, worker = view
    log = unit.log(items)
    attempt = 1 + (log.read_text(errors="replace").count("--- attempt ") if log.is_file() else 0)
    start = time.perf_counter()
    with _output_to(log):
        print(f"--- attempt {attempt}: unit {unit.describe()}, pid {os.getpid()} on {socket.gethostname()}, "
              f"{time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)
        if os.environ.get(KILL_ONCE_ENV) == unit.id and not log.with_suffix(".killed").exists():
            log.with_suffix(".killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            ctx = _worker_context(stage_name, items, opts, worker)  # loads the dataset: start-up, not the unit's work
            print(f"--- worker ready (imports, dataset) after {time.perf_counter() - start:.1f} s", flush=True)
            module, name = fn_name.split(":")
            getattr(importlib.import_module(module), name)(ctx, unit)
        except BaseException:
            traceback.print_exc()
            raise
        seconds = time.perf_counter() - start
        print(f"--- done in {seconds:.1f} s", flush=True)
    return {"seconds": round(seconds, 3), "host": socket.gethostname(), "attempt": attempt}
