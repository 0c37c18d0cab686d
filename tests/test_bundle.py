"""Bundles, the writing side: atomic staging, checksums and digest, refusal of foreign
engines, stale staging folders; reading is tested in ``tests/runtime/``."""

from __future__ import annotations

import json

import pytest

from esr_deploy.bundle import MANIFEST, SCHEMA_VERSION, StagedBundle
from esr_deploy.errors import BundleError, OutputError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    check_device,
    manifest_digest,
    sha256_file,
)


def _manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "m",
        "backend": "onnxruntime",
        "engine": {
            "file": "engine.onnx",
            "backend_version": "1.2.3",
            "device": {"kind": "cpu", "flags": ["avx2", "avx512f"]},
        },
    }


def _stage(dest, fail: bool = False) -> None:
    with StagedBundle(dest) as staged:
        (staged.dir / "engine.onnx").write_bytes(b"engine")
        staged.write_manifest(_manifest())
        if fail:
            raise RuntimeError("validation failed")
        staged.commit()


def test_commit_moves_bundle_into_place_with_checksums(tmp_path) -> None:
    dest = tmp_path / "engines" / "m-ort-fp32"
    _stage(dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["files"] == {"engine.onnx": sha256_file(dest / "engine.onnx")}
    assert (dest / "engine.onnx").read_bytes() == b"engine"
    # the digest is recorded beside the manifest, and nothing else (no staging marker)
    assert (dest / DIGEST_FILE).read_text().strip() == manifest_digest(manifest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([DIGEST_FILE, "engine.onnx", MANIFEST])
    assert [p.name for p in dest.parent.iterdir()] == ["m-ort-fp32"]


def test_failure_leaves_nothing_behind(tmp_path) -> None:
    dest = tmp_path / "m-ort-fp32"
    with pytest.raises(RuntimeError):
        _stage(dest, fail=True)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_bundle(tmp_path) -> None:
    dest = tmp_path / "m"
    _stage(dest)
    before = (dest / MANIFEST).read_text()
    with pytest.raises(RuntimeError):
        _stage(dest, fail=True)
    assert (dest / MANIFEST).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_device_mismatch_says_expected_and_found() -> None:
    m = _manifest()
    with pytest.raises(BundleError, match=r"built with onnxruntime 1\.2\.3, this machine has 9"):
        check_device(m, "9", {"flags": ["avx2", "avx512f"]})
    with pytest.raises(BundleError, match="lacks.*avx512f"):
        check_device(m, "1.2.3", {"flags": ["avx2"]})
    check_device(m, "1.2.3", {"flags": ["avx2", "avx512f", "amx_int8"]})


def test_uncreatable_output_folder_is_refused(tmp_path) -> None:
    # a parent that is a file cannot hold a folder, whoever runs the test (root included)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="Cannot create the output folder"):
        _stage(blocker / "sub" / "m")


def test_output_path_that_is_a_file_is_refused(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        _stage(f)


def test_committed_bundle_is_readable_by_others(tmp_path) -> None:
    # mkdtemp creates the staging folder 0700; a serving account must still read the bundle
    import os

    dest = tmp_path / "m"
    old = os.umask(0o022)
    try:
        _stage(dest)
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o755
