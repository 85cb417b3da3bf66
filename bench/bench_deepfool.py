"""Benchmark: our batched DeepFool (deepfool.py) against foolbox, ART and torchattacks.

Same trained model, same test images, measured in the same process (``--repeats R``: R rounds in
which every method runs once, the table shows each method's median):

    python bench/bench_deepfool.py [--checkpoint model/default/baseline_s0.pt] [--config configs/default.yaml] [--n 500] [--repeats 3] [--threads 1]

Run it in the bench venv, where the peers are installed (bench/requirements.txt); a peer that is
not importable is reported as skipped. Prints a markdown table: seconds, ms/image, ρ_adv
(mean ‖x_adv − x‖₂/‖x‖₂), fraction flipped (label at x_adv ≠ the clean prediction) and the
time of each method over ours (clipped, and as configured); and our achieved GFLOP/s (the FLOPs of
the forward rows plus those of the transposed layers DeepFool actually ran, which with restarted
backward passes is less than a full backward per candidate) against a float32 matmul measured in
the same run.
The peers clip to [0, 1]; ours is timed both as configured (DESIGN.md: no clipping) and with
clip=(0, 1) for a like-for-like comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import artifacts  # noqa: E402
from config import load_config  # noqa: E402
from deepfool import deepfool  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint (default: model/<run>/cnn_s<seed>.pt of the config)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--n", type=int, default=500, help="test images attacked (the first n)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the machine is shared); 0 = torch's default")
    p.add_argument("--peers", default="foolbox,art,torchattacks",
                   help="comma-separated peers to run (foolbox, art, torchattacks)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs of every method, interleaved; the table shows the median")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# FLOP accounting and the matmul reference
# ------------------------------------------------------------------------------------------------
def flops_per_row(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one input's forward through Conv2d/Linear layers. The
    input-gradient backward of these layers has the same multiply-adds (transposed conv / matmul),
    so one backward row is counted with the same FLOPs; element-wise layers are ignored."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2 * k * out[0].numel()
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# the attacks: each returns the adversarial points
# ------------------------------------------------------------------------------------------------
def run_ours(model, x, cfg, clip):
    out = deepfool(model, x, num_classes=cfg["deepfool_num_classes"], overshoot=cfg["deepfool_overshoot"],
                   max_iter=cfg["deepfool_max_iter"], clip=clip, batch_size=cfg["deepfool_batch_size"])
    return out.adversarial, out


def run_foolbox(model, x, pred, cfg):
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = fb.attacks.L2DeepFoolAttack(steps=cfg["deepfool_max_iter"], candidates=cfg["deepfool_num_classes"],
                                         overshoot=cfg["deepfool_overshoot"])
    _, clipped, _ = attack(fmodel, x, fb.criteria.Misclassification(pred), epsilons=None)
    return clipped


def run_art(model, x, pred, cfg):
    from art.attacks.evasion import DeepFool
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=int(model(x[:1]).shape[1]), clip_values=(0.0, 1.0),
                            device_type="cpu")
    attack = DeepFool(clf, max_iter=cfg["deepfool_max_iter"], epsilon=cfg["deepfool_overshoot"],
                      nb_grads=cfg["deepfool_num_classes"], batch_size=len(x), verbose=False)
    return torch.from_numpy(attack.generate(x.numpy()))


def run_torchattacks(model, x, pred, cfg):
    import torchattacks

    attack = torchattacks.DeepFool(model, steps=cfg["deepfool_max_iter"], overshoot=cfg["deepfool_overshoot"])
    return attack(x, pred)


PEERS = {"foolbox": ("foolbox L2DeepFoolAttack", run_foolbox),
         "art": ("ART DeepFool", run_art),
         "torchattacks": ("torchattacks DeepFool", run_torchattacks)}


def quality(model, x, x_adv, pred) -> tuple[float, float]:
    with torch.no_grad():
        adv_pred = model(x_adv.to(x.dtype)).argmax(1)
    rho = ((x_adv - x).flatten(1).double().norm(dim=1) / x.flatten(1).double().norm(dim=1)).mean()
    return float(rho), float((adv_pred != pred).double().mean())


# ------------------------------------------------------------------------------------------------
def load_inputs(args, cfg):
    path = Path(args.checkpoint) if args.checkpoint else artifacts.checkpoint_path(cfg, cfg["seed"])
    if not path.is_file():
        raise SystemExit(f"error: {path}: no checkpoint (run `python main.py --config ...` or pass --checkpoint)")
    model, meta = artifacts.load_checkpoint(path)
    import mnistload

    ds = mnistload.load_dataset(cfg)
    x = ds.x_test[:args.n].contiguous()
    return model, meta, path, x


def _restarted(stats: dict) -> str:
    """Candidate gradients whose backward started below the output layer, per layer (``resumed_at``
    keys are "<layer index>:<type>"; the highest index present is the full backward)."""
    at = sorted(((int(k.split(":")[0]), k, v) for k, v in stats.get("resumed_at", {}).items()), reverse=True)
    return ", ".join(f"{k} {v}" for _, k, v in at[1:]) or "none"


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta, path, x = load_inputs(args, cfg)
    model.eval()
    for p in model.parameters():  # peers and ours only need input gradients
        p.requires_grad_(False)
    with torch.no_grad():
        pred = model(x).argmax(1)

    f_row = flops_per_row(model, x)
    peak = matmul_gflops()
    print(f"model {path} ({meta.get('arch')}), {len(x)} test images, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"float32 matmul 2048³: {peak:.1f} GFLOP/s; model forward {f_row / 1e6:.1f} MFLOP/image")

    rows = []
    run_ours(model, x[:16], cfg, None)  # warm-up (allocator, oneDNN primitives)
    ours = [("ours (no clip, as configured)" if not cfg["deepfool_clip"] else "ours (clip, as configured)",
             (0.0, 1.0) if cfg["deepfool_clip"] else None)]
    if not cfg["deepfool_clip"]:
        ours.append(("ours (clip to [0, 1])", (0.0, 1.0)))
    peers = []
    for key in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if key not in PEERS:
            raise SystemExit(f"error: --peers: unknown peer {key!r}; expected some of {sorted(PEERS)}")
        name, fn = PEERS[key]
        try:
            fn(model, x[:4], pred[:4], cfg)  # warm-up and import
        except ImportError as exc:
            rows.append({"name": name, "skipped": f"not importable ({exc.name or exc})"})
            continue
        peers.append((name, fn))

    # Every method runs once per round, rounds interleaved, so that a slow spell of the shared
    # machine hits all of them; the table shows each method's median over the rounds.
    times = {}
    last = {}
    for _ in range(max(args.repeats, 1)):
        for label, clip in ours:
            (x_adv, out), sec = _timed(lambda: run_ours(model, x, cfg, clip))
            times.setdefault(label, []).append(sec)
            last[label] = (x_adv, out)
        for name, fn in peers:
            x_adv, sec = _timed(lambda: fn(model, x, pred, cfg))
            times.setdefault(name, []).append(sec)
            last[name] = (x_adv.detach().to(x.dtype), None)

    for label, _ in ours:
        x_adv, out = last[label]
        sec = statistics.median(times[label])
        rho, flipped = quality(model, x, x_adv, pred)
        st = out.stats
        flops = (f_row * st["forward_rows"]
                 + (st["backward_flops"] if st.get("backward_flops") is not None else f_row * st["backward_rows"]))
        rows.append({"name": label, "seconds": sec, "runs": times[label], "rho": rho, "flipped": flipped,
                     "gflops": flops / sec / 1e9,
                     "note": f"{st['forward_rows']} fwd rows; {st['gradient_rows']} candidate gradients: "
                             f"{st['gradient_rows'] - st['backward_rows']} kept from the step before, "
                             f"restarted below the output at {_restarted(st)}; mean iters "
                             f"{out.iterations.double().mean():.2f}, max {int(out.iterations.max())}"})
    by_name = {r["name"]: r for r in rows}
    ours_sec, ours_rho = by_name[ours[-1][0]]["seconds"], by_name[ours[-1][0]]["rho"]  # clipped: like for like
    conf_sec = by_name[ours[0][0]]["seconds"]  # as configured
    for name, _ in peers:
        x_adv, _ = last[name]
        rho, flipped = quality(model, x, x_adv, pred)
        rows.append({"name": name, "seconds": statistics.median(times[name]), "runs": times[name],
                     "rho": rho, "flipped": flipped,
                     "note": f"ρ_adv {100 * (ours_rho / rho - 1):+.2f}% (ours clipped vs this)"})

    print()
    print(f"median of {max(args.repeats, 1)} interleaved run(s) per method")
    print("| method | seconds | ms/image | ρ_adv | flipped | its time / ours clipped | its time / ours as configured | GFLOP/s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | skipped | | | | | | | {r['skipped']} |")
            continue
        gf = f"{r['gflops']:.1f} ({100 * r['gflops'] / peak:.0f}% of matmul)" if "gflops" in r else ""
        runs = " / ".join(f"{t:.2f}" for t in r["runs"]) if len(r["runs"]) > 1 else ""
        print(f"| {r['name']} | {r['seconds']:.2f}{' (' + runs + ')' if runs else ''} | "
              f"{1000 * r['seconds'] / len(x):.2f} | {r['rho']:.4f} | {100 * r['flipped']:.1f}% | "
              f"{r['seconds'] / ours_sec:.2f}× | {r['seconds'] / conf_sec:.2f}× | {gf} | {r['note']} |")


if __name__ == "__main__":
    main()
