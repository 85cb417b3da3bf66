"""Benchmark: our DeepFool (deepfool.py) against foolbox's L2DeepFoolAttack on several architectures.

The shipped MnistConvNet (a trained checkpoint) and the architectures of ``bench/deepfool_archs.py``
(three sequential ones and a non-sequential residual network, trained here for ``--epochs`` epochs
on the embedded MNIST subset, seeded), on the first ``--n`` test images. Everything is clipped to
[0, 1] (foolbox always clips), with the same steps (50), candidates (10) and overshoot (0.02):

    .venv-bench/bin/python bench/bench_deepfool_archs.py [--n 300] [--repeats 3] [--threads 1]

Methods per architecture: ``ours`` (``deepfool(model, x, clip=(0, 1))`` as the pipeline calls it),
``ours, generic`` (the same model behind a wrapper module whose ``forward`` calls it, so that no
model-specific path can apply; only printed when it is a different path) and ``foolbox``. Every
round runs every method of every architecture once (interleaved, so a slow spell of the shared
machine hits all of them); the table shows medians over ``--repeats`` rounds. Agreement: mean
‖x_adv − x‖₂, the fraction flipped and the largest per-input difference of ‖x_adv − x‖₂ against
foolbox (the same iterates up to float rounding, so equal radii are expected).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deepfool_archs import ARCHS, accuracy, train_briefly

from config import load_config
from deepfool import deepfool

STEPS, CANDIDATES, OVERSHOOT = 50, 10, 0.02


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="config whose dataset is used")
    p.add_argument("--checkpoint", default=str(ROOT / "model" / "default" / "baseline_s0.pt"),
                   help="trained MnistConvNet checkpoint (trained here for --epochs if missing)")
    p.add_argument("--archs", default="mnist_convnet," + ",".join(ARCHS),
                   help=f"comma-separated subset of mnist_convnet,{','.join(ARCHS)}")
    p.add_argument("--n", type=int, default=300, help="test images attacked (the first n)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the bench architectures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the machine is shared, and 1 is what is compared)")
    p.add_argument("--no-foolbox", action="store_true", help="time ours only")
    return p.parse_args(argv)


class Wrapped(nn.Module):
    """Hides the model's type and layers: deepfool sees a module with a custom ``forward``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def run_ours(model, x):
    out = deepfool(model, x, num_classes=CANDIDATES, overshoot=OVERSHOOT, max_iter=STEPS, clip=(0.0, 1.0))
    return out.adversarial


def run_foolbox(model, x, pred):
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = fb.attacks.L2DeepFoolAttack(steps=STEPS, candidates=CANDIDATES, overshoot=OVERSHOOT)
    _, clipped, _ = attack(fmodel, x, fb.criteria.Misclassification(pred), epsilons=None)
    return clipped


def build(name: str, args, ds):
    if name == "mnist_convnet":
        path = Path(args.checkpoint)
        if path.is_file():
            import artifacts

            model, _ = artifacts.load_checkpoint(path)
            return model.eval(), f"shipped MnistConvNet, checkpoint {path}", None
        from cnnmodel import build_model

        model, sec = train_briefly(build_model("mnist_convnet"), ds.x_train, ds.y_train, args.epochs)
        return model, f"shipped MnistConvNet, trained here ({path} missing)", sec
    if name not in ARCHS:
        raise SystemExit(f"error: --archs: unknown architecture {name!r}; expected mnist_convnet or one of {sorted(ARCHS)}")
    make, what = ARCHS[name]
    model, sec = train_briefly(make(), ds.x_train, ds.y_train, args.epochs)
    return model, what, sec


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    import mnistload

    ds = mnistload.load_dataset(cfg)
    x = ds.x_test[:args.n].contiguous()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {len(x)} test images, "
          f"load average {os.getloadavg()[0]:.2f}; steps {STEPS}, candidates {CANDIDATES}, "
          f"overshoot {OVERSHOOT}, clip [0, 1]")

    from deepfool import _SequentialJacobian
    have_foolbox = not args.no_foolbox
    if have_foolbox:
        try:
            import foolbox  # noqa: F401
        except ImportError:
            print("foolbox not importable: ours only (run in .venv-bench, bench/requirements.txt)")
            have_foolbox = False

    benches = []
    for name in [a.strip() for a in args.archs.split(",") if a.strip()]:
        model, what, sec = build(name, args, ds)
        for p in model.parameters():  # only input gradients are needed, by ours and by foolbox
            p.requires_grad_(False)
        with torch.no_grad():
            pred = model(x).argmax(1)
        special = _SequentialJacobian.supports(model) is not None
        methods = [("ours", lambda m=model: run_ours(m, x))]
        if special:
            wrapped = Wrapped(model).eval()
            methods.append(("ours, generic", lambda m=wrapped: run_ours(m, x)))
        if have_foolbox:
            methods.append(("foolbox", lambda m=model, p=pred: run_foolbox(m, x, p)))
        acc = accuracy(model, ds.x_test, ds.y_test)
        print(f"{name}: {what}; {sum(p.numel() for p in model.parameters()):,} parameters; test accuracy "
              f"{acc:.3f}" + (f" after {args.epochs} epoch(s), {sec:.1f} s" if sec is not None else "")
              + f"; model-specific path: {'yes' if special else 'no'}")
        benches.append({"name": name, "model": model, "pred": pred, "methods": methods,
                        "times": {}, "adv": {}})
    for b in benches:  # warm-up on a few inputs
        run_ours(b["model"], x[:8])
        if have_foolbox:
            run_foolbox(b["model"], x[:8], b["pred"][:8])

    for r in range(max(args.repeats, 1)):
        for b in benches:
            for label, fn in b["methods"]:
                start = time.perf_counter()
                adv = fn()
                b["times"].setdefault(label, []).append(time.perf_counter() - start)
                b["adv"][label] = adv.detach()
                print(f"  round {r + 1} {b['name']} {label}: {b['times'][label][-1]:.2f} s", flush=True)
        print(f"round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.2f}", flush=True)

    print()
    print(f"median of {max(args.repeats, 1)} interleaved round(s); {len(x)} images; "
          f"{torch.get_num_threads()} thread(s)")
    print("| architecture | method | seconds (median; runs) | ms/image | mean ‖r‖₂ | flipped | "
          "foolbox / this | Δ‖r‖ vs foolbox (max per input) |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for b in benches:
        model, pred = b["model"], b["pred"]
        med = {k: statistics.median(v) for k, v in b["times"].items()}
        for label, _ in b["methods"]:
            adv = b["adv"][label]
            radius = (adv - x).flatten(1).norm(dim=1)
            with torch.no_grad():
                flipped = float((model(adv).argmax(1) != pred).double().mean())
            ratio = f"**{med['foolbox'] / med[label]:.2f}×**" if "foolbox" in med and label != "foolbox" else ""
            diff = ""
            if "foolbox" in b["adv"] and label != "foolbox":
                fb_radius = (b["adv"]["foolbox"] - x).flatten(1).norm(dim=1)
                diff = f"{float((radius - fb_radius).abs().max()):.1e}"
            runs = " / ".join(f"{t:.2f}" for t in b["times"][label])
            print(f"| {b['name']} | {label} | {med[label]:.2f} ({runs}) | {1000 * med[label] / len(x):.2f} | "
                  f"{float(radius.mean()):.4f} | {100 * flipped:.1f}% | {ratio} | {diff} |")
        if "foolbox" in med:
            summary.append((b["name"], med["foolbox"] / med["ours"]))
    if summary:
        print()
        print("foolbox / ours: " + ", ".join(f"{n} {r:.2f}×" for n, r in summary)
              + f"; minimum {min(r for _, r in summary):.2f}×")


if __name__ == "__main__":
    main()
