"""Artifacts: atomic writes, checkpoints, checked reads and the run manifest.

Stages talk only through files in ``model/<run>/`` and ``results/<run>/``. Every write goes to a
temporary file in the same folder and is renamed into place, so an interrupted run never leaves a
half-written file that a later stage would trust. Every read checks what a later stage needs
(presence, keys, shapes, dataset fingerprint) and fails with one line naming the file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from config import ROOT, TRAINING_KEYS, anchored, config_hash, output_root


class ArtifactError(RuntimeError):
    """A missing or inconsistent artifact; the message names the file."""


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n")


def atomic_savez(path: str | Path, **arrays: Any) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.8g}" if isinstance(v, float) else v for v in row])
    return atomic_write_text(path, buf.getvalue())


def atomic_savefig(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (PNG bytes are deterministic: no timestamp)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# checked reads
# ---------------------------------------------------------------------------------------------
def require_file(path: str | Path, made_by: str = "") -> Path:
    path = Path(path)
    if not path.is_file():
        hint = f" (written by {made_by})" if made_by else ""
        raise ArtifactError(f"{path}: required artifact is missing{hint}")
    return path


def load_json(path: str | Path, keys: Iterable[str] = (), made_by: str = "") -> dict:
    path = require_file(path, made_by)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    return data


def load_npz(path: str | Path, keys: Iterable[str] = (), made_by: str = "") -> dict[str, np.ndarray]:
    """Load an .npz without pickles; every key in ``keys`` must be present."""
    path = require_file(path, made_by)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable .npz ({exc})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing arrays {missing}")
    return data


# ---------------------------------------------------------------------------------------------
# run folders, seeds, environment
# ---------------------------------------------------------------------------------------------
def model_dir(cfg: dict) -> Path:
    return output_root() / "model" / cfg["name"]


def results_dir(cfg: dict) -> Path:
    return output_root() / "results" / cfg["name"]


def model_seeds(cfg: dict) -> list[int]:
    return [cfg["seed"] + i for i in range(cfg["n_models"])]


def set_seed(seed: int) -> None:
    """One seed for Python, NumPy and torch; deterministic kernels where torch offers them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "captum", "mlxtend", "matplotlib"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def update_manifest(cfg: dict, stage: str, seconds: float, fingerprint: str | None = None,
                    extra: dict | None = None) -> Path:
    """Record (or update) this stage in ``results/<run>/manifest.json``: its command, wall time and
    the resolved config it ran with (``cfg``: the stage's view, see stage.py) with that config's hash.
    Stages never overwrite each other's config; ``config`` at the top level is their union."""
    path = results_dir(cfg) / "manifest.json"
    with _locked(path):  # stages may finish at once (make reproduce JOBS=2, or stages run by hand)
        return _update_manifest(path, cfg, stage, seconds, fingerprint, extra)


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path``'s ``.lock`` sibling (no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): unlocked; run make reproduce JOBS=1 there
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _update_manifest(path: Path, cfg: dict, stage: str, seconds: float, fingerprint: str | None,
                     extra: dict | None) -> Path:
    manifest: dict[str, Any] = {}
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            manifest = {}
    stage_cfg = dict(cfg)
    manifest.update({"run": cfg["name"], "layout": LAYOUT_VERSION, "git_commit": git_commit(),
                     "versions": versions()})
    if "seed" in stage_cfg and "n_models" in stage_cfg:
        manifest["seeds"] = model_seeds(cfg)
    if fingerprint is not None:
        manifest["dataset_fingerprint"] = fingerprint
    stages = manifest.setdefault("stages", {})
    stages[stage] = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                     "seconds": round(seconds, 3),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "config": stage_cfg, "config_hash": config_hash(stage_cfg),
                     **(extra or {})}
    union: dict[str, Any] = {}
    for entry in stages.values():
        union.update(entry.get("config", {}))
    manifest["config"] = dict(sorted(union.items()))
    return atomic_write_json(path, manifest)


@contextmanager
def stage_timer(name: str):
    """Time a stage; yields a dict whose ``seconds`` is filled in on exit."""
    info = {"stage": name, "seconds": 0.0}
    start = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
LAYOUT_VERSION = 2  # 2: artifacts keyed by training variant (model/<run>/<variant>_s<seed>.pt)


def checkpoint_path(cfg: dict, seed: int, variant: str = "baseline") -> Path:
    """``model/<run>/<variant>_s<seed>.pt`` (variant names: variants.py)."""
    return model_dir(cfg) / f"{variant}_s{seed}.pt"


def variant_dir(cfg: dict, variant: str) -> Path:
    """``results/<run>/variants/<variant>/``: one variant's training summary and radius files."""
    return results_dir(cfg) / "variants" / variant


def check_layout(cfg: dict) -> None:
    """A run folder written before training variants existed (``cnn_s<seed>.pt``,
    ``robustness_original.json``) is reported in one line instead of being half-read."""
    old = [model_dir(cfg) / "cnn_s0.pt", results_dir(cfg) / "robustness_original.json"]
    old += sorted(model_dir(cfg).glob("cnn_s*.pt"))[:1] + sorted(model_dir(cfg).glob("retrained_s*.pt"))[:1]
    for path in old:
        if path.is_file():
            raise ArtifactError(
                f"{path}: this run folder predates training variants (now model/<run>/<variant>_s<seed>.pt "
                f"and results/<run>/variants/<variant>/); move model/{cfg['name']} and results/{cfg['name']} "
                f"aside or delete them (`make clean-run CONFIG=...`) and rerun")


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """state_dict + plain metadata (no pickled objects), written atomically."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # a JSON round trip turns the metadata into plain data that loads under weights_only=True
    plain_meta = json.loads(json.dumps(meta, default=_json_default))
    return atomic_torch_save({"state_dict": state, "meta": plain_meta}, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """Load a checkpoint with ``weights_only=True``; returns ``(model_in_eval_mode, meta)``.

    The model is rebuilt from the metadata (``arch``: a built-in name or ``package.module:Class``,
    ``arch_kwargs``, ``n_classes``), never unpickled."""
    from cnnmodel import ArchError, build_model

    path = require_file(path, "main.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported with the file name
        raise ArtifactError(f"{path}: cannot load checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise ArtifactError(f"{path}: expected a dict with 'state_dict' and 'meta'")
    meta = ckpt["meta"]
    if not isinstance(meta, dict) or "arch" not in meta or "n_classes" not in meta:
        raise ArtifactError(f"{path}: checkpoint metadata lacks 'arch' or 'n_classes'")
    try:
        model = build_model(meta["arch"], meta["n_classes"], meta.get("arch_kwargs") or {})
    except ArchError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: state_dict does not fit arch {meta['arch']!r} ({exc})") from None
    return model.to(device).eval(), meta


def load_models(cfg: dict, fingerprint: str, variant: str = "baseline",
                device: torch.device | str = "cpu") -> list[tuple[int, torch.nn.Module, dict]]:
    """All ``n_models`` checkpoints of one variant, checked against the dataset fingerprint and the
    training config. Returns ``[(seed, model, meta), ...]`` in seed order."""
    made_by = "python main.py" if variant == "baseline" else f"python main.py --variant {variant}"
    loaded = []
    for seed in model_seeds(cfg):
        path = checkpoint_path(cfg, seed, variant)
        if not path.is_file():
            raise ArtifactError(f"{path}: no trained model (run `{made_by} --config ...` first)")
        model, meta = load_checkpoint(path, device)
        if meta.get("dataset_fingerprint") != fingerprint:
            raise ArtifactError(
                f"{path}: dataset fingerprint {meta.get('dataset_fingerprint')!r} does not match "
                f"the configured dataset {fingerprint!r} (retrain with `{made_by}`)")
        expected = config_hash(cfg, TRAINING_KEYS)
        if meta.get("training_config_hash") != expected:
            raise ArtifactError(
                f"{path}: trained with a different training config (hash "
                f"{meta.get('training_config_hash')!r}, expected {expected!r}); rerun `{made_by}`")
        loaded.append((seed, model, meta))
    return loaded


def data_dir(cfg: dict) -> Path:
    return anchored(cfg["data_dir"])


def stage_main(*extra_errors: type[BaseException]):
    """Decorate a stage's ``main(argv)``: a bad config, dataset or artifact (and ``extra_errors``)
    ends the stage with one ``error: ...`` line on stderr and exit code 2, never a traceback."""
    import functools

    from config import ConfigError
    from mnistload import DatasetError
    from variants import VariantError

    handled = (ConfigError, DatasetError, ArtifactError, VariantError, *extra_errors)

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None) -> int:
            try:
                code = main(argv)
            except handled as exc:
                # a KeyError's str() is its repr in quotes; its first argument is the message
                msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                print(f"error: {msg}", file=sys.stderr)
                return 2
            return 0 if code is None else code
        return wrapper
    return decorate


def trained_variants(cfg: dict) -> tuple[list[str], list[str]]:
    """(trained, not trained): the variants of the config (and the seed workflow's ``-is_retrain``
    variant) whose every seed has a checkpoint. The baseline must be trained."""
    from variants import VariantError, plan

    candidates: list[str] = []
    subsets = results_dir(cfg) / "subsets.json"
    try:
        candidates = [v.name for v in plan(cfg)]
    except VariantError:  # a dose given as remove_fraction: the names cc_remove.py resolved
        candidates = load_json(subsets, ("variants",), made_by="python cc_remove.py")["variants"]
    planned = list(candidates)
    if subsets.is_file():  # the seed workflow's variant counts when trained, is never "missing"
        extra = load_json(subsets).get("is_retrain_variant")
        if extra and extra not in candidates:
            candidates.append(extra)
    trained = [v for v in candidates if all(checkpoint_path(cfg, s, v).is_file() for s in model_seeds(cfg))]
    if "baseline" not in trained:
        raise ArtifactError(f"{checkpoint_path(cfg, model_seeds(cfg)[0], 'baseline')}: no trained baseline model "
                            "(run `python main.py --config ...` first)")
    return trained, [v for v in planned if v not in trained]
