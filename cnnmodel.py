"""The models of the pipeline, with layers addressable by name.

``arch`` is a built-in CNN (``mnist_convnet``, ``cifar_cnn``) or the import path of any ``nn.Module``
subclass, ``package.module:ClassName``, built with the keyword arguments ``arch_kwargs`` (and
``n_classes`` when its constructor takes a parameter of that name). The class is imported from the
working directory or PYTHONPATH; checkpoints store only the import path and the keyword arguments.

Later stages (DSA, conductance, mutation) ask for a layer's activations by name through forward
hooks instead of re-implementing the forward pass. A layer is any name of ``model.named_modules()``
(its output) or one of three aliases:

| alias | built-in CNNs | any other model (inferred; ``layer_aliases`` in the config overrides) |
|---|---|---|
| ``penultimate`` | the last hidden dense layer after its ReLU | the input of the last ``nn.Linear`` |
| ``logits`` | the output layer | the output of the last ``nn.Linear`` |
| ``last_conv`` | the last conv block, after its ReLU, before pooling | the output of the last ``nn.Conv2d`` |

"Last" is registration order (``named_modules()``), which is the forward order of ordinary models.
A module name wins over an inferred alias; a ``layer_aliases`` entry wins over both.

Inputs are float32 images in [0, 1], shape N×C×H×W; there is no normalisation inside the model,
so attacks and DeepFool work directly in pixel space.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from config import ConfigError

ARCHS = ("mnist_convnet", "cifar_cnn")
ALIASES = ("penultimate", "logits", "last_conv")


class ArchError(ConfigError):
    """An ``arch`` that cannot be imported or built; the message names the import path."""


class LayerError(ConfigError, KeyError):
    """An unknown layer name; the message lists the aliases and module names available."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


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
        """Return the child name for ``name`` (an alias or a child name); LayerError if unknown."""
        child = self.aliases.get(name, name)
        if child not in self.layer_names:
            raise LayerError(
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
        self.input_shape = (in_channels, 28, 28)


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
        self.input_shape = (in_channels, 32, 32)


BUILTIN: dict[str, type[NamedCNN]] = {"mnist_convnet": MnistConvNet, "cifar_cnn": CifarCNN}


# ---------------------------------------------------------------------------------------------
# building a model: a built-in name or an import path
# ---------------------------------------------------------------------------------------------
def import_arch(arch: str) -> type[nn.Module]:
    """The class named by ``package.module:ClassName``, imported from the working directory or
    PYTHONPATH; ArchError (one line) when the import fails or the object is not an nn.Module class."""
    module_name, sep, class_name = arch.partition(":")
    if not sep or not module_name or not class_name:
        raise ArchError(f"unknown arch {arch!r}: expected one of {list(ARCHS)} or an import path "
                        "package.module:ClassName")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # the working directory, as for `python -m`; only for this import
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchError(f"arch {arch!r}: cannot import module {module_name!r} ({exc.__class__.__name__}: "
                        f"{exc}); it must be importable from the working directory or PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(cwd)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ArchError(f"arch {arch!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                        f"attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = f"class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ArchError(f"arch {arch!r}: {class_name} is {what}, not a subclass of torch.nn.Module")
    return cls


def build_model(arch: str, n_classes: int = 10, arch_kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised model: ``cls(**arch_kwargs)``, with ``n_classes`` passed when the
    constructor has a parameter of that name and ``arch_kwargs`` does not set it.

    ``arch`` is a built-in name (``mnist_convnet``, ``cifar_cnn``) or ``package.module:ClassName``.
    """
    cls = BUILTIN[arch] if arch in BUILTIN else import_arch(arch)
    kwargs = dict(arch_kwargs or {})
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a constructor without an introspectable signature
        signature = None
    if signature is not None and "n_classes" in signature.parameters:
        if kwargs.setdefault("n_classes", n_classes) != n_classes:
            raise ArchError(f"arch {arch!r}: arch_kwargs sets n_classes {kwargs['n_classes']!r} but n_classes "
                            f"is {n_classes}")
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise ArchError(f"arch {arch!r}: arch_kwargs {kwargs} do not fit {cls.__name__}{signature} "
                            f"({exc})") from None
    model = cls(**kwargs)
    if not any(True for _ in model.parameters()):
        raise ArchError(f"arch {arch!r}: {cls.__name__}({kwargs}) has no parameters to train")
    return model


def builtin_input_shape(arch: str, arch_kwargs: dict | None = None) -> tuple[int, ...] | None:
    """C×H×W a built-in arch expects (without building it), None for an import path."""
    if arch not in BUILTIN:
        return None
    shape = BUILTIN[arch].input_shape
    return (int((arch_kwargs or {}).get("in_channels", shape[0])), *shape[1:])


# ---------------------------------------------------------------------------------------------
# layers by name
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRef:
    """Where a named activation is taken: the output (or, for ``on_input``, the first input) of the
    module ``module_name`` of ``model.named_modules()``."""
    name: str
    module_name: str
    module: nn.Module
    on_input: bool = False


def layer_aliases(model: nn.Module, overrides: dict[str, str] | None = None) -> dict[str, tuple[str, bool]]:
    """alias → (module name, on_input): a NamedCNN's own aliases, otherwise the inferred ones
    (module docstring), then ``overrides`` (config ``layer_aliases``: alias → module name, output)."""
    if isinstance(model, NamedCNN):
        table = {alias: (child, False) for alias, child in model.aliases.items()}
    else:
        table = {}
        linear = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
        conv = [name for name, m in model.named_modules() if name and isinstance(m, nn.Conv2d)]
        if linear:
            table["penultimate"] = (linear[-1], True)
            table["logits"] = (linear[-1], False)
        if conv:
            table["last_conv"] = (conv[-1], False)
    table.update({alias: (module_name, False) for alias, module_name in (overrides or {}).items()})
    return table


def find_layer(model: nn.Module, name: str, aliases: dict[str, str] | None = None) -> LayerRef:
    """Resolve ``name``: a ``layer_aliases`` override, a module name, or an alias (in that order).
    LayerError (listing what exists) when nothing matches."""
    modules = {n: m for n, m in model.named_modules() if n}
    table = layer_aliases(model, aliases)
    if name in (aliases or {}) or (name in table and name not in modules):
        module_name, on_input = table[name]
        if module_name not in modules:
            raise LayerError(f"layer alias {name!r} points to {module_name!r}, which is not a module of "
                             f"{type(model).__name__}; module names: {list(modules)}")
        return LayerRef(name, module_name, modules[module_name], on_input)
    if name in modules:
        return LayerRef(name, name, modules[name])
    missing = [a for a in ALIASES if a not in table]
    hint = ""
    if name in missing:
        need = "nn.Conv2d" if name == "last_conv" else "nn.Linear"
        hint = (f" ({type(model).__name__} has no {need}, so {name!r} is not inferred: set "
                f"layer_aliases: {{{name}: <module name>}})")
    raise LayerError(f"unknown layer {name!r}{hint}: expected an alias {sorted(table)} or a module name "
                     f"{list(modules)}")


@torch.no_grad()
def layer_activations(model: nn.Module, x: torch.Tensor, layers: list[str] | tuple[str, ...],
                      batch_size: int = 512, spatial_mean: bool = False,
                      device: torch.device | str | None = None,
                      aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Activations of the named layers for ``x`` (CPU tensors, float32), via forward hooks.

    ``layers`` are aliases or module names (``find_layer``; ``aliases`` = config ``layer_aliases``).
    Runs in eval mode (restoring the previous mode afterwards). With ``spatial_mean`` a conv
    activation N×C×H×W is averaged over H×W to N×C (SADL's treatment of conv layers).
    The returned dict also holds ``"__logits__"``, the model output. A module that runs more than
    once per forward pass (a shared ``nn.ReLU``, say) has no single activation: LayerError.
    """
    device = device or next(model.parameters()).device
    refs = [find_layer(model, name, aliases) for name in dict.fromkeys(layers)]
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    captured["__logits__"] = []

    def keep(name: str, out: torch.Tensor) -> None:
        out = out.detach()
        if spatial_mean and out.dim() == 4:
            out = out.mean(dim=(2, 3))
        captured[name].append(out.float().cpu())

    handles = []
    for ref in refs:
        if ref.on_input:
            hook = lambda _m, inp, name=ref.name: keep(name, inp[0])  # noqa: E731
            handles.append(ref.module.register_forward_pre_hook(hook))
        else:
            hook = lambda _m, _inp, out, name=ref.name: keep(name, out)  # noqa: E731
            handles.append(ref.module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch, start in enumerate(range(0, len(x), batch_size), 1):
            out = model(x[start:start + batch_size].to(device))
            captured["__logits__"].append(out.float().cpu())
            for ref in refs:
                runs = len(captured[ref.name]) - (batch - 1)
                if runs != 1:
                    what = "did not run" if runs == 0 else f"ran {runs} times"
                    raise LayerError(f"layer {ref.name!r} (module {ref.module_name!r}) {what} in a forward pass "
                                     f"of {type(model).__name__}; name a module that runs exactly once")
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


def channels_last(model: nn.Module, x: torch.Tensor | None = None):
    """Put a model with 2-D convolutions, and 4-D inputs, in the channels-last memory layout, in
    place; other models and inputs are returned unchanged. Same values up to float rounding: on CPU
    the max-pool and convolution kernels of this layout ran the shipped ConvNet's gradient ~25%
    faster (see bench/ and README, "Adversarial evaluation: cost")."""
    if any(p.dim() == 4 for p in model.parameters()):
        model.to(memory_format=torch.channels_last)
        if x is not None and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return model if x is None else (model, x)
