"""Safe checkpoint loading: the tensors of a checkpoint file, found without running its code.

A checkpoint is read in two steps, and neither ever imports or runs code named by the file:

1. ``torch.load(..., map_location="cpu", weights_only=True)``: torch's own restricted
   unpickler. It handles plain state dicts, BasicSR ``params``/``params_ema`` files and the
   legacy (pre-1.6, non-zip) format, and moves CUDA tensors to the CPU.

   (:mod:`esr_deploy.loading.unpickler`).

The state dict is then found at the top level or under one of :data:`NESTING_KEYS`
(up to :data:`MAX_NESTING_DEPTH` levels, e.g. ``{"model": {"state_dict": ...}}``), and only
its tensor entries are kept.
:mod:`esr_deploy.loading.keys` matches its keys with an architecture.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esr_deploy.errors import CheckpointError, UnsafeCheckpointError
from esr_deploy.loading.unpickler import restricted_load

logger = logging.getLogger(__name__)

#: Keys under which training frameworks nest the state dict, in order of preference
#: (BasicSR writes both ``params`` and ``params_ema`` and evaluates with the EMA weights).
NESTING_KEYS: tuple[str, ...] = (
    "state_dict",
    "params_ema",
    "params",
    "model_state_dict",
    "model",
    "net",
    "network",
    "generator",
)

#: How many nesting levels are followed (``{"model": {"state_dict": ...}}`` is two).
MAX_NESTING_DEPTH = 3


#: How many keys of each kind a mismatch or non-finite report lists before "...".
REPORT_LIMIT = 8


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Tensors read from a checkpoint file, and how they were found.

    Attributes:
        path: the file that was read.
        sha256: SHA-256 of the file's bytes (hex), as recorded in the bundle manifest.
        state_dict: flat ``name -> CPU tensor`` mapping; non-tensor entries are dropped.
        nested_key: where the state dict was found, ``None`` at the top level, else the
            key (``"params_ema"``) or keys joined with ``/`` (``"model/state_dict"``).
        placeholders: ``"module.Qualname"`` of every global the restricted unpickler
            replaced with an inert placeholder; empty when ``weights_only`` loading worked.
    """

    path: Path
    sha256: str
    state_dict: dict[str, Tensor]
    nested_key: str | None
    placeholders: tuple[str, ...]


def _describe_bytes(data: bytes) -> str:
    """A short human description of what a file that is not a checkpoint looks like."""
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, ValueError, EOFError):
            return "a zip archive that is truncated or corrupt (no readable central directory)"
        if any(n.endswith("/code/__torch__.py") or "/code/" in n for n in names):
            return "a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
        if not any(n.endswith("/data.pkl") for n in names):
            return f"a zip archive without data.pkl (first entries: {names[:3]})"
        return "a torch.save zip archive whose records are damaged"
    if len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return "a safetensors file (not read by esr-deploy; convert it to a torch state_dict)"
    if head.startswith(b"\x80"):
        return f"a pickle stream of {len(data)} bytes that ends early or is damaged"
    if data[257:262] == b"ustar":
        return "a tar archive (the pre-0.4 torch.save format is not supported)"
    sample = data[:256]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised binary data starting with {head.hex()}"
    if "\x00" not in text:
        return f"text starting with {text[:40]!r}"
    return f"unrecognised binary data starting with {head.hex()}"


def _torch_reason(exc: Exception) -> str:
    """The informative line of a ``torch.load`` error (its weights_only text is long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            # torch puts the reason after the marker, on the same line or the next one; the
            # text around it ("Please file an issue ...") is not advice for this user.
            detail = line.split(marker, 1)[1].strip()
            if not detail and i + 1 < len(lines):
                detail = lines[i + 1]
            return f"{marker} {detail}"[:200]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def _fail(path: Path, what: str, seen: str, todo: str) -> CheckpointError:
    return CheckpointError(f"cannot load checkpoint {path}: {what} — {seen} — {todo}")


def _plain_cpu_tensor(t: Tensor) -> Tensor:
    t = t.detach()
    if type(t) is not Tensor:
        t = t.as_subclass(Tensor)
    if t.device.type != "cpu":
        t = t.cpu()
    return t


def _find_state_dict(obj: Any, depth: int = 0) -> tuple[dict[str, Tensor], list[str]] | None:
    """The tensors of the state dict inside ``obj`` and the nesting keys that led there."""
    if not isinstance(obj, Mapping):
        return None
    if depth < MAX_NESTING_DEPTH:
        for key in NESTING_KEYS:
            if key in obj:
                found = _find_state_dict(obj.get(key), depth + 1)
                if found is not None:
                    return found[0], [key, *found[1]]
    tensors = {
        k: _plain_cpu_tensor(v)
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, Tensor)
    }
    if not tensors:
        return None
    skipped = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if skipped:
        logger.debug("skipped %d non-tensor entries: %s", len(skipped), skipped[:REPORT_LIMIT])
    return tensors, []


def _key_summary(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj.keys())[:12]]
        more = " ..." if len(obj) > 12 else ""
        return f"a {type(obj).__name__} with keys {keys}{more}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read the tensors of a checkpoint file without running code from it.

    Tries ``torch.load(weights_only=True, map_location="cpu")`` first; when torch refuses
    the file, reads it with the restricted unpickler described in the module docstring.

    Raises:
        UnsafeCheckpointError: the pickle references a global that exists to run code.
        CheckpointError: missing, unreadable, corrupt or not a checkpoint, or no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found", "nothing exists at this path",
                    "check the path, or download the weights first")  # fmt: skip
    if not path.is_file():
        raise _fail(path, "not a regular file", "it is a directory or special file",
                    "pass the checkpoint file itself (model.pth), not its folder")  # fmt: skip
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(path, "the file could not be read", f"the system said: {exc}",
                    "check its permissions") from exc  # fmt: skip
    if not data:
        raise _fail(path, "the file is empty", "0 bytes",
                    "the download or save was interrupted: fetch or save it again")  # fmt: skip
    sha256 = hashlib.sha256(data).hexdigest()

    placeholders: tuple[str, ...] = ()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as wo_exc:  # any failure: the restricted reader diagnoses it
        wo_reason = _torch_reason(wo_exc)
        try:
            obj, placeholders = restricted_load(data)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: its pickle references {exc}, which "
                "would run code chosen by whoever made the file; nothing from it was "
                "imported or executed — do not open it with torch.load(weights_only=False); "
                "get the weights from a trusted source, or have them re-saved as a plain "
                "state_dict (torch.save(model.state_dict(), ...))"
            ) from None
        except Exception as exc:  # any other failure means a damaged or foreign file
            raise _fail(
                path,
                "not a readable PyTorch checkpoint",
                f"the file ({len(data)} bytes) looks like {_describe_bytes(data)}; "
                f"torch.load said: {wo_reason}; the restricted reader said: {exc}",
                "check that this is the .pth/.pt/.ckpt file written by torch.save and that "
                "it was copied completely (compare its size or SHA-256 with the source)",
            ) from exc
        logger.warning(
            "%s: torch's weights_only loader refused the file (%s); read its tensors with "
            "the restricted unpickler, %d globals replaced by inert placeholders: %s",
            path, wo_reason, len(placeholders), ", ".join(placeholders),
        )  # fmt: skip

    found = _find_state_dict(obj)
    if found is None:
        raise _fail(
            path,
            "no tensors found",
            f"the file holds {_key_summary(obj)}; looked at the top level and under "
            f"{', '.join(NESTING_KEYS)}",
            "pass a checkpoint that contains the model weights (a state_dict), or "
            "re-save them with torch.save(model.state_dict(), ...)",
        )
    state_dict, keys = found
    nested_key = "/".join(keys) if keys else None
    logger.info(
        "%s: %d tensors%s (sha256 %s)",
        path, len(state_dict), f" under {nested_key!r}" if nested_key else "", sha256[:12],
    )  # fmt: skip
    return LoadedCheckpoint(
        path=path,
        sha256=sha256,
        state_dict=state_dict,
        nested_key=nested_key,
        placeholders=placeholders,
    )
