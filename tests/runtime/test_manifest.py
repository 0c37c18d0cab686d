"""The typed, versioned manifest: a real bundle's manifest read and written back exactly,
unknown keys kept (so the digest does not move), and wrong types, missing keys and schema
versions this esr-deploy does not read refused with the key or version named."""

from __future__ import annotations

import json
from typing import Any

import pytest
from manifest_samples import sample_manifest
from tiny_bundle import SCALE

from esr_deploy.compiling.options import CompileResult
from esr_deploy.errors import BundleError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    MANIFEST,
    manifest_digest,
    open_bundle,
    read_manifest,
)
from esr_deploy.runtime.manifest import READABLE_VERSIONS, SCHEMA_VERSION, Manifest


def test_a_real_bundle_round_trips_exactly(compiled: CompileResult) -> None:
    """The manifest compile wrote: read, typed, and written back to the same JSON and digest."""
    on_disk = json.loads((compiled.bundle / MANIFEST).read_text())
    m = read_manifest(compiled.bundle)
    assert m.to_json() == on_disk and m == on_disk and dict(m) == on_disk
    assert manifest_digest(m.to_json()) == manifest_digest(m) == compiled.digest
    assert (compiled.bundle / DIGEST_FILE).read_text().strip() == compiled.digest
    # the typed view says what the JSON says
    assert (m.schema_version, m.scale, m.layout) == (SCHEMA_VERSION, SCALE, "NCHW")
    assert (m.name, m.target, m.precision) == (on_disk["name"], "ort-fp32", "fp32")
    assert m.engine.file == on_disk["engine"]["file"]
    assert m.engine.flags == frozenset(on_disk["engine"]["device"].get("flags", []))
    assert m.inputs[0].name == on_disk["inputs"][0]["name"] and m.inputs[0].channels == 3
    assert m.export.min_hw == tuple(on_disk["export"]["input_range"]["min_hw"])
    assert m.export.batch is not None and m.export.batch.max == on_disk["export"]["batch"]["max"]
    assert m.profile.max == tuple(on_disk["profile"]["max"])
    assert dict(m.files) == on_disk["files"] and m.checkpoint.sha256 == on_disk["checkpoint"][
        "sha256"]  # fmt: skip
    assert open_bundle(compiled.bundle).manifest == m


def test_unknown_keys_are_kept_and_the_digest_does_not_move() -> None:
    newer = sample_manifest(future={"nested": [1, {"x": None}]}, created="2026-11-30")
    newer["engine"]["scheduler"] = "something new"
    newer["validation"]["Set5"]["new_metric"] = 0.5
    m = Manifest.from_json(newer)
    assert m.to_json() == newer
    assert manifest_digest(m) == manifest_digest(newer)
    assert m["future"] == {"nested": [1, {"x": None}]}


def test_reading_cannot_change_the_manifest() -> None:
    """The mapping view and to_json hand out copies; the typed view is its own copy."""
    source = sample_manifest()
    m = Manifest.from_json(source)
    m["engine"]["file"] = "evil.onnx"
    m.to_json()["files"].clear()
    source["engine"]["file"] = "changed-after.onnx"
    assert m.engine.file == "engine.onnx" == m["engine"]["file"]
    assert len(m.to_json()["files"]) == 2


def test_optional_sections_are_typed_when_present() -> None:
    """compile_seconds (per stage) and auto (with the peers it compared) when recorded."""
    bare = Manifest.from_json(sample_manifest())
    assert bare.compile_seconds is None and bare.auto is None and bare.precision_onnx is None
    assert bare.color_order == "RGB" and not bare.bgr
    m = Manifest.from_json(sample_manifest(
        compile_seconds={"load": 1.5, "export": 2, "total": 3.5},
        auto={"chosen": "ov-fp32", "reason": "fastest", "candidates": [{"target": "ov-fp32"}],
              "peers": [{"name": "torch eager fp32", "median_ms": 12.0}], "device": {}},
        precision_onnx={"onnx": "model.int8.onnx", "search": {}},
        color_order="BGR",
    ))  # fmt: skip
    assert m.compile_seconds == {"load": 1.5, "export": 2.0, "total": 3.5}
    assert m.auto is not None and m.auto.chosen == "ov-fp32"
    assert m.auto.peers[0]["median_ms"] == 12.0 and len(m.auto.candidates) == 1
    assert m.precision_onnx is not None and m.precision_onnx.onnx == "model.int8.onnx"
    assert m.bgr


def _drop(*path: str) -> Any:
    def change(m: dict[str, Any]) -> None:
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]

    return change


def _set(value: Any, *path: str | int) -> Any:
    def change(m: Any) -> None:
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value

    return change


REFUSED: dict[str, tuple[Any, str]] = {
    "name missing": (_drop("name"), "required key 'name' is missing"),
    "engine.file missing": (_drop("engine", "file"), "required key 'engine.file' is missing"),
    "min_hw missing": (_drop("export", "input_range", "min_hw"),
                       "required key 'export.input_range.min_hw' is missing"),
    "files missing": (_drop("files"), "required key 'files' is missing"),
    "scale a string": (_set("4", "scale"), "'scale' is str, not int"),
    "scale a bool": (_set(True, "scale"), "'scale' is bool, not int"),
    "data_range a string": (_set("255", "data_range"), "'data_range' is str, not number"),
    "engine not an object": (_set([], "engine"), "'engine' is list, not object"),
    "input name a number": (_set(3, "inputs", 0, "name"), "'inputs[0].name' is int, not str"),
    "settings missing": (_drop("engine", "settings"),
                         "required key 'engine.settings' is missing"),
    "cpu flags not strings": (_set([1], "engine", "device", "flags"),
                              "'engine.device.flags[0]' is int, not str"),
    "profile max a string": (_set("big", "profile", "max"), "key 'profile.max' is str, not list"),
    "profile max three sizes": (_set([1, 2, 3], "profile", "max"),
                                "key 'profile.max' is [1, 2, 3], not two sizes"),
    "latency median a string": (_set("fast", "latency_ms", "1x3x64x64", "median"),
                                "'latency_ms.1x3x64x64.median' is str, not number"),
    "file hash a number": (_set(5, "files", "engine.onnx"), "'files.engine.onnx' is int, not str"),
    "stage seconds a string": (_set({"load": "1s"}, "compile_seconds"),
                               "'compile_seconds.load' is str, not number"),
    "auto without its choice": (_set({"reason": "?"}, "auto"),
                                "required key 'auto.chosen' is missing"),
    "validation set not an object": (_set({"Set5": 30.0}, "validation"),
                                     "'validation.Set5' is number, not object"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_wrong_or_missing_key_is_refused_naming_it(case: str) -> None:
    change, words = REFUSED[case]
    manifest = sample_manifest()
    change(manifest)
    with pytest.raises(BundleError) as info:
        Manifest.from_json(manifest, "bundle/manifest.json")
    message = str(info.value)
    assert message.startswith("bundle/manifest.json: ") and words in message, message
    assert "recompile the bundle" in message


@pytest.mark.parametrize(
    ("version", "advice"),
    [(2, "upgrade esr-deploy"), (0, "recompile the bundle"), ("1", "recompile the bundle"),
     (True, "recompile the bundle"), (None, "recompile the bundle")],
)  # fmt: skip
def test_a_schema_version_not_read_here_is_refused_naming_both(version: Any, advice: str) -> None:
    manifest = sample_manifest(schema_version=version)
    with pytest.raises(BundleError) as info:
        Manifest.from_json(manifest)
    message = str(info.value)
    assert f"has schema_version {version!r}" in message, message
    reads = ", ".join(map(str, READABLE_VERSIONS))
    assert f"reads schema version(s) {reads}" in message and advice in message, message


def test_every_version_read_here_loads() -> None:
    assert SCHEMA_VERSION in READABLE_VERSIONS
    for version in READABLE_VERSIONS:
        assert Manifest.from_json(sample_manifest(schema_version=version)).schema_version == version


def test_not_an_object_is_refused() -> None:
    with pytest.raises(BundleError, match="is not a JSON object"):
        Manifest.from_json([sample_manifest()])
