"""Benchmark: layer conductance of 1,000 MNIST test inputs at n_steps = 50 (target ≤ 60 s on 2 cores).

    python bench/bench_conductance.py [--config configs/default.yaml] [--checkpoint model/default/baseline_s0.pt]
                                      [--n-inputs 1000] [--n-steps 50] [--ibs 500 1000 2000] [--no-peers]

Times, in the same run and on the same inputs and model (targets = predicted classes):
- ``conductance.layer_conductance`` at each ``--ibs`` (captum internal batch size; inputs per
  captum call = ibs // (n_steps + 1), so each call is one chunk and no step is evaluated twice);
- peer ``captum-whole``: one ``LayerConductance.attribute`` call on all inputs with
  ``internal_batch_size`` = the first ``--ibs`` — the straightforward use. captum then falls back to
  chunks of two steps × all inputs that advance one step each, i.e. ~2× the forward/backward work;
- peer ``captum-nobatch``: ``attribute`` per 100 inputs with ``internal_batch_size=None``
  (all 51 × 100 path points in one forward/backward).
All variants must agree (max |difference| printed). The model is the config's first trained original
model when present; otherwise a model trained here for one epoch on the config's training split
(timing depends on the architecture, not on how well it is trained).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import artifacts  # noqa: E402
from cnnmodel import build_model  # noqa: E402
from conductance import layer_conductance, predict  # noqa: E402
from config import anchored, load_config  # noqa: E402
from mnistload import load_dataset  # noqa: E402


def quick_model(cfg, ds):
    artifacts.set_seed(cfg["seed"])
    model = build_model(cfg["arch"], cfg["n_classes"])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    order = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(cfg["seed"]))
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]
        opt.zero_grad()
        F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
        opt.step()
    return model.eval()


def timed(fn):
    """(wall seconds, process CPU seconds, result): on a shared machine the CPU time divided by
    the thread count estimates the wall time an idle machine would give."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(anchored("configs/default.yaml")))
    p.add_argument("--checkpoint", default=None, help="default: model/<run>/cnn_s<seed>.pt of the config")
    p.add_argument("--n-inputs", type=int, default=1000)
    p.add_argument("--n-steps", type=int, default=50)
    p.add_argument("--layer", default=None, help="default: the config's conductance_layer")
    p.add_argument("--ibs", type=int, nargs="+", default=[500, 1000, 2000])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    layer = args.layer or cfg["conductance_layer"]
    ds = load_dataset(cfg)
    ckpt = Path(args.checkpoint) if args.checkpoint else artifacts.checkpoint_path(cfg, cfg["seed"], "baseline")
    if ckpt.is_file():
        model, _ = artifacts.load_checkpoint(ckpt)
        source = str(ckpt)
    else:
        t, _, model = timed(lambda: quick_model(cfg, ds))
        source = f"trained here for one epoch ({t:.1f} s; {ckpt} not found)"
    x = ds.x_test[:args.n_inputs]
    pred = predict(model, x).argmax(1)
    acc = (pred == ds.y_test[:args.n_inputs]).float().mean().item()
    print(f"model: {source}; accuracy on the {len(x)} inputs {acc:.3f}")
    print(f"conductance of {layer!r}, {len(x)} inputs, n_steps={args.n_steps}, "
          f"torch threads={torch.get_num_threads()}")

    results = {}
    for ibs in args.ibs:
        results[f"ours ibs={ibs}"] = timed(lambda ibs=ibs: layer_conductance(
            model, x, layer, target=pred, n_steps=args.n_steps, internal_batch_size=ibs))
    if not args.no_peers:
        from captum.attr import LayerConductance

        lc = LayerConductance(model, model.layer(layer))

        def whole():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return lc.attribute(x, baselines=0.0, target=pred, n_steps=args.n_steps,
                                    internal_batch_size=args.ibs[0], return_convergence_delta=True)

        def nobatch():
            parts = [lc.attribute(x[s:s + 100], baselines=0.0, target=pred[s:s + 100],
                                  n_steps=args.n_steps, return_convergence_delta=True)
                     for s in range(0, len(x), 100)]
            return torch.cat([a for a, _ in parts]), torch.cat([d for _, d in parts])

        results[f"captum-whole ibs={args.ibs[0]}"] = timed(whole)
        results["captum-nobatch"] = timed(nobatch)

    ref_name = f"ours ibs={args.ibs[0]}"
    ref_t, ref_c, (ref_a, ref_d) = results[ref_name]
    print(f"{'variant':<26}{'wall s':>8}{'ratio':>7}{'CPU s':>8}{'ratio':>7}{'max|Δattr|':>12}{'max|Δdelta|':>12}")
    for name, (t, c, (a, d)) in results.items():
        print(f"{name:<26}{t:8.1f}{t / ref_t:7.2f}{c:8.1f}{c / ref_c:7.2f}"
              f"{(a.float() - ref_a).abs().max().item():12.2e}{(d.double() - ref_d.double()).abs().max().item():12.2e}")
    best = min((t for n, (t, _, _) in results.items() if n.startswith("ours")))
    print(f"best of ours: {best:.1f} s wall for {len(x)} inputs (target ≤ 60 s); load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
