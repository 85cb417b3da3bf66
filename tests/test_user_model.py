"""Any model, any image data: an nn.Module by import path (arch: module:Class + arch_kwargs), layers
by any named_modules() name with inferred aliases, checkpoints rebuilt from import path + kwargs under
weights_only, one-line errors, and the digits example (examples/) through every stage."""
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from artifacts import ArtifactError, load_checkpoint, save_checkpoint
from cnnmodel import ArchError, LayerError, build_model, find_layer, layer_activations, layer_aliases, predict
from config import ConfigError, load_config
from examples.digits_model import DigitsCNN

DIGITS = "examples.digits_model:DigitsCNN"


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """The converter's output (examples/digits_to_npz.py), written once for this module."""
    from examples.digits_to_npz import convert

    return convert(tmp_path_factory.mktemp("digits") / "digits.npz")


# ---------------------------------------------------------------------------------------------
# arch by import path
# ---------------------------------------------------------------------------------------------
def test_build_by_import_path_passes_kwargs_and_n_classes():
    model = build_model(DIGITS, 7, {"width": 4, "hidden": 12})
    assert type(model) is DigitsCNN
    assert (model.conv1.out_channels, model.fc1.out_features, model.fc2.out_features) == (4, 12, 7)
    with pytest.raises(ArchError, match=r"arch_kwargs sets n_classes 5 but n_classes is 7"):
        build_model(DIGITS, 7, {"n_classes": 5})
    with pytest.raises(ArchError, match=r"arch_kwargs \{'widht': 4, 'n_classes': 7\} do not fit DigitsCNN\(n_classes"):
        build_model(DIGITS, 7, {"widht": 4})


@pytest.mark.parametrize("arch,message", [
    ("examples.no_such_module:Net", r"arch 'examples.no_such_module:Net': cannot import module "
                                    r"'examples.no_such_module' \(ModuleNotFoundError"),
    ("examples.digits_model:NoSuchNet", r"module 'examples.digits_model' \(.*digits_model.py\) has no attribute "
                                        r"'NoSuchNet'"),
], ids=["bad_import", "missing_class"])
def test_bad_import_is_a_one_line_error(arch, message):
    with pytest.raises(ArchError, match=message):
        build_model(arch, 10)


@pytest.mark.parametrize("arch,message", [
    ("examples.digits_to_npz:convert", r"convert is a function, not a subclass of torch.nn.Module"),
    ("collections:OrderedDict", r"OrderedDict is class OrderedDict, not a subclass of torch.nn.Module"),
], ids=["function", "class"])
def test_not_an_nn_module_is_a_one_line_error(arch, message):
    with pytest.raises(ArchError, match=message):
        build_model(arch, 10)


def test_import_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_user_net.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, hidden=3):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU())
                self.head = nn.Linear(hidden, 2)

            def forward(self, x):
                return self.head(self.body(x))
    """))
    monkeypatch.chdir(tmp_path)
    model = build_model("my_user_net:Net", 2, {"hidden": 5})
    assert model.head.in_features == 5
    # no n_classes parameter: not passed; aliases reach into nested modules
    assert layer_aliases(model) == {"penultimate": ("head", True), "logits": ("head", False)}
    acts = layer_activations(model, torch.rand(3, 1, 2, 2), ["penultimate", "body.1"])
    torch.testing.assert_close(acts["penultimate"], torch.relu(acts["body.1"]))


def test_config_checks_arch_and_mappings():
    assert load_config(None, [f"arch={DIGITS}", "arch_kwargs={width: 4}"])["arch_kwargs"] == {"width": 4}
    with pytest.raises(ConfigError, match=r"'arch' must be mnist_convnet, cifar_cnn or an import path"):
        load_config(None, ["arch=resnet"])
    with pytest.raises(ConfigError, match=r"--set: key 'arch_kwargs' expects a mapping with string keys, got 3"):
        load_config(None, ["arch_kwargs=3"])
    with pytest.raises(ConfigError, match=r"'layer_aliases' must be a mapping alias -> module name"):
        load_config(None, ["layer_aliases={penultimate: 3}"])
    a, b = load_config(None), load_config(None)
    a["arch_kwargs"]["x"] = 1
    assert b["arch_kwargs"] == {} and load_config(None)["arch_kwargs"] == {}  # defaults are not shared


def test_stage_reports_a_bad_arch_in_one_line(capsys, digits_npz):
    import main as train

    argv = ["--config", "configs/digits.yaml", "--set", f"data_path={digits_npz}", "--set", "arch=examples.nope:Net",
            "--set", "n_models=1", "--set", "num_epochs=1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: arch 'examples.nope:Net': cannot import module") and "\n" not in err


# ---------------------------------------------------------------------------------------------
# layers by name
# ---------------------------------------------------------------------------------------------
def digits_forward_by_hand(model: DigitsCNN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """DigitsCNN's forward written out with the functional API (independent of the hooks)."""
    conv2 = F.conv2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)),
                     model.conv2.weight, model.conv2.bias, padding=1)
    hidden = F.relu(F.linear(F.max_pool2d(F.relu(conv2), 2).flatten(1), model.fc1.weight, model.fc1.bias))
    return {"last_conv": conv2, "penultimate": hidden, "logits": F.linear(hidden, model.fc2.weight, model.fc2.bias)}


def test_alias_inference_on_a_user_model():
    torch.manual_seed(0)
    model = build_model(DIGITS, 10, {"width": 4, "hidden": 8}).eval()
    assert layer_aliases(model) == {"penultimate": ("fc2", True), "logits": ("fc2", False),
                                    "last_conv": ("conv2", False)}
    x = torch.rand(5, 1, 8, 8)
    acts = layer_activations(model, x, ["penultimate", "logits", "last_conv", "fc1", "relu3"], batch_size=2)
    with torch.no_grad():
        ref = digits_forward_by_hand(model, x)
        out = model(x)
    for name in ("penultimate", "logits", "last_conv"):
        torch.testing.assert_close(acts[name], ref[name])
    torch.testing.assert_close(acts["__logits__"], out)
    torch.testing.assert_close(acts["penultimate"], acts["relu3"])  # the input of fc2 = the output of relu3
    torch.testing.assert_close(acts["penultimate"], torch.relu(acts["fc1"]))
    pooled = layer_activations(model, x, ["last_conv"], spatial_mean=True)["last_conv"]
    torch.testing.assert_close(pooled, ref["last_conv"].mean(dim=(2, 3)))
    # config layer_aliases override: penultimate = the output of fc1 (before the ReLU)
    over = layer_activations(model, x, ["penultimate"], aliases={"penultimate": "fc1"})
    torch.testing.assert_close(over["penultimate"], acts["fc1"])
    assert find_layer(model, "penultimate", {"penultimate": "fc1"}).on_input is False


def test_wrong_layer_name_lists_available_names():
    model = build_model(DIGITS, 10)
    with pytest.raises(LayerError, match=r"unknown layer 'fc9': expected an alias \['last_conv', 'logits', "
                                         r"'penultimate'\] or a module name \['conv1', 'relu1', 'conv2', 'relu2', "
                                         r"'pool', 'fc1', 'relu3', 'fc2'\]"):
        layer_activations(model, torch.rand(2, 1, 8, 8), ["fc9"])
    with pytest.raises(LayerError, match=r"layer alias 'penultimate' points to 'fc7', which is not a module of "
                                         r"DigitsCNN; module names: \['conv1'"):
        find_layer(model, "penultimate", {"penultimate": "fc7"})
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(LayerError, match=r"unknown layer 'last_conv' \(Sequential has no nn.Conv2d, so 'last_conv' "
                                         r"is not inferred: set layer_aliases: \{last_conv: <module name>\}\)"):
        find_layer(mlp, "last_conv")
    with pytest.raises(KeyError):  # LayerError is also a KeyError, as NamedCNN.resolve_layer's always was
        build_model("mnist_convnet").resolve_layer("fc9")


def test_module_run_twice_or_never_is_an_error():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(1, 1)  # registered first: the last Linear is still fc2
            self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.act(x.flatten(1)))))

    model = Shared()
    with pytest.raises(LayerError, match=r"layer 'act' \(module 'act'\) ran 2 times in a forward pass of Shared"):
        layer_activations(model, torch.rand(3, 1, 2, 2), ["act"])
    with pytest.raises(LayerError, match=r"layer 'unused' \(module 'unused'\) did not run"):
        layer_activations(model, torch.rand(3, 1, 2, 2), ["unused"])
    acts = layer_activations(model, torch.rand(3, 1, 2, 2), ["penultimate", "logits"])  # modules that run once
    assert acts["penultimate"].shape == (3, 4) and acts["logits"].shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_user_model_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(3)
    kwargs = {"width": 3, "hidden": 10}
    model = build_model(DIGITS, 6, kwargs).eval()
    meta = {"arch": DIGITS, "arch_kwargs": kwargs, "n_classes": 6, "seed": 3}
    path = save_checkpoint(tmp_path / "user.pt", model, meta)
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled module or class
    assert raw["meta"] == meta and set(raw) == {"state_dict", "meta"}
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    loaded, meta2 = load_checkpoint(path)
    assert type(loaded) is DigitsCNN and not loaded.training and meta2 == meta
    assert loaded.fc1.out_features == 10 and loaded.fc2.out_features == 6
    x = torch.rand(7, 1, 8, 8)
    assert torch.equal(loaded(x), model(x)) and torch.equal(predict(loaded, x), predict(model, x))

    bad = dict(meta, arch="examples.gone_module:DigitsCNN")
    save_checkpoint(tmp_path / "gone.pt", model, bad)
    with pytest.raises(ArtifactError, match=r"gone.pt: arch 'examples.gone_module:DigitsCNN': cannot import module"):
        load_checkpoint(tmp_path / "gone.pt")
    save_checkpoint(tmp_path / "kw.pt", model, dict(meta, arch_kwargs={"width": 5, "hidden": 10}))
    with pytest.raises(ArtifactError, match=r"kw.pt: state_dict does not fit arch"):
        load_checkpoint(tmp_path / "kw.pt")


# ---------------------------------------------------------------------------------------------
# the digits example, every stage, smoke size
# ---------------------------------------------------------------------------------------------
DIGITS_SMOKE = ["n_models=2", "num_epochs=3", "n_train=400", "n_val=100", "n_test=100", "deepfool_n_test=50",
                "remove_count=20", "dsa_top=30", "dsa_k=5", "bootstrap=50", "n_mutants=5", "max_draws=50",
                "conductance_n_steps=5", "adv_n_test=20", "pgd_steps=3", "pgd_step_size=0.1",
                "adv_eps_linf=[0.0, 0.2]", "adv_eps_l2=[0.0, 1.0]", "adv_margin_steps=1"]


def test_digits_converter(digits_npz):
    with np.load(digits_npz, allow_pickle=False) as npz:
        x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    assert x_train.shape == (1347, 8, 8) and x_test.shape == (450, 8, 8) and x_train.dtype == np.uint8
    assert x_train.max() == 255 and x_train.min() == 0
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert np.abs(np.bincount(y_test) - 0.25 * np.bincount(raw.target)).max() <= 1  # stratified
    first = np.flatnonzero((np.rint(raw.images * 255 / 16) == x_train[0]).all(axis=(1, 2)))
    assert len(first) >= 1 and raw.target[first[0]] == y_train[0]  # a real digit with its label


def test_digits_chain_end_to_end(digits_npz, isolated_outputs):
    import adversarial
    import cc_remove
    import compare
    import conductance
    import detectors
    import main as train
    import mutation
    import report
    import robustness
    argv = ["--config", "configs/digits.yaml", "--set", f"data_path={digits_npz}"]
    for item in DIGITS_SMOKE:
        argv += ["--set", item]
    steps = [("train", train.main, argv), ("cc_remove", cc_remove.main, argv),
             ("train_variants", train.main, argv + ["--variant", "all", "--no-measure"]),
             ("robustness", robustness.main, argv), ("mutation", mutation.main, argv),
             ("conductance", conductance.main, argv), ("detectors", detectors.main, argv),
             ("adversarial", adversarial.main, argv), ("compare", compare.main, argv), ("report", report.main, argv)]
    for name, fn, args in steps:
        assert fn(args) in (0, None), f"stage {name} failed"
    res = isolated_outputs / "results" / "digits"
    assert (res / "REPORT.md").is_file() and (res / "REPORT.md").stat().st_size > 0
    ckpt = torch.load(isolated_outputs / "model" / "digits" / "baseline_s0.pt", weights_only=True)
    assert ckpt["meta"]["arch"] == DIGITS and ckpt["meta"]["arch_kwargs"] == {"width": 16, "hidden": 64}
    model, _ = load_checkpoint(isolated_outputs / "model" / "digits" / "baseline_s0.pt")
    assert type(model) is DigitsCNN
    train_json = json.loads((res / "variants" / "baseline" / "train.json").read_text())
    assert train_json["models"][0]["n_test"] == 100 and train_json["test_accuracy"]["mean"] > 0.5
    with np.load(res / "dsa_test.npz", allow_pickle=False) as npz:
        assert any("penultimate" in k for k in npz.files)  # the inferred alias fed DSA
