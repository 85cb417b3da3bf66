"""cnnmodel: shapes, named-layer activations via hooks, eval mode, checkpoint round-trip."""
import pytest
import torch

from artifacts import ArtifactError, load_checkpoint, save_checkpoint
from cnnmodel import build_model, layer_activations, predict


@pytest.mark.parametrize("arch,shape,hidden,conv", [("mnist_convnet", (1, 28, 28), 1000, (64, 14, 14)),
                                                      ("cifar_cnn", (3, 32, 32), 256, (64, 16, 16))])
def test_shapes_and_named_layers(arch, shape, hidden, conv):
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    x = torch.rand(5, *shape)
    out = model(x)
    assert out.shape == (5, 10)
    acts = layer_activations(model, x, ["penultimate", "logits", "last_conv"], batch_size=2)
    assert acts["penultimate"].shape == (5, hidden)
    assert acts["last_conv"].shape == (5, *conv)
    torch.testing.assert_close(acts["logits"], out)
    torch.testing.assert_close(acts["__logits__"], out)
    # the hook sees exactly what the children compute when chained by hand up to that layer
    h = x
    for name in model.layer_names:
        h = getattr(model, name)(h)
        if name == model.resolve_layer("penultimate"):
            break
    torch.testing.assert_close(acts["penultimate"], h)
    assert (acts["penultimate"] >= 0).all()  # after the ReLU
    pooled = layer_activations(model, x, ["last_conv"], spatial_mean=True)["last_conv"]
    torch.testing.assert_close(pooled, acts["last_conv"].mean(dim=(2, 3)))


def test_corner_case_convnet_architecture():
    model = build_model("mnist_convnet")
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size, model.conv1.padding) == (1, 24, (5, 5), (2, 2))
    assert (model.conv2.in_channels, model.conv2.out_channels) == (24, 64)
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (3136, 1000, 10)
    assert model.dropout.p == 0.5


def test_eval_mode_disables_dropout_and_train_mode_is_torchs():
    torch.manual_seed(0)
    model = build_model("mnist_convnet")
    x = torch.rand(4, 1, 28, 28)
    assert model.train() is model and model.training  # nn.Module.train is not overridden
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active
    acts = layer_activations(model, x, ["penultimate"])
    assert model.training  # mode restored
    torch.testing.assert_close(acts["penultimate"], layer_activations(model, x, ["penultimate"])["penultimate"])


def test_unknown_layer_name():
    with pytest.raises(KeyError, match="unknown layer 'fc9'"):
        build_model("mnist_convnet").resolve_layer("fc9")
    with pytest.raises(ValueError, match="unknown arch 'resnet'"):
        build_model("resnet")


def test_checkpoint_roundtrip_weights_only(tmp_path):
    torch.manual_seed(1)
    model = build_model("mnist_convnet").eval()
    meta = {"arch": "mnist_convnet", "n_classes": 10, "seed": 3, "dataset_fingerprint": "abc",
            "test_accuracy": 0.5, "versions": {"torch": torch.__version__}}
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    raw = torch.load(path, weights_only=True)  # plain data only: loads under the safe unpickler
    assert raw["meta"] == dict(meta, versions={"torch": str(torch.__version__)})
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == raw["meta"] and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(predict(model, x), predict(loaded, x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="bad.pt: cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="missing.pt: required artifact is missing"):
        load_checkpoint(tmp_path / "missing.pt")


def test_channels_last_keeps_outputs_and_leaves_mlps_alone():
    import copy

    from cnnmodel import MnistConvNet, channels_last

    torch.manual_seed(0)
    model = MnistConvNet().eval()
    x = torch.rand(6, 1, 28, 28)
    ref = model(x)
    cl, xcl = channels_last(copy.deepcopy(model), x)
    assert xcl.is_contiguous(memory_format=torch.channels_last)
    assert cl.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl(xcl), ref, atol=1e-5)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    same, x_same = channels_last(mlp, x)
    assert same is mlp and x_same is x
