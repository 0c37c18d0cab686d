"""Which ONNX a TensorRT build accepts and which machine a TensorRT engine runs on.

- **Precision is the ONNX's.** TensorRT 10 deprecated and TensorRT 11 removed the precision
  builder flags and implicit INT8 calibration; a strongly typed network takes every tensor's
  type from the ONNX. :func:`check_onnx_precision` refuses an ONNX that does not hold the
  precision asked for (fp16: a float16 tensor; int8: a QuantizeLinear node; fp32: neither),
  since TensorRT would silently build a float32 engine from it.
- **A plan runs only where it was built**: with the TensorRT version and on the GPU compute
  capability it was built for, unless built *version-compatible* (runs on the same or a newer
  TensorRT 10/11) or *hardware-compatible* (``AMPERE_PLUS``: any GPU of compute capability
  ≥ 8.0). :func:`check_gpu_engine` checks a bundle's manifest against this machine.

Pure Python (onnx only): no TensorRT needed, so both checks are tested on any machine.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from esr_deploy.errors import BundleError, ExportError
from esr_deploy.gpu import cc_tuple

log = logging.getLogger(__name__)

#: Hardware-compatible (``AMPERE_PLUS``) engines run on, and are built on, these GPUs.
AMPERE = (8, 0)


#: TensorRT major versions whose Python API this module uses.
SUPPORTED_TRT_MAJORS = (10, 11)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def check_onnx_precision(onnx_path: Path, precision: str) -> None:
    """Refuse an ONNX whose tensors do not hold ``precision`` (strongly typed builds take it
    from the ONNX): ``fp16`` needs float16 tensors, ``int8`` QuantizeLinear nodes, ``fp32``
    neither."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    fp16 = onnx.TensorProto.FLOAT16
    has_fp16 = (
        any(t.data_type == fp16 for t in graph.initializer)
        or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
            for n in graph.node
        )
        or any(
            v.type.tensor_type.elem_type == fp16
            for v in [*graph.input, *graph.output, *graph.value_info]
        )
    )
    has_qdq = any(n.op_type == "QuantizeLinear" for n in graph.node)
    seen = ", ".join(
        [w for w, present in (("float16 tensors", has_fp16), ("Q/DQ nodes", has_qdq)) if present]
    )
    problem = {
        "fp32": "it holds " + seen if seen else "",
        "fp16": "" if has_fp16 else "it has no float16 tensor",
        "int8": "" if has_qdq else "it has no QuantizeLinear node",
    }.get(precision, f"{precision} is not a TensorRT precision")
    if problem:
        made_by = {
            "fp32": "the fp32 export",
            "fp16": "the float16 ONNX that esr-deploy's fp16 pass writes",
            "int8": "the explicit Q/DQ ONNX that esr-deploy's int8 pass writes",
        }.get(precision, "an ONNX of that precision")
        raise ExportError(
            f"TensorRT {precision} needs an ONNX in that precision: a strongly typed network "
            f"takes every tensor's type from the ONNX — {onnx_path.name}: {problem} — build "
            f"from {made_by}."
        )


def check_gpu_engine(
    manifest_engine: Mapping[str, Any],
    found_device: Mapping[str, Any],
    found_trt_version: str,
) -> None:
    """Refuse to run a TensorRT engine on a machine it was not built for.

    ``manifest_engine`` is the manifest's ``engine`` entry (``backend_version``, ``device``,
    ``settings``); ``found_device`` is :func:`esr_deploy.gpu.gpu_info` (or
    :meth:`TensorRT.device`) here.

    - TensorRT version: must equal the one the engine was built with; a version-compatible
      engine also runs on any newer TensorRT 10.x/11.x.
    - Compute capability: must equal the one it was built for; a hardware-compatible
      (``ampere+``) engine runs on any GPU of compute capability ≥ 8.0.
    - GPU name: a different GPU model of the same compute capability runs the engine
      correctly (tactics timed on the other model may be slower here); this is only logged as
      a warning, never refused.

    Raises :class:`BundleError` naming what was expected and what was found.
    """
    built_device: Mapping[str, Any] = manifest_engine.get("device") or {}
    settings: Mapping[str, Any] = manifest_engine.get("settings") or {}
    built_trt = str(built_device.get("tensorrt") or manifest_engine.get("backend_version"))
    version_compatible = bool(
        settings.get("version_compatible", built_device.get("version_compatible", False))
    )
    hardware = str(
        settings.get("hardware_compatibility", built_device.get("hardware_compatibility", "none"))
    )

    found_v, built_v = version_tuple(found_trt_version), version_tuple(built_trt)
    if version_compatible:
        if not found_v or found_v < built_v or found_v[0] not in SUPPORTED_TRT_MAJORS:
            raise BundleError(
                f"The engine is version-compatible from TensorRT {built_trt} on (TensorRT "
                f"{'/'.join(map(str, SUPPORTED_TRT_MAJORS))}); this machine has TensorRT "
                f"{found_trt_version} — install TensorRT {built_trt} or newer, or recompile "
                "the bundle here."
            )
    elif found_v != built_v:
        raise BundleError(
            f"The engine was built with TensorRT {built_trt}; this machine has TensorRT "
            f"{found_trt_version} — install TensorRT {built_trt}, or recompile the bundle here "
            "(a version-compatible build runs on newer TensorRT)."
        )

    built_cc = cc_tuple(built_device.get("compute_capability"))
    found_cc = cc_tuple(found_device.get("compute_capability"))
    built_name, found_name = built_device.get("name"), found_device.get("name")
    expected = f"{built_name} (compute capability {built_device.get('compute_capability')})"
    found = f"{found_name} (compute capability {found_device.get('compute_capability')})"
    if found_cc is None:
        raise BundleError(
            f"The engine was built for {expected}; no CUDA GPU is visible here — run it on "
            "a machine with such a GPU."
        )
    if hardware == "ampere+":
        if found_cc < AMPERE:
            raise BundleError(
                f"The engine is hardware-compatible for GPUs of compute capability ≥ "
                f"{AMPERE[0]}.{AMPERE[1]} (Ampere and newer); this GPU is {found} — run it on "
                "an Ampere or newer GPU, or recompile the bundle here."
            )
    elif built_cc != found_cc:
        raise BundleError(
            f"The engine was built for {expected}; this GPU is {found} — recompile the "
            "bundle on this GPU (or build it hardware-compatible for Ampere and newer)."
        )
    if built_name and found_name and built_name != found_name:
        log.warning(
            "TensorRT engine built on %s runs on %s: it is compatible, but its kernels were "
            "timed on the other GPU; recompile here for the best latency",
            expected,
            found,
        )
