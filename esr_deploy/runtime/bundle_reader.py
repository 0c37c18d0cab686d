"""The one bundle reader: every command and :func:`esr_deploy.load` open a bundle here.

A bundle is what a serving team receives from someone else, so it is untrusted input.
:func:`open_bundle` refuses, with a :class:`~esr_deploy.errors.BundleError` (exit 2) that
names the entry, and *before* opening, hashing or naming anything it points at:

- a path (a ``files`` entry, the engine, the fp32 ONNX, an ONNX external-data location) that
  is absolute, contains ``..``, or resolves — symbolic links included — outside the folder;
- a file the manifest uses (engine, fp32 ONNX, precision ONNX, external data) that is not
  listed in ``files`` with its SHA-256, and any file in the folder the manifest does not list
  (so an engine cannot pull in an unlisted companion file);
- a file whose SHA-256 differs from its ``files`` entry (with ``verify``);
- a manifest :class:`~.manifest.Manifest` refuses: a schema version this esr-deploy does
  not read, a required key missing or a value of the wrong type (the message names the key);
- declared facts that contradict the fp32 graph the bundle ships: input/output names and
  dtypes, layout (NCHW with 3 channels) and scale (output size / input size, from ONNX shape
  inference on a probe input, or a run of the graph where inference cannot say).

Nothing in a bundle is executed: the manifest is data, and the recipe it records is never
imported (``validate`` builds its PyTorch reference only from what the user names).

**Digest.** A bundle's identity is ``sha256:`` followed by the SHA-256 (hex) of its canonical
manifest: the parsed ``manifest.json`` serialised by ``json.dumps(manifest, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` and encoded as UTF-8 (keys sorted at every level,
no whitespace, floats as Python's shortest round-trip repr). The manifest lists every other
file's SHA-256, so the digest pins the whole bundle. ``compile`` prints it and records it in
``manifest.sha256``; ``open_bundle(path, digest=D)`` refuses any other bundle.

This module imports neither torch nor a backend: ONNX Runtime only where shape inference
cannot give the scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper, shape_inference

from esr_deploy.errors import BundleError
from esr_deploy.runtime.manifest import SCHEMA_VERSION, Manifest, check_version

__all__ = ["SCHEMA_VERSION", "Bundle", "Manifest", "open_bundle", "read_manifest"]

MANIFEST = "manifest.json"
#: the bundle's digest as ``compile`` recorded it (not listed in ``files``: it is the digest of
#: the manifest that lists them)
DIGEST_FILE = "manifest.sha256"
REFERENCE_ONNX = "model.fp32.onnx"
LAYOUT = "NCHW"
MAX_MANIFEST_BYTES = 64 << 20
_PROBE_MIN = 16  # smallest LR side of the scale probe
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its folder, its checked manifest and its digest."""

    path: Path
    manifest: Manifest
    digest: str

    @property
    def engine_path(self) -> Path:
        return self.path / self.manifest.engine.file

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (checked by :func:`open_bundle`)."""
        return self.path / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The bytes the digest is taken of (see the module docstring); ``manifest``: the parsed
    JSON, or a :class:`Manifest` (its JSON)."""
    text = json.dumps(dict(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of :func:`canonical_manifest`."""
    return "sha256:" + hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def parse_digest(text: str) -> str:
    """A digest as given by a user (``sha256:<hex>`` or the bare hex) in canonical form."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise BundleError(
            f"Expected digest {text!r} is not a SHA-256 digest — give it as printed by "
            "`esr-deploy compile` (sha256: and 64 hex digits)."
        )
    return "sha256:" + value


# ------------------------------------------------------------------------------ paths


def _refuse_path(folder: Path, name: str, what: str, why: str) -> BundleError:
    return BundleError(
        f"Bundle {folder} refused: {what} {name!r} {why} — a bundle may only use files inside "
        "its own folder; do not use this bundle, ask its sender for a new one."
    )


def confined(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder``
    (resolved, symbolic links included); nothing is opened. ``folder`` is resolved."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(
            f"Bundle {folder} refused: {what} {name!r} is not a file name — recompile it."
        )
    posix = name.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or re.match(r"^[A-Za-z]:", posix):
        raise _refuse_path(folder, name, what, "is an absolute path")
    if ".." in PurePosixPath(posix).parts:
        raise _refuse_path(folder, name, what, "contains '..'")
    path = folder / posix
    if not path.resolve().is_relative_to(folder):
        raise _refuse_path(folder, name, what, "leads outside the bundle (a symbolic link)")
    return path


def _listed(manifest: Manifest) -> dict[str, str]:
    """The ``files`` map, every entry checked to be a SHA-256 value, names in posix form."""
    for name, sha in manifest.files.items():
        if not _HEX64.fullmatch(sha):
            raise BundleError(
                f"Bundle manifest lists {name!r} with {sha!r}, which is not a SHA-256 — "
                "recompile the bundle."
            )
    return {str(PurePosixPath(n.replace("\\", "/"))): s for n, s in manifest.files.items()}


def _walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) of everything below ``folder`` but folders; symbolic links
    are reported, not followed."""
    for root, dirs, names in os.walk(folder, followlinks=False):
        here = Path(root)
        linked = [d for d in dirs if (here / d).is_symlink()]
        for name in [*names, *linked]:
            path = here / name
            yield path.relative_to(folder).as_posix(), path


def check_contents(folder: Path, files: Mapping[str, str]) -> None:
    """Everything in ``folder`` is the manifest, its digest, or a listed regular file, and
    no symbolic link leads outside; nothing is opened."""
    for name, path in _walk(folder):
        if name in (MANIFEST, DIGEST_FILE) and not path.is_symlink():
            continue
        confined(folder, name, "the file")
        if name not in files:
            raise BundleError(
                f"Bundle {folder} holds {name!r}, which its manifest does not list — a bundle "
                "holds exactly the files its manifest lists with their SHA-256; remove it or "
                "recompile the bundle."
            )


def _regular(folder: Path, name: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise BundleError(
            f"Bundle {folder} is missing {name!r}, listed in its manifest — the bundle is "
            "incomplete; copy it again or recompile."
        ) from exc
    if not stat.S_ISREG(mode):
        raise BundleError(
            f"Bundle {folder}: {name!r} is not a regular file — recompile the bundle."
        )


def verify_checksums(folder: Path, files: Mapping[str, str]) -> None:
    """Every listed file exists, is a regular file and has its recorded SHA-256."""
    for name, expected in files.items():
        path = confined(folder, name, "the files entry")
        _regular(folder, name, path)
        found = sha256_file(path)
        if found != expected:
            raise BundleError(
                f"Bundle file {path} does not match its manifest: expected SHA-256 "
                f"{expected}, found {found} — the file was modified or damaged; recompile."
            )


# --------------------------------------------------------------------------- manifest


def read_manifest_json(folder: Path) -> tuple[Path, dict[str, Any]]:
    """``folder/manifest.json`` parsed: a JSON object of a schema version this esr-deploy
    reads (nothing else is checked; :func:`read_manifest` checks the rest)."""
    if not folder.is_dir():
        seen = "it does not exist" if not folder.exists() else "it is a file, not a folder"
        raise BundleError(
            f"Cannot open engine bundle {folder}: {seen} — pass the folder that "
            "`esr-deploy compile` wrote (engines/<name>-<target> or its --out)."
        )
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        what = "is a symbolic link" if path.is_symlink() else "is not there"
        raise BundleError(
            f"{folder} is not an engine bundle — its {MANIFEST} {what}; bundles are folders "
            "written by `esr-deploy compile`."
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB — not a manifest.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc} — recompile the bundle.") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object — recompile the bundle.")
    check_version(data, str(path))
    return path, data


def read_manifest(folder: Path) -> Manifest:
    """``folder/manifest.json`` read and checked (:meth:`Manifest.from_json`): the one place
    a bundle's manifest is parsed."""
    path, data = read_manifest_json(folder)
    return Manifest.from_json(data, str(path))


def used_files(manifest: Manifest) -> dict[str, str]:
    """Files the manifest uses: {name: what it is}."""
    used = {
        manifest.engine.file: "the engine",
        manifest.reference_onnx: "the fp32 ONNX (reference_onnx)",
    }
    precision = manifest.precision_onnx
    if precision is not None and precision.onnx is not None:
        used[precision.onnx] = "the precision ONNX (precision_onnx.onnx)"
    return used


def check_used_listed(folder: Path, manifest: Manifest, files: Mapping[str, str]) -> None:
    """Every file the manifest uses is confined, listed and a regular file (not a FIFO or
    device a backend would block on, even when checksums are not verified)."""
    for name, what in used_files(manifest).items():
        path = confined(folder, name, what)
        if str(PurePosixPath(name.replace("\\", "/"))) not in files:
            raise BundleError(
                f"Bundle {folder} refused: {what} {name!r} is not listed in the manifest's "
                "files with its SHA-256 — the bundle was edited; recompile it."
            )
        _regular(folder, name, path)


# ------------------------------------------------------------------------------ graphs


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def load_structure(folder: Path, name: str, files: Mapping[str, str]) -> onnx.ModelProto:
    """An ONNX file of the bundle without its external data, after checking that every
    external-data location stays inside the folder and is listed in ``files``."""
    path = confined(folder, name, "the ONNX file")
    _regular(folder, name, path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds on bad bytes
        raise BundleError(
            f"Bundle file {name!r} is not an ONNX model ({type(exc).__name__}) — recompile."
        ) from exc
    base = PurePosixPath(name.replace("\\", "/")).parent
    for tensor in _tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        what = f"the external data of {name}"
        confined(folder, location, what)  # the location itself: relative, no '..'
        data = str(base / location.replace("\\", "/"))
        confined(folder, data, what)
        if data not in files:
            raise BundleError(
                f"Bundle {folder} refused: {what} {location!r} is not listed in the manifest's "
                "files with its SHA-256 — the bundle was edited; recompile it."
            )
    return model


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _dtype(value: onnx.ValueInfoProto) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name)
    except (KeyError, ValueError):
        return "unknown"


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _contradiction(folder: Path, name: str, declared: Any, found: Any) -> BundleError:
    return BundleError(
        f"Bundle {folder} refused: the manifest says {name} is {declared!r}, the graph it ships "
        f"has {found!r} — the manifest was edited or belongs to another graph; recompile."
    )


def probe_output_hw(model: onnx.ModelProto, path: Path, h: int, w: int) -> tuple[int, int]:
    """Output H, W of the graph for a ``1×3×h×w`` input: shape inference, else a run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    dims = _graph_inputs(probe)[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, h, w), strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
        out = _dims(inferred.graph.output[0])
    except Exception:  # noqa: BLE001 - inference gives up on some graphs: run them instead
        out = []
    if len(out) == 4 and out[2] is not None and out[3] is not None:
        return out[2], out[3]
    import onnxruntime as ort  # torch-free; only where inference cannot say

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.zeros((1, 3, h, w), np.float32)
        y = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as exc:  # noqa: BLE001 - a graph that does not run is a bad bundle
        raise BundleError(
            f"The bundle's fp32 ONNX does not run on a 1x3x{h}x{w} input "
            f"({type(exc).__name__}) — recompile the bundle."
        ) from exc
    return int(y.shape[2]), int(y.shape[3])


def check_facts(folder: Path, manifest: Manifest, model: onnx.ModelProto) -> None:
    """The manifest's names, dtypes, layout and scale agree with the fp32 graph."""
    inputs, outputs = _graph_inputs(model), list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise _contradiction(folder, "the number of inputs/outputs", (1, 1),
                             (len(inputs), len(outputs)))  # fmt: skip
    for key, declared, value in (("input", manifest.inputs, inputs[0]),
                                 ("output", manifest.outputs, outputs[0])):  # fmt: skip
        if len(declared) != 1:
            raise BundleError(f"manifest '{key}s' must list one tensor; it lists {len(declared)}.")
        if declared[0].name != value.name:
            raise _contradiction(folder, f"the {key} name", declared[0].name, value.name)
        if declared[0].dtype != _dtype(value):
            raise _contradiction(folder, f"the {key} dtype", declared[0].dtype, _dtype(value))
    in_dims = _dims(inputs[0])
    if manifest.layout != LAYOUT or len(in_dims) != 4 or in_dims[1] != 3:
        raise _contradiction(folder, "the layout", manifest.layout, f"input dims {in_dims}")
    h, w = (max(v, _PROBE_MIN) for v in manifest.export.min_hw)
    out_h, out_w = probe_output_hw(model, folder / manifest.reference_onnx, h, w)
    scale = manifest.scale
    if scale < 1 or (out_h, out_w) != (scale * h, scale * w):
        found = out_h / h if out_h * w == out_w * h else f"{out_h}x{out_w} from {h}x{w}"
        raise _contradiction(folder, "the scale", scale, found)


# ------------------------------------------------------------------------------ device


def check_cpu_flags(built: Iterable[str], device: Mapping[str, Any]) -> None:
    """Refuse an engine optimised for ISA flags (``built``) this CPU (``device``) lacks."""
    want, have = set(built), set(device.get("flags") or ())
    if want - have:
        raise BundleError(
            f"The engine was optimised for a CPU with {sorted(want)}; this CPU lacks "
            f"{sorted(want - have)} — recompile the bundle on this machine."
        )


def check_device(manifest: Manifest, backend_version: str, device: Mapping[str, Any]) -> None:
    """Refuse an engine built for another backend version or a CPU lacking its ISA flags."""
    built = manifest.engine
    if built.backend_version != backend_version:
        raise BundleError(
            f"The engine was built with {manifest.backend} {built.backend_version}, this "
            f"machine has {backend_version} — recompile the bundle here or install the version "
            "it was built with."
        )
    check_cpu_flags(built.flags, device)


# -------------------------------------------------------------------------------- open


def recorded_digest(folder: Path) -> str | None:
    """The digest ``compile`` recorded in ``manifest.sha256``, if the file is there."""
    path = folder / DIGEST_FILE
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024:
        return None
    return path.read_text(encoding="utf-8", errors="replace").strip() or None


def check_digest(folder: Path, found: str, expected: str | None) -> None:
    """Refuse a bundle whose digest is not ``expected`` or not the one compile recorded."""
    if expected is not None and found != parse_digest(expected):
        raise BundleError(
            f"Bundle {folder} has digest {found}, expected {parse_digest(expected)} — it is "
            "not the bundle that was pinned (it was edited or replaced); do not serve it."
        )
    recorded = recorded_digest(folder)
    if recorded is not None and recorded != found:
        raise BundleError(
            f"Bundle {folder}: its manifest's digest is {found}, but {DIGEST_FILE} records "
            f"{recorded} — the manifest was edited after compile; recompile the bundle."
        )


def open_bundle(path: str | Path, *, digest: str | None = None, verify: bool = True) -> Bundle:
    """Open a bundle strictly (see the module docstring) and return it with its digest.

    ``digest``: the ``sha256:…`` the caller pinned; any other bundle is refused.
    ``verify``: check every listed file's SHA-256 (paths, listing, facts are always checked).
    """
    given = Path(path)
    folder = given.resolve()
    manifest = read_manifest(folder)
    found = manifest_digest(manifest)
    check_digest(given, found, digest)
    files = _listed(manifest)
    for name in files:
        confined(folder, name, "the files entry")
    check_used_listed(folder, manifest, files)
    check_contents(folder, files)
    if verify:
        verify_checksums(folder, files)
    reference = load_structure(folder, manifest.reference_onnx, files)
    for name in used_files(manifest):
        if name.endswith(".onnx") and name != manifest.reference_onnx:
            load_structure(folder, name, files)
    check_facts(folder, manifest, reference)
    return Bundle(path=folder, manifest=manifest, digest=found)
