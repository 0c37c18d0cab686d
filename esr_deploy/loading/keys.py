"""Key normalisation and strict matching of a state dict against an architecture.

:func:`align_keys` removes wrapper prefixes (``module.``, ``_orig_mod.``, ...) and compares keys
and shapes strictly with what the architecture expects; :func:`key_overlap` scores near misses
so recipes can be ranked; :func:`check_finite` refuses NaN/Inf weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from esr_deploy.errors import CheckpointError, KeyMismatchError
from esr_deploy.loading.checkpoint import REPORT_LIMIT, LoadedCheckpoint

logger = logging.getLogger(__name__)

#: Prefixes that wrappers add to every key: DataParallel/DDP, Lightning modules,
#: ``torch.compile`` and the usual generator/network attribute names.
KNOWN_PREFIXES: tuple[str, ...] = (
    "module.",
    "model.",
    "network.",
    "net.",
    "generator.",
    "_orig_mod.",
)

_NUM_BATCHES_TRACKED = "num_batches_tracked"


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes ``model.load_state_dict(strict=True)`` expects.

    Parameters and persistent buffers (what ``state_dict()`` returns); non-tensor extra
    state is not included.
    """
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor)
    }


def _dotted_prefixes(keys: Iterable[str]) -> list[str]:
    """Every dotted prefix shared by all keys (``"a."``, ``"a.b."``), shortest first."""
    split = [k.split(".")[:-1] for k in keys]
    if not split:
        return []
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return [".".join(common[: i + 1]) + "." for i in range(len(common))]


def _strip_candidates(keys: list[str]) -> list[str]:
    """Prefixes worth removing: repeated known wrapper prefixes and generic shared ones."""
    found: list[str] = [""]
    prefix = ""
    while True:
        rest = [k[len(prefix) :] for k in keys]
        nxt = next((p for p in KNOWN_PREFIXES if rest and all(r.startswith(p) for r in rest)), None)
        if nxt is None:
            break
        prefix += nxt
        found.append(prefix)
    for p in _dotted_prefixes(keys):
        if p not in found:
            found.append(p)
    return found


@dataclass(frozen=True)
class _Rename:
    strip: str
    add: str

    def apply(self, key: str) -> str:
        return self.add + key[len(self.strip) :]

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"removing prefix {self.strip!r}")
        if self.add:
            parts.append(f"adding prefix {self.add!r}")
        return " and ".join(parts) if parts else "keys unchanged"


def _renames(keys: list[str], expected: Mapping[str, tuple[int, ...]]) -> Iterator[_Rename]:
    for strip in _strip_candidates(keys):
        yield _Rename(strip, "")
    for add in _dotted_prefixes(list(expected)):
        for strip in _strip_candidates(keys):
            yield _Rename(strip, add)


def _is_nbt(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _NUM_BATCHES_TRACKED


@dataclass(frozen=True)
class _Comparison:
    rename: _Rename
    renamed: dict[str, Tensor]
    missing: list[str]
    unexpected: list[str]
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    score: float

    @property
    def exact(self) -> bool:
        """Keys and shapes match, ignoring ``num_batches_tracked`` in either direction."""
        return (
            not self.shape_mismatches
            and all(_is_nbt(k) for k in self.missing)
            and all(_is_nbt(k) for k in self.unexpected)
        )


def _compare(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], rename: _Rename
) -> _Comparison:
    renamed = {rename.apply(k): v for k, v in state_dict.items()}
    have = {k: tuple(v.shape) for k, v in renamed.items()}
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    mismatched = [(k, tuple(expected[k]), have[k]) for k in expected if k in have and
                  tuple(expected[k]) != have[k]]  # fmt: skip
    pairs_have = set(have.items())
    pairs_expected = {(k, tuple(s)) for k, s in expected.items()}
    union = len(pairs_have | pairs_expected)
    score = len(pairs_have & pairs_expected) / union if union else 1.0
    return _Comparison(rename, renamed, missing, unexpected, mismatched, score)


def _best_comparison(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> _Comparison:
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"cannot match weights: expected a mapping of tensors — got {type(state_dict)} — "
            "pass LoadedCheckpoint.state_dict"
        )
    keys = [k for k in state_dict if isinstance(k, str)]
    best: _Comparison | None = None
    for rename in _renames(keys, expected):
        if not all(k.startswith(rename.strip) for k in keys):
            continue
        comparison = _compare(state_dict, expected, rename)
        if comparison.exact:
            return comparison
        if best is None or comparison.score > best.score:
            best = comparison
    assert best is not None  # the identity rename always applies
    return best


def _listing(items: list[str]) -> str:
    shown = items[:REPORT_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "".join(f"\n    {item}" for item in shown) + more


def align_keys(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """Rename ``state_dict``'s keys so that keys and shapes match ``expected`` exactly.

    Tries the keys unchanged, then with wrapper prefixes removed (``module.``,
    ``module.model.``, ``_orig_mod.``, any dotted prefix shared by all keys), and with a
    prefix shared by all expected keys added. ``num_batches_tracked`` buffers missing from
    the checkpoint are filled with 0 and surplus ones dropped (BatchNorm does the same).

    Raises:
        KeyMismatchError: no renaming gives a strict match; the message is a diff of
            missing keys, unexpected keys and shape mismatches for the closest renaming.
    """
    best = _best_comparison(state_dict, expected)
    if best.exact:
        aligned = dict(best.renamed)
        for key in best.unexpected:
            del aligned[key]
        for key in best.missing:
            aligned[key] = torch.zeros(expected[key], dtype=torch.long)
        if best.missing or best.unexpected:
            logger.info(
                "num_batches_tracked: %d missing (set to 0), %d unexpected (dropped)",
                len(best.missing), len(best.unexpected),
            )  # fmt: skip
        if best.rename.strip or best.rename.add:
            logger.info("state_dict keys matched after %s", best.rename.describe())
        return aligned
    parts = [
        f"state_dict does not match the architecture (closest key mapping: "
        f"{best.rename.describe()}; {len(best.renamed)} tensors in the checkpoint, "
        f"{len(expected)} expected)"
    ]
    missing = [k for k in best.missing if not _is_nbt(k)] or best.missing
    unexpected = [k for k in best.unexpected if not _is_nbt(k)] or best.unexpected
    if best.missing:
        parts.append(f"\n  {len(missing)} missing keys:{_listing(missing)}")
    if best.unexpected:
        parts.append(f"\n  {len(unexpected)} unexpected keys:{_listing(unexpected)}")
    if best.shape_mismatches:
        lines = [f"{k}: expected {e}, found {f}" for k, e, f in best.shape_mismatches]
        parts.append(f"\n  {len(lines)} shape mismatches:{_listing(lines)}")
    parts.append(
        "\n  check that the architecture and its arguments (channels, blocks, scale) are "
        "the ones the checkpoint was trained with, or pick the recipe that matches it"
    )
    raise KeyMismatchError("".join(parts))


def key_overlap(state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> float:
    """How well ``state_dict`` fits ``expected``, in [0, 1], after the best key renaming.

    Jaccard index of the (key, shape) pairs: 1.0 is a strict match, extra or missing
    tensors and wrong shapes all lower it. Used to rank recipes when none matches.
    """
    best = _best_comparison(state_dict, expected)
    return 1.0 if best.exact else best.score


def check_finite(state_dict: Mapping[str, Tensor]) -> None:
    """Raise :class:`CheckpointError` if a floating-point tensor holds NaN or Inf."""
    bad: list[str] = []
    for name, t in state_dict.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(t.numel() - int(finite.sum()) - n_nan)
        bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf of {t.numel()} values)")
    if bad:
        raise CheckpointError(
            f"checkpoint weights are not finite — {len(bad)} tensors hold NaN or Inf:"
            f"{_listing(bad)}\n  the training run diverged or the file was damaged; use an "
            "earlier checkpoint or the EMA weights"
        )


def load_weights(model: torch.nn.Module, ckpt: LoadedCheckpoint) -> None:
    """Align ``ckpt``'s keys to ``model``, check they are finite, load with ``strict=True``."""
    try:
        aligned = align_keys(ckpt.state_dict, expected_shapes(model))
        check_finite(aligned)
    except CheckpointError as exc:
        raise type(exc)(f"{ckpt.path}: {exc}") from None
    try:
        model.load_state_dict(aligned, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"cannot load {ckpt.path} into {type(model).__name__}: load_state_dict failed — "
            f"{exc} — check the recipe's architecture arguments"
        ) from exc
