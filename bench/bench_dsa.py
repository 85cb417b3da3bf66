"""Benchmark of dif_dsa against peers measured in the same run (no timed assertions anywhere).

(a) real activations: penultimate layer of a trained model (``--checkpoint``; when it does not
    exist yet, a scratch model is trained for 2 epochs and the output says so) on the configured
    dataset: train vs itself (self-excluded) and test vs train.
(b) synthetic at paper scale: ``--synthetic-n`` x ``--synthetic-n`` x ``--dim`` float32 activations
    in 10 Gaussian classes, self-excluded; seconds and peak memory measured in a subprocess.

Peers: a plain NumPy SADL-style per-sample loop in float64 (the reference semantics of
coinse/sadl ``fetch_dsa``, with self-exclusion by index), run on a subset of queries and
extrapolated per query; and dnn-tip's ``DSA`` (PyPI ``dnn-tip``) run with the interpreter of
``--peer-python`` (default /work/main/.venv-bench), reported as skipped when it cannot be imported.
dnn-tip has no self-exclusion, so it is compared on query sets disjoint from the reference set.

    python bench/bench_dsa.py [--checkpoint model/default/baseline_s0.pt] [--config configs/default.yaml]
                              [--synthetic-n 60000 --dim 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dif_dsa import dsa  # noqa: E402

DEFAULT_PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

# The dnn-tip peer runs in its own interpreter; it reads an .npz and prints one JSON line.
DNN_TIP_SCRIPT = r"""
import json, sys, time, numpy as np
try:
    from dnn_tip.surprise import DSA
except Exception as exc:
    print(json.dumps({"skipped": f"cannot import dnn_tip.surprise.DSA ({exc.__class__.__name__}: {exc})"}))
    sys.exit(0)
data = np.load(sys.argv[1], allow_pickle=False)
start = time.perf_counter()
sa = DSA(data["ref"], data["ref_classes"])
values = sa(data["query"], data["query_classes"])
seconds = time.perf_counter() - start
np.save(sys.argv[2], np.asarray(values, dtype=np.float64))
print(json.dumps({"seconds": seconds}))
"""


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------
def numpy_sadl_loop(query, ref, query_classes, ref_classes, self_index=None):
    """SADL's per-sample loop (``find_closest_at`` twice per query) in float64 NumPy."""
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    members = {c: np.flatnonzero(ref_classes == c) for c in np.unique(ref_classes)}
    others = {c: np.flatnonzero(ref_classes != c) for c in members}
    out = np.empty(len(q))
    for i in range(len(q)):
        c = query_classes[i]
        own = members[c]
        d_a = np.linalg.norm(q[i] - r[own], axis=1)
        other = others[c]
        if self_index is not None:
            d_a[own == self_index[i]] = np.inf
            other = other[other != self_index[i]]
        a = own[np.argmin(d_a)]
        d_b = np.linalg.norm(r[a] - r[other], axis=1)
        out[i] = d_a.min() / d_b.min()
    return out


def run_dnn_tip(peer_python, query, ref, query_classes, ref_classes):
    """(seconds, values) from dnn-tip's DSA in ``peer_python``, or (None, reason)."""
    if not Path(peer_python).exists():
        return None, f"{peer_python} not found"
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npy"
        np.savez(inp, query=query, ref=ref, query_classes=query_classes.astype(np.int64),
                 ref_classes=ref_classes.astype(np.int64))
        proc = subprocess.run([str(peer_python), "-c", DNN_TIP_SCRIPT, str(inp), str(out)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return None, f"dnn-tip run failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
        info = json.loads(lines[-1])
        if "skipped" in info:
            return None, info["skipped"]
        return info["seconds"], np.load(out, allow_pickle=False)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------
# (a) real activations
# ---------------------------------------------------------------------------------------------
def _scratch_model(cfg, ds, device):
    """A quickly trained model (2 epochs, Adam lr 1e-3) when no checkpoint exists yet."""
    from artifacts import set_seed
    from cnnmodel import build_model

    set_seed(0)
    model = build_model(cfg["arch"], cfg["n_classes"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(ds.x_train), generator=gen).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(ds.x_train[idx].to(device)),
                                                     ds.y_train[idx].to(device))
            loss.backward()
            opt.step()
    return model.eval()


def bench_real(args) -> None:
    from artifacts import load_checkpoint
    from cnnmodel import layer_activations
    from config import load_config, resolve_device
    from mnistload import load_dataset

    cfg = load_config(args.config)
    device = resolve_device(cfg)
    ds = load_dataset(cfg)
    ckpt = ROOT / args.checkpoint if not Path(args.checkpoint).is_absolute() else Path(args.checkpoint)
    if ckpt.is_file():
        model, _ = load_checkpoint(ckpt, device)
        source = str(ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt)
    else:
        model = _scratch_model(cfg, ds, device)
        source = f"scratch model (2 epochs; {args.checkpoint} does not exist yet)"
    acts = {}
    for split in ("train", "test"):
        x, _ = ds.split(split)
        out = layer_activations(model, x, ["penultimate"], batch_size=cfg["eval_batch_size"],
                                spatial_mean=True, device=device)
        acts[split] = (out["penultimate"].numpy(), out["__logits__"].argmax(1).numpy())
    tr, tr_pred = acts["train"]
    te, te_pred = acts["test"]
    acc = float((te_pred == ds.y_test.numpy()).mean())
    print(f"\n(a) real activations: {cfg['dataset']} penultimate layer of {source}; "
          f"train {tr.shape}, test {te.shape}, test accuracy {acc:.3f}")
    selfi = np.arange(len(tr))
    n_sub = min(args.peer_queries, len(tr))
    sub = np.random.default_rng(0).choice(len(tr), n_sub, replace=False)
    for variant in ("sadl", "centroid_knn"):
        secs, res = timed(dsa, tr, tr, tr_pred, tr_pred, variant, k=cfg["dsa_k"], self_index=selfi,
                          chunk_size=args.chunk_size, device=device, progress=False)
        print(f"  ours {variant:12s} train vs train (self-excluded): {secs:8.3f} s")
        if variant == "sadl":
            p_secs, p_vals = timed(numpy_sadl_loop, tr[sub], tr, tr_pred[sub], tr_pred, selfi[sub])
            full = p_secs / n_sub * len(tr)
            print(f"  numpy loop sadl train vs train, {n_sub} queries: {p_secs:.3f} s "
                  f"(extrapolated to {len(tr)}: {full:.2f} s); ours/peer = {secs / full:.4f}; "
                  f"max rel diff {max_rel(res.dsa[sub], p_vals):.2e}")
    secs, res = timed(dsa, te, tr, te_pred, tr_pred, "sadl", chunk_size=args.chunk_size,
                      device=device, progress=False)
    print(f"  ours sadl         test vs train:                  {secs:8.3f} s")
    p_secs, p_vals = timed(numpy_sadl_loop, te, tr, te_pred, tr_pred)
    print(f"  numpy loop sadl test vs train (all {len(te)}): {p_secs:.3f} s; ours/peer = "
          f"{secs / p_secs:.4f}; max rel diff {max_rel(res.dsa, p_vals):.2e}")
    t_secs, t_vals = run_dnn_tip(args.peer_python, te, tr, te_pred, tr_pred)
    if t_secs is None:
        print(f"  dnn-tip DSA: skipped ({t_vals})")
    else:
        print(f"  dnn-tip DSA test vs train (all {len(te)}, its float32 arithmetic): {t_secs:.3f} s; "
              f"ours/peer = {secs / t_secs:.4f} ({t_secs / secs:.0f}x faster); "
              f"max rel diff {max_rel(res.dsa, t_vals):.2e}")


# ---------------------------------------------------------------------------------------------
# (b) synthetic, paper scale
# ---------------------------------------------------------------------------------------------
def synthetic(n: int, d: int, n_classes: int, seed: int):
    """Gaussian blobs around class centres drawn with seed 0 (so other seeds give fresh points
    of the same distribution)."""
    centres = np.random.default_rng(0).normal(size=(n_classes, d)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    y = rng.integers(0, n_classes, n)
    x = centres[y] + rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def synthetic_worker(args) -> None:
    """Runs in a subprocess so that its peak memory is its own; prints one JSON line."""
    x, y = synthetic(args.synthetic_n, args.dim, 10, seed=0)
    rss_inputs = _rss_mb("VmRSS")
    try:  # reset the peak-RSS counter (Linux); otherwise VmHWM includes start-up
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    secs, res = timed(dsa, x, x, y, y, args.variant, k=args.k, self_index=np.arange(len(x)),
                      chunk_size=args.chunk_size, device=args.device, progress=False)
    out = {"seconds": secs, "peak_rss_mb": _rss_mb("VmHWM"), "rss_inputs_mb": rss_inputs,
           "unique_x_a": int(len(np.unique(res.index_a)))}
    np.save(args.worker_out, res.dsa)
    print(json.dumps(out))


def bench_synthetic(args) -> None:
    n, d = args.synthetic_n, args.dim
    print(f"\n(b) synthetic: {n} x {n} x {d} float32, 10 classes, self-excluded "
          f"(torch threads {torch.get_num_threads()}, chunk_size {args.chunk_size})")
    x, y = synthetic(n, d, 10, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = {}
        for variant in args.variants:
            out_file = Path(tmp) / f"{variant}.npy"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant,
                   "--synthetic-n", str(n), "--dim", str(d), "--k", str(args.k),
                   "--chunk-size", str(args.chunk_size), "--device", args.device,
                   "--worker-out", str(out_file)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  ours {variant}: worker failed: {proc.stderr.strip()[-500:]}")
                continue
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            ours[variant] = (info, np.load(out_file, allow_pickle=False))
            extra = f", {info['unique_x_a']} distinct x_a" if variant == "sadl" else f", k={args.k}"
            print(f"  ours {variant:12s}: {info['seconds']:8.2f} s, peak RSS {info['peak_rss_mb']:.0f} MB "
                  f"(inputs + interpreter {info['rss_inputs_mb']:.0f} MB){extra}")
    if "sadl" not in ours:
        return
    secs, values = ours["sadl"][0]["seconds"], ours["sadl"][1]
    n_sub = min(args.peer_queries, n)
    sub = np.random.default_rng(1).choice(n, n_sub, replace=False)
    p_secs, p_vals = timed(numpy_sadl_loop, x[sub], x, y[sub], y, np.arange(n)[sub])
    full = p_secs / n_sub * n
    print(f"  numpy loop sadl, {n_sub} queries: {p_secs:.2f} s -> extrapolated to {n}: {full:.1f} s; "
          f"ours/peer = {secs / full:.4f} ({full / secs:.0f}x faster); "
          f"max rel diff {max_rel(values[sub], p_vals):.2e}")
    # dnn-tip cannot exclude self: fresh queries from the same distribution against the n points
    xq, yq = synthetic(args.peer_queries, d, 10, seed=1)
    o_secs, o_res = timed(dsa, xq, x, yq, y, "sadl", chunk_size=args.chunk_size, device=args.device,
                          progress=False)
    t_secs, t_vals = run_dnn_tip(args.peer_python, xq, x, yq, y)
    if t_secs is None:
        print(f"  dnn-tip DSA: skipped ({t_vals})")
        return
    t_full = t_secs / args.peer_queries * n
    print(f"  {args.peer_queries} fresh queries vs the {n} points: ours {o_secs:.2f} s, dnn-tip "
          f"{t_secs:.2f} s (its float32 arithmetic); ours/peer = {o_secs / t_secs:.4f}; "
          f"max rel diff {max_rel(o_res.dsa, t_vals):.2e}")
    print(f"  dnn-tip extrapolated to {n} queries: {t_full:.0f} s; ours (full self-DSA) / peer = "
          f"{secs / t_full:.5f} ({t_full / secs:.0f}x faster)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="model/default/baseline_s0.pt")
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--synthetic-n", type=int, default=60000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=20, help="k of centroid_knn")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peer-queries", type=int, default=500,
                   help="queries given to the slow peers (their time is extrapolated per query)")
    p.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON),
                   help="interpreter with dnn-tip installed")
    p.add_argument("--variants", nargs="+", default=["sadl", "centroid_knn"],
                   choices=["sadl", "centroid_knn"], help="variants timed on the synthetic set")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="sadl", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        synthetic_worker(args)
        return
    print(f"bench_dsa: torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.skip_real:
        bench_real(args)
    if not args.skip_synthetic:
        bench_synthetic(args)


if __name__ == "__main__":
    main()
