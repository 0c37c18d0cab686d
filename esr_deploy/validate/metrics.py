"""Model metrics as the NTIRE / AIM efficient-SR challenge reports define them.

Definitions follow ``utils/model_summary.py`` of the challenge repositories (Kai Zhang,
Yawei Li, Radu Timofte; AIM 2020 / NTIRE 2022-2023 ESR, e.g. ofsoundof/NTIRE2022_ESR,
bytedance/RLFN), itself derived from sovrasov/flops-counter.pytorch, with the model run once
on a 1×C×H×W input (256×256 in the reports):

- **FLOPs** (the reports' "FLOPs [G]" = this / 1e9) are multiply-accumulates, bias not
  counted, summed over every executed layer call:

  * Conv2d: ``k_h · k_w · C_in · (C_out / groups) · N · H_out · W_out``
    (= ``weight.numel() · N · H_out · W_out``);
  * ConvTranspose2d: the same formula with the *output* size
    (again ``weight.numel() · N · H_out · W_out``, as the utility counts it);
  * Linear: ``in_features · out_features`` per output row
    (= ``weight.numel() · output.numel() / out_features``; the utility's formula agrees for
    2-D inputs);
  * ReLU, PReLU, ELU, LeakyReLU, ReLU6 modules: ``output.numel()``;
  * BatchNorm2d: ``output.numel()``, doubled when affine;
  * everything else (pixel shuffle, additions, functional activations, sigmoid,
    interpolation) counts 0.

- **activations**: number of elements of the outputs of all conv calls
  (``Σ output.numel()``, Radosavovic et al., "Designing Network Design Spaces").
- **convs**: number of conv calls executed (a module called twice counts twice).
- **params**: ``Σ p.numel()`` over ``model.parameters()`` (trainable or not; buffers not
  included).

NTIRE 2024 onwards reports FLOPs from fvcore's ``FlopCountAnalysis``, which also counts one
"flop" per conv multiply-accumulate but handles the non-conv ops differently (matmuls,
upsampling and norms counted, element-wise activations not): the two differ only in those
non-conv terms. This module implements the model-summary definition above; with it the
NTIRE 2023 baseline RFDN measures 0.433 M params, 27.10 G FLOPs and 112.03 M activations,
the figures the NTIRE 2023 ESR results list for it (e.g. as quoted in icandle/PlainUSR's
README), and 64 convs.

Extension (not in the utility): convs made with ``torch.nn.functional.conv2d`` /
``conv_transpose2d`` outside any ``nn.Conv*`` module (e.g. fixed Sobel/Laplacian filters held
in buffers in ECB-style training forms) are counted too, with the same formulas; their
number is reported separately as ``functional_convs`` (the utility's conv count is
``convs − functional_convs``). They are seen through a ``TorchFunctionMode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ModelMetrics", "model_metrics"]

_ELEMENTWISE_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)
_CONV_FUNCS: frozenset[Callable[..., Any]] = frozenset(
    {F.conv2d, torch.conv2d, F.conv_transpose2d, torch.conv_transpose2d}
)


@dataclass(frozen=True)
class ModelMetrics:
    """NTIRE-style counts for one forward pass (see the module docstring for definitions)."""

    params: int
    flops: int
    activations: int
    convs: int
    functional_convs: int = 0
    input_hw: tuple[int, int] = (256, 256)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``input_hw`` as a list)."""
        d = asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d


class _Counter:
    """Mutable accumulator shared by the hooks and the function mode of one measurement."""

    def __init__(self) -> None:
        self.flops = 0
        self.activations = 0
        self.convs = 0
        self.functional_convs = 0
        self.conv_depth = 0  # > 0 while inside an nn.Conv* module's forward

    def add_conv(self, weight: torch.Tensor, output: torch.Tensor) -> None:
        """``weight.numel() · N · H_out · W_out`` MACs; ``output.numel()`` activations."""
        n_positions = output.numel() // output.shape[1] if output.dim() > 1 else 1
        self.flops += int(weight.numel()) * int(n_positions)
        self.activations += int(output.numel())
        self.convs += 1


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_shaped_zeros(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Zeros of the shape ``func`` (a 2-D conv or transposed conv) would return.

    The counts depend on shapes only, so the convs, nearly all of a forward's time, are not
    computed (RLFN at 256×256: about a second on 2 cores before). Shapes follow PyTorch's
    formulas: ``(H + 2p − d(k − 1) − 1) // s + 1`` for a conv (``'same'`` keeps H,
    ``'valid'`` is p = 0); ``(H − 1)s − 2p + d(k − 1) + output_padding + 1`` for a
    transposed conv.
    """
    transposed = func in (F.conv_transpose2d, torch.conv_transpose2d)
    names = ["input", "weight", "bias", "stride", "padding"]
    names += ["output_padding", "groups", "dilation"] if transposed else ["dilation", "groups"]
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    x, weight = given["input"], given["weight"]
    stride, dilation = _pair(given.get("stride", 1)), _pair(given.get("dilation", 1))
    kernel = tuple(int(k) for k in weight.shape[-2:])
    padding = given.get("padding", 0)
    size = []
    for i, extent in enumerate(x.shape[-2:]):
        reach = dilation[i] * (kernel[i] - 1)
        if transposed:
            extra = _pair(given.get("output_padding", 0))[i]
            size.append((extent - 1) * stride[i] - 2 * _pair(padding)[i] + reach + extra + 1)
        elif padding == "same":
            size.append(int(extent))
        else:
            pad = 0 if padding == "valid" else _pair(padding)[i]
            size.append((extent + 2 * pad - reach - 1) // stride[i] + 1)
    channels = weight.shape[1] * int(given.get("groups", 1)) if transposed else weight.shape[0]
    return x.new_zeros((*x.shape[:-3], channels, *size))


class _FunctionalConvCounter(TorchFunctionMode):
    """Stands in for every conv call (zeros of its output's shape, :func:`_conv_shaped_zeros`)
    and counts those that happen outside ``nn.Conv*`` modules."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _CONV_FUNCS:
            return func(*args, **kwargs)
        out = _conv_shaped_zeros(func, args, kwargs)
        if self.counter.conv_depth == 0:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.counter.add_conv(weight, out)  # both tensors: the stand-in read its shape
            self.counter.functional_convs += 1
        return out


def model_metrics(
    model: nn.Module, input_hw: tuple[int, int] = (256, 256), in_channels: int = 3
) -> ModelMetrics:
    """Run ``model`` once on zeros of shape 1×``in_channels``×H×W and count (see module doc).

    Convs are not computed: each returns zeros of its output's shape (the counts depend on
    shapes only), so a forward costs its element-wise ops.

    The model is run in eval mode under ``torch.no_grad()`` on the device and dtype of its
    first parameter (CPU float32 if it has none); its training flag is restored afterwards
    and all hooks are removed even if the forward fails.
    """
    counter = _Counter()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def conv_pre(module: nn.Module, inputs: Any) -> None:
        counter.conv_depth += 1

    def conv_post(module: nn.Module, inputs: Any, output: Any) -> None:
        counter.conv_depth -= 1
        if isinstance(output, torch.Tensor):
            assert isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
            counter.add_conv(module.weight, output)

    def act_post(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            counter.flops += int(output.numel())

    def bn_post(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            assert isinstance(module, nn.BatchNorm2d)
            counter.flops += int(output.numel()) * (2 if module.affine else 1)

    def linear_post(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            assert isinstance(module, nn.Linear)
            rows = output.numel() // max(module.out_features, 1)
            counter.flops += int(module.weight.numel()) * int(rows)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            handles.append(m.register_forward_pre_hook(conv_pre))
            handles.append(m.register_forward_hook(conv_post))
        elif isinstance(m, _ELEMENTWISE_ACTIVATIONS):
            handles.append(m.register_forward_hook(act_post))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(bn_post))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_post))

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(1, in_channels, int(input_hw[0]), int(input_hw[1]), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FunctionalConvCounter(counter):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    params = sum(int(p.numel()) for p in model.parameters())
    return ModelMetrics(
        params=params,
        flops=counter.flops,
        activations=counter.activations,
        convs=counter.convs,
        functional_convs=counter.functional_convs,
        input_hw=(int(input_hw[0]), int(input_hw[1])),
    )
