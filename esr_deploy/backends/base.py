"""The backend interface: build an engine from ONNX, load it, run it.

A backend is imported lazily by :mod:`esr_deploy.targets` and is the only module that imports
its runtime (``onnxruntime``, ``tensorrt``): ``esr-deploy --help`` and the test suite work
without any of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esr_deploy.errors import ExportError
from esr_deploy.shapes import ShapeProfile

if TYPE_CHECKING:
    from torch import nn

    from esr_deploy.precision.calibration import CalibrationSet
    from esr_deploy.precision.int8_kernels import Int8Kernels
    from esr_deploy.runtime.manifest import Manifest


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not (and what to do)."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class BuiltEngine:
    """What a backend wrote into the bundle: the engine file and facts for the manifest."""

    engine_file: str  # relative to the bundle folder
    backend_version: str
    device: Mapping[str, Any]
    settings: Mapping[str, Any] = field(default_factory=dict)


class EngineSession(ABC):
    """A loaded engine. ``run`` takes and returns float32 NCHW arrays."""

    @abstractmethod
    def run(self, lr: np.ndarray) -> np.ndarray: ...


class Backend(ABC):
    """One runtime (ONNX Runtime CPU, TensorRT, ...)."""

    name: str
    #: False for backends whose engine is a hand-off artefact checked by emulation
    measures_latency: bool = True

    @abstractmethod
    def availability(self, precision: str) -> Availability: ...

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def device(self) -> Mapping[str, Any]:
        """This machine, described as the manifest records it (CPU flags, GPU name, ...)."""

    @abstractmethod
    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        """Build the engine for ``onnx_path`` into ``bundle_dir``. ``profile``: the LR sizes
        it must accept (``min`` derived by the exporter), for backends that fix shapes at
        build time (TensorRT optimisation profiles); others ignore it."""

    @abstractmethod
    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession: ...

    def int8_kernels(self) -> Int8Kernels | None:
        """What this backend's int8 convolutions do on this CPU (measured), which sets the
        int8 weights' range; None for runtimes that accumulate in int32 whatever the CPU
        (TensorRT, the portable hand-off ONNX), whose weights keep the full ±127."""
        return None

    def check_engine(self, manifest: Manifest) -> None:
        """Refuse a bundle's engine that this machine cannot run (raises ``BundleError`` with
        what was expected and what was found). Default: same backend version, and a CPU with
        the ISA flags the engine was optimised for."""
        from esr_deploy.runtime.bundle_reader import check_device

        check_device(manifest, self.version(), self.device())


@dataclass(frozen=True)
class ModelBuild:
    """What a :class:`ModelBackend` built: the engine, and for reduced precision what stayed
    in float32 and why (the manifest's ``precision_onnx`` section, which the report shows)."""

    engine: BuiltEngine
    precision_info: Mapping[str, Any] | None = None


class ModelBackend(Backend):
    """A backend that compiles the PyTorch deploy form itself (AOTInductor), not the ONNX.

    The compiler hands it the model, the shape profile, the calibration images (for reduced
    precision) and the validation inputs (to check reduced precision stays in range)."""

    @abstractmethod
    def build_model(
        self,
        model: nn.Module,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile,
        calibration: CalibrationSet | None,
        check_inputs: Sequence[np.ndarray],
    ) -> ModelBuild: ...

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        raise ExportError(
            f"The {self.name} backend compiles the PyTorch model, not an ONNX file — "
            f"{onnx_path.name} cannot be built — compile the checkpoint with esr-deploy compile."
        )
