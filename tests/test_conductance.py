"""Known-answer tests of conductance.py (captum LayerConductance toward the predicted class).

References: Dhamdhere et al. arXiv 1805.12233 (conductance, completeness over a layer);
captum's convergence delta = Σ attributions − (F(x) − F(baseline)).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import conductance  # noqa: E402
from cnnmodel import MnistConvNet, NamedCNN  # noqa: E402


class SmoothNet(NamedCNN):
    """A tiny CNN with smooth activations: the Riemann-Stieltjes error of the path integral is
    O(1/n_steps), so the convergence delta must vanish as the steps grow."""

    aliases = {"last_conv": "act2", "penultimate": "act3", "logits": "fc2"}

    def __init__(self):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, 4, 3, padding=1)),
            ("act1", nn.Tanh()),
            ("conv2", nn.Conv2d(4, 6, 3, padding=1)),
            ("act2", nn.Softplus()),
            ("pool", nn.AvgPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(6 * 4 * 4, 12)),
            ("act3", nn.Tanh()),
            ("fc2", nn.Linear(12, 3)),
        ]))


def _smooth(seed=0):
    torch.manual_seed(seed)
    model = SmoothNet().eval()
    with torch.no_grad():  # outputs of order 1, so relative deltas are not float32 noise
        model.fc2.weight.mul_(100.0)
    return model


def _inputs(n, shape=(1, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def _f_diff(model, x, target, baseline):
    """F_target(x) − F_target(baseline) with plain forward calls, written independently."""
    with torch.no_grad():
        fx = model(x).double()
        fb = model(torch.full_like(x, baseline)).double()
    idx = torch.arange(len(x))
    return fx[idx, target] - fb[idx, target]


def test_completeness_sum_equals_f_difference_within_delta():
    model = _smooth()
    x = _inputs(6)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    attr, delta = conductance.layer_conductance(model, x, "last_conv", target=target, n_steps=20)
    assert attr.shape == (6, 6, 8, 8) and delta.shape == (6,)
    fd = _f_diff(model, x, target, 0.0)
    total = attr.double().sum(dim=(1, 2, 3))
    # captum's delta is exactly the completeness gap (up to float32 rounding)
    assert torch.allclose(total - fd, delta, atol=1e-5)


def test_delta_shrinks_with_steps_on_smooth_model():
    model = _smooth()
    x = _inputs(5)
    fd = _f_diff(model, x, conductance.predict(model, x).argmax(1), 0.2)
    rel = {}
    for n in (40, 400):
        attr, delta = conductance.layer_conductance(model, x, "last_conv", baseline=0.2, n_steps=n,
                                                    internal_batch_size=5000)
        total = attr.double().sum(dim=(1, 2, 3))
        rel[n] = ((total - fd).abs() / fd.abs().clamp_min(1e-6)).max().item()
    # left Riemann-Stieltjes sum: error O(1/n_steps), so ten times the steps cut it ~tenfold
    assert rel[400] < 2e-3
    assert rel[400] < rel[40] / 4


def test_completeness_on_relu_convnet_dense_and_conv_layers():
    torch.manual_seed(3)
    model = MnistConvNet(10).eval()
    x = _inputs(3, (1, 28, 28), seed=4)
    pred = conductance.predict(model, x).argmax(1)
    fd = _f_diff(model, x, pred, 0.0)
    for layer, shape in (("last_conv", (3, 64, 14, 14)), ("penultimate", (3, 1000))):
        attr, delta = conductance.layer_conductance(model, x, layer, n_steps=100,
                                                    internal_batch_size=400)
        assert attr.shape == shape
        total = attr.double().flatten(1).sum(1)
        assert torch.allclose(total - fd, delta, atol=1e-4)
        assert (delta.abs() / fd.abs()).max() < 0.05


def test_input_equal_to_baseline_has_zero_conductance():
    model = _smooth()
    x = torch.full((3, 1, 8, 8), 0.3)
    attr, delta = conductance.layer_conductance(model, x, "last_conv", baseline=0.3, n_steps=10)
    assert torch.count_nonzero(attr) == 0
    assert torch.all(delta.abs() < 1e-6)


def test_channel_features_equals_plain_loop():
    g = torch.Generator().manual_seed(0)
    attr = torch.randn(4, 3, 5, 6, generator=g)
    expected = np.zeros((4, 3))
    a = attr.numpy()
    for n in range(4):
        for c in range(3):
            s = 0.0
            for i in range(5):
                for j in range(6):
                    s += float(a[n, c, i, j])
            expected[n, c] = s / 30
    got = conductance.channel_features(attr)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conductance.channel_features(a), expected, rtol=1e-5, atol=1e-6)
    dense = torch.randn(4, 7, generator=g)
    assert torch.equal(conductance.channel_features(dense), dense)
    with pytest.raises(ValueError, match="attr"):
        conductance.channel_features(torch.zeros(2, 3, 4))


def test_target_defaults_to_predicted_class():
    model = _smooth()
    x = _inputs(8, seed=7)
    with torch.no_grad():
        pred = model(x).argmax(1)
    a_default, d_default = conductance.layer_conductance(model, x, n_steps=15)
    a_pred, d_pred = conductance.layer_conductance(model, x, target=pred, n_steps=15)
    assert torch.equal(a_default, a_pred) and torch.equal(d_default, d_pred)
    other = (pred + 1) % 3
    a_other, _ = conductance.layer_conductance(model, x, target=other, n_steps=15)
    assert not torch.allclose(a_other, a_pred)


def test_batching_does_not_change_result_and_leaves_no_grad():
    model = _smooth()
    model.train()  # the function must evaluate in eval mode and restore the mode
    x = _inputs(7, seed=9)
    a1, d1 = conductance.layer_conductance(model, x, n_steps=12, internal_batch_size=10_000)
    # several inputs per call with chunks of a few steps each (overlapping by one step)
    a2, d2 = conductance.layer_conductance(model, x, n_steps=12, internal_batch_size=9, batch_size=3)
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(d1, d2, atol=1e-5)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_cli_missing_model_names_file(tmp_path, capsys):
    cfg = tmp_path / "missing.yaml"
    cfg.write_text("name: test_conductance_missing_models_xyz\nn_models: 1\n")
    assert conductance.main(["--config", str(cfg)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "test_conductance_missing_models_xyz/baseline_s0.pt" in err


def test_cli_writes_checked_npz(tmp_path, isolated_outputs):
    """Untrained checkpoints written as main.py would; the npz holds what the detectors read."""
    import artifacts
    from config import TRAINING_KEYS, config_hash, load_config
    from mnistload import load_dataset

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("name: cond_tiny\nn_models: 2\nn_train: 100\nn_val: 10\nn_test: 20\n"
                        "conductance_n_steps: 3\nconductance_internal_batch_size: 50\n"
                        "conductance_splits: [val, test]\n")
    cfg = load_config(cfg_path)
    ds = load_dataset(cfg)
    for seed in artifacts.model_seeds(cfg):
        torch.manual_seed(seed)
        meta = {"arch": cfg["arch"], "n_classes": 10, "seed": seed, "variant": "baseline",
                "dataset_fingerprint": ds.fingerprint, "training_config_hash": config_hash(cfg, TRAINING_KEYS)}
        artifacts.save_checkpoint(artifacts.checkpoint_path(cfg, seed, "baseline"), MnistConvNet(10), meta)
    assert conductance.main(["--config", str(cfg_path)]) == 0
    res = artifacts.results_dir(cfg)
    for split, n in (("val", 10), ("test", 20)):
        data = artifacts.load_npz(res / f"conductance_{split}.npz",
                                  ["seeds", "labels", "pred", "features", "delta"])
        assert data["seeds"].tolist() == [0, 1]
        assert data["labels"].dtype == np.int64 and data["labels"].tolist() == getattr(ds, f"y_{split}").tolist()
        assert data["pred"].shape == (2, n) and data["pred"].dtype == np.int64
        assert data["features"].shape == (2, n, 64) and data["features"].dtype == np.float32
        assert data["delta"].shape == (2, n) and data["delta"].dtype == np.float64
        assert str(data["dataset_fingerprint"]) == ds.fingerprint and str(data["layer"]) == "last_conv"
        # stored arrays agree with completeness: Σ_channels mean·(14·14) − (F(x) − F(x')) = delta
        total = data["features"].astype(np.float64).sum(-1) * 14 * 14
        np.testing.assert_allclose(total - data["f_diff"], data["delta"], atol=1e-4, rtol=1e-3)
        # predictions are the models' own, recomputed here with plain forward calls
        x = getattr(ds, f"x_{split}")
        for i, seed in enumerate(data["seeds"]):
            model, _ = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, int(seed), "baseline"))
            with torch.no_grad():
                assert np.array_equal(model(x).argmax(1).numpy(), data["pred"][i])
    import json
    manifest = json.loads((res / "manifest.json").read_text())
    assert set(manifest["stages"]["conductance"]["convergence_delta"]) == {"val", "test"}
