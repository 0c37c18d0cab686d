"""Engine bundles, the writing side: staged beside the destination, committed atomically.

A bundle is built in a hidden staging folder beside its destination (same file system) and
renamed into place only by :meth:`StagedBundle.commit`, which the compiler calls after
validation passed. Leaving the ``with`` block without committing (an error, a failed check,
Ctrl-C) deletes the staging folder: no half-written or unvalidated bundle is ever where a
serving team looks. An existing folder at the destination is replaced only at commit time,
and only when it is an esr-deploy bundle (:func:`check_writable`).

A process killed outright (SIGKILL, power loss) cannot clean up: its staging folder
``.<name>.partial-*`` holds a marker file with the owning host and process id, and the next
compile that writes beside it removes every such folder whose owner is no longer running.
A folder without a readable marker is never removed.

``manifest.json`` is the contract (schema in ``../shared/design.md``); its ``files`` map holds
the SHA-256 of every other file, and ``manifest.sha256`` the bundle's digest. Reading a bundle
is :mod:`esr_deploy.runtime.bundle_reader`'s job, and only its.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from esr_deploy.errors import EsrDeployError, OutputError
from esr_deploy.runtime.bundle_reader import (
    DIGEST_FILE,
    MANIFEST,
    REFERENCE_ONNX,
    SCHEMA_VERSION,
    check_contents,
    manifest_digest,
    read_manifest_json,
    sha256_file,
)
from esr_deploy.runtime.manifest import Manifest

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "REFERENCE_ONNX",
    "REPORT",
    "SCHEMA_VERSION",
    "StagedBundle",
    "check_writable",
    "sha256_file",
]

REPORT = "report.md"
#: marker in a staging folder: {"host": ..., "pid": ...} of the compile that owns it
STAGING_MARKER = ".esr-deploy-staging"


def _is_bundle(folder: Path) -> str | None:
    """None when ``folder`` is an esr-deploy bundle (its manifest parses, has a schema
    version we read and a ``files`` map, and the folder holds nothing the manifest does not
    list), else why not. Looser than :func:`~.bundle_reader.read_manifest` on purpose: an
    incomplete bundle of ours may still be replaced."""
    try:
        path, manifest = read_manifest_json(folder)
        files = manifest.get("files")
        if not isinstance(files, dict):
            return f"{path} has no 'files' map."
        check_contents(folder.resolve(), files)
    except EsrDeployError as exc:
        return str(exc).split(" — ")[0]  # what was seen, without the reader's advice
    return None


def check_writable(destination: Path) -> None:
    """Fail early, before any work, if ``destination`` cannot be created or replaced.

    Creates nothing: the nearest existing ancestor of the destination must be a writable
    folder (the missing ones are created when the bundle is staged), and an existing
    destination must be an empty folder or an esr-deploy bundle (:func:`_is_bundle`), since
    committing replaces it. Anything else is left exactly as it is.
    """
    destination = Path(os.path.abspath(destination))
    if destination.exists() or destination.is_symlink():
        if destination.is_symlink() or not destination.is_dir():
            raise OutputError(
                f"The output path {destination} exists and is not a folder — remove it or "
                "choose another with --out."
            )
        why = _is_bundle(destination) if any(destination.iterdir()) else None
        if why is not None:
            raise OutputError(
                f"The output folder {destination} already exists, is not empty and is not an "
                f"esr-deploy bundle ({why.rstrip('.')}); a compile replaces its output folder "
                "entirely, so it was left untouched — choose a new or empty folder with --out."
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


def _owner_gone(staging: Path) -> bool:
    """Whether ``staging`` carries our marker and its owning process is gone (this host)."""
    try:
        owner = json.loads((staging / STAGING_MARKER).read_text(encoding="utf-8"))
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_staging(destination: Path) -> list[Path]:
    """Remove the staging folders of killed compiles beside ``destination``; returns them."""
    removed = []
    for staging in destination.parent.glob(f".{destination.name}.partial-*"):
        if staging.is_dir() and not staging.is_symlink() and _owner_gone(staging):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
            log.info("removed %s, left by a compile that was killed", staging)
    return removed


def _out_of_space(exc: BaseException | None, folder: Path) -> bool:
    """Whether a failure came from a full disk: an ENOSPC anywhere in the exception's chain
    (ONNX Runtime words it as a serialization error), or less than 1 MiB left."""
    if not isinstance(exc, Exception):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, EsrDeployError):  # a check that failed, not a write
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


class StagedBundle:
    """Context manager that owns a staging folder until :meth:`commit` moves it into place."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination.resolve()
        self.path: Path | None = None
        self._committed = False
        #: Folders above the destination that staging created (deepest first), removed
        #: again when the bundle is not committed.
        self._created: list[Path] = []
        #: the bundle's digest, once :meth:`write_manifest` wrote the manifest
        self.digest: str | None = None

    def __enter__(self) -> StagedBundle:
        check_writable(self.destination)
        missing = self.destination.parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        try:
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.destination)
            self.path = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.destination.name}.partial-", dir=self.destination.parent
                )
            )
            owner = {"host": socket.gethostname(), "pid": os.getpid()}
            (self.path / STAGING_MARKER).write_text(json.dumps(owner), encoding="utf-8")
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
        """Add checksums of every file in the staging folder, write ``manifest.json`` and
        record its digest in ``manifest.sha256``; returns the manifest as written.

        The manifest is first read back as a bundle's reader reads it
        (:meth:`Manifest.from_json`): one the runtime would refuse is never written."""
        skip = {MANIFEST, DIGEST_FILE, STAGING_MARKER}
        files = {
            p.relative_to(self.dir).as_posix(): sha256_file(p)
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.relative_to(self.dir).as_posix() not in skip
        }
        full = dict(manifest)
        full["files"] = files
        text = json.dumps(full, indent=2) + "\n"
        written: dict[str, Any] = json.loads(text)
        Manifest.built(written, "the manifest compile built")
        (self.dir / MANIFEST).write_text(text, encoding="utf-8")
        self.digest = manifest_digest(written)
        (self.dir / DIGEST_FILE).write_text(self.digest + "\n", encoding="utf-8")
        return written

    def commit(self) -> Path:
        """Move the staged bundle to its destination, replacing an older bundle there.

        The staging folder was created private (0700); the bundle gets the permissions a
        new folder would have under the current umask, so a serving account can read it.
        """
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.dir, 0o777 & ~umask)
        (self.dir / STAGING_MARKER).unlink(missing_ok=True)
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
        full = exc is not None and self.path is not None and _out_of_space(exc, self.path)
        if not self._committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if not self._committed:
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # not empty (something else wrote there) or already gone
                    break
        if full:
            raise OutputError(
                f"No space left on device while writing the bundle in "
                f"{self.destination.parent} ({type(exc).__name__}: {exc}) — free some space "
                "there or choose another location with --out; nothing was written."
            ) from exc
