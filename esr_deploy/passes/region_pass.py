"""The driver the region-folding passes share: analyse, choose, fold, repeat.

Each round traces the model once (:func:`affine_ops.analyse` on the compile's sample), asks
the pass for groups of regions (:meth:`RegionFoldingPass.candidates`, folded together or not
at all), computes every group's folds (:func:`region_fold.compute_fold`), keeps those that are
worth it (by default: ``Σ cost_after <= conv MACs replaced``) and exact at the border unless
``--accept-border-drift`` was given, applies them, and repeats until a round folds nothing
(at most :data:`MAX_ROUNDS`). A group rejected once is not tried again; the regions left
unfolded are reported with the reason unless a later, narrower fold covered them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import fx, nn

from esr_deploy.passes.affine_ops import Analysis, analyse, trace
from esr_deploy.passes.base import Pass, PassContext, PassOutcome
from esr_deploy.passes.linear_region import Region
from esr_deploy.passes.region_fold import (
    EXACT,
    Fold,
    apply_fold,
    compute_fold,
    conv_cost,
    param_dtype,
)

#: Rounds of analyse → fold; one round normally suffices, a second confirms nothing is left.
MAX_ROUNDS = 5


class RegionFoldingPass(Pass):
    """Shared driver: analyse, let the subclass choose region groups, fold, repeat.

    Subclasses implement :meth:`candidates` (groups of regions that are folded together or
    not at all) and may override :meth:`worth_folding`.
    """

    prefix: ClassVar[str] = "folded"

    @abstractmethod
    def candidates(self, analysis: Analysis) -> list[list[Region]]: ...

    def worth_folding(self, gm: fx.GraphModule, analysis: Analysis, folds: Sequence[Fold]) -> bool:
        """Default: the folded convs cost no more than the convs they replace."""
        nodes = {n for f in folds for n in f.region.nodes}
        return sum(f.cost_after for f in folds) <= conv_cost(gm, analysis, nodes)

    def run(self, model: nn.Module, context: PassContext) -> PassOutcome:
        try:
            gm = trace(model)
        except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
            return PassOutcome(
                model=model,
                modified=False,
                details=(
                    f"not applied: the model cannot be traced by torch.fx ({type(exc).__name__}: "
                    f"{str(exc)[:200]})",
                ),
            )
        details: list[str] = []
        skipped: dict[str, str] = {}  # region output -> why it was not folded
        rejected: set[str] = set()
        drift = 0.0
        folded = 0
        for _ in range(MAX_ROUNDS):
            analysis = analyse(gm, context.sample().to(param_dtype(gm)))
            plan: list[list[Fold]] = []
            planned: set[fx.Node] = set()
            for group in self.candidates(analysis):
                nodes = {n for r in group for n in r.nodes}
                key = ",".join(sorted(n.name for n in nodes))
                if key in rejected or nodes & planned:
                    continue
                maybe = [compute_fold(gm, analysis, r) for r in group]
                ok = [f for f in maybe if f is not None]
                if len(ok) != len(maybe):
                    rejected.add(key)
                    continue
                if not self.worth_folding(gm, analysis, ok):
                    before = conv_cost(gm, analysis, nodes)
                    after = sum(f.cost_after for f in ok)
                    if after > before > 0:  # silent for "already one conv" / "no conv"
                        k = "x".join(str(d) for d in ok[0].weight.shape[-2:])
                        skipped[group[-1].output.name] = (
                            f"region ending at {group[-1].output.name}: not folded — the "
                            f"{k} conv would cost {after} multiply-accumulates per pixel vs "
                            f"{before} for the convs it replaces"
                        )
                    rejected.add(key)
                    continue
                worst = max(f.border_error for f in ok)
                if worst > EXACT and not context.accept_border_drift:
                    skipped[group[-1].output.name] = (
                        f"region ending at {group[-1].output.name}: not folded — the fold "
                        f"differs at the image border by {worst:.3g} of the output's "
                        "magnitude (zero padding where the training form pads with a bias); "
                        "pass --accept-border-drift to fold it"
                    )
                    rejected.add(key)
                    continue
                plan.append(ok)
                planned |= nodes
            if not plan:
                break
            replaced: dict[fx.Node, fx.Node] = {}
            for applied in plan:
                names = [apply_fold(gm, f, self.prefix, replaced) for f in applied]
                ops = sum(len(f.region.compute_nodes) for f in applied)
                worst = max(f.border_error for f in applied)
                drift = max(drift, worst if worst > EXACT else 0.0)
                details.append(
                    f"{'+'.join(names)}: {ops} ops → {len(applied)} conv(s) "
                    f"{'x'.join(str(s) for s in applied[0].weight.shape[-2:])}"
                    + (f", border drift {worst:.3g} accepted" if worst > EXACT else "")
                )
                folded += 1
        # report regions left unfolded only if no later fold (below a cut point) covered them
        remaining = {n.name for n in gm.graph.nodes}
        details += [why for name, why in skipped.items() if name in remaining]
        return PassOutcome(
            model=gm, modified=folded > 0, details=tuple(details), border_drift=drift
        )
