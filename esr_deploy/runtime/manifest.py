"""The manifest: the typed, versioned contract between a bundle and whoever runs it.

``manifest.json`` is written by ``compile`` (the writer builds a plain dict:
``compiler.build_manifest``) and read here, once, into a :class:`Manifest`: frozen dataclasses
for every section serving code reads, each value checked for its JSON type.
:meth:`Manifest.from_json` refuses, with a :class:`~esr_deploy.errors.BundleError` naming the
dotted key (``required key 'engine.file' is missing``, ``key 'profile.max' is str, not
list``), a manifest that lacks a required key or holds a value of the wrong type.

**Exact round trip.** :meth:`Manifest.to_json` returns the very object the manifest was
built from, unknown keys included: a newer esr-deploy may add keys, and the bundle's digest
(the SHA-256 of the canonical JSON, :mod:`.bundle_reader`) must not change by being read.
The typed attributes are a checked *view* of that JSON; so is the read-only mapping
interface (``manifest["name"]``, ``dict(manifest)``), which hands out copies and is kept
for scripts that read the JSON by key: esr-deploy's own code reads the attributes.

**Versions.** :data:`SCHEMA_VERSION` is what this esr-deploy writes; it reads the versions
in :data:`READABLE_VERSIONS`. Any other ``schema_version`` (older, newer, or not an integer)
is refused with the version seen and the versions read. A version is bumped when a key
serving code relies on changes meaning or disappears; new optional keys (``auto.peers``,
``compile_seconds``) do not bump it, so every bundle written so far (version 1) loads.

Torch-free: a serving process imports this without the compile side.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from esr_deploy.errors import BundleError

#: the schema version this esr-deploy writes
SCHEMA_VERSION = 1
#: the schema versions this esr-deploy reads
READABLE_VERSIONS: tuple[int, ...] = (1,)

HW = tuple[int, int]
T = TypeVar("T")
_Kind = type | tuple[type, ...]
_NUMBER = (int, float)


def _type_name(kind: _Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:  # an int is a number too
        kinds = tuple(k for k in kinds if k is not int)
    names = {"dict": "object", "list": "list", "str": "str", "int": "int", "float": "number",
             "bool": "bool", "NoneType": "null"}  # fmt: skip
    return "/".join(dict.fromkeys(names.get(k.__name__, k.__name__) for k in kinds))


def _has_kind(value: Any, kind: _Kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is no number
    return isinstance(value, kinds)


class _Section:
    """A JSON object being read: its dotted path and where it came from, for messages."""

    def __init__(self, data: Mapping[str, Any], path: str, where: str) -> None:
        self.data, self.path, self.where = data, path, where

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str, required: bool = True) -> BundleError:
        what = "required key" if required else "key"
        return BundleError(
            f"{self.where}: {what} '{self.key(name)}' {problem} — the manifest is incomplete "
            "or was edited; recompile the bundle."
        )

    def value(self, name: str, kind: _Kind, required: bool = True, default: Any = None) -> Any:
        """The value of ``name``, of JSON type ``kind``; ``default`` when optional and absent
        (or null)."""
        if name not in self.data or (not required and self.data[name] is None):
            if required:
                raise self.error(name, "is missing")
            return default
        value = self.data[name]
        if not _has_kind(value, kind):
            raise self.error(
                name, f"is {_type_name(type(value))}, not {_type_name(kind)}", required
            )
        return value

    def section(self, name: str, required: bool = True) -> _Section | None:
        data = self.value(name, dict, required)
        return None if data is None else _Section(data, self.key(name), self.where)

    def require(self, name: str) -> _Section:
        found = self.section(name)
        assert found is not None  # required: value() raised otherwise
        return found

    def items(self, name: str, required: bool = True) -> list[tuple[str, _Section]]:
        """The entries of an object of objects (``validation``, ``latency_ms``)."""
        table = self.section(name, required)
        if table is None:
            return []
        return [(k, table.require(k)) for k in table.data]

    def list_of(self, name: str, kind: _Kind, required: bool = True) -> list[Any] | None:
        values = self.value(name, list, required)
        if values is None:
            return None
        for i, item in enumerate(values):
            if not _has_kind(item, kind):
                raise self.error(f"{name}[{i}]", f"is {_type_name(type(item))}, not "
                                 f"{_type_name(kind)}", required)  # fmt: skip
        return list(values)

    def objects(self, name: str, parse: Callable[[_Section], T], required: bool = True
                ) -> tuple[T, ...]:  # fmt: skip
        """A list of objects, each read by ``parse``."""
        values = self.list_of(name, dict, required) or []
        return tuple(parse(_Section(v, f"{self.key(name)}[{i}]", self.where))
                     for i, v in enumerate(values))  # fmt: skip

    def hw(self, name: str, required: bool = True) -> HW | None:
        """An H×W pair: two positive integers."""
        values = self.list_of(name, int, required)
        if values is None:
            return None
        if len(values) != 2 or min(values) < 1:
            raise self.error(name, f"is {values!r}, not two sizes (H, W)", required)
        return int(values[0]), int(values[1])


# ------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of the engine: name, dtype (numpy name) and symbolic shape."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def read(cls, s: _Section) -> TensorInfo:
        shape = s.list_of("shape", (int, str), required=False) or []
        return cls(s.value("name", str), s.value("dtype", str), tuple(shape))

    @property
    def channels(self) -> int | None:
        """The channel dimension of an NCHW tensor, when the shape says it."""
        c = self.shape[1] if len(self.shape) == 4 else None
        return c if isinstance(c, int) else None


@dataclass(frozen=True)
class Profile:
    """The LR shapes (H, W) the engine was built for: smallest, tuned-for, largest."""

    min: HW | None = None
    opt: HW | None = None
    max: HW | None = None

    @classmethod
    def read(cls, s: _Section) -> Profile:
        return cls(*(s.hw(k, required=False) for k in ("min", "opt", "max")))


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint the engine was compiled from (absent facts: ``None``)."""

    path: str | None
    sha256: str | None

    @classmethod
    def read(cls, s: _Section) -> Checkpoint:
        return cls(s.value("path", str, False), s.value("sha256", str, False))


@dataclass(frozen=True)
class Engine:
    """The engine file and what it was built with. ``device`` (CPU model and ISA flags, or
    GPU name and compute capability) and ``settings`` (what the backend loads it with) are
    the backend's own tables."""

    file: str
    backend_version: str
    device: Mapping[str, Any]
    settings: Mapping[str, Any]

    @classmethod
    def read(cls, s: _Section) -> Engine:
        device = s.require("device")
        device.list_of("flags", str, required=False)
        return cls(s.value("file", str), s.value("backend_version", str), device.data,
                   s.require("settings").data)  # fmt: skip

    @property
    def flags(self) -> frozenset[str]:
        """The CPU ISA flags the engine was optimised for (empty for a GPU engine)."""
        return frozenset(self.device.get("flags") or ())


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes one engine call takes."""

    min: int
    max: int

    @classmethod
    def read(cls, s: _Section) -> BatchRange:
        return cls(s.value("min", int, False, 1), s.value("max", int, False, 1))


@dataclass(frozen=True)
class Export:
    """What the export established: the smallest LR input that maps to scale×its size, and
    the batch range of the exported graph (absent: batch 1 only)."""

    min_hw: HW
    batch: BatchRange | None
    exporter: str | None = None
    opset: int | None = None
    simplified: bool | None = None
    max_abs_error: float | None = None  # ONNX vs PyTorch, relative to the data range

    @classmethod
    def read(cls, s: _Section) -> Export:
        min_hw = s.require("input_range").hw("min_hw")
        assert min_hw is not None  # required
        batch = s.section("batch", required=False)
        return cls(min_hw, BatchRange.read(batch) if batch else None,
                   s.value("exporter", str, False), s.value("opset", int, False),
                   s.value("simplified", bool, False),
                   s.value("max_abs_error", _NUMBER, False))  # fmt: skip


@dataclass(frozen=True)
class SetValidation:
    """Task quality and parity of one validation set (``required``: the tolerance it was
    gated with, ``{"parity_min_psnr", "max_psnr_drop"}``; absent in hand-made manifests)."""

    images: int | None
    psnr_drop: float | None
    reference_psnr_y: float | None
    engine_psnr_y: float | None
    reference_ssim_y: float | None
    engine_ssim_y: float | None
    parity_min_psnr: float | None
    passed: bool | None
    required: Mapping[str, Any] | None

    @classmethod
    def read(cls, s: _Section) -> SetValidation:
        def number(key: str) -> float | None:
            return s.value(key, _NUMBER, False)  # type: ignore[no-any-return]

        return cls(
            images=s.value("images", int, False),
            psnr_drop=number("psnr_drop"),
            reference_psnr_y=number("reference_psnr_y"),
            engine_psnr_y=number("engine_psnr_y"),
            reference_ssim_y=number("reference_ssim_y"),
            engine_ssim_y=number("engine_ssim_y"),
            parity_min_psnr=number("parity_min_psnr"),
            passed=s.value("passed", bool, False),
            required=s.value("required", dict, False),
        )


@dataclass(frozen=True)
class Latency:
    """Latency at one input shape, in ms."""

    median: float
    p10: float | None
    p90: float | None
    runs: int | None

    @classmethod
    def read(cls, s: _Section) -> Latency:
        return cls(float(s.value("median", _NUMBER)), s.value("p10", _NUMBER, False),
                   s.value("p90", _NUMBER, False), s.value("runs", int, False))  # fmt: skip


@dataclass(frozen=True)
class PrecisionOnnx:
    """The reduced-precision ONNX the engine was built from (fp16/int8 targets)."""

    onnx: str | None

    @classmethod
    def read(cls, s: _Section) -> PrecisionOnnx:
        return cls(s.value("onnx", str, False))


@dataclass(frozen=True)
class Auto:
    """How ``--target auto`` chose: the target, why, and every candidate (and, where
    recorded, every peer a user would otherwise run) as plain JSON tables."""

    chosen: str
    reason: str
    max_psnr_drop: float | None
    candidates: tuple[Mapping[str, Any], ...]
    peers: tuple[Mapping[str, Any], ...]

    @classmethod
    def read(cls, s: _Section) -> Auto:
        return cls(
            s.value("chosen", str),
            s.value("reason", str, False, ""),
            s.value("max_psnr_drop", _NUMBER, False),
            tuple(s.list_of("candidates", dict, False) or ()),
            tuple(s.list_of("peers", dict, False) or ()),
        )


def _seconds(s: _Section) -> Mapping[str, float]:
    return {k: float(s.value(k, _NUMBER)) for k in s.data}


def _files(s: _Section) -> Mapping[str, str]:
    return {k: s.value(k, str) for k in s.data}


# ------------------------------------------------------------------------------ manifest


def check_version(obj: Mapping[str, Any], where: str) -> int:
    """The manifest's ``schema_version``, when this esr-deploy reads it."""
    version = obj.get("schema_version")
    number = version if _has_kind(version, int) else None
    if number is not None and number in READABLE_VERSIONS:
        return int(number)
    reads = ", ".join(map(str, READABLE_VERSIONS))
    if number is not None and number > max(READABLE_VERSIONS):
        advice = "it was written by a newer esr-deploy: upgrade esr-deploy to read it"
    else:
        advice = "recompile the bundle with this esr-deploy"
    raise BundleError(
        f"{where} has schema_version {version!r}; this esr-deploy reads schema version(s) "
        f"{reads} — {advice}."
    )


@dataclass(frozen=True, eq=False)
class Manifest(Mapping[str, Any]):
    """A bundle's checked manifest (module docstring); build it with :meth:`from_json`.

    Equality and the mapping interface are those of the JSON it was built from."""

    schema_version: int
    name: str
    target: str
    precision: str
    backend: str
    scale: int
    data_range: float
    color_order: str  # "RGB" or "BGR"
    layout: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    profile: Profile
    checkpoint: Checkpoint
    engine: Engine
    reference_onnx: str
    export: Export
    files: Mapping[str, str]  # {relative path: SHA-256 hex}
    validation: Mapping[str, SetValidation]
    latency_ms: Mapping[str, Latency]  # {"1xCxHxW": ...}
    passes: tuple[Mapping[str, Any], ...]
    metrics: Mapping[str, Any]
    recipe: Mapping[str, Any] | None
    precision_onnx: PrecisionOnnx | None
    pruning: Mapping[str, Any] | None
    batch: Mapping[str, Any] | None  # batch range, batch-vs-single parity, throughput
    auto: Auto | None
    compile_seconds: Mapping[str, float] | None  # {stage: s, ..., "total": s}
    report_figures: tuple[Mapping[str, Any], ...]  # {"file", "kind", "image", "caption"}
    created: str | None
    esr_deploy_version: str | None
    _json: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Any, where: str = "the manifest") -> Manifest:
        """Check ``obj`` (parsed JSON) and read it; ``where`` names it in messages.

        Raises:
            BundleError: not an object, a schema version this esr-deploy does not read,
                or a key missing or of the wrong type (the message names the key).
        """
        if not isinstance(obj, dict):
            raise BundleError(f"{where} is not a JSON object — recompile the bundle.")
        version = check_version(obj, where)
        data = copy.deepcopy(obj)  # what to_json returns; the attributes read their own copy
        s = _Section(copy.deepcopy(obj), "", where)
        precision_onnx, auto = s.section("precision_onnx", False), s.section("auto", False)
        seconds = s.section("compile_seconds", False)
        return cls(
            schema_version=version,
            name=s.value("name", str),
            target=s.value("target", str),
            precision=s.value("precision", str),
            backend=s.value("backend", str),
            scale=s.value("scale", int),
            data_range=float(s.value("data_range", _NUMBER)),
            color_order=s.value("color_order", str, False, "RGB"),
            layout=s.value("layout", str),
            inputs=s.objects("inputs", TensorInfo.read),
            outputs=s.objects("outputs", TensorInfo.read),
            profile=Profile.read(s.section("profile", False) or _Section({}, "profile", where)),
            checkpoint=Checkpoint.read(s.require("checkpoint")),
            engine=Engine.read(s.require("engine")),
            reference_onnx=s.value("reference_onnx", str),
            export=Export.read(s.require("export")),
            files=_files(s.require("files")),
            validation={k: SetValidation.read(v) for k, v in s.items("validation")},
            latency_ms={k: Latency.read(v) for k, v in s.items("latency_ms")},
            passes=tuple(s.list_of("passes", dict) or ()),
            metrics=s.require("metrics").data,
            recipe=s.value("recipe", dict, False),
            precision_onnx=PrecisionOnnx.read(precision_onnx) if precision_onnx else None,
            pruning=s.value("pruning", dict, False),
            batch=s.value("batch", dict, False),
            auto=Auto.read(auto) if auto else None,
            compile_seconds=_seconds(seconds) if seconds else None,
            report_figures=tuple(s.list_of("report_figures", dict, False) or ()),
            created=s.value("created", str, False),
            esr_deploy_version=s.value("esr_deploy_version", str, False),
            _json=data,
        )

    @classmethod
    def built(cls, obj: Mapping[str, Any], where: str) -> Manifest:
        """A manifest esr-deploy itself built (about to be written), read as a bundle's reader
        will read it (after a JSON round trip): a refusal here is a bug in esr-deploy, raised
        as :class:`RuntimeError`, never a manifest the runtime would refuse written."""
        try:
            return cls.from_json(json.loads(json.dumps(dict(obj))), where)
        except BundleError as exc:
            seen = str(exc).split(" — ")[0]
            raise RuntimeError(
                f"esr-deploy built a manifest its own reader refuses ({seen}) — a bug in "
                "esr-deploy: please report it with this message."
            ) from exc

    def to_json(self) -> dict[str, Any]:
        """The JSON object this manifest was read from, unknown keys included (a copy)."""
        return copy.deepcopy(self._json)

    @property
    def bgr(self) -> bool:
        """Whether the engine takes its channels in BGR order."""
        return self.color_order == "BGR"

    # the JSON as a read-only mapping (copies: nothing read can change the manifest)
    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._json[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)
