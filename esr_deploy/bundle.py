"""Engine bundles: the folder a serving team receives, written atomically, loaded with checks.

A bundle is built in a hidden staging folder beside its destination (same file system) and
renamed into place only by :meth:`StagedBundle.commit`, which the compiler calls after
validation passed. Leaving the ``with`` block without committing (an error, a failed check,
Ctrl-C) deletes the staging folder: no half-written or unvalidated bundle is ever where a
serving team looks. An existing bundle at the destination is replaced only at commit time.

``manifest.json`` is the contract (schema in ``../shared/design.md``); its ``files`` map holds
the SHA-256 of every other file. :func:`load_bundle` verifies the checksums, the backend
version and the device the engine was built for, and refuses a mismatch saying what was
expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from esr_deploy.errors import BundleError, OutputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.md"
REFERENCE_ONNX = "model.fp32.onnx"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(destination: Path) -> None:
    """Fail early, before any work, if ``destination`` cannot be created or replaced.

    Creates nothing: the nearest existing ancestor of the destination must be a writable
    folder (the missing ones are created when the bundle is staged), and an existing
    destination must be an engine bundle (a folder with a ``manifest.json``) or an empty
    folder, since committing replaces it.
    """
    destination = Path(os.path.abspath(destination))
    if destination.exists() or destination.is_symlink():
        if not destination.is_dir():
            raise OutputError(
                f"The output path {destination} exists and is not a folder — remove it or "
                "choose another with --out."
            )
        if any(destination.iterdir()) and not (destination / MANIFEST).is_file():
            raise OutputError(
                f"The output folder {destination} already exists, is not empty and is not an "
                f"engine bundle (no {MANIFEST}); a compile replaces its output folder "
                "entirely — choose a new or empty folder with --out."
            )
    ancestor = destination.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(
            f"Cannot create the output folder {destination.parent}: {ancestor} is a file, not "
            "a folder — choose another location with --out."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"Cannot create the output folder {destination.parent}: {ancestor} is not "
            "writable — choose another location with --out or fix its permissions."
        )


class StagedBundle:
    """Context manager that owns a staging folder until :meth:`commit` moves it into place."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination.resolve()
        self.path: Path | None = None
        self._committed = False
        #: Folders above the destination that staging created (deepest first), removed
        #: again when the bundle is not committed.
        self._created: list[Path] = []

    def __enter__(self) -> StagedBundle:
        check_writable(self.destination)
        missing = self.destination.parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        try:
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.destination.name}.partial-", dir=self.destination.parent
                )
            )
        except OSError as exc:
            self.__exit__(None, None, None)  # remove the folders created above
            raise OutputError(
                f"Cannot write in {self.destination.parent}: {exc.strerror} — choose another "
                "location with --out."
            ) from exc
        return self

    @property
    def dir(self) -> Path:
        assert self.path is not None, "StagedBundle used outside its with-block"
        return self.path

    def write_manifest(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Add checksums of every file in the staging folder and write ``manifest.json``."""
        files = {
            str(p.relative_to(self.dir)): sha256_file(p)
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        full = dict(manifest)
        full["files"] = files
        (self.dir / MANIFEST).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        return full

    def commit(self) -> Path:
        """Move the staged bundle to its destination, replacing an older bundle there.

        The staging folder was created private (0700); the bundle gets the permissions a
        new folder would have under the current umask, so a serving account can read it.
        """
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.dir, 0o777 & ~umask)
        old: Path | None = None
        if self.destination.exists():
            old = self.destination.with_name(f".{self.destination.name}.old-{os.getpid()}")
            os.replace(self.destination, old)
        os.replace(self.dir, self.destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        log.info("bundle written to %s", self.destination)
        return self.destination

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if not self._committed:
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # not empty (something else wrote there) or already gone
                    break


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Mapping[str, Any]

    @property
    def engine_path(self) -> Path:
        return self.path / str(self.manifest["engine"]["file"])


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        seen = "it does not exist" if not path.exists() else "it is a file, not a folder"
        raise BundleError(
            f"Cannot open engine bundle {path}: {seen} — pass the folder that "
            "`esr-deploy compile` wrote (engines/<name>-<target> or its --out)."
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"{path} is not an engine bundle — no {MANIFEST} in it; bundles are folders "
            "written by `esr-deploy compile`."
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{manifest_path} is not valid JSON: {exc} — recompile the bundle."
        ) from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path} has schema_version {data.get('schema_version')!r}; this "
            f"esr-deploy reads version {SCHEMA_VERSION} — recompile the bundle or upgrade."
        )
    return data  # type: ignore[no-any-return]


def verify_files(path: Path, manifest: Mapping[str, Any]) -> None:
    for name, expected in dict(manifest.get("files", {})).items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"Bundle {path} is missing {name} listed in its manifest.")
        found = sha256_file(file)
        if found != expected:
            raise BundleError(
                f"Bundle file {file} does not match its manifest: expected SHA-256 "
                f"{expected}, found {found} — the file was modified or damaged; recompile."
            )


def check_device(
    manifest: Mapping[str, Any], backend_version: str, device: Mapping[str, Any]
) -> None:
    """Refuse an engine built for another backend version or a CPU lacking its ISA flags."""
    built = manifest.get("engine", {})
    if built.get("backend_version") != backend_version:
        raise BundleError(
            f"The engine was built with {manifest.get('backend')} "
            f"{built.get('backend_version')}, this machine has {backend_version} — recompile "
            "the bundle here or install the version it was built with."
        )
    want = set(built.get("device", {}).get("flags", []))
    have = set(device.get("flags", []))
    if want - have:
        raise BundleError(
            f"The engine was optimised for a CPU with {sorted(want)}; this CPU lacks "
            f"{sorted(want - have)} — recompile the bundle on this machine."
        )


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and, with ``verify``, check every file's checksum."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path=path, manifest=manifest)
