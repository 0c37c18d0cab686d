"""Graph passes: each one transforms a model into an equivalent, cheaper one (see base.py)."""

from __future__ import annotations

from collections.abc import Sequence

from esr_deploy.errors import EsrDeployError
from esr_deploy.passes.base import Pass
from esr_deploy.passes.fold_batchnorm import FoldBatchNorm
from esr_deploy.passes.fold_identity import FoldIdentity
from esr_deploy.passes.fold_reparam import FoldReparam
from esr_deploy.passes.merge_linear_chains import MergeLinearChains

PASSES: dict[str, type[Pass]] = {
    p.name: p for p in (FoldReparam, FoldBatchNorm, FoldIdentity, MergeLinearChains)
}
#: What ``compile`` runs unless ``--passes`` says otherwise: the maximal fold first, then the
#: narrower passes for what it had to leave (a costlier or border-drifting maximal region).
DEFAULT_PASSES: tuple[str, ...] = (
    "fold-reparam",
    "fold-bn",
    "fold-identity",
    "merge-linear-chains",
)


def build_passes(names: Sequence[str]) -> list[Pass]:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise EsrDeployError(
            f"Unknown pass(es) {', '.join(unknown)} — passes are: {', '.join(PASSES)} (or 'none')."
        )
    return [PASSES[n]() for n in names]
