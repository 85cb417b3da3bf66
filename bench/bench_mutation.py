"""Benchmark: LCR of many mutants, batched delta evaluation vs one deep copy of the model per mutant.

    python bench/bench_mutation.py [--checkpoint model/default/baseline_s0.pt] [--config configs/default.yaml]
                                   [--op NAI --rate 0.01 --n-mutants 100 --n-inputs 1000]
                                   [--baseline-mutants 100]

Times, in the same run and on the same test inputs and mutant seeds (no acceptance step: timing only):
- ``mutation.mutant_predictions`` (original's activations once per chunk, each mutant by delta
  propagation);
- ``functional_call``: every mutant's full forward pass with its parameter dict (no copy);
- ``deepcopy``: ``copy.deepcopy(model)`` + ``load_state_dict`` + forward for every mutant — the
  straightforward loop. With ``--baseline-mutants`` < ``--n-mutants`` the two loops run on that many
  mutants and their time is scaled to ``--n-mutants`` (printed as such).
All three must give the same LCR; the script prints seconds and speed-ups. Target (not asserted):
≤ 10 s for 100 mutants × 1,000 MNIST inputs.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import artifacts  # noqa: E402
from config import load_config, resolve_device  # noqa: E402
from mutation import label_change_rate, mutant_predictions, mutate, rate_tag  # noqa: E402


def loop_predictions(model, x, op, rate, seeds, batch_size, copy_model: bool) -> np.ndarray:
    out = np.empty((len(seeds), len(x)), dtype=np.int64)
    with torch.no_grad():
        for j, seed in enumerate(seeds):
            params = mutate(model, op, rate, seed)
            if copy_model:
                mutant = copy.deepcopy(model)
                mutant.load_state_dict(params, strict=False)
                run = mutant
            else:
                def run(xb, params=params):
                    return torch.func.functional_call(model, params, (xb,))
            out[j] = torch.cat([run(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--checkpoint", default=None, help="default: model/<run>/cnn_s<seed>.pt of the config")
    p.add_argument("--op", default="NAI")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--n-mutants", type=int, default=100)
    p.add_argument("--n-inputs", type=int, default=1000)
    p.add_argument("--baseline-mutants", type=int, default=None,
                   help="mutants timed in the two loops (default: --n-mutants); scaled to --n-mutants")
    args = p.parse_args(argv)

    from mnistload import load_dataset

    cfg = load_config(args.config)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    device = resolve_device(cfg)
    ckpt = Path(args.checkpoint) if args.checkpoint else artifacts.checkpoint_path(cfg, cfg["seed"])
    if not ckpt.is_file():
        print(f"error: {ckpt}: no checkpoint (run `python main.py --config {args.config}` first, "
              "or pass --checkpoint)", file=sys.stderr)
        return 2
    model, _ = artifacts.load_checkpoint(ckpt, device)
    ds = load_dataset(cfg)
    x = ds.x_test[: args.n_inputs].to(device)
    seeds = list(range(args.n_mutants))
    n_base = min(args.baseline_mutants or args.n_mutants, args.n_mutants)
    bs = cfg["eval_batch_size"]
    print(f"[bench_mutation] {ckpt.name}: {args.op} γ={rate_tag(args.rate)}, {len(seeds)} mutants × "
          f"{len(x)} inputs, batch {bs}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}")

    t, c = time.perf_counter(), time.process_time()
    pred, batched = mutant_predictions(model, x, args.op, args.rate, seeds, bs, device)
    t_batched, c_batched = time.perf_counter() - t, time.process_time() - c
    lcr = label_change_rate(pred, batched)

    rows = [("batched (delta propagation)", t_batched, c_batched, "")]
    for name, copy_model in (("functional_call loop", False), ("deepcopy loop", True)):
        t, c = time.perf_counter(), time.process_time()
        ref = loop_predictions(model, x, args.op, args.rate, seeds[:n_base], bs, copy_model)
        scale = len(seeds) / n_base
        seconds, cpu = (time.perf_counter() - t) * scale, (time.process_time() - c) * scale
        same = np.array_equal(ref, batched[:n_base])
        note = "" if n_base == len(seeds) else f" (timed on {n_base} mutants, scaled)"
        rows.append((name, seconds, cpu, note + ("" if same else " PREDICTIONS DIFFER")))
    # CPU seconds (all threads) are shown too: on a machine shared with other jobs they vary less.
    for name, seconds, cpu, note in rows:
        print(f"  {name:30s} {seconds:8.2f} s wall ({cpu:8.2f} s CPU)   speed-up of batched "
              f"×{seconds / t_batched:6.1f} wall, ×{cpu / c_batched:6.1f} CPU{note}")
    print(f"[bench_mutation] mean LCR {lcr.mean():.4f}; batched {t_batched:.2f} s for {len(seeds)} mutants × "
          f"{len(x)} inputs ({'within' if t_batched <= 10 else 'above'} the 10 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
