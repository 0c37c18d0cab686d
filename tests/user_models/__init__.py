"""User architectures defined outside the package, compiled by tests/test_compile.py via --arch.

:func:`tiny_source` is the shared cheapest real compile input: a random-weight
:class:`~user_models.tiny_sr.TinyGatedSR` checkpoint (a compile of it takes seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_ARCH = "user_models.tiny_sr:TinyGatedSR"  # tests/ is on sys.path under pytest


def tiny_args(scale: int) -> dict[str, int]:
    return {"channels": 8, "num_units": 1, "upscale": scale}


def tiny_source(folder: Path, scale: int):  # type: ignore[no-untyped-def]
    """Write ``folder/tiny.pth`` (seeded random weights) and return its ModelSource."""
    import torch

    from esr_deploy.loading.detect import ModelSource
    from user_models.tiny_sr import TinyGatedSR

    torch.manual_seed(0)
    ckpt = folder / "tiny.pth"
    torch.save(TinyGatedSR(**tiny_args(scale)).state_dict(), ckpt)
    return ModelSource(
        checkpoint=ckpt, arch=TINY_ARCH, arch_args=json.dumps(tiny_args(scale)), scale=scale,
        data_range=1.0,
    )  # fmt: skip
