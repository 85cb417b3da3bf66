"""Known-answer tests of adversarial.py: FGSM closed form on an affine model, PGD feasibility,
success rate / robustness margin on hand-made tables, no parameter gradients, CLI errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adversarial  # noqa: E402
from cnnmodel import MnistConvNet  # noqa: E402

D, K = 2 * 4 * 4, 5  # affine model on 2×4×4 inputs, 5 classes


def _affine(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, K)).eval()


def _ce_input_gradient(model, x, y):
    """∇_x CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − e_y), in float64 numpy, per input."""
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    xs = x.double().flatten(1).numpy()
    z = xs @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(xs)), y.numpy()] -= 1.0
    return p @ w  # N×D


@pytest.mark.parametrize("low, high, eps", [(0.3, 0.7, 0.1), (0.0, 1.0, 0.25)])
def test_fgsm_matches_closed_form_on_affine_model(low, high, eps):
    model = _affine()
    g = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(64, 2, 4, 4, generator=g)
    y = torch.randint(0, K, (64,), generator=g)
    grad = _ce_input_gradient(model, x, y)
    assert np.abs(grad).min() > 1e-7  # no sign ties that float32 could flip
    expected = np.clip(x.double().flatten(1).numpy() + eps * np.sign(grad), 0.0, 1.0)
    got = adversarial.fgsm(model, x, y, eps)
    assert got.shape == x.shape
    np.testing.assert_allclose(got.double().flatten(1).numpy(), expected, atol=1e-6)
    if low > eps:  # far from the box edges: every pixel moved by exactly eps
        np.testing.assert_allclose(np.abs(got.double() - x.double()).numpy(), eps, atol=1e-6)


def test_pgd_linf_one_step_without_start_is_fgsm():
    model = _affine(2)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(32, 2, 4, 4, generator=g)
    y = torch.randint(0, K, (32,), generator=g)
    eps = 0.2
    pgd = adversarial.pgd_linf(model, x, y, eps, steps=1, step_size=eps, random_start=False)
    assert torch.allclose(pgd, adversarial.fgsm(model, x, y, eps), atol=1e-7)


def test_pgd_l2_one_step_without_start_matches_closed_form():
    model = _affine(4)
    g = torch.Generator().manual_seed(5)
    x = 0.3 + 0.4 * torch.rand(16, 2, 4, 4, generator=g)  # inside the box: no clipping
    y = torch.randint(0, K, (16,), generator=g)
    eps = 0.5
    grad = _ce_input_gradient(model, x, y)
    expected = x.double().flatten(1).numpy() + eps * grad / np.linalg.norm(grad, axis=1, keepdims=True)
    got = adversarial.pgd_l2(model, x, y, eps, steps=1, step_size=eps, random_start=False)
    np.testing.assert_allclose(got.double().flatten(1).numpy(), expected, atol=1e-6)


def _mnist_like(n, seed):
    """Images with many pixels exactly 0 or 1 (the box edges) and others in between."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[x < 0.4] = 0.0
    x[x > 0.8] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box(random_start):
    torch.manual_seed(0)
    model = MnistConvNet(10).eval()
    x, y = _mnist_like(6, 7)
    for eps in (0.05, 0.3):
        adv = adversarial.pgd_linf(model, x, y, eps, steps=3, step_size=0.1, random_start=random_start,
                                   generator=torch.Generator().manual_seed(0))
        dist = (adv.double() - x.double()).abs().flatten(1).max(1).values
        assert dist.max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert dist.max() > 0.5 * eps  # it did move (a large step hits the ball's surface)
    for eps in (0.5, 3.0):
        adv = adversarial.pgd_l2(model, x, y, eps, steps=3, step_size=eps, random_start=random_start,
                                 generator=torch.Generator().manual_seed(0))
        dist = (adv.double() - x.double()).flatten(1).norm(dim=1)
        assert dist.max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert dist.max() > 0.5 * eps


def test_pgd_random_start_is_deterministic_given_generator():
    model = _affine()
    x = 0.5 * torch.ones(8, 2, 4, 4)
    y = torch.zeros(8, dtype=torch.long)
    for attack, eps in ((adversarial.pgd_linf, 0.1), (adversarial.pgd_l2, 0.5)):
        a = attack(model, x, y, eps, steps=0, generator=torch.Generator().manual_seed(11))
        b = attack(model, x, y, eps, steps=0, generator=torch.Generator().manual_seed(11))
        c = attack(model, x, y, eps, steps=0, generator=torch.Generator().manual_seed(12))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.equal(a, x)


def test_pgd_l2_random_start_is_uniform_in_ball():
    """Uniform in a d-ball: P(‖δ‖ ≤ r·eps) = r^d, so in d = 2 half the mass lies within r = 1/√2,
    and the direction is isotropic (mean δ ≈ 0)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2)).eval()
    x = 0.5 * torch.ones(20000, 2)
    y = torch.zeros(20000, dtype=torch.long)
    adv = adversarial.pgd_l2(model, x, y, 0.4, steps=0, generator=torch.Generator().manual_seed(0))
    r = (adv - x).norm(dim=1) / 0.4
    assert r.max() <= 1 + 1e-6
    assert abs((r <= 1 / math.sqrt(2)).float().mean().item() - 0.5) < 0.02
    assert (adv - x).mean(0).abs().max() < 0.01


def test_attacks_leave_no_parameter_gradients_and_use_eval_mode():
    torch.manual_seed(0)
    model = MnistConvNet(10)
    model.train()  # dropout active in training mode: the attacks must switch it off
    x, y = _mnist_like(8, 1)
    a1 = adversarial.pgd_linf(model, x, y, 0.1, steps=3, random_start=False)
    a2 = adversarial.pgd_linf(model, x, y, 0.1, steps=3, random_start=False)
    assert torch.equal(a1, a2)
    adversarial.fgsm(model, x, y, 0.1)
    adversarial.pgd_l2(model, x, y, 1.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())


def test_eps_zero_is_identity_and_bad_inputs_rejected():
    model = _affine()
    x = torch.rand(4, 2, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    for attack in (adversarial.fgsm, adversarial.pgd_linf, adversarial.pgd_l2):
        assert torch.equal(attack(model, x, y, 0.0), x)
        with pytest.raises(ValueError, match="eps"):
            attack(model, x, y, -0.1)
        with pytest.raises(ValueError, match="x"):
            attack(model, x + 1.0, y, 0.1)


def test_success_rate_on_hand_made_table():
    clean = [1, 1, 1, 0, 0, 1]
    adv = [1, 0, 0, 0, 1, 1]
    # correct before: inputs 0, 1, 2, 5; wrong after among them: 1, 2 → 2/4
    assert adversarial.success_rate(clean, adv) == pytest.approx(0.5)
    assert adversarial.success_rate([1, 1], [0, 0]) == 1.0
    assert adversarial.success_rate([1, 1], [1, 1]) == 0.0
    assert math.isnan(adversarial.success_rate([0, 0], [0, 1]))
    with pytest.raises(ValueError):
        adversarial.success_rate([1, 0], [1])


def test_robustness_margin_on_hand_made_table():
    eps = [0.0, 0.1, 0.2, 0.3]
    acc = [0.99, 0.8, 0.4, 0.1]
    assert adversarial.robustness_margin(eps, acc, 0.5) == pytest.approx(0.2)
    assert adversarial.robustness_margin(eps, acc, 0.85) == pytest.approx(0.1)
    assert adversarial.robustness_margin(eps, acc, 0.4) == pytest.approx(0.3)  # strictly below
    assert adversarial.robustness_margin(eps, acc, 0.05) is None
    # grid given out of order: still the smallest eps
    assert adversarial.robustness_margin([0.3, 0.0, 0.2, 0.1], [0.1, 0.99, 0.4, 0.8], 0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        adversarial.robustness_margin(eps, acc[:3], 0.5)


def test_transfer_eps_picks_nearest_positive_grid_value():
    assert adversarial.transfer_eps([0.0, 0.05, 0.1, 0.3]) == 0.1
    assert adversarial.transfer_eps([0.0, 0.0078, 0.0157, 0.0314]) == 0.0314
    assert adversarial.transfer_eps([0.0]) is None


def _cli(config_path, env_root):
    env = dict(os.environ, PIPELINE_OUTPUT_ROOT=str(env_root))
    return subprocess.run([sys.executable, str(ROOT / "adversarial.py"), "--config", str(config_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_missing_models_exits_nonzero_naming_file(tmp_path):
    cfg = tmp_path / "missing.yaml"
    cfg.write_text("name: adv_missing_models\nn_models: 2\n")
    proc = _cli(cfg, tmp_path / "out")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(tmp_path / "out" / "model" / "adv_missing_models" / "baseline_s0.pt") in lines[0]
    assert not (tmp_path / "out" / "results" / "adv_missing_models" / "adversarial.json").exists()


def test_cli_end_to_end_on_tiny_models(tmp_path, isolated_outputs):
    """Untrained checkpoints written as main.py would: every output file, consistent shapes."""
    import artifacts
    from config import TRAINING_KEYS, config_hash, load_config
    from mnistload import load_dataset

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("name: adv_tiny\nn_models: 2\nn_train: 100\nn_val: 50\nn_test: 100\nadv_n_test: 12\n"
                        "adv_eps_linf: [0.0, 0.1, 0.3]\nadv_eps_l2: [0.0, 2.0]\npgd_steps: 2\n"
                        "pgd_step_size: 0.1\neval_batch_size: 8\nbootstrap: 10\n")
    out_root = isolated_outputs  # conftest: PIPELINE_OUTPUT_ROOT for this test
    cfg = load_config(cfg_path)
    ds = load_dataset(cfg)
    for kind, base in (("baseline", 0), ("corner_cases_n100", 100)):
        for seed in artifacts.model_seeds(cfg):
            torch.manual_seed(base + seed)
            meta = {"arch": cfg["arch"], "n_classes": 10, "seed": seed, "variant": kind,
                    "dataset_fingerprint": ds.fingerprint,
                    "training_config_hash": config_hash(cfg, TRAINING_KEYS)}
            artifacts.save_checkpoint(artifacts.checkpoint_path(cfg, seed, kind), MnistConvNet(10), meta)
    assert adversarial.main(["--config", str(cfg_path)]) == 0
    res = out_root / "results" / "adv_tiny"
    report = json.loads((res / "adversarial.json").read_text())
    # the default variants: corner_cases_n100 is trained here, random_n100 is not (reported, skipped)
    assert report["variants"] == ["baseline", "corner_cases_n100"] and report["n_test"] == 12
    assert report["not_trained"] == ["random_n100"]
    for kind in report["variants"]:
        assert len(report["per_model"][kind]) == 2
        for r in report["per_model"][kind]:
            for a in adversarial.ATTACKS:
                entry = r["attacks"][a]
                assert entry["accuracy"][0] == pytest.approx(r["clean_accuracy"])
                assert len(entry["accuracy"]) == len(entry["eps"])
    rows = (res / "adversarial.csv").read_text().strip().splitlines()
    assert rows[0] == "variant,seed,attack,norm,eps,accuracy,success_rate"
    assert len(rows) - 1 == 2 * 2 * (3 + 3 + 2)  # kinds × seeds × grid points
    transfer = json.loads((res / "transfer.json").read_text())
    assert transfer["eps_linf"] == 0.1 and transfer["kinds"] == ["baseline", "corner_cases_n100"]
    # diagonal = white-box PGD-L∞ accuracy at that eps, as recorded per model
    for kind in ("baseline", "corner_cases_n100"):
        for r in report["per_model"][kind]:
            white_box = r["attacks"]["pgd_linf"]["accuracy"][1]
            assert transfer["per_seed"][str(r["seed"])][kind][kind] == pytest.approx(white_box)
    assert (res / "adversarial.png").stat().st_size > 0
    manifest = json.loads((res / "manifest.json").read_text())
    assert "adversarial" in manifest["stages"]


def test_bisection_margin_brackets_the_exact_linear_margin():
    """On a two-class linear model the L∞-minimal flip of input x is |w·x + b| / ‖w‖₁ (FGSM and PGD-L∞
    reach it: the optimal L∞ step is −ε·sign(w)), so accuracy(ε) is known exactly. The refined margin
    must bracket the true crossing within (grid step)/2^steps, while the grid alone is coarse."""
    from config import load_config

    torch.manual_seed(0)
    d = 16
    w = torch.randn(d)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(d), w]))
        model[1].bias.copy_(torch.tensor([0.0, 0.05]))
    x = 0.3 + 0.4 * torch.rand(300, 1, 4, 4)  # far enough from 0 and 1 that clipping never binds
    f = x.flatten(1) @ w + 0.05
    y = (f > 0).long()
    y[:10] = 1 - y[:10]  # ten wrong labels: never robust
    exact = (f.abs() / w.abs().sum()).numpy()
    correct = (y == (f > 0).long()).numpy()
    target = 0.5
    cand = np.sort(exact[correct])
    crossing = next(m for m in cand if ((exact > m) & correct).mean() < target)  # brute force ε*
    steps = 7
    cfg = load_config(None, ["adv_eps_linf=[0.0, 0.1, 0.2]", "adv_eps_l2=[0.0]", f"adv_margin_steps={steps}",
                             f"adv_target_accuracy={target}", "pgd_steps=40", "pgd_step_size=0.01",
                             "eval_batch_size=128"])
    result, _ = adversarial.evaluate_model(model, x, y, cfg, "cpu", seed=0)
    assert 0.0 < crossing < 0.2
    for attack in ("fgsm", "pgd_linf"):
        entry = result["attacks"][attack]
        lo, hi = entry["margin_bracket"]
        assert hi - lo == pytest.approx(0.1 / 2 ** steps)
        assert lo < crossing <= hi + 1e-6, (attack, lo, crossing, hi)
        assert entry["robustness_margin"] == hi
        assert entry["robustness_margin_grid"] in (0.1, 0.2)
        # every accuracy evaluated during the search is the exact one at that ε
        for eps, acc in entry["margin_evaluations"]:
            assert acc == pytest.approx(((exact > eps) & correct).mean(), abs=1 / 300 + 1e-9)
        # only the undecided inputs were attacked: fewer than one full pass per bisection step
        assert entry["margin_inputs_attacked"] < steps * len(x) / 2


@pytest.mark.parametrize("attack", ["pgd_linf", "pgd_l2"])
def test_early_stop_changes_no_outcome_only_the_work(attack):
    """Early stopping freezes an input at its first misclassified iterate. Brute-force reference:
    run PGD one step at a time without early stopping (steps=1 from the previous iterate, no random
    start after the first) and record, per input, whether any iterate was misclassified; the early-
    stopped run must mark the same inputs, return misclassified points for them, and return the
    plain run's last iterate for the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.rand(40, 1, 8, 8)
    y = model(x).argmax(1)  # all correct at the start
    eps, steps, step = (0.04, 8, 0.01) if attack == "pgd_linf" else (0.2, 8, 0.05)
    fn = getattr(adversarial, "_" + attack)
    kwargs = {"step_size": step, "random_start": False}
    # reference: iterate by hand (the update rules written plainly)
    cur, fooled_ref = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        xr = cur.clone().requires_grad_(True)
        logits = model(xr)
        fooled_ref |= logits.argmax(1) != y
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), xr)
        if attack == "pgd_linf":
            cur = torch.min(torch.max(cur + step * g.sign(), x - eps), x + eps).clamp(0, 1)
        else:
            g = g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
            delta = cur + step * g - x
            norm = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
            cur = (x + delta * (eps / norm).clamp(max=1.0)).clamp(0, 1)
    with torch.no_grad():
        fooled_ref |= model(cur).argmax(1) != y
    plain, fooled_plain = fn(model, x, y, eps, steps=steps, **kwargs)
    early, fooled_early = fn(model, x, y, eps, steps=steps, **kwargs, early_stop=True)
    assert 0 < int(fooled_ref.sum()) < len(x), "the fixture should break some inputs, not all"
    assert torch.equal(fooled_plain, fooled_ref) and torch.equal(fooled_early, fooled_ref)
    with torch.no_grad():
        assert (model(early[fooled_early]).argmax(1) != y[fooled_early]).all()
    assert torch.allclose(early[~fooled_early], plain[~fooled_early], atol=1e-6)
    assert torch.allclose(plain, cur, atol=1e-5)
    # and a broken input is no longer attacked: fewer gradient rows than the plain run
    rows = []
    orig = adversarial._logits_and_gradient
    try:
        adversarial._logits_and_gradient = lambda m, xb, yb: (rows.append(len(xb)), orig(m, xb, yb))[1]
        fn(model, x, y, eps, steps=steps, **kwargs, early_stop=True)
    finally:
        adversarial._logits_and_gradient = orig
    assert sum(rows) < steps * len(x)
