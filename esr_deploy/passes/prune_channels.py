"""``prune-channels``: remove pruned channels physically, across coupled layers.

**Coupling.** Removing output channel ``c`` of a conv removes ``c`` from every tensor that is
added to, multiplied with, concatenated into or read channel-wise alongside it: residual adds,
attention products (ESA, HFAB), depthwise convs, BatchNorm/PReLU parameters, long skips, and
the input channel ``c`` of every consumer conv. These dependency groups come from
Torch-Pruning's DepGraph (Fang et al., CVPR 2023), built on the model by tracing autograd.
Two rules are esr-deploy's own: a group that reaches the network's output or input is never
pruned (the output's 3 channels are fixed; DepGraph would prune the output of a pixel shuffle
as if it were its input), and a group that contains a pixel shuffle is not pruned either
(its input channels ``c·r² .. c·r²+r²-1`` form one output channel; DepGraph maps them one to
one). Both are reported.

**Exact mode** (default in ``compile``): a channel is removed only when it is provably dead in
every conv that produces it in its group: zero filter and zero bias. A conv that carries a
``prune_mask`` buffer (shape ``[C_out]``, 1 = keep, 0 = pruned; the soft-filter-pruning
convention) has its masked filters and biases zeroed first. A channel with a zero filter but
a non-zero bias is a constant ``v = act(b)``; when every consumer of it is a 1×1 conv it is
folded exactly into the consumers' biases (``b'_o = b_o + Σ W[o, c] · v``) and removed; a
consumer that zero-pads would see ``0`` instead of ``v`` at the border, so those channels are
kept and reported. Every removal is verified on the model's outputs before it is kept.

**Lossy mode** (``--prune-ratio r`` or ``--prune-to N``): in every prunable group whose
channels one conv produces (block-internal widths, attention branches) the channels with the
lowest importance are removed (L1 norm of the producing filters; other criteria plug in
through :data:`IMPORTANCE`), ``floor(r·C)`` of them or down to ``N``. Residual trunks (groups
summed from several convs) are kept and reported: measured on RLFN, removing 25% of the trunk
by L1 without fine-tuning turns the output into noise (values in the tens of thousands on a
0..255 model, float32 and float64 disagreeing by 2e-3). The pass is not exact: the compile
reports the parameter, FLOP, latency and PSNR change in the manifest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from esr_deploy.errors import EsrDeployError, PassError
from esr_deploy.passes.base import Pass, PassContext, PassOutcome, copy_model

log = logging.getLogger(__name__)

#: Relative output change accepted for an exact removal (float32 summation order only).
EXACT_REMOVAL = 1e-5


def _torch_pruning() -> Any:
    """torch_pruning, imported only when this pass runs (it probes optional packages such as
    ``timm`` at import, and a broken one must not break compiles that do not prune)."""
    try:
        import torch_pruning
    except Exception as exc:  # ImportError, or anything a broken optional package raises
        raise EsrDeployError(
            f"The prune-channels pass needs torch_pruning, which failed to import — "
            f"{type(exc).__name__}: {exc} — reinstall it (pip install 'torch-pruning>=1.5') "
            "or fix the package it names, or leave the pass out with --passes "
            "fold-reparam,fold-bn,fold-identity,merge-linear-chains."
        ) from exc
    return torch_pruning


Importance = Callable[[list[tuple[nn.Conv2d, list[int]]]], torch.Tensor]


def l1_importance(producers: list[tuple[nn.Conv2d, list[int]]]) -> torch.Tensor:
    """Per group channel: the L1 norm of its filters in every producing conv, summed."""
    total: torch.Tensor | None = None
    for conv, idxs in producers:
        norms = conv.weight.detach().abs().flatten(1).sum(1)[idxs].double()
        total = norms if total is None else total + norms
    assert total is not None, "a group has at least its root conv"
    return total


IMPORTANCE: dict[str, Importance] = {"l1": l1_importance}


def apply_prune_masks(model: nn.Module) -> list[str]:
    """Zero the filters (and biases) that a ``prune_mask`` buffer marks as pruned."""
    notes = []
    for name, module in model.named_modules():
        mask = getattr(module, "prune_mask", None)
        if not isinstance(module, nn.Conv2d) or not isinstance(mask, torch.Tensor):
            continue
        if mask.numel() != module.out_channels:
            raise PassError(
                f"{name}.prune_mask has {mask.numel()} entries but the conv has "
                f"{module.out_channels} output channels — a prune_mask marks output channels "
                "(1 = keep, 0 = pruned)."
            )
        dead = (mask.flatten() == 0).nonzero().flatten()
        if len(dead):
            with torch.no_grad():
                module.weight[dead] = 0
                if module.bias is not None:
                    module.bias[dead] = 0
            notes.append(f"{name}: prune_mask zeroes {len(dead)} of {module.out_channels} filters")
    return notes


def _conv_items(group: Any, handler: Callable[..., Any]) -> list[tuple[nn.Conv2d, list[int]]]:
    optype = _torch_pruning().ops.OPTYPE
    out = []
    for item in group.items:
        dep = item.dep
        if dep.target.type in (optype.CONV, optype.DEPTHWISE_CONV) and dep.handler == handler:
            out.append((dep.target.module, [int(i) for i in item.idxs]))
    return out


def _why_not_prunable(group: Any) -> str | None:
    output = _torch_pruning().ops.OPTYPE.OUTPUT
    for item in group.items:
        target = item.dep.target
        if target.type == output:
            return "it reaches the network output"
        if isinstance(target.module, nn.PixelShuffle) or "PixelShuffle" in str(target.name):
            return "it passes through a pixel shuffle"
    return None


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


class PruneChannels(Pass):
    """See the module docstring; ``ratio``/``keep`` select lossy mode."""

    name = "prune-channels"
    in_place = True

    def __init__(
        self, ratio: float | None = None, keep: int | None = None, importance: str = "l1"
    ) -> None:
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise PassError(f"--prune-ratio must be between 0 and 1, got {ratio}.")
        if keep is not None and keep < 1:
            raise PassError(f"--prune-to must be at least 1 channel, got {keep}.")
        if importance not in IMPORTANCE:
            raise PassError(f"Unknown importance '{importance}': {', '.join(IMPORTANCE)}.")
        self.ratio, self.keep, self.importance = ratio, keep, IMPORTANCE[importance]
        self.lossy = ratio is not None or keep is not None
        # lossy pruning changes the output on purpose; the compile reports what it cost
        self.tolerance = math.inf if self.lossy else EXACT_REMOVAL

    def run(self, model: nn.Module, context: PassContext) -> PassOutcome:
        notes = apply_prune_masks(model)
        sample = context.sample().to(next(model.parameters()).dtype)
        if self.lossy:
            model, removed, more = self._lossy(model, sample)
        else:
            model, removed, more = self._exact(model, sample)
        notes += more
        total = sum(removed.values())
        notes.insert(
            0,
            f"{'lossy' if self.lossy else 'exact'}: removed {total} channels in "
            f"{len(removed)} groups"
            if total
            else "no channel removed",
        )
        return PassOutcome(
            model=model,
            modified=total > 0,
            details=tuple(notes),
            extra={"mode": "lossy" if self.lossy else "exact", "removed": removed},
        )

    # ------------------------------------------------------------------ exact

    def _exact(
        self, model: nn.Module, sample: torch.Tensor
    ) -> tuple[nn.Module, dict[str, int], list[str]]:
        tp = _torch_pruning()
        removed: dict[str, int] = {}
        notes: list[str] = []
        done: set[str] = set()
        while True:
            candidate = self._next_dead(model, sample, done)
            if candidate is None:
                return model, removed, notes
            name, dead, constant = candidate
            done.add(name)
            trial = copy_model(model)
            conv = trial.get_submodule(name)
            graph = tp.DependencyGraph().build_dependency(trial, example_inputs=sample)
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dead)
            reason = _why_not_prunable(group)
            producers = _conv_items(group, tp.prune_conv_out_channels)
            if reason is None:
                reason = self._check_dead(producers, constant)
            if reason is None and constant:
                reason = _fold_constants(trial, group, sample)
            if reason is not None:
                notes.append(f"{name}: {len(dead)} dead channel(s) kept — {reason}")
                continue
            group.prune()
            if not _same_output(model, trial, sample):
                notes.append(
                    f"{name}: {len(dead)} dead channel(s) kept — removing them "
                    "changed the output (an op in their group is not zero-preserving)"
                )
                continue
            model = trial
            removed[name] = len(dead)
            notes.append(
                f"{name}: removed {len(dead)} channel(s) from a group of "
                f"{len(producers)} producing conv(s)"
            )

    def _next_dead(
        self, model: nn.Module, sample: torch.Tensor, done: set[str]
    ) -> tuple[str, list[int], bool] | None:
        for name, m in model.named_modules():
            if not isinstance(m, nn.Conv2d) or name in done:
                continue
            zero_filter = m.weight.detach().flatten(1).abs().amax(1) == 0
            if m.bias is None:
                zero_bias = torch.ones_like(zero_filter)
            else:
                zero_bias = m.bias.detach() == 0
            dead = (zero_filter & zero_bias).nonzero().flatten().tolist()
            if dead:
                return name, dead, False
            constant = (zero_filter & ~zero_bias).nonzero().flatten().tolist()
            if constant:
                return name, constant, True
        return None

    @staticmethod
    def _check_dead(producers: list[tuple[nn.Conv2d, list[int]]], constant: bool) -> str | None:
        if constant and len(producers) > 1:
            return "a constant channel shared by several producing convs (a residual sum)"
        for conv, idxs in producers:
            w = conv.weight.detach().flatten(1)[idxs]
            if float(w.abs().max()) != 0.0:
                return "another conv in their group still produces them"
            bias = conv.bias.detach() if conv.bias is not None else None
            if not constant and bias is not None and float(bias[idxs].abs().max()):
                return "another conv in their group adds a bias to them"
        return None

    # ------------------------------------------------------------------ lossy

    def _lossy(
        self, model: nn.Module, sample: torch.Tensor
    ) -> tuple[nn.Module, dict[str, int], list[str]]:
        tp = _torch_pruning()
        removed: dict[str, int] = {}
        notes: list[str] = []
        handled: set[str] = set()
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        for name in convs:
            if name in handled:
                continue
            conv = model.get_submodule(name)
            assert isinstance(conv, nn.Conv2d)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=sample)
            group = graph.get_pruning_group(
                conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels))
            )
            names = _names(model)
            producers = _conv_items(group, tp.prune_conv_out_channels)
            handled.update(names[c] for c, _ in producers)
            reason = _why_not_prunable(group)
            if reason is None and len(producers) > 1:
                reason = (
                    f"its channels are a residual sum of {len(producers)} convs; pruning "
                    "a residual trunk without fine-tuning destroys the model"
                )
            if reason is not None:
                notes.append(f"{name}: group kept — {reason}")
                continue
            channels = int(conv.out_channels)
            keep: int = (
                self.keep
                if self.keep is not None
                else channels - math.floor((self.ratio or 0.0) * channels)
            )
            drop = channels - max(1, min(keep, channels))
            if drop <= 0:
                continue
            scores = self.importance(producers)
            idxs = torch.argsort(scores)[:drop].tolist()
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
            group.prune()
            removed[name] = drop
            notes.append(
                f"{name}: removed {drop} of {channels} channels (group of "
                f"{len(producers)} producing conv(s))"
            )
        return model, removed, notes


def _same_output(before: nn.Module, after: nn.Module, sample: torch.Tensor) -> bool:
    gen = torch.Generator().manual_seed(7)
    inputs = [
        sample,
        torch.rand(
            1,
            sample.shape[1],
            sample.shape[2] + 3,
            sample.shape[3] + 5,
            generator=gen,
            dtype=sample.dtype,
        )
        * float(sample.max()),
    ]
    with torch.no_grad():
        for x in inputs:
            a, b = before(x), after(x)
            span = max(float(a.max() - a.min()), 1e-12)
            if a.shape != b.shape or float((a - b).abs().max()) / span > EXACT_REMOVAL:
                return False
    return True


def _fold_constants(model: nn.Module, group: Any, sample: torch.Tensor) -> str | None:
    """Fold constant channels into the biases of the 1×1 convs that read them.

    The constant each consumer sees is measured on ``sample`` (the producer's bias after the
    ops between, e.g. an activation); every consumer must be a 1×1 conv without padding.
    """
    consumers = _conv_items(group, _torch_pruning().prune_conv_in_channels)
    if not consumers:
        return "no conv reads them"
    for conv, _ in consumers:
        if conv.kernel_size != (1, 1) or conv.padding not in ((0, 0), 0) or conv.groups != 1:
            return (
                "a consumer conv zero-pads or is grouped, so the constant cannot be folded "
                "into its bias at the image border"
            )
    seen: dict[nn.Conv2d, torch.Tensor] = {}

    def grab(conv: nn.Conv2d) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Sequence[torch.Tensor]) -> None:
            seen[conv] = args[0].detach()

        return hook

    handles = [c.register_forward_pre_hook(grab(c)) for c, _ in consumers]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    for conv, idxs in consumers:
        x = seen[conv][:, idxs]
        values = x.mean(dim=(0, 2, 3))
        if float((x - values.view(1, -1, 1, 1)).abs().max()) > 1e-6 * max(
            float(values.abs().max()), 1.0
        ):
            return "the channel is not constant where a consumer reads it"
        with torch.no_grad():
            shift = (conv.weight[:, idxs, 0, 0] * values.to(conv.weight.dtype)).sum(1)
            if conv.bias is None:
                conv.bias = nn.Parameter(shift)
            else:
                conv.bias += shift
    return None
