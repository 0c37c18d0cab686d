"""LR shape profiles: the input sizes an engine is built and validated for.

Shared by the compile side (recipes, exporters, TensorRT optimisation profiles) and the runtime
(bundles record the profile; the upscaler tiles what exceeds it), so it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from esr_deploy.errors import EsrDeployError

HW = tuple[int, int]

#: Largest LR frame the default profile admits (a 1080p LR frame, either orientation fits
#: a dynamic-shape engine; TensorRT profiles are derived from it by that backend).
DEFAULT_OPT_HW: HW = (256, 256)
DEFAULT_MAX_HW: HW = (1080, 1920)


@dataclass(frozen=True)
class ShapeProfile:
    """LR input sizes (H, W) an engine is built and validated for.

    ``min`` is ``None`` until the exporter has derived the smallest input the graph accepts
    (networks with a strided conv followed by a large pooling window fail below it).
    """

    opt: HW = DEFAULT_OPT_HW
    max: HW = DEFAULT_MAX_HW
    min: HW | None = None

    def to_dict(self) -> dict[str, list[int] | None]:
        return {
            "min": list(self.min) if self.min else None,
            "opt": list(self.opt),
            "max": list(self.max),
        }


def parse_shape(text: str, option: str = "--shape") -> HW:
    """``"64x64"`` → (64, 64), an LR input H×W.

    Raises:
        EsrDeployError: not ``HxW`` with positive integer sides.
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EsrDeployError(
            f"{option} '{text}' is not a shape — write it as HxW (LR height x width), e.g. 256x256."
        ) from None
    if h < 1 or w < 1:
        raise EsrDeployError(
            f"{option} '{text}' has a side below 1 — give positive sides, e.g. 256x256."
        )
    return h, w
