"""Graph passes: each one transforms a model into an equivalent, cheaper one (see base.py)."""

from __future__ import annotations

from collections.abc import Sequence

from esr_deploy.errors import EsrDeployError
from esr_deploy.passes.base import Pass
from esr_deploy.passes.fold_batchnorm import FoldBatchNorm
from esr_deploy.passes.fold_identity import FoldIdentity
from esr_deploy.passes.fold_reparam import FoldReparam
from esr_deploy.passes.merge_linear_chains import MergeLinearChains
from esr_deploy.passes.prune_channels import PruneChannels

PASSES: dict[str, type[Pass]] = {
    p.name: p for p in (FoldReparam, FoldBatchNorm, FoldIdentity, MergeLinearChains, PruneChannels)
}
#: What ``compile`` runs unless ``--passes`` says otherwise: the maximal fold first, then the
#: narrower passes for what it had to leave (a costlier or border-drifting maximal region),
#: then exact removal of dead channels (folded convs included).
DEFAULT_PASSES: tuple[str, ...] = (
    "fold-reparam",
    "fold-bn",
    "fold-identity",
    "merge-linear-chains",
    "prune-channels",
)


def build_passes(
    names: Sequence[str], prune_ratio: float | None = None, prune_to: int | None = None
) -> list[Pass]:
    """Pass objects for ``names``; ``prune_ratio``/``prune_to`` make ``prune-channels`` lossy."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise EsrDeployError(
            f"Unknown pass(es) {', '.join(unknown)} — passes are: {', '.join(PASSES)} (or 'none')."
        )
    if (prune_ratio is not None or prune_to is not None) and "prune-channels" not in names:
        raise EsrDeployError(
            "--prune-ratio/--prune-to need the prune-channels pass; add it to --passes."
        )
    return [
        PruneChannels(ratio=prune_ratio, keep=prune_to) if n == "prune-channels" else PASSES[n]()
        for n in names
    ]
