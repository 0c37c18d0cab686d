"""A bundle → a Triton Inference Server model repository entry (``esr-deploy export --triton``).

Layout written (Triton's model repository; ``<version>`` is a positive integer)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx | model.xml + model.bin | model.plan
    <repo>/<name>/<version>/manifest.json     the bundle's manifest, byte for byte
    <repo>/<name>/<version>/manifest.sha256   the bundle's digest (sha256 of the canonical manifest)
    <repo>/<name>/<version>/export.json       which bundle file each model file is, with its sha256

The manifest and digest live in the *version* folder because Triton serves one config for
all versions of a model while each version may come from another bundle; the serving side
checks a version with :func:`verify_version` (digest of the manifest = ``manifest.sha256``,
each model file's sha256 = the manifest's entry for the bundle file it came from).

Which file is exported, and with which Triton backend:

- ``ort-*`` (ONNX Runtime CPU): the bundle's engine is ONNX Runtime's *optimised* graph, saved
  for this CPU (it may hold contrib and NCHWc ops that only ONNX Runtime's CPU build has).
  The portable graph that was validated is exported instead (``model.fp32.onnx`` for fp32,
  the precision ONNX for fp16/int8), for the ``onnxruntime`` backend with the settings the
  engine was built and validated with: intra/inter-op threads, sequential execution and the
  graph optimisation level (Triton's ``optimization.graph.level``: unset = all
  optimisations, -1 = basic, 1 = extended, 2 = none), so the server optimises it the same way.
- ``ov-*``: ``engine.xml``/``engine.bin`` as ``model.xml``/``model.bin`` (``openvino``
  backend) with the threads, streams, performance hint and bf16 hint that were validated.
- ``onnx-fp16``/``onnx-int8`` (portable, for GPUs): the precision ONNX, ``onnxruntime`` backend
  on ``KIND_GPU`` with the TensorRT execution provider in FP16/INT8.
- ``ort-cuda-*``/``ort-trt-fp16``: the ONNX the engine came from, ``onnxruntime`` on the GPU
  (TensorRT provider in FP16 for ``ort-trt-fp16``).
- ``trt-*``: ``engine.plan`` as ``model.plan`` (``tensorrt_plan`` platform, ``KIND_GPU``).

IO: one input and one output, NCHW, dtype and names from the exported graph (the fp32 graph
for OpenVINO and TensorRT); H and W are dynamic (``-1``). With ``max_batch_size`` > 0 Triton
adds the batch dimension itself, so ``dims`` is ``[3, -1, -1]``; Triton's dynamic batcher
only stacks requests of the same H×W. The batch an engine accepts is read from its graph
(a symbolic batch: the manifest's ``export.batch.max``) or, for TensorRT, from its
optimisation profiles; ``--max-batch-size`` may not exceed it.

Writing is staged in a hidden folder in the repository and renamed into place; an existing
model folder is only added to when its ``config.pbtxt`` is exactly the one this export would
write, and an existing version folder is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from esr_deploy import __version__
from esr_deploy.errors import BundleError, EsrDeployError, ExportError, OutputError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    MANIFEST,
    Bundle,
    manifest_digest,
    open_bundle,
    read_manifest,
    sha256_file,
)
from esr_deploy.runtime.manifest import Manifest
from esr_deploy.targets import get_target

CONFIG = "config.pbtxt"
EXPORT_RECORD = "export.json"
#: max_batch_size written when the engine takes any batch and none was asked for
DEFAULT_MAX_BATCH = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
}
#: ONNX Runtime's level → Triton's optimization.graph.level (None: Triton's default, all)
_ORT_GRAPH_LEVEL = {
    "ORT_ENABLE_ALL": None,
    "ORT_ENABLE_EXTENDED": 1,
    "ORT_ENABLE_BASIC": -1,
    "ORT_DISABLE_ALL": 2,
}


@dataclass(frozen=True)
class TritonRequest:
    """What ``esr-deploy export --triton`` was asked for."""

    bundle: Path
    repo: Path
    name: str | None = None  # default: <manifest name>-<target>
    version: int = 1
    max_batch_size: int | None = None  # default: min(engine's limit, DEFAULT_MAX_BATCH)
    instances: int = 1
    expect_digest: str | None = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name
    channels: int
    batch: int | None  # fixed batch of the graph, None when symbolic


@dataclass(frozen=True)
class EntryPlan:
    """How a bundle maps onto Triton: files, backend/platform, device, settings."""

    files: tuple[tuple[str, str], ...]  # (file in the bundle, file in the version folder)
    scheduler: str  # 'backend: "onnxruntime"' or 'platform: "tensorrt_plan"'
    gpu: bool
    io_graph: str  # bundle ONNX whose inputs/outputs the entry declares
    note: str
    parameters: tuple[tuple[str, str], ...] = ()
    graph_level: int | None = None
    accelerator: str | None = None  # TensorRT EP precision_mode on the GPU


@dataclass(frozen=True)
class TritonEntry:
    model_dir: Path
    version_dir: Path
    config: str
    max_batch_size: int
    digest: str
    plan: EntryPlan


def default_name(manifest: Manifest) -> str:
    return f"{manifest.name}-{manifest.target}"


def check_request(request: TritonRequest) -> None:
    """Refuse bad options before any work (exit code 2)."""
    if request.name is not None and (not _NAME.match(request.name) or request.name in (".", "..")):
        raise EsrDeployError(
            f"--name {request.name!r} is not a Triton model name — use letters, digits, "
            "'_', '-' and '.', starting with a letter or digit (at most 128)."
        )
    if request.version < 1:
        raise EsrDeployError(f"--version {request.version} — Triton versions are integers ≥ 1.")
    if request.instances < 1:
        raise EsrDeployError(f"--instances {request.instances} — give at least 1 instance.")
    if request.max_batch_size is not None and request.max_batch_size < 0:
        raise EsrDeployError(
            f"--max-batch-size {request.max_batch_size} — give 0 (no batching) or more."
        )


# --------------------------------------------------------------------------------- plan


def _onnx_source(manifest: Manifest) -> str:
    """The portable ONNX an ONNX Runtime engine was optimised from."""
    if manifest.precision == "fp32":
        return manifest.reference_onnx
    precision = manifest.precision_onnx
    if precision is None or precision.onnx is None:
        raise BundleError(
            f"The {manifest.target} bundle names no precision_onnx.onnx — the portable "
            f"{manifest.precision} graph it was built from is missing; recompile."
        )
    return precision.onnx


def _ort_cpu_settings(
    settings: Mapping[str, Any],
) -> tuple[tuple[tuple[str, str], ...], int | None]:
    mode = {"sequential": "0", "parallel": "1"}.get(str(settings.get("execution_mode")), "0")
    params = (
        ("intra_op_thread_count", str(int(settings.get("intra_op_num_threads") or 0))),
        ("inter_op_thread_count", str(int(settings.get("inter_op_num_threads") or 0))),
        ("execution_mode", mode),
    )
    level = str(settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    if level not in _ORT_GRAPH_LEVEL:
        raise BundleError(
            f"The engine's graph_optimization_level {level!r} is not one of "
            f"{sorted(_ORT_GRAPH_LEVEL)} — recompile the bundle."
        )
    return params, _ORT_GRAPH_LEVEL[level]


def _ov_parameters(settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    bf16 = str(settings.get("inference_precision_hint", "f32")) == "bf16"
    return (
        ("INFERENCE_NUM_THREADS", str(int(settings.get("inference_num_threads") or 0))),
        ("NUM_STREAMS", str(int(settings.get("num_streams") or 1))),
        ("PERFORMANCE_HINT", str(settings.get("performance_hint", "LATENCY"))),
        ("HINT_BF16", "YES" if bf16 else "NO"),
    )


def plan_entry(bundle: Bundle) -> EntryPlan:
    """Which files, which Triton backend and which settings (see the module docstring)."""
    manifest = bundle.manifest
    target = get_target(manifest.target)
    engine = manifest.engine.file
    settings = manifest.engine.settings
    reference = manifest.reference_onnx
    onnxrt = 'backend: "onnxruntime"'
    if target.backend == "onnxruntime":
        source = _onnx_source(manifest)
        params, level = _ort_cpu_settings(settings)
        note = (
            f"{engine} is ONNX Runtime's graph optimised for the build CPU (it may hold "
            f"CPU-only fused ops), so the validated portable graph {source} is exported as "
            "model.onnx; Triton's onnxruntime backend optimises it at load with the same "
            "settings"
        )
        return EntryPlan(((source, "model.onnx"),), onnxrt, False, source, note, params, level)
    if target.backend == "openvino":
        xml = Path(engine)
        files = ((engine, "model.xml"), (str(xml.with_suffix(".bin")), "model.bin"))
        note = f"{engine} and its weights exported as model.xml/model.bin (OpenVINO IR as built)"
        return EntryPlan(files, 'backend: "openvino"', False, reference, note,
                         _ov_parameters(settings))  # fmt: skip
    if target.backend == "tensorrt":
        note = f"{engine} exported as model.plan: it runs only on the GPU it was built for"
        return EntryPlan(((engine, "model.plan"),), 'platform: "tensorrt_plan"', True,
                         reference, note)  # fmt: skip
    if target.backend in ("portable", "onnxruntime_gpu"):
        source = engine if target.backend == "portable" else _onnx_source(manifest)
        trt = target.backend == "portable" or target.variant == "tensorrt"
        accel = {"fp16": "FP16", "int8": "INT8"}.get(target.precision) if trt else None
        note = f"{source} exported as model.onnx for ONNX Runtime on the GPU" + (
            f" with the TensorRT execution provider in {accel}" if accel else ""
        )
        return EntryPlan(((source, "model.onnx"),), onnxrt, True, source, note, accelerator=accel)
    raise ExportError(
        f"Target {target.name} has no Triton backend — export a bundle compiled for an ort-*, "
        "ov-*, onnx-* or trt-* target."
    )


def tensor_specs(path: Path) -> tuple[TensorSpec, TensorSpec]:
    """The single input and output of the ONNX at ``path``: name, dtype, channels, batch."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    specs = []
    for value in (inputs[0], model.graph.output[0]):
        kind = value.type.tensor_type
        dims = list(kind.shape.dim)
        if len(dims) != 4 or not dims[1].HasField("dim_value"):
            raise BundleError(
                f"{path.name}: {value.name} is not NCHW with fixed channels — recompile."
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name
        batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
        specs.append(TensorSpec(value.name, dtype, dims[1].dim_value, batch))
    return specs[0], specs[1]


def batch_limit(bundle: Bundle, plan: EntryPlan, spec: TensorSpec) -> int | None:
    """The largest batch the engine accepts; None when its graph sets no bound."""
    if plan.scheduler.startswith("platform"):  # TensorRT: its optimisation profiles
        profiles = bundle.manifest.engine.settings.get("profiles") or []
        maxima = [int(p["max"][0]) for p in profiles if isinstance(p, Mapping) and "max" in p]
        return min(maxima) if maxima else 1
    if spec.batch is not None:
        return spec.batch
    recorded = bundle.manifest.export.batch
    return recorded.max if recorded is not None else None


def resolve_max_batch(requested: int | None, limit: int | None) -> int:
    if requested is None:
        if limit is None:
            return DEFAULT_MAX_BATCH
        return min(limit, DEFAULT_MAX_BATCH) if limit > 1 else 0
    if limit is not None and requested > limit:
        raise ExportError(
            f"--max-batch-size {requested} is more than the engine accepts ({limit}) — "
            f"give at most {limit}, or recompile with a larger batch range."
        )
    return requested


# ------------------------------------------------------------------------------- config


def _tensor_block(spec: TensorSpec, max_batch: int) -> str:
    dtype = _TRITON_DTYPES.get(spec.dtype)
    if dtype is None:
        raise ExportError(f"Tensor {spec.name} has dtype {spec.dtype}, which Triton lacks.")
    dims = [spec.channels, -1, -1]
    if max_batch == 0:
        dims.insert(0, spec.batch if spec.batch is not None else -1)
    shown = ", ".join(str(d) for d in dims)
    return f'  {{\n    name: "{spec.name}"\n    data_type: {dtype}\n    dims: [ {shown} ]\n  }}'


def config_text(
    name: str, plan: EntryPlan, io: tuple[TensorSpec, TensorSpec], max_batch: int, instances: int
) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``inference.ModelConfig``)."""
    kind = "KIND_GPU" if plan.gpu else "KIND_CPU"
    lines = [
        "# written by esr-deploy export --triton; each version folder holds the bundle's",
        "# manifest.json, manifest.sha256 (digest) and export.json: check them before serving",
        f'name: "{name}"',
        plan.scheduler,
        f"max_batch_size: {max_batch}",
        f"input [\n{_tensor_block(io[0], max_batch)}\n]",
        f"output [\n{_tensor_block(io[1], max_batch)}\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
    ]
    if max_batch > 1:
        lines.append("dynamic_batching { }")
    for key, value in plan.parameters:
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    optimization = []
    if plan.graph_level is not None:
        optimization.append(f"  graph {{ level: {plan.graph_level} }}")
    if plan.accelerator is not None:
        optimization.append(
            "  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{plan.accelerator}" }}\n'
            "      }\n    ]\n  }"
        )
    if optimization:
        lines.append("optimization {\n" + "\n".join(optimization) + "\n}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- write


def _check_destination(model_dir: Path, version_dir: Path, config: str) -> bool:
    """True when ``model_dir`` exists (with this very config); refuse anything else."""
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        raise OutputError(f"{model_dir} exists and is not a folder — choose another --name.")
    if not model_dir.exists():
        return False
    existing = model_dir / CONFIG
    if not existing.is_file() or existing.read_text(encoding="utf-8", errors="replace") != config:
        seen = "has a different config.pbtxt" if existing.is_file() else "has no config.pbtxt"
        raise OutputError(
            f"Model folder {model_dir} exists and {seen} — a version is added to a model only "
            "when its config is the same; choose another --name (or move that folder)."
        )
    if version_dir.exists() or version_dir.is_symlink():
        raise OutputError(
            f"{version_dir} exists — versions are never replaced; choose another --version."
        )
    return True


def _stage_version(folder: Path, bundle: Bundle, plan: EntryPlan, max_batch: int) -> None:
    files = bundle.manifest.files
    record: dict[str, Any] = {}
    for source, dest in plan.files:
        if source not in files:
            raise BundleError(f"{bundle.path}: {source} is not listed in the manifest's files.")
        shutil.copyfile(bundle.file(source), folder / dest)
        got = sha256_file(folder / dest)
        if got != files[source]:
            raise BundleError(
                f"{bundle.path / source} changed while it was exported (sha256 {got}, the "
                f"manifest lists {files[source]}) — do not serve it; recompile the bundle."
            )
        record[dest] = {"from": source, "sha256": got}
    shutil.copyfile(bundle.file(MANIFEST), folder / MANIFEST)
    if manifest_digest(read_manifest(folder)) != bundle.digest:
        raise BundleError(f"{bundle.path / MANIFEST} changed while it was exported — retry.")
    (folder / DIGEST_FILE).write_text(bundle.digest + "\n", encoding="utf-8")
    export = {
        "bundle_digest": bundle.digest,
        "target": bundle.manifest.target,
        "model_files": record,
        "max_batch_size": max_batch,
        "note": plan.note,
        "esr_deploy_version": __version__,
    }
    (folder / EXPORT_RECORD).write_text(json.dumps(export, indent=2) + "\n", encoding="utf-8")


def export_triton(request: TritonRequest) -> TritonEntry:
    """Write the repository entry for ``request`` (see the module docstring)."""
    check_request(request)
    bundle = open_bundle(request.bundle, digest=request.expect_digest)
    plan = plan_entry(bundle)
    io = tensor_specs(bundle.file(plan.io_graph))
    max_batch = resolve_max_batch(request.max_batch_size, batch_limit(bundle, plan, io[0]))
    name = request.name or default_name(bundle.manifest)
    if not _NAME.match(name):
        raise EsrDeployError(f"The bundle's name {name!r} is no Triton model name — pass --name.")
    config = config_text(name, plan, io, max_batch, request.instances)
    repo = request.repo
    if repo.exists() and not repo.is_dir():
        raise OutputError(f"--triton {repo} is a file — give a folder (the model repository).")
    model_dir, version_dir = repo / name, repo / name / str(request.version)
    exists = _check_destination(model_dir, version_dir, config)
    try:
        repo.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repo))
    except OSError as exc:
        raise OutputError(f"Cannot write to {repo}: {exc.strerror} — check the path.") from exc
    try:
        staged_version = stage / str(request.version)
        staged_version.mkdir()
        _stage_version(staged_version, bundle, plan, max_batch)
        (stage / CONFIG).write_text(config, encoding="utf-8")
        os.rename(staged_version if exists else stage, version_dir if exists else model_dir)
    except OSError as exc:
        raise OutputError(
            f"Could not write {version_dir}: {exc.strerror} — check the repository folder "
            "(another export may be writing the same model)."
        ) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return TritonEntry(model_dir, version_dir, config, max_batch, bundle.digest, plan)


# ------------------------------------------------------------------------------- verify


def verify_version(version_dir: Path) -> str:
    """Check an exported version folder; return the bundle digest it carries.

    The manifest's digest must be the recorded one, and each model file's sha256 the one the
    manifest lists for the bundle file it was exported from.
    """
    manifest = read_manifest(version_dir)
    found = manifest_digest(manifest)
    recorded_path = version_dir / DIGEST_FILE
    recorded = recorded_path.read_text(encoding="utf-8").strip() if recorded_path.is_file() else ""
    if recorded != found:
        raise BundleError(
            f"{version_dir}: manifest digest {found}, {DIGEST_FILE} says {recorded or 'nothing'}"
            " — the manifest was edited; export the bundle again."
        )
    try:
        record = json.loads((version_dir / EXPORT_RECORD).read_text(encoding="utf-8"))
        entries = dict(record["model_files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{version_dir}/{EXPORT_RECORD} is missing or unreadable.") from exc
    for dest, entry in entries.items():
        path = version_dir / Path(str(dest)).name
        listed = manifest.files.get(str(entry.get("from")))
        if not path.is_file() or listed is None or sha256_file(path) != listed:
            raise BundleError(
                f"{path} is not the bundle's {entry.get('from')} (sha256 differs from the "
                "manifest) — do not serve it; export the bundle again."
            )
    return found
