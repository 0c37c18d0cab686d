"""esr-deploy: a deployment compiler for efficient single-image super-resolution networks.

The serving API: ``esr_deploy.load(bundle).upscale(image)``
(see :mod:`esr_deploy.runtime.upscaler`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esr_deploy.runtime.upscaler import Upscaler

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(bundle: str | Path, max_memory: int | None = None, digest: str | None = None) -> Upscaler:
    """Load an engine bundle to upscale images with: ``load(b).upscale(array)``.

    ``digest``: the bundle's ``sha256:…`` digest as ``esr-deploy compile`` printed it; any
    other bundle is refused (pin bundles by digest, as container images are pinned).
    Imported lazily, so that ``import esr_deploy`` (and ``esr-deploy --help``) stays light.
    """
    from esr_deploy.runtime.upscaler import load as load_bundle_for_serving

    return load_bundle_for_serving(bundle, max_memory=max_memory, digest=digest)
