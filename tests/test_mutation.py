"""Model mutation and LCR: operator counts and semantics, determinism, acceptance, LCR vs a plain loop."""
import copy
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import artifacts
import mutation
from cnnmodel import MnistConvNet, NamedCNN
from config import TRAINING_KEYS, ConfigError, config_hash, load_config
from mutation import (OPERATORS, MutationError, accept_mutants, label_change_rate, mutant_predictions,
                      mutate, mutation_plan)


@pytest.fixture(scope="module")
def inputs():
    return torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) ** 3


@pytest.fixture(scope="module")
def convnet(inputs):
    """An untrained MnistConvNet whose output layer is rescaled and centred on ``inputs`` so that
    they get varied predictions (an untrained net predicts one class for all of them)."""
    torch.manual_seed(0)
    model = MnistConvNet(10).eval()
    with torch.no_grad():
        model.fc2.weight.mul_(30)
        model.fc2.bias.sub_(model(inputs).mean(0))
    assert len(set(model(inputs).argmax(1).tolist())) >= 5
    return model


def _half_up(rate, n):  # the documented count rule: round(γ·n), halves rounded up
    return int(math.floor(rate * n + 0.5))


def _changed_rows(before, after):
    return (before != after).reshape(before.shape[0], -1).any(dim=1)


def _plain_loop(model, x, op, rate, seeds):
    """Reference: one deep copy of the model per mutant, full forward pass."""
    with torch.no_grad():
        pred = model(x).argmax(1)
        changed = []
        for seed in seeds:
            mutant = copy.deepcopy(model)
            mutant.load_state_dict(mutate(model, op, rate, seed), strict=False)
            changed.append((mutant(x).argmax(1) != pred).double())
    return pred.numpy(), torch.stack(changed).mean(0).numpy()


# --------------------------------------------------------------------------------------------- γ = 0
@pytest.mark.parametrize("op", OPERATORS)
def test_rate_zero_mutant_is_the_original_and_lcr_is_zero(convnet, inputs, op):
    params = mutate(convnet, op, 0.0, seed=3)
    for name, p in convnet.named_parameters():
        assert torch.equal(params[name], p), name
    assert mutation_plan(convnet, op, 0.0, 3) == {}
    pred, mpred = mutant_predictions(convnet, inputs, op, 0.0, [0, 1, 2])
    assert np.array_equal(label_change_rate(pred, mpred), np.zeros(len(inputs)))


# --------------------------------------------------------------------------------------------- NAI
@pytest.mark.parametrize("op", ["NAI", "NAI_filter"])
def test_nai_applied_twice_restores_the_weights(convnet, op):
    once = copy.deepcopy(convnet)
    once.load_state_dict(mutate(convnet, op, 0.3, seed=7), strict=False)
    assert any(not torch.equal(a, b) for a, b in zip(once.parameters(), convnet.parameters()))
    twice = mutate(once, op, 0.3, seed=7)
    for name, p in convnet.named_parameters():
        assert torch.equal(twice[name], p), name


# --------------------------------------------------------------------------------------------- counts
LAYERS = {"conv1": 24, "conv2": 64, "fc1": 1000, "fc2": 10}


@pytest.mark.parametrize("rate", [0.1, 0.0625])  # 0.0625·24 = 1.5 → 2 (halves round up)
@pytest.mark.parametrize("op", OPERATORS)
def test_each_operator_touches_the_documented_count(convnet, op, rate):
    snapshot = {k: v.clone() for k, v in convnet.state_dict().items()}
    params = mutate(convnet, op, rate, seed=11)
    for k, v in convnet.state_dict().items():  # the original model is never modified
        assert torch.equal(v, snapshot[k]), k
    touched = {"conv1", "conv2"} if op.endswith("_filter") else {"conv1", "conv2", "fc1"}  # never fc2
    for layer, n in LAYERS.items():
        w0, b0 = snapshot[f"{layer}.weight"], snapshot[f"{layer}.bias"]
        w1, b1 = params[f"{layer}.weight"], params[f"{layer}.bias"]
        if layer not in touched:
            assert torch.equal(w1, w0) and torch.equal(b1, b0), (op, layer)
            continue
        rows = _changed_rows(w0, w1)
        k = _half_up(rate, n)
        if op == "GF":  # single entries of each tensor, redrawn
            assert int((w1 != w0).sum()) == _half_up(rate, w0.numel()), layer
            assert int((b1 != b0).sum()) == _half_up(rate, n), layer
        elif op in ("NAI", "NAI_filter"):
            assert int(rows.sum()) == k, layer
            assert torch.equal(w1[rows], -w0[rows]) and torch.equal(w1[~rows], w0[~rows])
            assert torch.equal(b1 != b0, rows) and torch.equal(b1[rows], -b0[rows])
        elif op == "WS":  # each chosen neuron's incoming weights permuted, bias kept
            assert int(rows.sum()) == k, layer
            assert torch.equal(b1, b0)
            flat0, flat1 = w0[rows].reshape(k, -1), w1[rows].reshape(k, -1)
            assert torch.equal(flat0.sort(dim=1).values, flat1.sort(dim=1).values)
        elif op == "NS":  # the chosen neurons exchange weights and biases among themselves
            assert int(rows.sum()) == k, layer
            idx = rows.nonzero().squeeze(1)
            old = {tuple(w0[i].flatten().tolist()) + (b0[i].item(),) for i in idx}
            new = {tuple(w1[i].flatten().tolist()) + (b1[i].item(),) for i in idx}
            assert old == new and len(new) == k
        elif op == "GF_filter":  # whole filters redrawn, bias kept
            assert int(rows.sum()) == k, layer
            assert bool((w1[rows] != w0[rows]).all()) and torch.equal(b1, b0)


def test_count_rule_rounds_halves_up():
    assert [mutation.mutation_count(r, n) for r, n in [(0.01, 24), (0.01, 64), (0.5, 1), (0.25, 10), (1.0, 7)]] \
        == [0, 1, 1, 3, 7]


# --------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("op", OPERATORS)
def test_same_seed_regenerates_the_identical_mutant(convnet, op):
    a, b, c = (mutate(convnet, op, 0.05, s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------- LCR
@pytest.mark.parametrize("op", OPERATORS)
def test_lcr_equals_a_plain_loop_over_deep_copied_mutants(convnet, inputs, op):
    seeds = [0, 1, 2]
    ref_pred, ref_lcr = _plain_loop(convnet, inputs, op, 0.05, seeds)
    assert ref_lcr.max() > 0  # otherwise the comparison would prove little
    for batch_size in (16, 5) if op in ("NAI", "WS") else (16,):  # one chunk; chunks splitting the inputs
        pred, mpred = mutant_predictions(convnet, inputs, op, 0.05, seeds, batch_size=batch_size)
        assert mpred.shape == (3, 16) and mpred.dtype == np.int64
        assert np.array_equal(pred, ref_pred)
        assert np.array_equal(label_change_rate(pred, mpred), ref_lcr)


class _Branchy(nn.Module):
    """Not a chain of named layers: mutants go through functional_call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + torch.tanh(self.b(x)))


@pytest.mark.parametrize("op", ["NAI", "WS", "NS", "GF"])
def test_lcr_fallback_for_non_sequential_models(op):
    torch.manual_seed(2)
    model = _Branchy().eval()
    x = torch.randn(40, 6)
    ref_pred, ref_lcr = _plain_loop(model, x, op, 0.25, [0, 1, 2, 3])
    pred, mpred = mutant_predictions(model, x, op, 0.25, [0, 1, 2, 3])
    assert np.array_equal(pred, ref_pred) and np.array_equal(label_change_rate(pred, mpred), ref_lcr)


def test_label_change_rate_by_hand():
    pred = np.array([0, 1, 2, 3])
    mpred = np.array([[0, 1, 2, 0], [1, 1, 2, 0], [0, 0, 0, 3], [0, 1, 2, 3]])
    assert np.array_equal(label_change_rate(pred, mpred), [0.25, 0.25, 0.25, 0.5])
    assert np.isnan(label_change_rate(pred, np.empty((0, 4), dtype=np.int64))).all()


# --------------------------------------------------------------------------------------------- acceptance
def _two_neuron_model():
    """1 input → 2 hidden ReLU neurons → 2 logits. Hidden neuron 0 decides (logit0 = h0, logit1 = 0.5);
    hidden neuron 1 feeds nothing. Negating neuron 0 makes h0 = 0: everything becomes class 1
    (val accuracy 0.5); negating neuron 1 changes nothing (accuracy 1.0)."""
    model = NamedCNN(OrderedDict([("fc1", nn.Linear(1, 2)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(2, 2))]))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0], [1.0]]))
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        model.fc2.bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([[0.1], [0.2], [0.3], [0.7], [0.8], [0.9]])
    y = torch.tensor([1, 1, 1, 0, 0, 0])
    return model.eval(), x, y


def test_acceptance_keeps_exactly_the_mutants_above_the_threshold():
    model, x, y = _two_neuron_model()
    assert model(x).argmax(1).tolist() == y.tolist()
    # NAI at γ = 0.5 on the 2 hidden neurons negates one of them; which one is read off the weights.
    negated = {s: int(mutate(model, "NAI", 0.5, s)["fc1.weight"][:, 0].argmin()) if
               bool((mutate(model, "NAI", 0.5, s)["fc1.weight"] < 0).any()) else None for s in range(40)}
    assert set(negated.values()) == {0, 1}
    good = [s for s in range(40) if negated[s] == 1]
    for s in range(40):  # the known answer: accuracy 1.0 when neuron 1 is negated, 0.5 otherwise
        mutant = copy.deepcopy(model)
        mutant.load_state_dict(mutate(model, "NAI", 0.5, s), strict=False)
        assert float((mutant(x).argmax(1) == y).float().mean()) == (1.0 if s in good else 0.5)
    rec = accept_mutants(model, "NAI", 0.5, x, y, n_mutants=5, max_draws=40, threshold=0.9)
    assert rec["seeds"] == good[:5] and rec["val_accuracy"] == [1.0] * 5
    assert rec["draws"] == good[4] + 1 and rec["acceptance_rate"] == 5 / (good[4] + 1)
    assert rec["original_val_accuracy"] == 1.0 and rec["complete"]
    rec2, (pred, mpred) = accept_mutants(model, "NAI", 0.5, x, y, n_mutants=5, max_draws=40,
                                         return_predictions=True)
    assert rec2 == rec
    ref_pred, ref_mpred = mutant_predictions(model, x, "NAI", 0.5, good[:5])
    assert np.array_equal(pred, ref_pred) and np.array_equal(mpred, ref_mpred)
    # threshold 0.5: accuracy 0.5 ≥ 0.5 × 1.0, so every draw is accepted (≥, not >)
    rec = accept_mutants(model, "NAI", 0.5, x, y, n_mutants=6, max_draws=40, threshold=0.5)
    assert rec["seeds"] == list(range(6)) and rec["acceptance_rate"] == 1.0


def test_acceptance_at_rate_zero_and_threshold_one_accepts_everything(convnet, inputs):
    y = torch.arange(16) % 10
    rec = accept_mutants(convnet, "WS", 0.0, inputs, y, n_mutants=4, max_draws=4, threshold=1.0)
    assert rec["seeds"] == [0, 1, 2, 3] and rec["acceptance_rate"] == 1.0


def test_too_few_accepted_mutants_is_a_clear_error():
    model, x, y = _two_neuron_model()
    with pytest.raises(MutationError, match=r"operator NAI at rate 0\.5: only \d+/30 mutants accepted in 10 "
                                            r"draws \(acceptance rate \d+\.\d%"):
        accept_mutants(model, "NAI", 0.5, x, y, n_mutants=30, max_draws=10, threshold=0.9)
    rec = accept_mutants(model, "NAI", 0.5, x, y, n_mutants=30, max_draws=10, strict=False)
    assert not rec["complete"] and rec["draws"] == 10 and len(rec["seeds"]) < 10


# --------------------------------------------------------------------------------------------- bad input
def test_bad_operator_and_rate_are_clear_errors(convnet):
    with pytest.raises(ValueError, match="operator: unknown mutation operator 'XYZ'"):
        mutate(convnet, "XYZ", 0.1, 0)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"rate: mutation rate must be a number in \[0, 1\]"):
            mutate(convnet, "NAI", bad, 0)
    with pytest.raises(ConfigError, match="mutation_operators"):
        load_config(None, ["mutation_operators=[NAI, XYZ]"])
    with pytest.raises(ConfigError, match="mutation_rates"):
        load_config(None, ["mutation_rates=[0.01, 1.5]"])


def test_cli_rejects_bad_config(capsys):
    assert mutation.main(["--config", "configs/smoke.yaml", "--set", "mutation_rates=[2]"]) == 2
    assert "mutation_rates" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- CLI
def test_cli_writes_accepted_mutants_and_lcr_and_reuses_them(capsys, monkeypatch):
    import mnistload

    overrides = ["n_models=1", "n_mutants=3", "max_draws=50", "mutation_operators=[NAI, GF_filter]",
                 "mutation_rates=[0.05]", "n_test=100"]
    cfg = load_config("configs/smoke.yaml", overrides)
    ds = mnistload.load_dataset(cfg)
    monkeypatch.setattr(mnistload, "load_dataset", lambda _cfg: ds)  # parse the embedded MNIST once
    torch.manual_seed(0)
    meta = {"arch": cfg["arch"], "n_classes": 10, "seed": cfg["seed"], "dataset_fingerprint": ds.fingerprint,
            "training_config_hash": config_hash(cfg, TRAINING_KEYS)}
    artifacts.save_checkpoint(artifacts.checkpoint_path(cfg, cfg["seed"]), MnistConvNet(10), meta)
    argv = ["--config", "configs/smoke.yaml"] + [a for o in overrides for a in ("--set", o)]

    assert mutation.main(argv) == 0
    out = capsys.readouterr().out
    assert "[mutation] NAI_0.05: acceptance rate" in out and "(reused)" not in out
    path = artifacts.model_dir(cfg) / "mutants_NAI_0.05_s0.json"
    rec = json.loads(path.read_text())
    assert len(rec["seeds"]) == 3 and rec["dataset_fingerprint"] == ds.fingerprint
    assert all(a >= 0.9 * rec["original_val_accuracy"] for a in rec["val_accuracy"])
    for split, y in (("val", ds.y_val), ("test", ds.y_test)):
        with np.load(artifacts.results_dir(cfg) / f"lcr_{split}.npz", allow_pickle=False) as npz:
            assert npz["seeds"].tolist() == [0] and np.array_equal(npz["labels"], y.numpy())
            assert npz["pred"].shape == (1, len(y)) and npz["pred"].dtype == np.int64
            for tag in ("NAI_0.05", "GF_filter_0.05"):
                lcr = npz[f"lcr_{tag}"]
                assert lcr.shape == (1, len(y)) and lcr.dtype == np.float64
                assert set(np.unique(lcr * 3).round(9)) <= {0.0, 1.0, 2.0, 3.0}  # k/3 with 3 mutants
                assert npz[f"n_accepted_{tag}"].tolist() == [3]
    manifest = json.loads((artifacts.results_dir(cfg) / "manifest.json").read_text())
    assert "mutation" in manifest["stages"]

    mtime = path.stat().st_mtime_ns
    with np.load(artifacts.results_dir(cfg) / "lcr_val.npz", allow_pickle=False) as npz:
        first = {k: npz[k] for k in npz.files}
    assert mutation.main(argv) == 0
    assert "(reused)" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    with np.load(artifacts.results_dir(cfg) / "lcr_val.npz", allow_pickle=False) as npz:
        # val LCR from the acceptance pass (first run) = recomputed from the stored seeds (reuse)
        assert all(np.array_equal(npz[k], first[k]) for k in first)
    # a different threshold does not match the stored record: redrawn
    assert mutation.main(argv + ["--set", "mutation_threshold=0.5"]) == 0
    assert json.loads(path.read_text())["threshold"] == 0.5
    # not enough draws: the CLI fails naming operator, rate and acceptance rate
    assert mutation.main(argv + ["--set", "max_draws=1", "--set", "mutation_threshold=0.8"]) == 2
    assert "operator NAI at rate 0.05: only 1/3 mutants accepted in 1 draws" in capsys.readouterr().err
