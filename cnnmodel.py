"""The CNNs of the pipeline, with layers addressable by stable names.

Every layer is a named child module, so later stages (DSA, conductance, mutation) can ask for a
layer's activations by name through forward hooks instead of re-implementing the forward pass.
Aliases: ``penultimate`` (the last hidden dense layer after its ReLU), ``logits`` (the output layer)
and ``last_conv`` (the last convolution block, after its ReLU and before pooling).

Inputs are float32 images in [0, 1], shape N×C×H×W; there is no normalisation inside the model,
so attacks and DeepFool work directly in pixel space.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

ARCHS = ("mnist_convnet", "cifar_cnn")


class NamedCNN(nn.Module):
    """A sequential CNN whose children carry stable names (``conv1``, ``relu1``, ...).

    ``aliases`` maps the role names used by the stages to child names. ``train()``/``eval()`` are
    the ones of ``nn.Module``: training loops live in ``main.py``.
    """

    aliases: dict[str, str] = {}

    def __init__(self, layers: "OrderedDict[str, nn.Module]"):
        super().__init__()
        for name, module in layers.items():
            self.add_module(name, module)
        self.layer_names = tuple(layers.keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x

    def resolve_layer(self, name: str) -> str:
        """Return the child name for ``name`` (an alias or a child name); error if unknown."""
        child = self.aliases.get(name, name)
        if child not in self.layer_names:
            raise KeyError(
                f"unknown layer {name!r}: expected one of {sorted(self.aliases)} "
                f"or a layer name {list(self.layer_names)}"
            )
        return child

    def layer(self, name: str) -> nn.Module:
        return getattr(self, self.resolve_layer(name))


class MnistConvNet(NamedCNN):
    """The corner-case paper's MNIST ConvNet: conv 1→24 5×5 pad 2, ReLU, maxpool 2; conv 24→64
    5×5 pad 2, ReLU, maxpool 2; dropout 0.5; fc 3136→1000, ReLU; fc 1000→classes."""

    aliases = {"penultimate": "relu3", "logits": "fc2", "last_conv": "relu2"}
    input_shape = (1, 28, 28)

    def __init__(self, n_classes: int = 10, in_channels: int = 1):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 24, 5, padding=2)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(24, 64, 5, padding=2)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("dropout", nn.Dropout(0.5)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 7 * 7, 1000)),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(1000, n_classes)),
        ]))


class CifarCNN(NamedCNN):
    """A small CIFAR-10 CNN: two blocks of two 3×3 convs (32, 64 channels) with max-pooling,
    dropout 0.5, fc 4096→256, ReLU, fc 256→classes."""

    aliases = {"penultimate": "relu5", "logits": "fc2", "last_conv": "relu4"}
    input_shape = (3, 32, 32)

    def __init__(self, n_classes: int = 10, in_channels: int = 3):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3, padding=1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3, padding=1)),
            ("relu2", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(32, 64, 3, padding=1)),
            ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3, padding=1)),
            ("relu4", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("dropout", nn.Dropout(0.5)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 8 * 8, 256)),
            ("relu5", nn.ReLU()),
            ("fc2", nn.Linear(256, n_classes)),
        ]))


def build_model(arch: str, n_classes: int = 10) -> NamedCNN:
    """Build an architecture by name (``mnist_convnet`` or ``cifar_cnn``)."""
    if arch == "mnist_convnet":
        return MnistConvNet(n_classes)
    if arch == "cifar_cnn":
        return CifarCNN(n_classes)
    raise ValueError(f"unknown arch {arch!r}: expected one of {list(ARCHS)}")


@torch.no_grad()
def layer_activations(model: NamedCNN, x: torch.Tensor, layers: list[str] | tuple[str, ...],
                      batch_size: int = 512, spatial_mean: bool = False,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Activations of the named layers for ``x`` (CPU tensors, float32), via forward hooks.

    Runs in eval mode (restoring the previous mode afterwards). With ``spatial_mean`` a conv
    activation N×C×H×W is averaged over H×W to N×C (SADL's treatment of conv layers).
    The returned dict also holds ``"__logits__"``, the model output.
    """
    device = device or next(model.parameters()).device
    children = [model.resolve_layer(name) for name in layers]
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    captured["__logits__"] = []
    handles = []
    for name, child in zip(layers, children):
        def hook(_module, _inp, out, name=name):
            out = out.detach()
            if spatial_mean and out.dim() == 4:
                out = out.mean(dim=(2, 3))
            captured[name].append(out.float().cpu())
        handles.append(getattr(model, child).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size].to(device))
            captured["__logits__"].append(out.float().cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in captured.items()}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits for ``x`` in eval mode, batched, returned on the CPU (float32). Never shuffles."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, 0)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels (int64, CPU) for ``x`` in eval mode."""
    return predict_logits(model, x, batch_size, device).argmax(dim=1)
