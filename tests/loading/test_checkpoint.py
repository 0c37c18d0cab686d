"""Tests for esr_deploy.loading (checkpoint, unpickler, keys): real files saved by torch."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from esr_deploy.errors import CheckpointError, KeyMismatchError, UnsafeCheckpointError
from esr_deploy.loading.checkpoint import NESTING_KEYS, LoadedCheckpoint, load_checkpoint
from esr_deploy.loading.keys import (
    KNOWN_PREFIXES,
    align_keys,
    check_finite,
    expected_shapes,
    key_overlap,
    load_weights,
)

# ----------------------------------------------------------------------------- helpers


class TinySR(nn.Module):
    """A small SR-like net with a BatchNorm (num_batches_tracked buffer)."""

    def __init__(self, channels: int = 8, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU())  # fmt: skip
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.body(self.head(x))))


class HyperParams:
    """A custom hyper-parameter class, as Lightning pickles into ``hyper_parameters``."""

    def __init__(self, channels: int, lr: float) -> None:
        self.channels = channels
        self.lr = lr


class SystemCall:
    """Malicious payload: unpickling it would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class EvalCall:
    """Malicious payload through builtins.eval."""

    def __init__(self, expr: str) -> None:
        self.expr = expr

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.expr,))


def _model_sd(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinySR()
    model.body[1].running_mean.uniform_(-1, 1)
    return model.state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
        assert a[k].device.type == "cpu"


def _save(obj: object, path: Path, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _lightning_ckpt(sd: dict[str, torch.Tensor], extra: object = None) -> dict[str, object]:
    model = TinySR()
    model.load_state_dict(sd)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    opt.step()
    ckpt: dict[str, object] = {
        "epoch": 3,
        "global_step": 300,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in sd.items()),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"step_size": 10, "gamma": 0.5}],
        "hyper_parameters": {
            "hp": HyperParams(8, 1e-3),
            "args": argparse.Namespace(scale=2, data=Path("/data/div2k")),
        },
    }
    if extra is not None:
        ckpt["hyper_parameters"]["extra"] = extra  # type: ignore[index]
    return ckpt


def _retag_cuda(src: Path, dst: Path) -> None:
    """Rewrite the storage locations of a torch.save zip from 'cpu' to 'cuda:0'."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                # protocol 2 writes str as BINUNICODE: 'X' + 4-byte length + utf-8
                new = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert new != data
                data = new
            zout.writestr(info.filename, data)


# ----------------------------------------------------------------------------- loading


def test_top_level_state_dict(tmp_path: Path) -> None:
    sd = _model_sd()
    ckpt = load_checkpoint(_save(sd, tmp_path / "a.pth"))
    assert isinstance(ckpt, LoadedCheckpoint)
    assert ckpt.nested_key is None and ckpt.placeholders == ()
    assert "body.1.num_batches_tracked" in ckpt.state_dict
    _assert_same(ckpt.state_dict, dict(sd))
    assert re.fullmatch(r"[0-9a-f]{64}", ckpt.sha256)


@pytest.mark.parametrize("key", NESTING_KEYS)
def test_each_nesting_key(tmp_path: Path, key: str) -> None:
    sd = _model_sd()
    ckpt = load_checkpoint(_save({key: sd, "iter": 5, "meta": "x"}, tmp_path / "a.pth"))
    assert ckpt.nested_key == key
    _assert_same(ckpt.state_dict, dict(sd))


def test_params_ema_preferred_over_params(tmp_path: Path) -> None:
    ema, raw = _model_sd(1), _model_sd(2)
    ckpt = load_checkpoint(_save({"params": raw, "params_ema": ema}, tmp_path / "a.pth"))
    assert ckpt.nested_key == "params_ema"
    _assert_same(ckpt.state_dict, dict(ema))


def test_nested_twice(tmp_path: Path) -> None:
    sd = _model_sd()
    ckpt = load_checkpoint(_save({"model": {"state_dict": sd}, "epoch": 1}, tmp_path / "a.pth"))
    assert ckpt.nested_key == "model/state_dict"
    _assert_same(ckpt.state_dict, dict(sd))


def test_no_tensors_names_keys(tmp_path: Path) -> None:
    path = _save({"epoch": 1, "lr": 0.1, "params": {"note": "empty"}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="no tensors") as err:
        load_checkpoint(path)
    assert "'epoch'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "module.model.", "_orig_mod.", "generator."])
def test_prefix_stripping(tmp_path: Path, prefix: str) -> None:
    sd = _model_sd()
    path = _save({f"{prefix}{k}": v for k, v in sd.items()}, tmp_path / "a.pth")
    model = TinySR()
    load_weights(model, load_checkpoint(path))
    _assert_same(dict(model.state_dict()), dict(sd))


def test_generic_common_prefix() -> None:
    sd = _model_sd()
    aligned = align_keys({f"ema_wrapper.inner.{k}": v for k, v in sd.items()},
                         expected_shapes(TinySR()))  # fmt: skip
    _assert_same(aligned, dict(sd))


def test_missing_num_batches_tracked_is_tolerated() -> None:
    sd = {k: v for k, v in _model_sd().items() if not k.endswith("num_batches_tracked")}
    model = TinySR()
    aligned = align_keys(sd, expected_shapes(model))
    assert aligned["body.1.num_batches_tracked"].item() == 0
    model.load_state_dict(aligned, strict=True)
    assert key_overlap(sd, expected_shapes(model)) == 1.0


def test_cuda_tagged_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    sd = _model_sd()
    src = _save(sd, tmp_path / "cpu.pth")
    dst = tmp_path / "cuda.pth"
    _retag_cuda(src, dst)
    if not torch.cuda.is_available():  # the rewrite is real: a plain load wants a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(dst, weights_only=True)
    _assert_same(load_checkpoint(dst).state_dict, dict(sd))


def test_cuda_tagged_lightning_checkpoint_uses_fallback(tmp_path: Path) -> None:
    sd = _model_sd()
    src = _save(_lightning_ckpt(sd), tmp_path / "cpu.ckpt")
    dst = tmp_path / "cuda.ckpt"
    _retag_cuda(src, dst)
    ckpt = load_checkpoint(dst)
    assert ckpt.placeholders
    model = TinySR()
    load_weights(model, ckpt)
    _assert_same(dict(model.state_dict()), dict(sd))


def test_real_imdn_checkpoint(weights_dir: Path) -> None:
    ckpt = load_checkpoint(weights_dir / "imdn_x4.pth")
    assert len(ckpt.state_dict) == 92 and ckpt.placeholders == ()
    assert all(k.startswith("module.") for k in ckpt.state_dict)
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
    check_finite(ckpt.state_dict)


def test_legacy_format(tmp_path: Path) -> None:
    sd = _model_sd()
    path = _save({"params": sd}, tmp_path / "a.pth", _use_new_zipfile_serialization=False)
    _assert_same(load_checkpoint(path).state_dict, dict(sd))


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_style_fallback(tmp_path: Path, legacy: bool) -> None:
    sd = _model_sd()
    path = _save(_lightning_ckpt(sd), tmp_path / "last.ckpt",
                 _use_new_zipfile_serialization=not legacy)  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):  # torch itself refuses it
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = load_checkpoint(path)
    assert ckpt.nested_key == "state_dict"
    assert f"{__name__}.HyperParams" in ckpt.placeholders
    assert "argparse.Namespace" in ckpt.placeholders
    _assert_same(ckpt.state_dict, {f"model.{k}": v for k, v in sd.items()})
    model = TinySR()
    load_weights(model, ckpt)
    _assert_same(dict(model.state_dict()), dict(sd))


def test_pickled_optimizer_object_is_placeholder(tmp_path: Path) -> None:
    model = TinySR()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = _save({"state_dict": model.state_dict(), "optimizer": opt}, tmp_path / "a.pth")
    ckpt = load_checkpoint(path)
    assert "torch.optim.sgd.SGD" in ckpt.placeholders
    _assert_same(ckpt.state_dict, dict(model.state_dict()))


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("zip_format", [True, False])
def test_os_system_refused_and_not_run(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": _model_sd(), "x": SystemCall(f"touch {marker}")}
    path = _save(payload, tmp_path / "evil.pth", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match="system") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_bare_pickle_os_system_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(SystemCall(f"touch {marker}"), protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_builtins_eval_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    expr = f"open({str(marker)!r}, 'w').close()"
    path = _save({"params": _model_sd(), "x": EvalCall(expr)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_checkpoint(path)
    assert not marker.exists()


def test_payload_hidden_in_lightning_extras_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = _lightning_ckpt(_model_sd(), extra=[HyperParams(1, 0.1), SystemCall(f"touch {marker}")])
    path = _save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_subprocess_via_stack_global_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # protocol 4: STACK_GLOBAL; the callable is subprocess.check_call
    data = (b"\x80\x04\x8c\nsubprocess\x8c\ncheck_call\x93"
            + pickle.dumps(["touch", str(marker)], protocol=4)[2:-1] + b"\x85R.")  # fmt: skip
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="subprocess"):
        load_checkpoint(path)
    assert not marker.exists()


def test_extension_opcode_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02\x82\x01)R.")  # EXT1 1, EMPTY_TUPLE, REDUCE
    with pytest.raises(UnsafeCheckpointError, match="EXT1"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
        ("builtins", "exec"), ("builtins", "compile"), ("__builtin__", "__import__"),
        ("builtins", "open"), ("builtins", "getattr"), ("sys", "modules"),
        ("importlib", "import_module"), ("runpy", "run_path"), ("shutil", "rmtree"),
        ("socket", "socket"), ("pty", "spawn"), ("ctypes", "CDLL"), ("marshal", "loads"),
        ("types", "FunctionType"), ("types", "CodeType"), ("pickle", "loads"),
        ("_pickle", "loads"), ("webbrowser", "open"), ("code", "InteractiveInterpreter"),
        ("torch", "load"), ("numpy", "load"),
    ],
)  # fmt: skip
def test_dangerous_globals_refused(tmp_path: Path, module: str, name: str) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")  # GLOBAL, REDUCE
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{name}")):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload",
    [
        b"(S'touch {m}'\nios\nsystem\n.",  # INST
        b"(cos\nsystem\nS'touch {m}'\no.",  # OBJ
        b"cposix\nsystem\n(S'touch {m}'\ntR.",  # GLOBAL + REDUCE
        b"\x80\x02cos\nsystem\n)\x81.",  # NEWOBJ
        b"\x80\x04\x8c\x08builtins\x8c\x15object.__subclasses__\x93)R.",  # dotted name
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_opcode_paths_refused(tmp_path: Path, payload: bytes) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(payload.replace(b"{m}", str(marker).encode()))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_unknown_globals_are_never_imported(tmp_path: Path) -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    obj = {"state_dict": {"w": torch.ones(2)}, "a": b"c", "b": None}
    path = _save(obj, tmp_path / "a.pth")
    with zipfile.ZipFile(path) as z:  # swap None for a call of this.Zen(1) via GLOBAL+REDUCE
        names = z.namelist()
        pkl_name = next(n for n in names if n.endswith("/data.pkl"))
        pkl = z.read(pkl_name).replace(b"N", b"cthis\nZen\nK\x01\x85R", 1)
        records = {n: z.read(n) for n in names}
    records[pkl_name] = pkl
    with zipfile.ZipFile(path, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    ckpt = load_checkpoint(path)
    assert ckpt.placeholders == ("this.Zen",)
    assert "this" not in sys.modules
    _assert_same(ckpt.state_dict, {"w": torch.ones(2)})


# ----------------------------------------------------------------------------- bad files


def _bad_files(tmp_path: Path, weights_dir: Path | None) -> dict[str, Path]:
    files: dict[str, Path] = {}
    files["missing"] = tmp_path / "nope.pth"
    files["directory"] = tmp_path / "a_dir"
    files["directory"].mkdir()
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    full = _save(_model_sd(), tmp_path / "full.pth").read_bytes()
    files["truncated"] = tmp_path / "trunc.pth"
    files["truncated"].write_bytes(full[: len(full) // 2])
    legacy = io.BytesIO()
    torch.save(_model_sd(), legacy, _use_new_zipfile_serialization=False)
    files["truncated_legacy"] = tmp_path / "trunc_legacy.pth"
    files["truncated_legacy"].write_bytes(legacy.getvalue()[: len(legacy.getvalue()) // 2])
    files["text"] = tmp_path / "notes.pth"
    files["text"].write_text("these are not the weights you are looking for\n")
    files["png"] = tmp_path / "image.pth"
    files["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return files


@pytest.mark.parametrize(
    "kind, seen",
    [
        ("missing", "not found"),
        ("directory", "not a regular file"),
        ("empty", "empty"),
        ("truncated", "truncated or corrupt"),
        ("truncated_legacy", "ends early"),
        ("text", "text starting with"),
        ("png", "PNG image"),
    ],
)
def test_bad_file_errors(tmp_path: Path, kind: str, seen: str) -> None:
    path = _bad_files(tmp_path, None)[kind]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    message = str(err.value)
    assert str(path) in message and seen in message
    assert "\n" not in message  # one paragraph


def test_truncated_real_checkpoint(tmp_path: Path, weights_dir: Path) -> None:
    for name in ("imdn_x4.pth", "rlfn_x4.pth"):
        data = (weights_dir / name).read_bytes()
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_checkpoint(path)


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    sd = _model_sd()
    sd["tail.bias"][2] = bad
    ckpt = load_checkpoint(_save(sd, tmp_path / "a.pth"))
    with pytest.raises(CheckpointError, match=r"tail\.bias \((1 NaN, 0|0 NaN, 1) Inf"):
        check_finite(ckpt.state_dict)
    with pytest.raises(CheckpointError, match=r"tail\.bias"):
        load_weights(TinySR(), ckpt)


def test_key_mismatch_diff() -> None:
    sd = dict(_model_sd())
    sd["head.weight"] = torch.zeros(50, 3, 3, 3)
    del sd["tail.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        align_keys({f"module.{k}": v for k, v in sd.items()}, expected_shapes(TinySR()))
    message = str(err.value)
    assert "1 missing keys" in message and "tail.bias" in message
    assert "1 unexpected keys" in message and "extra.weight" in message
    assert "head.weight: expected (8, 3, 3, 3), found (50, 3, 3, 3)" in message
    assert "removing prefix 'module.'" in message


def test_key_mismatch_lists_at_most_eight() -> None:
    expected = {f"layer{i}.weight": (2,) for i in range(20)}
    with pytest.raises(KeyMismatchError, match=r"20 missing keys(.|\n)*and 12 more"):
        align_keys({"other.weight": torch.zeros(2)}, expected)


def test_key_overlap_ranks_architectures() -> None:
    candidates = {
        "tiny8": expected_shapes(TinySR(8)),
        "tiny16": expected_shapes(TinySR(16)),
        "tiny8_x3": expected_shapes(TinySR(8, scale=3)),
        "mlp": expected_shapes(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))),
        "convs": expected_shapes(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 3))),
    }
    sd = {f"module.{k}": v for k, v in _model_sd().items()}
    scores = {name: key_overlap(sd, exp) for name, exp in candidates.items()}
    assert scores["tiny8"] == 1.0
    assert max((s, n) for n, s in scores.items() if n != "tiny8")[0] < 1.0
    assert scores["tiny8_x3"] > scores["tiny16"] > scores["mlp"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_load_weights_key_mismatch_names_path(tmp_path: Path) -> None:
    path = _save(_model_sd(), tmp_path / "a.pth")
    with pytest.raises(KeyMismatchError, match=re.escape(str(path))):
        load_weights(TinySR(16), load_checkpoint(path))


# ----------------------------------------------------------------------------- property

_segment = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
_names = st.lists(_segment, min_size=1, max_size=3).map(".".join)
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool])
_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def _state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(_names, min_size=1, max_size=6, unique=True))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name in names:
        shape, dtype = draw(_shapes), draw(_dtypes)
        sd[name] = (torch.rand(shape, generator=gen) * 10).to(dtype)
    return sd


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sd=_state_dicts(),
    nesting=st.lists(st.sampled_from(NESTING_KEYS), max_size=2),
    prefixes=st.lists(st.sampled_from(KNOWN_PREFIXES), max_size=2),
    lightning_extra=st.booleans(),
)
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory,
    sd: dict[str, torch.Tensor],
    nesting: list[str],
    prefixes: list[str],
    lightning_extra: bool,
) -> None:
    prefix = "".join(prefixes)
    obj: dict[str, object] = {prefix + k: v for k, v in sd.items()}
    for key in reversed(nesting):
        obj = {key: obj, "epoch": 7}
    if lightning_extra:  # an object weights_only refuses: forces the restricted reader
        obj["hyper-parameters"] = argparse.Namespace(lr=0.1)
    path = tmp_path_factory.mktemp("prop") / "ckpt.pth"
    torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert bool(ckpt.placeholders) == lightning_extra
    assert ckpt.nested_key == ("/".join(nesting) or None)
    expected = {k: tuple(v.shape) for k, v in sd.items()}
    _assert_same(align_keys(ckpt.state_dict, expected), sd)
    assert key_overlap(ckpt.state_dict, expected) == 1.0
