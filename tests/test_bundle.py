"""Bundles, the writing side: atomic staging, checksums and digest, refusal of foreign
engines, stale staging folders; reading is tested in ``tests/runtime/``."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from manifest_samples import sample_manifest

from esr_deploy.bundle import MANIFEST, STAGING_MARKER, StagedBundle
from esr_deploy.errors import BundleError, OutputError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    check_device,
    manifest_digest,
    sha256_file,
)
from esr_deploy.runtime.manifest import Manifest


def _manifest() -> dict:
    return sample_manifest()


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


def test_a_manifest_the_reader_would_refuse_is_never_written(tmp_path) -> None:
    """write_manifest reads the manifest back as a bundle's reader does before writing it."""
    dest = tmp_path / "m-ort-fp32"
    broken = _manifest()
    broken["engine"]["file"] = 3
    with pytest.raises(RuntimeError, match=r"'engine\.file' is int, not str.*a bug"):
        with StagedBundle(dest) as staged:
            (staged.dir / "engine.onnx").write_bytes(b"engine")
            staged.write_manifest(broken)
            staged.commit()
    assert list(tmp_path.iterdir()) == []


def test_device_mismatch_says_expected_and_found() -> None:
    m = Manifest.from_json(_manifest())
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


def test_out_of_space_is_reported_as_such(tmp_path) -> None:
    # the writer's own error (ONNX Runtime words a full disk as a serialization failure)
    # carries ENOSPC in its chain; the message says what happened and where
    dest = tmp_path / "m"
    with pytest.raises(OutputError, match="No space left on device") as info:
        with StagedBundle(dest):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                raise RuntimeError("protobuf serialization failed") from exc
    assert str(tmp_path) in str(info.value) and "--out" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_of_a_live_or_foreign_owner_is_kept(tmp_path) -> None:
    dest = tmp_path / "m"
    alive = tmp_path / ".m.partial-alive"  # its owner, pid 1, is running
    alive.mkdir()
    (alive / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    unmarked = tmp_path / ".m.partial-unmarked"  # not provably ours
    unmarked.mkdir()
    _stage(dest)
    assert alive.is_dir() and unmarked.is_dir()


def test_a_compile_killed_with_sigkill_leaves_no_staging_after_the_next(tmp_path) -> None:
    """SIGKILL a real compile once its staging folder exists; the next compile to the same
    --out removes it (its owner is gone) and commits its own bundle."""
    from user_models import TINY_ARCH, tiny_args, tiny_source

    from esr_deploy.compiling.options import CompileOptions
    from esr_deploy.compiling.pipeline import compile_model

    source = tiny_source(tmp_path, 2)
    out = tmp_path / "out" / "bundle"
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests_dir, *sys.path])}  # fmt: skip
    args = ["compile", source.checkpoint, "--arch", TINY_ARCH, "--arch-args",
            json.dumps(tiny_args(2)), "--scale", "2", "--data-range", "1", "--no-latency",
            "--out", out]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "esr_deploy.cli", *map(str, args)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not list(out.parent.glob(".bundle.partial-*/" + STAGING_MARKER)):
            assert proc.poll() is None, "the compile ended before it staged anything"
            assert time.monotonic() < deadline, "no staging folder after 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = list(out.parent.glob(".bundle.partial-*"))
    assert len(left) == 1 and not out.exists()  # the debris a killed compile leaves
    result = compile_model(CompileOptions(source=source, val_dirs=(), out=out, latency_shapes=()))
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]
    assert result.bundle == out.resolve() and (out / MANIFEST).is_file()
