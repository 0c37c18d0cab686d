"""Safe checkpoint loading, key normalisation and strict matching.

A checkpoint is read in two steps, and neither ever imports or runs code named by the file:

1. ``torch.load(..., map_location="cpu", weights_only=True)``: torch's own restricted
   unpickler. It handles plain state dicts, BasicSR ``params``/``params_ema`` files and the
   legacy (pre-1.6, non-zip) format, and moves CUDA tensors to the CPU.
2. When torch refuses the file because of extra entries it does not allow (Lightning
   ``hyper_parameters`` objects, ``argparse.Namespace``, pickled optimizers or schedulers,
   custom classes), :class:`_RestrictedUnpickler` reads the same bytes itself: the zip
   format (``data.pkl`` plus the ``data/<key>`` storage records) or the legacy format. Its
   ``find_class`` never imports anything. It returns

   * a small allowlist: plain containers (``dict``, ``OrderedDict``, ``list``, ``tuple``,
     ``set``, ``frozenset``, numbers, ``str``, ``bytes``), ``torch.Size``, ``torch.device``,
     dtypes, storage-type markers and this module's own wrappers around torch's tensor
     rebuild functions (which check their arguments and drop backward hooks and Python
     attributes);
   * an :class:`UnsafeCheckpointError` for globals that exist to run code (``os.system``,
     ``subprocess.*``, ``builtins.eval``, ``pickle.loads``, ... see :func:`_refusal_reason`);
   * an inert placeholder class for every other global: calling it, ``__new__``,
     ``__setstate__``, item assignment and ``append`` only record their arguments.

   So the only callables a file can reach are the allowlisted ones; ``REDUCE``, ``NEWOBJ``,
   ``BUILD``, ``INST``/``OBJ`` and ``STACK_GLOBAL`` all go through ``find_class`` and end
   at a placeholder, and extension-registry opcodes (``EXT1/2/4``, which can bypass
   ``find_class`` through ``copyreg``'s cache) are refused before unpickling starts.

The state dict is then found at the top level or under one of :data:`NESTING_KEYS`
(up to :data:`MAX_NESTING_DEPTH` levels, e.g. ``{"model": {"state_dict": ...}}``), and only
its tensor entries are kept. :func:`align_keys` removes wrapper prefixes (``module.``,
``_orig_mod.``, ...) and compares keys and shapes strictly with what the architecture
expects; :func:`key_overlap` scores near misses so recipes can be ranked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import pickletools
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from esr_deploy.errors import CheckpointError, KeyMismatchError, UnsafeCheckpointError

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

#: Prefixes that wrappers add to every key: DataParallel/DDP, Lightning modules,
#: ``torch.compile`` and the usual generator/network attribute names.
KNOWN_PREFIXES: tuple[str, ...] = (
    "module.",
    "model.",
    "network.",
    "net.",
    "generator.",
    "_orig_mod.",
)

#: How many keys of each kind a mismatch or non-finite report lists before "...".
REPORT_LIMIT = 8

_NUM_BATCHES_TRACKED = "num_batches_tracked"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Restricted unpickler: refusal list, allowlist and placeholders
# --------------------------------------------------------------------------------------

# Whole modules (and their submodules) that exist to run code, touch the OS or load more
# pickles. A reference to any of them is refused.
_REFUSED_MODULES: frozenset[str] = frozenset(
    {
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "importlib", "imp",
        "zipimport", "pkgutil", "runpy", "site", "shutil", "socket", "_socket", "ssl",
        "asyncio", "pty", "tty", "ctypes", "_ctypes", "cffi", "marshal", "pickle", "_pickle",
        "cPickle", "shelve", "dill", "cloudpickle", "joblib", "webbrowser", "code", "codeop",
        "pdb", "bdb", "pydoc", "timeit", "trace", "profile", "cProfile", "ast", "dis",
        "signal", "multiprocessing", "concurrent", "threading", "_thread", "mmap",
        "resource", "fcntl", "commands", "popen2", "pipes", "urllib", "urllib2", "http",
        "httplib", "ftplib", "smtplib", "telnetlib", "xmlrpc", "distutils", "setuptools",
        "pip", "ensurepip", "venv", "tkinter", "logging.config", "torch.hub", "torch.jit",
        "torch.package", "torch.utils.cpp_extension", "torch.ops", "torch._ops",
        "torch.library",
    }
)  # fmt: skip

# Names refused in *any* module: they evaluate, execute, import, spawn or deserialize.
_REFUSED_NAMES: frozenset[str] = frozenset(
    {
        "eval", "exec", "execfile", "compile", "__import__", "import_module", "reload",
        "open", "file", "input", "getattr", "setattr", "delattr", "globals", "locals",
        "vars", "breakpoint", "help", "exit", "quit", "__build_class__", "apply",
        "system", "popen", "popen2", "popen3", "popen4", "spawn", "spawnl", "spawnv",
        "spawnve", "execv", "execve", "execl", "execlp", "execvp", "fork", "forkpty",
        "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput",
        "run_path", "run_module", "load", "loads", "load_module", "unsafe_load",
        "full_load", "FunctionType", "CodeType", "LambdaType", "MethodType", "ModuleType",
    }
)  # fmt: skip

# builtins that are refused beyond _REFUSED_NAMES (they build classes or reach attributes).
_REFUSED_BUILTINS: frozenset[str] = frozenset(
    {"type", "super", "object.__subclasses__", "memoryview", "classmethod", "staticmethod",
     "property", "map", "filter", "iter", "next", "print"}
)  # fmt: skip

_MODULE_ALIASES: dict[str, str] = {"__builtin__": "builtins", "exceptions": "builtins"}


def _refusal_reason(module: str, name: str) -> str | None:
    """Why ``module.name`` must not be loaded at all, or ``None`` when it may be a placeholder.

    The check is on names only: nothing is imported to decide.
    """
    module = _MODULE_ALIASES.get(module, module)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in _REFUSED_MODULES:
            return f"module {'.'.join(parts[:i])!r} runs code or touches the system"
    name_parts = name.split(".")
    for part in name_parts:
        if part in _REFUSED_NAMES:
            return f"{part!r} evaluates, executes, imports or deserializes"
    if module == "builtins" and (name in _REFUSED_BUILTINS or name_parts[0] in _REFUSED_BUILTINS):
        return f"builtins.{name} builds classes or reaches into objects"
    if any(p.startswith("__") and p.endswith("__") for p in name_parts[1:]):
        return "it reaches a dunder attribute through a dotted name"
    return None


class _Placeholder:
    """Inert stand-in for a global the restricted unpickler will not import.

    Every way pickle can use a class or an instance only records arguments: creating an
    instance (``REDUCE``/``NEWOBJ``/``INST``/``OBJ``), calling one, ``BUILD``
    (``__setstate__``), ``SETITEMS`` and ``APPENDS``. There is no ``__getattr__``: unknown
    attributes raise ``AttributeError``.
    """

    _esr_global: str = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    list_items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = {}
        obj.list_items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - records in __new__
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Placeholder:
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        """Record an element (pickle ``APPEND``)."""
        self.list_items.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        """Record elements (pickle ``APPENDS``); ``values`` is a list built by pickle."""
        if not isinstance(values, list | tuple):
            raise pickle.UnpicklingError("APPENDS on a placeholder with a non-list")
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self._esr_global}>"


def _make_placeholder(qualified: str) -> type[_Placeholder]:
    short = qualified.rsplit(".", 1)[-1] or "Global"
    return type(short, (_Placeholder,), {"_esr_global": qualified, "__module__": __name__})


class _TypeMarker:
    """A torch class named by the pickle only as an argument (never called)."""

    def __init__(self, qualified: str) -> None:
        self.qualified = qualified

    def __repr__(self) -> str:
        return f"<type {self.qualified}>"


_TENSOR_MARKER = _TypeMarker("torch.Tensor")
_PARAMETER_MARKER = _TypeMarker("torch.nn.parameter.Parameter")


@dataclass(frozen=True)
class _StorageKind:
    """What ``torch.FloatStorage`` & co. mean inside a persistent id: a dtype."""

    name: str
    dtype: torch.dtype


def _storage_kind(name: str) -> _StorageKind | None:
    if name == "UntypedStorage":
        return _StorageKind(name, torch.uint8)
    if not name.endswith("Storage"):
        return None
    try:
        return _StorageKind(name, torch.serialization.StorageType(name).dtype)
    except (KeyError, AttributeError):
        return None


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise pickle.UnpicklingError(f"malformed tensor record: {what}")


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _check_rebuild_args(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    _require(isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage), "storage")
    _require(isinstance(offset, int) and offset >= 0, "storage offset")
    _require(_is_int_tuple(size) and _is_int_tuple(stride), "size/stride")


def _clean_metadata(metadata: Any) -> dict[str, bool] | None:
    if isinstance(metadata, dict) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items()
    ):
        return metadata
    return None


def _safe_rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Tensor:
    _check_rebuild_args(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _safe_rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    _check_rebuild_args(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, tuple(size), tuple(stride), False, OrderedDict(),
        _clean_metadata(metadata),
    )  # fmt: skip


def _safe_rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> Tensor:
    _check_rebuild_args(storage, storage_offset, size, stride)
    _require(isinstance(dtype, torch.dtype), "dtype")
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, tuple(size), tuple(stride), False, OrderedDict(), dtype,
        _clean_metadata(metadata),
    )  # fmt: skip


def _safe_rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Tensor:
    _require(isinstance(data, Tensor), "parameter data")
    return data.detach()


def _safe_rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Tensor:
    return _safe_rebuild_parameter(data, requires_grad, backward_hooks)


_SAFE_REBUILDERS: tuple[Callable[..., Tensor], ...] = (
    _safe_rebuild_tensor,
    _safe_rebuild_tensor_v2,
    _safe_rebuild_tensor_v3,
    _safe_rebuild_parameter,
    _safe_rebuild_parameter_with_state,
)


def _safe_rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Tensor:
    """Tensor (or subclass / tensor with attributes): rebuilt as a plain tensor."""
    _require(any(func is f for f in _SAFE_REBUILDERS), "rebuild function")
    _require(new_type is _TENSOR_MARKER or new_type is _PARAMETER_MARKER, "tensor type")
    _require(isinstance(args, tuple), "rebuild arguments")
    return func(*args)


def _defaultdict_as_dict(*args: Any) -> dict[Any, Any]:
    """``collections.defaultdict(factory)`` becomes a plain dict: the factory is dropped."""
    return {}


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; latin-1 only."""
    _require(isinstance(text, str) and encoding in ("latin1", "latin-1"), "bytes record")
    return text.encode("latin1")


_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "complex32",
    "complex64", "complex128", "cfloat", "cdouble", "chalf", "uint8", "uint16", "uint32",
    "uint64", "int8", "int16", "short", "int32", "int", "int64", "long", "bool", "qint8",
    "quint8", "qint32", "quint4x2", "quint2x4", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip


def _build_allowlist() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.int": int,
        "builtins.float": float,
        "builtins.complex": complex,
        "builtins.bool": bool,
        "builtins.str": str,
        "builtins.bytes": bytes,
        "builtins.bytearray": bytearray,
        "builtins.slice": slice,
        "collections.OrderedDict": OrderedDict,
        "collections.defaultdict": _defaultdict_as_dict,
        "_codecs.encode": _latin1_encode,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": _TENSOR_MARKER,
        "torch._tensor.Tensor": _TENSOR_MARKER,
        "torch.nn.parameter.Parameter": _PARAMETER_MARKER,
        "torch._tensor._rebuild_from_type_v2": _safe_rebuild_from_type_v2,
    }
    for fn in _SAFE_REBUILDERS:
        allowed[f"torch._utils.{fn.__name__.removeprefix('_safe')}"] = fn
    for name in _DTYPE_NAMES:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            allowed[f"torch.{name}"] = dtype
    return allowed


_ALLOWED: dict[str, Any] = _build_allowlist()

_EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})


def _scan_pickle(stream: BinaryIO) -> None:
    """Walk one pickle's opcodes (without running them) and refuse registry lookups.

    ``EXT1/2/4`` resolve globals through ``copyreg``'s process-wide cache, which can
    bypass ``find_class``; no checkpoint writer uses them.
    """
    try:
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name in _EXTENSION_OPCODES:
                raise UnsafeCheckpointError(f"opcode {opcode.name} (copyreg extension registry)")
    except UnsafeCheckpointError:
        raise
    except (ValueError, EOFError) as exc:
        raise pickle.UnpicklingError(f"corrupt pickle stream: {exc}") from exc


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are the allowlist, a refusal, or an inert placeholder."""

    def __init__(
        self,
        stream: BinaryIO,
        storage_loader: Callable[[tuple[Any, ...]], Any] | None,
        placeholders: dict[str, type[_Placeholder]],
    ) -> None:
        super().__init__(stream)
        self._storage_loader = storage_loader
        self._placeholders = placeholders

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("global with a non-string name")
        module = _MODULE_ALIASES.get(module, module)
        qualified = f"{module}.{name}"
        reason = _refusal_reason(module, name)
        if reason is not None:
            raise UnsafeCheckpointError(f"`{qualified}` ({reason})")
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if module == "torch":
            kind = _storage_kind(name)
            if kind is not None:
                return kind
        if qualified not in self._placeholders:
            self._placeholders[qualified] = _make_placeholder(qualified)
        return self._placeholders[qualified]

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - storages only
        if self._storage_loader is None or not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {type(pid).__name__}")
        return self._storage_loader(pid)


def _ascii(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="strict")
    _require(isinstance(value, str), what)
    return str(value)


def _storage_from_bytes(raw: bytes, kind: _StorageKind, file_byteorder: str) -> Any:
    untyped = (
        torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
    )
    if file_byteorder != sys.byteorder and kind.dtype.itemsize > 1:
        untyped.byteswap(kind.dtype)
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)


def _unpickle_zip(data: bytes, placeholders: dict[str, type[_Placeholder]]) -> Any:
    """Read a ``torch.save`` zip archive with the restricted unpickler."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl_names) != 1:
        raise pickle.UnpicklingError("zip archive without exactly one <archive>/data.pkl")
    prefix = pkl_names[0][: -len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", errors="replace")
        if byteorder not in ("little", "big"):
            raise pickle.UnpicklingError(f"unknown byte order {byteorder!r}")
    loaded: dict[str, Any] = {}

    def load_storage(pid: tuple[Any, ...]) -> Any:
        _require(len(pid) == 5 and _ascii(pid[0], "typename") == "storage", "persistent id")
        kind, key, _location, numel = pid[1:]
        _require(isinstance(kind, _StorageKind), "storage type")
        key = _ascii(key, "storage key")
        _require(isinstance(numel, int) and numel >= 0, "storage size")
        if key in loaded:
            return loaded[key]
        record = f"{prefix}data/{key}"
        _require(record in names, f"missing storage record {record}")
        nbytes = numel * kind.dtype.itemsize
        with archive.open(record) as fh:
            raw = fh.read(nbytes)
        _require(len(raw) == nbytes, f"storage record {record} is short")
        # The location ("cuda:0", ...) is ignored: every storage is created on the CPU.
        loaded[key] = _storage_from_bytes(raw, kind, byteorder)
        return loaded[key]

    pkl = archive.read(pkl_names[0])
    _scan_pickle(io.BytesIO(pkl))
    return _RestrictedUnpickler(io.BytesIO(pkl), load_storage, placeholders).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _unpickle_legacy(data: bytes, placeholders: dict[str, type[_Placeholder]]) -> Any:
    """Read a legacy (non-zip, torch < 1.6) ``torch.save`` stream with the restricted unpickler.

    Layout: magic number, protocol version, sys info, the object (storages as persistent
    ids), the list of storage keys, then per storage an int64 element count and its bytes
    (little-endian).
    """
    stream = io.BytesIO(data)
    storages: dict[str, tuple[Any, _StorageKind]] = {}
    views: dict[str, Any] = {}

    def load_storage(pid: tuple[Any, ...]) -> Any:
        typename = _ascii(pid[0], "typename")
        if typename == "module":  # a pickled nn.Module's class (source check skipped)
            _require(len(pid) == 4, "module record")
            return pid[1]
        _require(typename == "storage" and len(pid) == 6, "persistent id")
        kind, root_key, _location, numel, view = pid[1:]
        _require(isinstance(kind, _StorageKind), "storage type")
        root_key = _ascii(root_key, "storage key")
        _require(isinstance(numel, int) and numel >= 0, "storage size")
        if root_key not in storages:
            storages[root_key] = (torch.UntypedStorage(numel * kind.dtype.itemsize), kind)
        untyped = storages[root_key][0]
        if view is None:
            return torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=kind.dtype, _internal=True
            )
        _require(isinstance(view, tuple) and len(view) == 3, "storage view")
        view_key, offset, size = _ascii(view[0], "view key"), view[1], view[2]
        _require(isinstance(offset, int) and isinstance(size, int), "storage view")
        if view_key not in views:
            start = offset * kind.dtype.itemsize
            views[view_key] = torch.storage.TypedStorage(
                wrap_storage=untyped[start : start + size * kind.dtype.itemsize],
                dtype=kind.dtype,
                _internal=True,
            )
        return views[view_key]

    def next_pickle(loader: Callable[[tuple[Any, ...]], Any] | None) -> Any:
        start = stream.tell()
        _scan_pickle(stream)
        stream.seek(start)
        return _RestrictedUnpickler(stream, loader, placeholders).load()

    if next_pickle(None) != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a torch.save stream (wrong magic number)")
    if next_pickle(None) != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unsupported legacy torch.save protocol version")
    next_pickle(None)  # sys info
    result = next_pickle(load_storage)
    keys = next_pickle(None)
    _require(isinstance(keys, list), "storage key list")
    _require(set(storages) <= {_ascii(k, "storage key") for k in keys}, "storage key list")
    for key in keys:
        key = _ascii(key, "storage key")
        _require(key in storages, f"unknown storage key {key}")
        untyped, kind = storages[key]
        header = stream.read(8)
        _require(len(header) == 8, f"storage {key} is truncated")
        count = int.from_bytes(header, "little", signed=True)
        _require(count * kind.dtype.itemsize == untyped.nbytes(), f"storage {key} size")
        raw = stream.read(untyped.nbytes())
        _require(len(raw) == untyped.nbytes(), f"storage {key} is truncated")
        if raw:
            untyped.copy_(_storage_from_bytes(raw, kind, "little")._untyped_storage)
    return result


# --------------------------------------------------------------------------------------
# load_checkpoint
# --------------------------------------------------------------------------------------


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


def _restricted_load(data: bytes) -> tuple[Any, tuple[str, ...]]:
    placeholders: dict[str, type[_Placeholder]] = {}
    if data.startswith(b"PK\x03\x04"):
        obj = _unpickle_zip(data, placeholders)
    else:
        obj = _unpickle_legacy(data, placeholders)
    return obj, tuple(placeholders)


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
            obj, placeholders = _restricted_load(data)
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


# --------------------------------------------------------------------------------------
# Key normalisation and strict matching
# --------------------------------------------------------------------------------------


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes ``model.load_state_dict(strict=True)`` expects.

    Parameters and persistent buffers (what ``state_dict()`` returns); non-tensor extra
    state is not included.
    """
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor)
    }


def _dotted_prefixes(keys: Iterable[str]) -> list[str]:
    """Every dotted prefix shared by all keys (``"a."``, ``"a.b."``), shortest first."""
    split = [k.split(".")[:-1] for k in keys]
    if not split:
        return []
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return [".".join(common[: i + 1]) + "." for i in range(len(common))]


def _strip_candidates(keys: list[str]) -> list[str]:
    """Prefixes worth removing: repeated known wrapper prefixes and generic shared ones."""
    found: list[str] = [""]
    prefix = ""
    while True:
        rest = [k[len(prefix) :] for k in keys]
        nxt = next((p for p in KNOWN_PREFIXES if rest and all(r.startswith(p) for r in rest)), None)
        if nxt is None:
            break
        prefix += nxt
        found.append(prefix)
    for p in _dotted_prefixes(keys):
        if p not in found:
            found.append(p)
    return found


@dataclass(frozen=True)
class _Rename:
    strip: str
    add: str

    def apply(self, key: str) -> str:
        return self.add + key[len(self.strip) :]

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"removing prefix {self.strip!r}")
        if self.add:
            parts.append(f"adding prefix {self.add!r}")
        return " and ".join(parts) if parts else "keys unchanged"


def _renames(keys: list[str], expected: Mapping[str, tuple[int, ...]]) -> Iterator[_Rename]:
    for strip in _strip_candidates(keys):
        yield _Rename(strip, "")
    for add in _dotted_prefixes(list(expected)):
        for strip in _strip_candidates(keys):
            yield _Rename(strip, add)


def _is_nbt(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _NUM_BATCHES_TRACKED


@dataclass(frozen=True)
class _Comparison:
    rename: _Rename
    renamed: dict[str, Tensor]
    missing: list[str]
    unexpected: list[str]
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    score: float

    @property
    def exact(self) -> bool:
        """Keys and shapes match, ignoring ``num_batches_tracked`` in either direction."""
        return (
            not self.shape_mismatches
            and all(_is_nbt(k) for k in self.missing)
            and all(_is_nbt(k) for k in self.unexpected)
        )


def _compare(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], rename: _Rename
) -> _Comparison:
    renamed = {rename.apply(k): v for k, v in state_dict.items()}
    have = {k: tuple(v.shape) for k, v in renamed.items()}
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    mismatched = [(k, tuple(expected[k]), have[k]) for k in expected if k in have and
                  tuple(expected[k]) != have[k]]  # fmt: skip
    pairs_have = set(have.items())
    pairs_expected = {(k, tuple(s)) for k, s in expected.items()}
    union = len(pairs_have | pairs_expected)
    score = len(pairs_have & pairs_expected) / union if union else 1.0
    return _Comparison(rename, renamed, missing, unexpected, mismatched, score)


def _best_comparison(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> _Comparison:
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"cannot match weights: expected a mapping of tensors — got {type(state_dict)} — "
            "pass LoadedCheckpoint.state_dict"
        )
    keys = [k for k in state_dict if isinstance(k, str)]
    best: _Comparison | None = None
    for rename in _renames(keys, expected):
        if not all(k.startswith(rename.strip) for k in keys):
            continue
        comparison = _compare(state_dict, expected, rename)
        if comparison.exact:
            return comparison
        if best is None or comparison.score > best.score:
            best = comparison
    assert best is not None  # the identity rename always applies
    return best


def _listing(items: list[str]) -> str:
    shown = items[:REPORT_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "".join(f"\n    {item}" for item in shown) + more


def align_keys(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """Rename ``state_dict``'s keys so that keys and shapes match ``expected`` exactly.

    Tries the keys unchanged, then with wrapper prefixes removed (``module.``,
    ``module.model.``, ``_orig_mod.``, any dotted prefix shared by all keys), and with a
    prefix shared by all expected keys added. ``num_batches_tracked`` buffers missing from
    the checkpoint are filled with 0 and surplus ones dropped (BatchNorm does the same).

    Raises:
        KeyMismatchError: no renaming gives a strict match; the message is a diff of
            missing keys, unexpected keys and shape mismatches for the closest renaming.
    """
    best = _best_comparison(state_dict, expected)
    if best.exact:
        aligned = dict(best.renamed)
        for key in best.unexpected:
            del aligned[key]
        for key in best.missing:
            aligned[key] = torch.zeros(expected[key], dtype=torch.long)
        if best.missing or best.unexpected:
            logger.info(
                "num_batches_tracked: %d missing (set to 0), %d unexpected (dropped)",
                len(best.missing), len(best.unexpected),
            )  # fmt: skip
        if best.rename.strip or best.rename.add:
            logger.info("state_dict keys matched after %s", best.rename.describe())
        return aligned
    parts = [
        f"state_dict does not match the architecture (closest key mapping: "
        f"{best.rename.describe()}; {len(best.renamed)} tensors in the checkpoint, "
        f"{len(expected)} expected)"
    ]
    missing = [k for k in best.missing if not _is_nbt(k)] or best.missing
    unexpected = [k for k in best.unexpected if not _is_nbt(k)] or best.unexpected
    if best.missing:
        parts.append(f"\n  {len(missing)} missing keys:{_listing(missing)}")
    if best.unexpected:
        parts.append(f"\n  {len(unexpected)} unexpected keys:{_listing(unexpected)}")
    if best.shape_mismatches:
        lines = [f"{k}: expected {e}, found {f}" for k, e, f in best.shape_mismatches]
        parts.append(f"\n  {len(lines)} shape mismatches:{_listing(lines)}")
    parts.append(
        "\n  check that the architecture and its arguments (channels, blocks, scale) are "
        "the ones the checkpoint was trained with, or pick the recipe that matches it"
    )
    raise KeyMismatchError("".join(parts))


def key_overlap(state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> float:
    """How well ``state_dict`` fits ``expected``, in [0, 1], after the best key renaming.

    Jaccard index of the (key, shape) pairs: 1.0 is a strict match, extra or missing
    tensors and wrong shapes all lower it. Used to rank recipes when none matches.
    """
    best = _best_comparison(state_dict, expected)
    return 1.0 if best.exact else best.score


def check_finite(state_dict: Mapping[str, Tensor]) -> None:
    """Raise :class:`CheckpointError` if a floating-point tensor holds NaN or Inf."""
    bad: list[str] = []
    for name, t in state_dict.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(t.numel() - int(finite.sum()) - n_nan)
        bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf of {t.numel()} values)")
    if bad:
        raise CheckpointError(
            f"checkpoint weights are not finite — {len(bad)} tensors hold NaN or Inf:"
            f"{_listing(bad)}\n  the training run diverged or the file was damaged; use an "
            "earlier checkpoint or the EMA weights"
        )


def load_weights(model: torch.nn.Module, ckpt: LoadedCheckpoint) -> None:
    """Align ``ckpt``'s keys to ``model``, check they are finite, load with ``strict=True``."""
    try:
        aligned = align_keys(ckpt.state_dict, expected_shapes(model))
        check_finite(aligned)
    except CheckpointError as exc:
        raise type(exc)(f"{ckpt.path}: {exc}") from None
    try:
        model.load_state_dict(aligned, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"cannot load {ckpt.path} into {type(model).__name__}: load_state_dict failed — "
            f"{exc} — check the recipe's architecture arguments"
        ) from exc
