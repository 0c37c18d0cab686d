"""The restricted unpickler: checkpoints that torch's ``weights_only`` loader refuses, read without
importing or running anything named by the file.

When torch refuses a file because of extra entries it does not allow (Lightning
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
"""

from __future__ import annotations

import io
import pickle
import pickletools
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch import Tensor

from esr_deploy.errors import UnsafeCheckpointError

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


def restricted_load(data: bytes) -> tuple[Any, tuple[str, ...]]:
    placeholders: dict[str, type[_Placeholder]] = {}
    if data.startswith(b"PK\x03\x04"):
        obj = _unpickle_zip(data, placeholders)
    else:
        obj = _unpickle_legacy(data, placeholders)
    return obj, tuple(placeholders)
