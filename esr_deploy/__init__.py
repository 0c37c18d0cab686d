"""esr-deploy: a deployment compiler for efficient single-image super-resolution networks.

The serving API: ``esr_deploy.load(bundle).upscale(image)``
(see :mod:`esr_deploy.runtime.upscaler`). The compile API:
``esr_deploy.compile(source, target)`` (see :mod:`esr_deploy.compiling.api`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from esr_deploy.compiling.options import CompileResult
    from esr_deploy.runtime.upscaler import Upscaler

__version__ = "0.1.0"
__all__ = ["__version__", "compile", "load"]


def load(bundle: str | Path, max_memory: int | None = None, digest: str | None = None) -> Upscaler:
    """Load an engine bundle to upscale images with: ``load(b).upscale(array)``.

    ``digest``: the bundle's ``sha256:…`` digest as ``esr-deploy compile`` printed it; any
    other bundle is refused (pin bundles by digest, as container images are pinned).
    Imported lazily, so that ``import esr_deploy`` (and ``esr-deploy --help``) stays light.
    """
    from esr_deploy.runtime.upscaler import load as load_bundle_for_serving

    return load_bundle_for_serving(bundle, max_memory=max_memory, digest=digest)


def compile(  # shadows the builtin inside this namespace only, as torch.compile does
    source: str | Path | nn.Module,
    target: str = "ort-fp32",
    *,
    val: str | Path | Sequence[str | Path] = (),
    out: str | Path | None = None,
    recipe: str | None = None,
    scale: int | None = None,
    data_range: float | None = None,
    **options: Any,
) -> CompileResult:
    """Compile a model into a validated engine bundle, as ``esr-deploy compile`` does.

    ``source``: a checkpoint path (a zoo recipe is detected, or named with ``recipe=``; a
    user architecture takes ``arch="pkg.module:Class"``, ``arch_args=`` JSON, ``scale=`` and
    ``data_range=``), a ``torch.nn.Module`` (with ``scale=`` and ``data_range=``, 1.0 unless
    given, or ``recipe=``; compiled from a copy), or an ``.onnx`` file with dynamic N, H and W
    (compiled as given; its scale is read from shapes). ``target``: a name from
    ``esr-deploy targets``, or ``"auto"``. ``val``: validation set folder(s) (default: the
    small set that ships with esr-deploy). ``out``: the bundle folder (default
    ``engines/<name>-<target>``). Other keywords are
    :class:`esr_deploy.compiling.CompileOptions` fields, e.g. ``latency_shapes=()`` to skip
    timing or ``max_psnr_drop=0.01``.

    Returns the :class:`~esr_deploy.compiling.CompileResult`: ``bundle`` (the folder),
    ``manifest`` (as written, with ``compile_seconds`` per stage) and ``digest``. Bad input
    raises an :class:`esr_deploy.errors.EsrDeployError` subclass; a failed validation raises
    :class:`~esr_deploy.errors.ValidationError` and writes nothing. Imported lazily, so that
    ``import esr_deploy`` stays light.
    """
    from esr_deploy.compiling.api import compile_source

    return compile_source(
        source, target, val=val, out=out, recipe=recipe, scale=scale, data_range=data_range,
        **options,
    )  # fmt: skip
