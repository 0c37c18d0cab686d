"""Where the files that ship with esr-deploy live: recipes, example checkpoint, default set."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def recipes_dir() -> Path:
    """The zoo's recipe folder: ``recipes/`` of a source checkout, or its copy inside a wheel."""
    packaged = PACKAGE_DIR / "_recipes"
    if packaged.is_dir():
        return packaged
    return PACKAGE_DIR.parent / "recipes"


def default_val_dir() -> Path:
    """The small validation set that ships with the package (``HR/`` and ``LR_bicubic/X<s>/``)."""
    return ASSETS_DIR / "set5_crops"


def example_checkpoint() -> Path:
    """The bundled example checkpoint used by ``make demo`` (official RLFN x4 weights)."""
    return ASSETS_DIR / "rlfn_x4.pth"


def cache_root() -> Path:
    """Caches (calibration statistics, TensorRT timing caches): ``$ESR_DEPLOY_CACHE``, else
    ``$XDG_CACHE_HOME/esr-deploy``, else ``~/.cache/esr-deploy``."""
    if os.environ.get("ESR_DEPLOY_CACHE"):
        return Path(os.environ["ESR_DEPLOY_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "esr-deploy"
    return Path.home() / ".cache" / "esr-deploy"
