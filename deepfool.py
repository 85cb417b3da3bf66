"""Batched DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method to
fool deep neural networks", CVPR 2016, arXiv 1511.04599), multi-class L2 version (Algorithm 2).

Semantics follow the authors' reference code (LTS4/DeepFool, ``Python/deepfool.py``), which is
what DESIGN.md calls the robustness radius:

* the candidate labels are the top-``num_classes`` classes of the clean logits, fixed for the
  whole run; candidate 0 is the original prediction k̂(x0);
* one iteration = at the current point x_i, for every candidate k != k̂:
  w'_k = ∇f_k(x_i) − ∇f_k̂(x_i) and f'_k = f_k(x_i) − f_k̂(x_i); pick
  l = argmin_k |f'_k| / ‖w'_k‖₂ (Algorithm 2, line 8, first minimum on ties); step
  r_i = (|f'_l|/‖w'_l‖ + 1e-4) · w'_l/‖w'_l‖ (eq. 8 plus the code's 1e-4 for stability);
  r_tot += r_i; the next point is x0 + (1 + overshoot)·r_tot (clamped to ``clip`` if given);
* after the step the label at the new point (argmax over *all* logits) is compared with k̂:
  a different label ends the run for that input (converged), otherwise it continues until
  ``max_iter`` steps have been taken (not converged). ``iterations`` counts the steps taken.

Everything is batched: one forward of the active inputs per iteration, then the K−1 candidate
gradients of the whole active batch; inputs that have converged leave the batch.

Gradient strategy (the measurements behind it, per architecture and against foolbox, are printed
by ``bench/bench_deepfool_archs.py`` and recorded in the README; none are kept here):
  * any model: ``_AutogradJacobian``. The model's own forward runs on chunks of rows, keeping
    each chunk's graph, and K−1 ``torch.autograd.grad`` calls per chunk (grad_outputs
    e_k − e_k̂ per row) give the gradients. While it runs, ``conv2d``, eval-mode ``batch_norm``
    and ``avg_pool2d`` calls are intercepted (a ``TorchFunctionMode``): the forward values are the
    model's own, convolutions run with channels_last weights (one memory layout through the whole
    network: mixed layouts are the slowest case), and the backward of these operations is
    replaced by the same linear map computed faster (input gradient only: a matrix product and
    one strided add per kernel tap for convolutions with few input channels, a channels_last
    transposed convolution otherwise; a per-channel product for batch norm, or, for a batch norm
    of a convolution's output, the scale folded into that convolution's transposed weight; the
    average pool's backward on a channels_last cotangent). Finished rows leave the graphs by
    chunk.
  * plain sequential networks (nn.Sequential or cnnmodel.NamedCNN of Conv2d/ReLU/MaxPool2d/
    Flatten/Linear/Dropout) get a hand-written backward, ``_SequentialJacobian``: the K−1
    cotangents of every input go through each transposed layer in one call, and each input's
    backward restarts at the highest layer whose ReLU/max-pool pattern changed since its last
    step (an exact reuse: the layers above are the same linear maps), which the generic path
    cannot do on a graph of unknown structure. Its forward runs in channels_last too (CPU
    max-pooling is several times faster there).
Rejected (measured): ``is_grads_batched=True`` and ``torch.func.vmap`` over ``vjp`` (their
convolution and max-pool backward rules loop over the vmapped dimension), one backward over the
input replicated K−1 times (K−1 forwards).
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# LTS4 adds this to the step length so that the point lands just past the linearised boundary.
STEP_EPS = 1e-4


@dataclass
class DeepFoolResult:
    """Per-input results of :func:`deepfool` (tensors on the device of the input ``x``).

    perturbation: r̂ = adversarial − x; equals (1 + overshoot)·r_tot when ``clip`` is None.
    adversarial:  the point whose label was checked last (x + r̂).
    iterations:   steps taken (int64); orig_label: k̂(x) (int64); adv_label: label at
    ``adversarial`` (int64); converged: the label changed within ``max_iter`` steps (bool).
    stats:        work done, for benchmarks: ``forward_rows`` (inputs pushed through forward
    passes) and ``backward_rows`` (inputs pushed through backward passes, one per candidate).
    """

    perturbation: torch.Tensor
    adversarial: torch.Tensor
    iterations: torch.Tensor
    orig_label: torch.Tensor
    adv_label: torch.Tensor
    converged: torch.Tensor
    stats: dict = field(default_factory=dict)


def _check_arguments(model: nn.Module, x: torch.Tensor, num_classes: int, overshoot: float,
                     max_iter: int, clip, batch_size) -> tuple[float, float] | None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point torch.Tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x: expected a batch N×... with at least 2 dimensions, got shape "
                         f"{tuple(x.shape)}")
    expected = getattr(model, "input_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"x: expected inputs of shape N×{'×'.join(map(str, expected))} for "
                         f"{type(model).__name__}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or infinite values")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an integer >= 1, got {max_iter!r}")
    if not (overshoot >= 0.0 and overshoot < float("inf")):
        raise ValueError(f"overshoot: expected a finite number >= 0, got {overshoot!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected None or an integer >= 1, got {batch_size!r}")
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip: expected None or a pair (low, high), got {clip!r}") from None
    if not lo < hi:
        raise ValueError(f"clip: expected low < high, got {clip!r}")
    return lo, hi


def _forward(model: nn.Module, x: torch.Tensor, n_expected: int, num_classes: int) -> torch.Tensor:
    """Logits of ``x`` (N×C), with the shape checks a caller can act on."""
    try:
        logits = model(x)
    except RuntimeError as exc:  # shape mismatch inside the network
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ValueError(f"x: inputs of shape {tuple(x.shape)} do not fit the model ({first})") from None
    _check_logits(logits, n_expected, num_classes)
    return logits


def _check_logits(logits: torch.Tensor, n_expected: int, num_classes: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != n_expected:
        raise ValueError(f"model: expected logits of shape N×C with N={n_expected}, got "
                         f"{tuple(logits.shape)}")
    if num_classes > logits.shape[1]:
        raise ValueError(f"num_classes: {num_classes} exceeds the model's {logits.shape[1]} logits")


def _conv2d_input_grad(g: torch.Tensor, weight: torch.Tensor, in_shape, stride, padding, dilation,
                       groups: int) -> torch.Tensor:
    """Gradient of ``conv2d(x, weight)`` w.r.t. ``x`` (shape ``in_shape``) for the cotangent ``g``.

    The same linear map as autograd's convolution backward, computed the way oneDNN runs it faster
    on CPU (measurements in bench/ and the README): for few input channels (``GROUPED_MAX_IN`` or
    fewer, e.g. the image layer) as one matrix product with the flattened weight followed by
    :func:`_fold` (col2im: each output position's k×k patch of contributions added back onto the
    input); otherwise as a transposed convolution in channels_last."""
    c_out, c_in_g, kh, kw = weight.shape
    if groups == 1 and c_in_g <= GROUPED_MAX_IN:
        n, _, ho, wo = g.shape
        cols = torch.matmul(weight.reshape(c_out, -1).t(), g.reshape(n, c_out, -1))
        return _fold(cols.view(n, c_in_g, kh, kw, ho, wo), tuple(in_shape[-2:]), dilation, padding, stride)
    # output_padding recovers input sizes that a strided convolution maps to the same output size
    extra = tuple(int(in_shape[2 + d]) - ((int(g.shape[2 + d]) - 1) * stride[d] - 2 * padding[d]
                                           + dilation[d] * (weight.shape[2 + d] - 1) + 1) for d in range(2))
    return F.conv_transpose2d(g.contiguous(memory_format=torch.channels_last),
                              weight.contiguous(memory_format=torch.channels_last), None, stride, padding,
                              extra, groups, dilation)


def _fold(cols: torch.Tensor, size, dilation, padding, stride) -> torch.Tensor:
    """``F.fold`` (col2im) of ``cols`` (N, C, kh, kw, Ho, Wo) onto an (N, C, *size) image: each
    output position's kh×kw patch of contributions added back where the convolution read it. One
    strided add per kernel tap into a zero-padded image, several times faster on CPU than
    ``F.fold`` (its sums in the same order: taps in row-major order)."""
    n, c, kh, kw, ho, wo = cols.shape
    (dh, dw), (ph, pw), (sh, sw) = dilation, padding, stride
    h, w = size
    # the padded image spans every position read: (k − 1)·d + s·(o − 1) + 1 ≤ size + 2·pad
    out = cols.new_zeros(n, c, max(h + 2 * ph, (kh - 1) * dh + sh * (ho - 1) + 1),
                         max(w + 2 * pw, (kw - 1) * dw + sw * (wo - 1) + 1))
    for u in range(kh):
        for v in range(kw):
            out[:, :, u * dh:u * dh + sh * (ho - 1) + 1:sh, v * dw:v * dw + sw * (wo - 1) + 1:sw] += cols[:, :, u, v]
    return out[:, :, ph:ph + h, pw:pw + w]


def _conv2d(x, weight, bias, stride, padding, dilation, groups, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    cl = torch.channels_last
    out = F.conv2d(x, weight.contiguous(memory_format=cl), bias, stride, padding, dilation, groups)
    # With one input channel oneDNN keeps NCHW; the layers after it (and their backward, which
    # gets channels_last cotangents) run much slower on mixed layouts than on one.
    return out if out.is_contiguous(memory_format=cl) else out.contiguous(memory_format=cl)


class _Conv2dInputGrad(torch.autograd.Function):
    """``conv2d`` whose backward gives the input gradient only (:func:`_conv2d_input_grad`);
    the weight and bias get none (DeepFool differentiates w.r.t. the input alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, channels_last):
        ctx.save_for_backward(weight)  # the input gradient is linear in the cotangent: no x needed
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return _conv2d(x, weight, bias, stride, padding, dilation, groups, channels_last)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        return (_conv2d_input_grad(g, weight, *ctx.conf),) + (None,) * 7


def _bn_scale(running_var: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """Eval-mode batch norm's per-channel input-gradient factor γ/√(var + eps) (γ = 1 without affine)."""
    scale = torch.rsqrt(running_var + eps)
    return (scale if weight is None else scale * weight).detach()


class _BatchNormEvalInputGrad(torch.autograd.Function):
    """``batch_norm`` with running statistics (eval mode): the forward is ``F.batch_norm`` itself;
    the backward is its input gradient, the per-channel factor weight/√(var + eps), as one
    multiplication (autograd's batch-norm backward costs about two and reduces over the batch)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        ctx.save_for_backward(_bn_scale(running_var, weight, eps).view((1, -1) + (1,) * (x.dim() - 2)))
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return (g * scale,) + (None,) * 5


class _ConvBatchNormEvalInputGrad(torch.autograd.Function):
    """``batch_norm`` (running statistics) of a convolution's output, differentiated straight to
    the convolution's input: the forward is ``F.batch_norm`` of the convolution's output itself;
    the backward is the convolution's input gradient with the batch-norm scale folded into the
    weight, weight·γ/√(var + eps) per output channel — one transposed convolution instead of a
    per-channel product followed by it (eval-mode batch norm is an affine map per channel)."""

    @staticmethod
    def forward(ctx, x, conv_out, running_mean, running_var, weight, bias, eps, conv_weight, conf):
        scale = _bn_scale(running_var, weight, eps)
        ctx.save_for_backward(conv_weight.detach() * scale.view((-1,) + (1,) * (conv_weight.dim() - 1)))
        ctx.conf = conf
        return F.batch_norm(conv_out, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        (folded,) = ctx.saved_tensors
        return (_conv2d_input_grad(g, folded, *ctx.conf),) + (None,) * 8


class _AvgPool2dChannelsLastGrad(torch.autograd.Function):
    """``avg_pool2d`` of a channels_last input whose backward gets its cotangent in channels_last
    too: a cotangent arriving through ``flatten`` is NCHW, and the CPU backward of a channels_last
    pool is several times slower on it than on a channels_last one (same values)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.save_for_backward(x)
        ctx.conf = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        return (torch.ops.aten.avg_pool2d_backward(g, x, *ctx.conf),) + (None,) * 6


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class _FastConvolutions(TorchFunctionMode):
    """While active, every ``conv2d`` call (``nn.Conv2d`` and ``F.conv2d``, inside any model) runs
    with its weight in channels_last when ``channels_last`` (oneDNN's faster layout: same values,
    different rounding order) and, when its input requires a gradient, through
    :class:`_Conv2dInputGrad`; convolutions with string padding are left as they are. Every
    eval-mode ``batch_norm`` whose input requires a gradient runs through
    :class:`_BatchNormEvalInputGrad`, and every ``avg_pool2d`` of a channels_last input through
    :class:`_AvgPool2dChannelsLastGrad`. Forward values are those of the model's own calls."""

    def __init__(self, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        # id(convolution output) -> (weak reference to it, its input, weight, conv arguments):
        # a batch norm applied to that output is differentiated through both at once
        self._conv_out: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            a = dict(zip(_CONV_ARGS, args), **kwargs)
            x, w, padding = a["input"], a["weight"], a.get("padding", 0)
            if not isinstance(padding, str) and w.dim() == 4:
                stride, dilation = _pair(a.get("stride", 1)), _pair(a.get("dilation", 1))
                groups, bias = a.get("groups", 1), a.get("bias")
                if torch.is_grad_enabled() and x.requires_grad:
                    out = _Conv2dInputGrad.apply(x, w, bias, stride, _pair(padding), dilation, groups,
                                                 self.channels_last)
                    self._conv_out[id(out)] = (weakref.ref(out), x, w, (x.shape, stride, _pair(padding), dilation, groups))
                    return out
                if self.channels_last:
                    return _conv2d(x, w, bias, stride, _pair(padding), dilation, groups, True)
        elif func is F.batch_norm and torch.is_grad_enabled():
            a = dict(zip(_BN_ARGS, args), **kwargs)
            x, mean, var = a["input"], a["running_mean"], a["running_var"]
            if (not a.get("training", False) and mean is not None and var is not None and x.requires_grad
                    and x.dim() >= 2 and not mean.requires_grad and not var.requires_grad):
                conv = self._conv_out.get(id(x))
                if conv is not None and conv[0]() is x:  # the output of a convolution of this forward
                    _, conv_x, conv_w, conf = conv
                    return _ConvBatchNormEvalInputGrad.apply(conv_x, x.detach(), mean, var, a.get("weight"),
                                                             a.get("bias"), a.get("eps", 1e-5), conv_w, conf)
                return _BatchNormEvalInputGrad.apply(x, mean, var, a.get("weight"), a.get("bias"), a.get("eps", 1e-5))
        elif func is F.avg_pool2d and torch.is_grad_enabled():
            a = dict(zip(_AVG_POOL_ARGS, args), **kwargs)
            x = a["input"]
            if (x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous()):
                kernel = list(_pair(a["kernel_size"]))
                stride = list(_pair(a["stride"])) if a.get("stride") not in (None, []) else kernel
                return _AvgPool2dChannelsLastGrad.apply(x, kernel, stride, list(_pair(a.get("padding", 0))),
                                                        a.get("ceil_mode", False), a.get("count_include_pad", True),
                                                        a.get("divisor_override"))
        return func(*args, **kwargs)


class _AutogradJacobian:
    """Candidate gradients through autograd: works for any differentiable model.

    ``forward`` runs the model on chunks of ``GRAPH_CHUNK_ROWS`` inputs and keeps each chunk's
    graph; ``vjp`` runs, chunk by chunk, one backward per candidate (rows are independent, so
    each row gets its own gradient). A chunk's saved activations are read K−1 times in a row, so a
    chunk small enough to stay in cache runs its backward passes faster than one graph of the
    whole batch. The model's own ``forward`` runs (its hooks, its mode), under
    :class:`_FastConvolutions`; a model whose forward rejects channels_last activations (e.g. a
    ``.view`` after a convolution) runs again with them off. Parameters' ``.grad`` is never
    touched (``torch.autograd.grad`` w.r.t. the input only).
    """

    def __init__(self, model: nn.Module, num_classes: int):
        self.model = model
        self.k1 = num_classes - 1
        self.chunk_rows = GRAPH_CHUNK_ROWS
        self.chunks: list = []  # [input (requires grad), logits] per chunk of the last forward
        self.forward_rows = 0   # rows forwarded again by ``select``
        self.channels_last = True

    def _call(self, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            try:
                with _FastConvolutions(True):
                    logits = self.model(x)
                _check_logits(logits, len(x), num_classes)
                return logits
            except (RuntimeError, ValueError):  # rejected channels_last, or a genuine error: see below
                self.channels_last = False
        with _FastConvolutions(False):
            return _forward(self.model, x, len(x), num_classes)

    def forward(self, x: torch.Tensor, keep: bool, num_classes: int) -> torch.Tensor:
        self.chunks = []
        if not keep:
            with torch.no_grad():
                return self._call(x, num_classes)
        return torch.cat([self._forward_chunk(x[i:i + self.chunk_rows], num_classes)
                          for i in range(0, len(x), self.chunk_rows)])

    def _forward_chunk(self, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        xc = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._call(xc, num_classes)
        self.chunks.append([xc, logits])
        return logits.detach()

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """Restrict the graphs to ``rows`` (sorted positions in the last forward's batch) as far as
        pays: a chunk with no such row is dropped; a chunk with finished rows either carries them
        (K−1 backward rows each) or, when that costs more than forwarding its running rows again
        (a backward row costs about a forward row), is forwarded again with those only
        (neighbouring such chunks together). Returns the positions still in the graphs, a sorted
        superset of ``rows``, in the order of the graphs."""
        old, self.chunks = self.chunks, []
        kept, pending, offset = [], [], 0
        num_classes = self.k1 + 1

        def flush():
            if pending:
                x = torch.cat(pending)
                for i in range(0, len(x), self.chunk_rows):
                    self._forward_chunk(x[i:i + self.chunk_rows], num_classes)
                self.forward_rows += len(x)
                pending.clear()

        for xc, logits in old:
            n = len(xc)
            inside = rows[(rows >= offset) & (rows < offset + n)] - offset
            m = len(inside)
            if m and m < self.k1 * (n - m):
                pending.append(xc.detach()[inside])
                kept.append(inside + offset)
            elif m:
                flush()
                self.chunks.append([xc, logits])
                kept.append(torch.arange(offset, offset + n, device=rows.device))
            offset += n
        flush()
        return torch.cat(kept)

    def vjp(self, grad_outputs: torch.Tensor):
        """(N, K−1, C) output cotangents → ``(w, norms, None)``: the (N, K−1, *x.shape[1:]) input
        gradients and their L2 norms (N, K−1), rows in the order of the graphs (the last
        forward's, or the positions ``select`` returned); see :meth:`_SequentialJacobian.vjp`."""
        k1 = grad_outputs.shape[1]
        out, offset = [], 0
        for xc, logits in self.chunks:
            go = grad_outputs[offset:offset + len(xc)]
            out.append(torch.stack([torch.autograd.grad(logits, xc, go[:, j], retain_graph=j < k1 - 1)[0]
                                    for j in range(k1)], dim=1))
            offset += len(xc)
        self.chunks = []  # each graph serves one step: every running row moves after it
        w = torch.cat(out) if len(out) > 1 else out[0]
        return w, w.flatten(2).norm(dim=2), None


class _SequentialJacobian:
    """Candidate gradients of a plain sequential CNN, back-propagated by hand for all candidates
    at once. The cotangents are rows ordered (input, candidate), so each layer's transposed
    operation is one large call over N·(K−1) rows instead of K−1 calls of N rows. Exact: the same
    linear maps autograd applies (ReLU masks, max-pool argmax routing, transposed weights).

    Layouts (each chosen by measurement, see bench/):
    * a convolution with few input channels (``GROUPED_MAX_IN`` or fewer: the image layer) is
      transposed by one grouped ``conv_transpose2d`` over (N, (K−1)·C_out, H, W) with K−1 groups
      (oneDNN is slow with one output channel);
    * the other convolutions are transposed in channels_last;
    * a non-overlapping max-pool (kernel = stride, no padding, sizes divisible) routes its
      cotangent with one multiply by a 0/1 mask of the argmax positions, built once per forward
      and shared by the candidates (a ReLU just before the pool is folded into it), written
      straight in the layout of the transposed convolution that follows; other pools scatter to
      their argmax.
    * a non-overlapping max-pool above a few-channel convolution of stride 1 (the image layer of
      most CNNs) does its routing and that convolution's transposed product in one matrix product
      at the pooled size (``_pool_conv_backward``).
    * rows go through the layers in chunks (``SEQUENTIAL_CHUNK_BYTES``) so that the element-wise
      steps between the products work on data that fits in cache.
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.saved: list = []
        self._grouped_weights: dict = {}
        self._workspace: dict = {}
        self.conv_mode = {i: "grouped" if layer.in_channels // layer.groups <= GROUPED_MAX_IN else "cl"
                          for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)}
        # ReLUs right before a max-pool: applied after it in the forward, their mask folded into
        # the pool's routing (see ``forward``)
        self.relu_into_pool = {i for i, layer in enumerate(layers)
                               if isinstance(layer, nn.ReLU) and i + 1 < len(layers)
                               and isinstance(layers[i + 1], nn.MaxPool2d)}
        # The layout a max-pool writes its routed cotangent in: that of the convolution below it.
        self.route_layout = {i: "cl" if self.conv_mode.get(_next_layer(layers, i, -1, nn.ReLU)) == "cl" else "nchw"
                             for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)}
        # ReLUs (not folded into a pool) right above a convolution transposed grouped (in NCHW)
        self.relu_to_nchw = {i for i, layer in enumerate(layers)
                             if isinstance(layer, nn.ReLU) and i not in self.relu_into_pool
                             and self.conv_mode.get(_next_layer(layers, i, -1)) == "grouped"}
        # A non-overlapping max-pool above a few-channel convolution (stride 1, not dilated, not
        # grouped; with only a ReLU folded into the pool between them): the pool's routing and the
        # convolution's transposed product run as one matrix product at the pooled size
        # (``_pool_conv_backward``) instead of a routing to full size and a transposed convolution.
        self.pool_conv = {}  # pool index -> convolution index
        for i, layer in enumerate(layers):
            j = _next_layer(layers, i, -1, nn.ReLU)
            if not (isinstance(layer, nn.MaxPool2d) and self.conv_mode.get(j) == "grouped"):
                continue
            conv = layers[j]
            if (conv.groups == 1 and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
                    and all(m in self.relu_into_pool for m in range(j + 1, i) if isinstance(layers[m], nn.ReLU))
                    and _pair(layer.kernel_size) == _pair(layer.stride or layer.kernel_size)
                    and _pair(layer.padding) == (0, 0) and _pair(layer.dilation) == (1, 1)):
                (kh, kw), (th, tw) = _pair(layer.kernel_size), conv.kernel_size
                shifts = len(_tap_shifts(kh, th, conv.padding[0])) * len(_tap_shifts(kw, tw, conv.padding[1]))
                # the fused product's multiply-adds over the dense transposed convolution's, times
                # the input channels (the grouped transposed convolution it replaces gets faster
                # with more of them): see POOL_CONV_MAX_COST
                if conv.in_channels * shifts * kh * kw / (th * tw) <= POOL_CONV_MAX_COST:
                    self.pool_conv[i] = j
        self._pool_conv_matrix: dict = {}
        self._forward_w = {i: layers[i].weight.detach().contiguous(memory_format=torch.channels_last)
                           for i in self.conv_mode}
        self.weights_cl = {i: self._forward_w[i] for i, mode in self.conv_mode.items() if mode == "cl"}
        # Linear ← Flatten ← channels_last pool routing: the Linear's transposed product is written
        # in (h, w, C) order (columns of its weight permuted), so the routing reads it contiguously.
        self.flatten_cl = {}  # Flatten index -> Linear index
        for j, layer in enumerate(layers):
            if isinstance(layer, nn.Flatten):
                up, down = _next_layer(layers, j, 1), _next_layer(layers, j, -1)
                if (up < len(layers) and isinstance(layers[up], nn.Linear) and down >= 0
                        and self.route_layout.get(down) == "cl"):
                    self.flatten_cl[j] = up
        # Each Linear's weight, transposed and contiguous: the product g·W as g·(Wᵀ)ᵀ runs faster.
        self._weight_t = {i: layer.weight.detach().t().contiguous()
                          for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)}
        self._permuted_done: set = set()
        # Layers whose backward depends on the input: ReLUs (unless folded into the pool after them)
        # and max-pools. The backward is resumed at these from cached cotangents (see ``vjp``).
        self.mask_layers = [i for i, layer in enumerate(layers)
                            if isinstance(layer, nn.MaxPool2d)
                            or (isinstance(layer, nn.ReLU) and i not in self.relu_into_pool)]
        self.flops = 0          # multiply-adds ×2 of the transposed Linear/Conv2d layers run so far
        self.resumed = {}       # layer -> rows (× candidates) whose backward resumed there
        self._cache = None      # state of the last vjp (rows aligned with ``saved``), see ``vjp``
        self._start = None      # per row of the last forward: the layer its backward must start at

    @staticmethod
    def supports(model: nn.Module) -> list[nn.Module] | None:
        """The layers of ``model`` if it is a plain sequence of supported layers, else None."""
        layers = None
        if type(model) is nn.Sequential:
            layers = list(model)
        else:
            try:
                from cnnmodel import NamedCNN
            except ImportError:  # pragma: no cover - deepfool.py used outside the repo
                NamedCNN = None
            if NamedCNN is not None and isinstance(model, NamedCNN) and type(model).forward is NamedCNN.forward:
                layers = [getattr(model, name) for name in model.layer_names]
        if not layers:
            return None
        for layer in layers:
            if layer._forward_hooks or layer._forward_pre_hooks:
                return None
            # exact types: a subclass may override forward, which the hand-written path would ignore
            if type(layer) is nn.Conv2d:
                if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                    return None
            elif type(layer) is nn.Flatten:
                if layer.start_dim != 1 or layer.end_dim != -1:
                    return None
            elif type(layer) not in (nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity):
                return None
        return layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor, keep: bool, num_classes: int) -> torch.Tensor:
        saved = []
        h = x
        big = 0
        try:
            for i, layer in enumerate(self.layers):
                big = max(big, math.prod(h.shape[1:]))
                if isinstance(layer, nn.MaxPool2d):
                    shape = h.shape
                    h, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                          layer.ceil_mode, return_indices=True)
                    # ReLU → MaxPool runs as MaxPool → ReLU (max commutes with the monotone ReLU,
                    # and a window whose argmax differs has a max <= 0, masked either way): the
                    # ReLU mask at the routed position is (pooled > 0), applied at the pooled size.
                    fused = i - 1 in self.relu_into_pool
                    if fused:
                        h = F.relu(h)
                    saved.append(self._pool_state(i, layer, shape, h, idx, fused) if keep else None)
                elif isinstance(layer, nn.ReLU):
                    before_pool = i in self.relu_into_pool
                    if not before_pool:  # (else applied after the pool)
                        h = F.relu(h)
                    saved.append(None if before_pool or not keep else h > 0)
                else:
                    if i in self.flatten_cl and h.dim() == 4 and self.flatten_cl[i] not in self._permuted_done:
                        j = self.flatten_cl[i]
                        c, hh, ww = h.shape[1:]
                        self._weight_t[j] = (self.layers[j].weight.detach().view(-1, c, hh, ww)
                                             .permute(2, 3, 1, 0).reshape(c * hh * ww, -1).contiguous())
                        self._permuted_done.add(j)
                    saved.append(h.shape)
                    if isinstance(layer, nn.Conv2d):  # channels_last: its convolution and the
                        # max-pool after it run several times faster on CPU than in NCHW
                        h = _conv2d(h, self._forward_w[i], layer.bias, layer.stride, layer.padding,
                                    layer.dilation, layer.groups, True)
                    else:
                        h = layer(h)  # Dropout/Identity: identity in eval mode
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ValueError(f"x: inputs of shape {tuple(x.shape)} do not fit the model ({first})") from None
        _check_logits(h, len(x), num_classes)
        self.saved = saved if keep else []
        self._rows, self._device = len(x), x.device
        self._row_bytes = big * x.element_size()  # the largest activation of one input
        self._start = self._changed_from(self._cache["saved"]) if keep and self._cache is not None else None
        return h

    def _pool_state(self, i, layer, shape, pooled, idx, fused):
        """What the backward of max-pool ``i`` needs: ("mask", full-size 0/1 routing mask) for a
        non-overlapping pool, else ("scatter", input shape, argmax indices, ReLU mask or None)."""
        k, s = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
        n, c, hh, ww = shape
        if (k == s and _pair(layer.padding) == (0, 0) and _pair(layer.dilation) == (1, 1)
                and hh == k[0] * pooled.shape[2] and ww == k[1] * pooled.shape[3]):
            value = (pooled > 0).to(pooled.dtype) if fused else torch.ones_like(pooled)
            mask = pooled.new_zeros(n, c, hh * ww).scatter_(2, idx.flatten(2), value.flatten(2))
            if i in self.pool_conv:  # (N, H/kh, W/kw, kh·kw, C): 1 at the argmax's offset in its window
                hp, wp = pooled.shape[2:]
                mask = mask.view(n, c, hp, k[0], wp, k[1]).permute(0, 2, 4, 3, 5, 1).reshape(n, hp, wp, -1, c)
                return ("offsets", mask, k)
            mask = mask.view(n, c, hh, ww)
            if self.route_layout[i] == "cl":
                mask = mask.contiguous(memory_format=torch.channels_last)
            return ("mask", mask, k)
        return ("scatter", shape, idx, (pooled > 0) if fused else None)

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep only the state of ``rows`` (sorted positions in the last forward's batch); returns them."""
        self.saved = self._subset(self.saved, rows)
        if self._start is not None:
            self._start = self._start[rows]
        if self._cache is not None:  # the cached rows stay where they are; only the map shrinks
            self._cache["pos"] = self._cache["pos"][rows]
        return rows

    def _changed_from(self, old: list) -> torch.Tensor:
        """Per row of the last forward: the highest layer whose activation pattern (ReLU mask or
        max-pool routing) differs from that row in ``old`` (the state of the last vjp, same rows),
        or −1 if none does. Above that layer the backward is the same linear map as at the last
        vjp, so the cotangent arriving there is the cached one."""
        start = torch.full((self._rows,), -1, dtype=torch.int64, device=self._device)
        for i in self.mask_layers:  # ascending: a higher changed layer overwrites a lower one
            a, b = old[i], self.saved[i]
            if isinstance(self.layers[i], nn.MaxPool2d):
                pairs = [(a[1], b[1])] if a[0] in ("mask", "offsets") else [(a[2], b[2]), (a[3], b[3])]
            else:
                pairs = [(a, b)]
            changed = None
            for u, v in pairs:
                if u is not None:
                    ne = (u != v).flatten(1).any(1)
                    changed = ne if changed is None else changed | ne
            if changed is not None:
                start[changed] = i
        return start

    def _subset(self, saved: list, rows) -> list:
        """``saved`` restricted to ``rows`` (a sorted index tensor or a slice)."""
        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        out = []
        for layer, s in zip(self.layers, saved):
            if isinstance(layer, nn.MaxPool2d):
                if s[0] in ("mask", "offsets"):
                    out.append((s[0], s[1][rows], s[2]))
                else:
                    out.append(("scatter", torch.Size((count,) + tuple(s[1][1:])), s[2][rows],
                                None if s[3] is None else s[3][rows]))
            elif isinstance(layer, nn.ReLU):
                out.append(None if s is None else s[rows])
            else:
                out.append(torch.Size((count,) + tuple(s[1:])))
        return out

    @torch.no_grad()
    def vjp(self, grad_outputs: torch.Tensor):
        """(N, K−1, C) output cotangents → ``(w, norms, idx)``: input gradients at the last forward
        and their L2 norms (over each candidate's gradient) for row r of the last forward are
        ``w[idx[r]]`` and ``norms[idx[r]]`` (``idx`` None: row r itself). The gradients stay in
        the cache they are kept in, so that only the rows and candidates used are ever copied.

        The cotangents must be those of the last vjp for the same rows (DeepFool's candidates are
        fixed per input). Each row's backward starts at the highest layer whose activation pattern
        changed since the last vjp, from the cotangent cached there; a row with no change keeps its
        gradients. Exact: unchanged layers are the same linear maps.
        """
        n, k1 = grad_outputs.shape[:2]
        top = len(self.layers) - 1
        if self._start is None or self._cache is None:  # everything from the output
            self._cache = {"w": None, "cot": {top: grad_outputs}, "pos": torch.arange(n, device=grad_outputs.device)}
            start = torch.full((n,), top, dtype=torch.int64, device=grad_outputs.device)
        else:
            start = self._start
        # Cached rows keep their first positions ("pos" maps the current rows to them), so dropping
        # finished rows copies nothing. Rows go through the layers in chunks of ``chunk`` inputs:
        # the (K−1)-fold cotangents of a whole batch are far larger than the cache, and the
        # element-wise steps between the products are then bound by memory.
        c = self._cache
        chunk = max(16, SEQUENTIAL_CHUNK_BYTES // max(1, k1 * self._row_bytes))
        for level in torch.unique(start).tolist():
            if level < 0:  # nothing changed: the cached gradients stand
                continue
            for rows in (start == level).nonzero().squeeze(1).split(chunk):
                # (contiguous ranges as slices: views and plain copies instead of gathers/scatters)
                pos = _as_index(c["pos"][rows])
                rows = _as_index(rows)

                def keep(i, g, pos=pos):
                    if i not in c["cot"]:
                        c["cot"][i] = g.new_empty((len(c["pos"]),) + tuple(g.shape[1:]))
                    c["cot"][i][pos] = g

                saved = self.saved if isinstance(rows, slice) and rows == slice(0, len(start)) else self._subset(self.saved, rows)
                w = self._backward(c["cot"][level][pos], level, saved, keep)
                if c["w"] is None:
                    c["w"] = w.new_empty((len(c["pos"]),) + tuple(w.shape[1:]))
                    c["norm"] = w.new_empty((len(c["pos"]), k1))
                c["w"][pos] = w
                c["norm"][pos] = w.flatten(2).norm(dim=2)
            self.resumed[level] = self.resumed.get(level, 0) + int((start == level).sum()) * k1
        c["saved"] = self.saved
        pos = c["pos"]  # (sorted; all of the cache's rows when as long as it)
        return c["w"], c["norm"], None if len(pos) == len(c["w"]) else pos

    def _backward(self, g: torch.Tensor, first: int, saved: list, keep) -> torch.Tensor:
        """Back-propagate the cotangent ``g`` arriving at the output of layer ``first`` down to the
        input; ``keep(i, cotangent)`` receives the cotangent arriving at each mask layer passed
        (what a later vjp resumes from) and must copy it (it may live in a reused buffer)."""
        n, k1 = g.shape[:2]
        i = first + 1
        while i > 0:
            i -= 1
            layer, s = self.layers[i], saved[i]
            if i in self.mask_layers and i != first:  # (at ``first`` g came from the cache)
                keep(i, g)
            if isinstance(layer, nn.MaxPool2d) and s[0] == "offsets":  # the pool and the
                j = self.pool_conv[i]  # convolution below it at once (no mask layer between)
                g = self._pool_conv_backward(i, j, g, s, saved[j])
                self.flops += self._conv_flops(self.layers[j], n * k1, saved[j])
                i = j
            elif isinstance(layer, nn.Linear):  # (acts on the last dimension of its input, shape s)
                rows = g.reshape(-1, layer.out_features)
                out = self._buffer(("linear", i), (len(rows), layer.in_features), g)
                g = torch.mm(rows, self._weight_t[i].t(), out=out).view(n, k1, *s[1:])
                self.flops += 2 * len(rows) * layer.in_features * layer.out_features
            elif isinstance(layer, nn.ReLU):
                if s is not None:  # (None: folded into the MaxPool2d that follows it)
                    if i in self.relu_to_nchw:  # written straight in the layout the grouped
                        # transposed convolution below reads (a separate copy otherwise)
                        out = self._buffer(("relu", i), g.shape, g)
                        g = torch.mul(g, s.unsqueeze(1), out=out)
                    else:
                        g = g * s.unsqueeze(1)
            elif isinstance(layer, nn.Flatten):
                if i in self.flatten_cl and len(s) == 4:  # g is in (h, w, C) order: see __init__
                    g = g.view(n, k1, s[2], s[3], s[1]).permute(0, 1, 4, 2, 3)
                else:
                    g = g.reshape(n, k1, *s[1:])
            elif isinstance(layer, nn.MaxPool2d):
                if s[0] == "mask":
                    g = _unpool_mask(g, s[1], s[2], self.route_layout[i],
                                     lambda shape, part="out", key=("pool", i), like=g: self._buffer(key + (part,), shape, like))
                else:
                    g = _unpool_scatter(g, s)
            elif isinstance(layer, nn.Conv2d):
                g = self._conv_transpose(i, layer, g, s)
                self.flops += self._conv_flops(layer, n * k1, g.shape[-3:])
            # Dropout / Identity: identity in eval mode
        return g  # (possibly in a reused buffer: ``vjp`` copies it into its cache at once)

    @staticmethod
    def _conv_flops(conv: nn.Conv2d, rows: int, in_shape) -> int:
        """Multiply-adds ×2 of ``conv``'s transposed product for ``rows`` cotangents (the dense count)."""
        out_hw = [(int(in_shape[-2 + d]) + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
                  // conv.stride[d] + 1 for d in range(2)]
        return (2 * rows * conv.out_channels * out_hw[0] * out_hw[1] * (conv.in_channels // conv.groups)
                * conv.kernel_size[0] * conv.kernel_size[1])

    def _pool_conv_backward(self, i: int, j: int, g: torch.Tensor, state, in_shape) -> torch.Tensor:
        """The cotangent ``g`` (N, K−1, C, H/kh, W/kw) at the output of max-pool ``i`` back through
        the pool (with a ReLU folded into it) and the convolution ``j`` below it (``pool_conv``):
        the input gradient of the convolution, (N, K−1, C_in, H_in, W_in).

        With the convolution's output position y = kh·p + a (window p, offset a in the window) and
        its input position y' = kh·m + r (r < kh), stride 1 and padding P give the kernel tap
        t = kh·(m − p) + r + P − a. So the gradient at the input positions of residue r is, for
        each of the few shifts d = m − p that reach a tap, a 1×1 map of the pooled cotangent
        masked per offset (N·(K−1)·H/kh·W/kw rows × kh·kw·C columns, mostly one nonzero per
        window) by a matrix of the convolution's weights: one matrix product for all residues and
        shifts, then one shifted add per shift. The same sums as the routing to full size and the
        transposed convolution, at a quarter of the positions, and no window copy."""
        _, offsets, (kh, kw) = state
        n, k1, c, hp, wp = g.shape
        conv = self.layers[j]
        cin, height, width = conv.in_channels, int(in_shape[2]), int(in_shape[3])
        matrix, shifts_h, shifts_w = self._pool_conv_weights(i, j, g)
        rows = n * k1
        masked = self._buffer(("pool_conv", i, "masked"), (n, k1, hp, wp, kh * kw, c), g)
        torch.mul(g.permute(0, 1, 3, 4, 2).unsqueeze(4), offsets.unsqueeze(1), out=masked)
        cols = self._buffer(("pool_conv", i, "cols"), (len(matrix), rows * hp * wp), g)
        torch.mm(matrix, masked.view(-1, kh * kw * c).t(), out=cols)
        cols = cols.view(cin * kh * kw, len(shifts_h), len(shifts_w), rows, hp, wp)
        mh, mw = -(-height // kh), -(-width // kw)
        acc = self._buffer(("pool_conv", i, "acc"), (cin * kh * kw, rows, mh, mw), g).zero_()
        for a, d in enumerate(shifts_h):  # input row m = p + d
            p0, p1 = max(0, -d), min(hp, mh - d)
            for b, e in enumerate(shifts_w):
                q0, q1 = max(0, -e), min(wp, mw - e)
                if p0 < p1 and q0 < q1:
                    acc[:, :, p0 + d:p1 + d, q0 + e:q1 + e] += cols[:, a, b, :, p0:p1, q0:q1]
        out = acc.view(cin, kh, kw, rows, mh, mw).permute(3, 0, 4, 1, 5, 2).reshape(n, k1, cin, mh * kh, mw * kw)
        if mh * kh != height or mw * kw != width:
            out = out[..., :height, :width].contiguous()
        return out

    def _pool_conv_weights(self, i: int, j: int, like: torch.Tensor):
        """For ``_pool_conv_backward``: the matrix M with
        M[(c_in, r_h, r_w, d_h, d_w), (a_h, a_w, c_out)] = W[c_out, c_in, kh·d_h + r_h + P_h − a_h, kw·d_w + r_w + P_w − a_w]
        (0 where the tap is outside the kernel) and the shifts d_h, d_w that reach a tap."""
        key = (i, like.dtype, like.device)
        if key not in self._pool_conv_matrix:
            conv, pool = self.layers[j], self.layers[i]
            weight = conv.weight.detach().to(like.dtype)
            (kh, kw), (th, tw), (ph, pw) = _pair(pool.kernel_size), conv.kernel_size, conv.padding
            sh, sw = _tap_shifts(kh, th, ph), _tap_shifts(kw, tw, pw)
            m = weight.new_zeros(conv.in_channels, kh, kw, len(sh), len(sw), kh, kw, conv.out_channels)
            for rh, rw, ah, aw in itertools.product(range(kh), range(kw), range(kh), range(kw)):
                for a, d in enumerate(sh):
                    for b, e in enumerate(sw):
                        tap_h = kh * d + rh + ph - ah
                        tap_w = kw * e + rw + pw - aw
                        if 0 <= tap_h < th and 0 <= tap_w < tw:
                            m[:, rh, rw, a, b, ah, aw, :] = weight[:, :, tap_h, tap_w].t()
            self._pool_conv_matrix[key] = (m.reshape(-1, kh * kw * conv.out_channels).contiguous(), sh, sw)
        return self._pool_conv_matrix[key]

    def _buffer(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` for the large intermediate ``key``, reusing the memory of the last
        call: large fresh allocations are fresh pages from the OS whose first-touch faults can cost
        as much as the work itself. Only for intermediates consumed within one ``vjp``."""
        need = math.prod(shape)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._workspace[key] = like.new_empty(need)
        return buf[:need].view(shape)

    def _conv_transpose(self, i: int, conv: nn.Conv2d, g: torch.Tensor, in_shape) -> torch.Tensor:
        n, k1 = g.shape[:2]
        out_hw = g.shape[-2:]
        # output_padding recovers input sizes that a strided convolution maps to the same output size
        extra = tuple(int(in_shape[2 + d]) - ((int(out_hw[d]) - 1) * conv.stride[d] - 2 * conv.padding[d]
                                               + conv.dilation[d] * (conv.kernel_size[d] - 1) + 1)
                      for d in range(2))
        if self.conv_mode[i] == "grouped":
            w = self._grouped_weights.get((i, k1))
            if w is None:
                w = self._grouped_weights[(i, k1)] = conv.weight.detach().repeat(k1, 1, 1, 1)
            out = F.conv_transpose2d(g.reshape(n, k1 * g.shape[2], *out_hw), w, None, conv.stride,
                                     conv.padding, extra, k1 * conv.groups, conv.dilation)
            return out.view(n, k1, -1, *out.shape[-2:])
        rows = g.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        out = F.conv_transpose2d(rows, self.weights_cl[i], None, conv.stride, conv.padding, extra,
                                 conv.groups, conv.dilation)
        return out.unflatten(0, (n, k1))


GRAPH_CHUNK_ROWS = 128  # rows per autograd graph (_AutogradJacobian)
SEQUENTIAL_CHUNK_BYTES = 32 << 20  # _SequentialJacobian: (K−1)·inputs·largest activation per chunk
GROUPED_MAX_IN = 4  # convolutions with at most this many input channels are transposed grouped


# ``_SequentialJacobian.pool_conv``: a pool and the few-channel convolution below it are fused when
# C_in × (the fused product's multiply-adds / the transposed convolution's) is at most this. Whole
# DeepFool runs against the unfused path (1 thread, 200 inputs, a conv → ReLU → 2×2 max-pool image
# layer): 1 channel 5×5 taps (cost 1.44) 1.06×, 3 channels 5×5 (4.3) 1.57×, 1 channel 3×3 (4)
# 1.08×, 3 channels 3×3 (12) 0.89×.
POOL_CONV_MAX_COST = 6.0


def _tap_shifts(k: int, taps: int, pad: int) -> list[int]:
    """For a pool of kernel ``k`` over a stride-1 convolution of ``taps`` taps padded by ``pad``
    (one dimension): the shifts d = m − p between an input block m and a pooled position p that
    reach a tap t = k·d + r + pad − a (0 <= r, a < k) of the kernel."""
    return [d for d in range(-(taps + pad) // k - 1, (taps + pad) // k + 2)
            if any(0 <= k * d + r + pad - a < taps for r in range(k) for a in range(k))]


def _next_layer(layers: list[nn.Module], i: int, step: int, *skip: type) -> int:
    """The index of the nearest layer from ``i`` in direction ``step`` (−1: towards the input) that
    is not an identity in eval mode (Dropout, Identity) nor of a type in ``skip``; −1 or
    ``len(layers)`` past the end."""
    j = i + step
    while 0 <= j < len(layers) and isinstance(layers[j], (nn.Dropout, nn.Identity) + skip):
        j += step
    return j


def _as_index(idx: torch.Tensor):
    """A sorted 1-D index as a slice when it is a contiguous range, else itself."""
    n = len(idx)
    if n and int(idx[-1]) - int(idx[0]) + 1 == n:
        return slice(int(idx[0]), int(idx[0]) + n)
    return idx


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _unpool_mask(g: torch.Tensor, mask: torch.Tensor, kernel: tuple[int, int], layout: str,
                 empty=None) -> torch.Tensor:
    """Backward of a non-overlapping max-pool: each pooled cotangent copied over its window and
    multiplied by the 0/1 argmax mask (N, C, H, W), written in ``layout`` ("cl" or "nchw") into
    ``empty(shape)`` (default: a new tensor; ``empty(shape, "rows")`` for a scratch buffer)."""
    n, k1, c, h, w = g.shape
    kh, kw = kernel
    hh, ww = h * kh, w * kw
    empty = empty or (lambda shape, part="out": g.new_empty(shape))
    if layout == "cl":
        view = empty((n, k1, hh, ww, c)).permute(0, 1, 4, 2, 3)
    else:
        view = empty((n, k1, c, hh, ww))
        # NCHW: a multiply broadcasting g over both window dimensions would run an inner loop of
        # kw elements. Instead g is first repeated over the window's columns (one row of the
        # window), then multiplied with an inner loop over whole output rows. The repeat is a
        # product with a 0/1 matrix where that is exact (one nonzero term per output: CPU, float64
        # or float32 products in full precision; a non-finite cotangent would spread along its
        # row), the fastest way on CPU; else a gather of the columns.
        cols = torch.arange(w, device=g.device).repeat_interleave(kw)
        buffer = empty((n * k1 * c * h, ww), "rows")
        if g.device.type == "cpu" and (g.dtype == torch.float64
                                       or (g.dtype == torch.float32 and _exact_float32_products())):
            spread = torch.zeros(w, ww, dtype=g.dtype, device=g.device)
            spread[cols, torch.arange(ww, device=g.device)] = 1
            rows = torch.mm(g.reshape(-1, w), spread, out=buffer)
        else:
            rows = torch.index_select(g.reshape(-1, w), 1, cols, out=buffer)
        torch.mul(rows.reshape(n, k1, c, h, 1, ww), mask.view(n, 1, c, h, kh, ww),
                  out=view.view(n, k1, c, h, kh, ww))
        return view
    torch.mul(g[:, :, :, :, None, :, None], mask.unflatten(2, (h, kh)).unflatten(4, (w, kw)).unsqueeze(1),
              out=view.unflatten(3, (h, kh)).unflatten(5, (w, kw)))
    return view


def _exact_float32_products() -> bool:
    """Whether float32 matrix products on CPU run in full precision (no TF32/bfloat16 rounding)."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # per-backend ``fp32_precision`` settings are in use: do not rely on it
        return False


def _unpool_scatter(g: torch.Tensor, state) -> torch.Tensor:
    """Backward of any max-pool: each pooled cotangent goes to the argmax of its window."""
    _, shape, idx, relu_mask = state
    n, k1 = g.shape[:2]
    if relu_mask is not None:
        g = g * relu_mask.unsqueeze(1)
    full = g.new_zeros(n, k1, shape[1], shape[2] * shape[3])
    full.scatter_add_(3, idx.flatten(2).unsqueeze(1).expand(-1, k1, -1, -1), g.reshape(n, k1, shape[1], -1))
    return full.view(n, k1, *shape[1:])


def _grad_outputs(cand: torch.Tensor, n_logits: int, dtype) -> torch.Tensor:
    """(N, K−1, C) cotangents e_{cand[:,k]} − e_{cand[:,0]}: their VJPs are w'_k = ∇f_k − ∇f_k̂."""
    n, k = cand.shape
    g = torch.zeros(n, k - 1, n_logits, dtype=dtype, device=cand.device)
    g.scatter_(2, cand[:, 1:].unsqueeze(2), 1.0)
    g.scatter_add_(2, cand[:, :1].expand(n, k - 1).unsqueeze(2),
                   torch.full((n, k - 1, 1), -1.0, dtype=dtype, device=cand.device))
    return g


def _deepfool_batch(model: nn.Module, x0: torch.Tensor, num_classes: int, overshoot: float,
                    max_iter: int, clip: tuple[float, float] | None, stats: dict):
    n = x0.shape[0]
    dev = x0.device
    view = (-1,) + (1,) * (x0.dim() - 1)
    layers = _SequentialJacobian.supports(model)
    jac = _SequentialJacobian(layers) if layers is not None else _AutogradJacobian(model, num_classes)
    rows_before = stats["gradient_rows"]

    # Clean forward, keeping what the backward needs: it gives the candidates and the first
    # iteration's gradients.
    logits = jac.forward(x0, True, num_classes)
    stats["forward_rows"] += n
    n_logits = logits.shape[1]
    cand = logits.topk(num_classes, dim=1).indices  # (n, K); column 0 = k̂(x0)
    orig = cand[:, 0].clone()

    r_tot = torch.zeros_like(x0)
    adversarial = x0.detach().clone()
    iterations = torch.zeros(n, dtype=torch.int64, device=dev)
    adv_label = orig.clone()
    converged = torch.zeros(n, dtype=torch.bool, device=dev)

    active = torch.arange(n, device=dev)  # inputs still running (positions in x0)
    graph_rows = active                   # inputs in the gradient state: a superset of active
    for it in range(1, max_iter + 1):
        if len(graph_rows) != len(active):
            kept = jac.select(torch.searchsorted(graph_rows, active))
            logits, graph_rows = logits[kept], graph_rows[kept]
        # w'_k for the rows of the gradient state (a few finished rows may ride along: see select)
        w, norms, idx = jac.vjp(_grad_outputs(cand[graph_rows], n_logits, x0.dtype))
        stats["gradient_rows"] += (num_classes - 1) * len(graph_rows)
        sel = None
        if len(graph_rows) != len(active):
            sel = torch.searchsorted(graph_rows, active)
            idx = sel if idx is None else idx[sel]
        c = cand[active]
        with torch.no_grad():
            lg = logits if sel is None else logits[sel]
            f = lg.gather(1, c[:, 1:]) - lg.gather(1, c[:, :1])              # f'_k, (m, K-1)
            w_norm = norms if idx is None else norms[idx]                    # ‖w'_k‖, (m, K-1)
            # A zero gradient difference gives no direction: that candidate is never chosen.
            pert = torch.where(w_norm > 0, f.abs() / w_norm, torch.full_like(f, float("inf")))
            best = pert.argmin(dim=1)                                        # l (first minimum)
            m = len(active)
            rows = torch.arange(m, device=dev)
            pert_l = pert[rows, best]
            w_l = w[rows if idx is None else idx, best]
            norm_l = w_norm[rows, best]
            # Inputs with no usable direction (all gradients equal) cannot move: they stop here.
            stuck = ~torch.isfinite(pert_l)
            scale = torch.where(stuck, torch.zeros_like(pert_l), (pert_l + STEP_EPS) / norm_l)
            r_tot[active] += scale.view(view) * w_l                           # r_tot += r_i
            point = x0[active] + (1.0 + overshoot) * r_tot[active]
            if clip is not None:
                point = point.clamp(clip[0], clip[1])
        del w_l
        iterations[active] = it
        adversarial[active] = point

        # Label at the new point (LTS4: k_i = argmax f(x0 + (1+overshoot) r_tot)). When another
        # iteration may follow, this forward keeps what the next gradients need.
        more = it < max_iter
        del w
        logits = jac.forward(point, more, num_classes)
        stats["forward_rows"] += m
        label = logits.argmax(dim=1)
        adv_label[active] = label
        flipped = label != orig[active]
        converged[active] = flipped
        done = flipped | stuck
        if not more:
            break
        graph_rows = active
        if bool(done.any()):
            active = active[~done]
            if len(active) == 0:
                break
    if isinstance(jac, _SequentialJacobian):
        stats["backward_rows"] += sum(jac.resumed.values())
        stats["backward_flops"] += jac.flops
        for i, rows_i in jac.resumed.items():
            name = f"{i}:{type(jac.layers[i]).__name__}"
            stats["resumed_at"][name] = stats["resumed_at"].get(name, 0) + rows_i
    else:
        stats["backward_rows"] += stats["gradient_rows"] - rows_before
        stats["backward_flops"] = None
        stats["forward_rows"] += jac.forward_rows
    perturbation = adversarial - x0 if clip is not None else (1.0 + overshoot) * r_tot
    return perturbation, adversarial, iterations, orig, adv_label, converged


def deepfool(model: nn.Module, x: torch.Tensor, num_classes: int = 10, overshoot: float = 0.02,
             max_iter: int = 50, clip: tuple[float, float] | None = None,
             batch_size: int | None = None) -> DeepFoolResult:
    """DeepFool minimal L2 perturbations of the inputs ``x`` (N×...) for ``model``'s own predictions.

    ``clip=(low, high)`` keeps every perturbed point in that box (not in the LTS4 reference; off by
    default as in DESIGN.md). ``batch_size`` bounds the inputs processed together (None = all).
    The model runs in eval mode (its previous mode is restored) on the device of its parameters;
    no gradient is accumulated into its parameters.
    """
    clip = _check_arguments(model, x, num_classes, overshoot, max_iter, clip, batch_size)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = x.device
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    stats = {"forward_rows": 0, "gradient_rows": 0, "backward_rows": 0, "backward_flops": 0, "resumed_at": {}}
    parts = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, max(step, 1)):
            xb = x[start:start + step].detach().to(device)
            parts.append(_deepfool_batch(model, xb, num_classes, float(overshoot), max_iter, clip,
                                         stats))
    finally:
        model.train(was_training)
    if not parts:  # an empty batch
        empty_i = torch.zeros(0, dtype=torch.int64, device=x.device)
        return DeepFoolResult(torch.zeros_like(x), x.detach().clone(), empty_i, empty_i.clone(),
                              empty_i.clone(), torch.zeros(0, dtype=torch.bool, device=x.device),
                              stats)
    cols = [torch.cat([p[i] for p in parts]).to(x.device) for i in range(6)]
    return DeepFoolResult(*cols, stats=stats)
