"""The one bundle reader against hostile and careless bundles (issue 14).

One real bundle is compiled once (``conftest.compiled``: a random-weight user network,
seconds); each test copies it into a "received" folder that also holds a *sentinel*: a file
outside the bundle with secret content, which hostile bundles point at. Every case is run
through the real CLI (``inspect``, ``inspect --json``, ``upscale``, ``validate``, ``bench``)
and the Python API (:func:`esr_deploy.load`), and must give exit 2 with a message naming the
entry, no traceback, and nothing of the sentinel (content or SHA-256) in any output. An
attacker who edits the manifest also rewrites ``manifest.sha256``, so that the edit is caught
by what it breaks, not by the recorded digest.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import external_data_helper
from PIL import Image
from tiny_bundle import SCALE
from typer.testing import CliRunner
from user_models import TINY_ARCH, tiny_args

import esr_deploy
from esr_deploy.bundle import MANIFEST, REFERENCE_ONNX
from esr_deploy.cli import app
from esr_deploy.compiling.options import CompileResult
from esr_deploy.errors import BundleError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    canonical_manifest,
    manifest_digest,
    open_bundle,
    sha256_file,
)


@dataclass
class Received:
    """A copy of the compiled bundle in ``root/bundle``, beside ``root/secret.txt``."""

    root: Path
    bundle: Path
    secret: Path
    checkpoint: Path

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.bundle / MANIFEST).read_text())  # type: ignore[no-any-return]

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Edit the manifest as an attacker would: the recorded digest is rewritten too."""
        m = self.manifest()
        change(m)
        (self.bundle / MANIFEST).write_text(json.dumps(m, indent=2))
        (self.bundle / DIGEST_FILE).write_text(manifest_digest(m) + "\n")

    def rehash(self, name: str) -> None:
        self.edit(lambda m: m["files"].__setitem__(name, sha256_file(self.bundle / name)))

    @property
    def secret_text(self) -> str:
        return self.secret.read_text()


@pytest.fixture
def received(tmp_path: Path, compiled: CompileResult) -> Received:
    root = tmp_path / "received"
    root.mkdir()
    shutil.copytree(compiled.bundle, root / "bundle")
    secret = root / "secret.txt"
    secret.write_text(f"SECRET-{secrets.token_hex(16)}\n")
    checkpoint = Path(compiled.manifest["checkpoint"]["path"])
    return Received(root, root / "bundle", secret, checkpoint)


def cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _image(folder: Path) -> Path:
    path = folder / "in.png"
    Image.fromarray(np.full((12, 10, 3), 128, np.uint8)).save(path)
    return path


def assert_refused(r: Received, words: list[str], *extra: str) -> str:
    """Every command and the Python API refuse the bundle with exit 2; returns the message."""
    image = _image(r.root)
    runs = [
        ("inspect", r.bundle, *extra),
        ("inspect", r.bundle, "--json", *extra),
        ("upscale", r.bundle, image, "--out", r.root / "out", *extra),
        ("validate", r.bundle, *extra),
        ("bench", r.bundle, *extra),
    ]
    secret = r.secret_text
    secret_sha = hashlib.sha256(secret.encode()).hexdigest()
    first = ""
    for args in runs:
        res = cli(*args)
        shown = f"{args[0]}: exit {res.exit_code}\n{res.output}"
        assert res.exit_code == 2, shown
        assert isinstance(res.exception, SystemExit), shown  # no uncaught exception
        assert "Traceback" not in res.output, shown
        assert secret.strip() not in res.output and secret_sha not in res.output, shown
        message = " ".join(res.output.split())  # rich wraps long lines
        for word in words:
            assert word in message, f"{word!r} not in\n{shown}"
        first = first or res.output.strip().splitlines()[0]
    assert not (r.root / "out").exists()
    digest = extra[1] if extra else None
    with pytest.raises(BundleError) as info:
        esr_deploy.load(r.bundle, digest=digest)
    assert secret.strip() not in str(info.value) and secret_sha not in str(info.value)
    print(f"\nCASE exit 2: {first}")  # for the closing note (pytest -s)
    return first


# ------------------------------------------------------------------------------ control


def test_the_compiled_bundle_opens_and_its_digest_is_printed_and_recorded(
    compiled: CompileResult, received: Received
) -> None:
    m = received.manifest()
    digest = compiled.digest
    assert digest == manifest_digest(m) == (received.bundle / DIGEST_FILE).read_text().strip()
    assert digest == "sha256:" + hashlib.sha256(canonical_manifest(m)).hexdigest()
    # the digest does not depend on the manifest's whitespace or key order
    assert manifest_digest(json.loads(json.dumps(m, indent=None, sort_keys=False))) == digest
    assert open_bundle(received.bundle, digest=digest.removeprefix("sha256:")).digest == digest
    res = cli("inspect", received.bundle, "--json", "--expect-digest", digest)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["digest"] == digest
    assert esr_deploy.load(received.bundle, digest=digest).scale == SCALE


# ------------------------------------------------------------------------ hostile cases


def _outside_copy(r: Received, name: str) -> Path:
    """A copy of a bundle file outside the bundle: a reader following a path there would
    find matching checksums, so only confinement can refuse it."""
    outside = r.root / name
    shutil.copy(r.bundle / name, outside)
    return outside


def _files_dotdot(r: Received) -> None:
    r.edit(lambda m: m["files"].__setitem__("../secret.txt", sha256_file(r.secret)))


def _files_absolute(r: Received) -> None:
    r.edit(lambda m: m["files"].__setitem__(str(r.secret), sha256_file(r.secret)))


def _engine_symlink(r: Received) -> None:
    outside = _outside_copy(r, "engine.onnx")
    (r.bundle / "engine.onnx").unlink()
    (r.bundle / "engine.onnx").symlink_to(outside)


def _engine_outside_unlisted(r: Received) -> None:
    _outside_copy(r, "engine.onnx")
    r.edit(lambda m: m["engine"].__setitem__("file", "../engine.onnx"))


def _engine_inside_unlisted(r: Received) -> None:
    shutil.copy(r.bundle / REFERENCE_ONNX, r.bundle / "engine2.onnx")
    r.edit(lambda m: m["engine"].__setitem__("file", "engine2.onnx"))


def _checksum_entry_removed(r: Received) -> None:
    shutil.copy(r.bundle / REFERENCE_ONNX, r.bundle / "engine.onnx")  # a modified engine
    r.edit(lambda m: m["files"].pop("engine.onnx"))


def _engine_modified(r: Received) -> None:
    shutil.copy(r.bundle / REFERENCE_ONNX, r.bundle / "engine.onnx")


def _scale_edited(r: Received) -> None:
    r.edit(lambda m: m.__setitem__("scale", 4))


def _input_name_edited(r: Received) -> None:
    r.edit(lambda m: m["inputs"][0].__setitem__("name", "x"))


def _output_dtype_edited(r: Received) -> None:
    r.edit(lambda m: m["outputs"][0].__setitem__("dtype", "float16"))


def _layout_edited(r: Received) -> None:
    r.edit(lambda m: m.__setitem__("layout", "NHWC"))


def _missing_export(r: Received) -> None:
    r.edit(lambda m: m.pop("export"))


def _missing_metrics(r: Received) -> None:
    r.edit(lambda m: m.pop("metrics"))


def _newer_schema(r: Received) -> None:
    r.edit(lambda m: m.__setitem__("schema_version", 2))


def _engine_file_not_a_name(r: Received) -> None:
    r.edit(lambda m: m["engine"].__setitem__("file", 7))


def _external_data(r: Received, location: str) -> None:
    """Move the fp32 ONNX's first weight to external data at ``location`` (the graph file is
    re-listed with its new checksum, as a careful attacker would)."""
    model = onnx.load(str(r.bundle / REFERENCE_ONNX))
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location, 0, len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(r.bundle / REFERENCE_ONNX))
    r.rehash(REFERENCE_ONNX)


def _external_data_outside(r: Received) -> None:
    _external_data(r, "../secret.txt")


def _external_data_absolute(r: Received) -> None:
    _external_data(r, str(r.secret))


def _external_data_unlisted(r: Received) -> None:
    _external_data(r, "weights.bin")


def _external_data_symlink(r: Received) -> None:
    (r.bundle / "weights.bin").symlink_to(r.secret)
    _external_data(r, "weights.bin")
    r.edit(lambda m: m["files"].__setitem__("weights.bin", sha256_file(r.secret)))


def _manifest_symlink(r: Received) -> None:
    outside = _outside_copy(r, MANIFEST)
    (r.bundle / MANIFEST).unlink()
    (r.bundle / MANIFEST).symlink_to(outside)


def _manifest_edited_digest_kept(r: Received) -> None:
    m = r.manifest()
    m["name"] = "renamed"
    (r.bundle / MANIFEST).write_text(json.dumps(m))


def _unlisted_file(r: Received) -> None:
    (r.bundle / "extra.bin").write_bytes(b"not listed")


CASES: dict[str, tuple[Callable[[Received], None], list[str]]] = {
    "files entry with ..": (_files_dotdot, ["'../secret.txt'", "contains '..'"]),
    "files entry absolute": (_files_absolute, ["is an absolute path"]),
    "engine symlink outside": (_engine_symlink, ["'engine.onnx'", "leads outside the bundle"]),
    "engine outside, unlisted": (_engine_outside_unlisted, ["'../engine.onnx'", "contains '..'"]),
    "engine inside, unlisted": (_engine_inside_unlisted, ["'engine2.onnx' is not listed"]),
    "checksum entry removed": (_checksum_entry_removed, ["'engine.onnx' is not listed"]),
    "engine modified": (_engine_modified, ["engine.onnx does not match its manifest"]),
    "scale edited": (_scale_edited, ["the scale is 4", "has 2.0"]),
    "input name edited": (_input_name_edited, ["the input name is 'x'", "'lr'"]),
    "output dtype edited": (_output_dtype_edited, ["the output dtype is 'float16'"]),
    "layout edited": (_layout_edited, ["the layout is 'NHWC'"]),
    "export missing": (_missing_export, ["required key 'export' is missing"]),
    "metrics missing": (_missing_metrics, ["required key 'metrics' is missing"]),
    "newer schema": (
        _newer_schema,
        ["schema_version 2", "reads schema version(s) 1", "upgrade esr-deploy"],
    ),  # fmt: skip
    "engine file not a name": (_engine_file_not_a_name, ["'engine.file' is int, not str"]),
    "external data outside": (_external_data_outside, ["'../secret.txt'", "contains '..'"]),
    "external data absolute": (_external_data_absolute, ["is an absolute path"]),
    "external data unlisted": (_external_data_unlisted, ["'weights.bin' is not listed"]),
    "external data symlink": (_external_data_symlink, ["'weights.bin'", "leads outside"]),
    "manifest symlink": (_manifest_symlink, [f"its {MANIFEST} is a symbolic link"]),
    "manifest edited": (_manifest_edited_digest_kept, [f"{DIGEST_FILE} records"]),
    "unlisted file": (_unlisted_file, ["holds 'extra.bin'", "does not list"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_bundle_is_refused_with_exit_2(received: Received, case: str) -> None:
    mutate, words = CASES[case]
    mutate(received)
    assert_refused(received, words)


def test_other_digest_is_refused(compiled: CompileResult, received: Received) -> None:
    other = "sha256:" + "0" * 64
    words = [f"has digest {compiled.digest}, expected {other}"]
    assert_refused(received, words, "--expect-digest", other)


def test_malformed_digest_is_refused(received: Received) -> None:
    words = ["'nonsense' is not a SHA-256 digest"]
    assert_refused(received, words, "--expect-digest", "nonsense")


# --------------------------------------------------------------------- nothing executed


def test_code_named_in_the_manifest_is_never_run(received: Received) -> None:
    marker = received.root / "ran"
    popen = {"args": ["touch", str(marker)]}

    def name_a_process(m: dict[str, Any]) -> None:
        m["recipe"].update(arch="subprocess:Popen", arch_args=popen)
        m.update(arch="subprocess:Popen", arch_args=popen)

    received.edit(name_a_process)
    for args in (("inspect", received.bundle), ("validate", received.bundle)):
        res = cli(*args)
        assert res.exit_code == 0, res.output  # the recipe is data: nothing to refuse
        assert not marker.exists()
    assert "reference: the bundle's fp32 ONNX" in " ".join(res.output.split())
    named = ("--checkpoint", received.checkpoint, "--arch", TINY_ARCH,
             "--arch-args", json.dumps(tiny_args(SCALE)))  # fmt: skip
    res = cli("validate", received.bundle, *named)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "The bundle says its model has arch 'subprocess:Popen'" in " ".join(res.output.split())
    assert not marker.exists()
    print(f"\nCASE exit 2: {res.output.strip().splitlines()[0]}")


def test_validate_with_the_named_model_uses_it(received: Received) -> None:
    named = ("--checkpoint", received.checkpoint, "--arch", TINY_ARCH,
             "--arch-args", json.dumps(tiny_args(SCALE)))  # fmt: skip
    res = cli("validate", received.bundle, *named)
    assert res.exit_code == 0, res.output
    assert f"reference: PyTorch fp32 model from {received.checkpoint}" in " ".join(
        res.output.split()
    )
    res = cli("validate", received.bundle, "--arch", TINY_ARCH)
    assert res.exit_code == 2 and "give the checkpoint too" in " ".join(res.output.split())


def test_reader_imports_no_torch() -> None:
    code = "import sys, esr_deploy.runtime.bundle_reader; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
