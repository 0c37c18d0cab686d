"""Peers: what a user would run instead of an esr-deploy engine, timed on this CPU.

An engine is worth shipping only where it beats the obvious alternatives on the machine at
hand, so these are timed side by side with it, *interleaved* (every runner in turn, round
after round, each timed call right after an untimed one of the same runner:
:func:`esr_deploy.validate.latency.interleaved_times`), so machine noise hits all alike and
ratios of medians are meaningful even on a busy machine:

- ``eager-fp32``: the official (training-form) ``nn.Module`` in PyTorch eager mode,
  ``torch.inference_mode``;
- ``eager-bf16``: the same under ``torch.autocast(bfloat16)`` with ``channels_last`` input and
  weights, only where bf16 is native on this CPU (:func:`esr_deploy.cpu.bf16_unavailable_reason`;
  emulated bf16 is several times slower than fp32 and no user would run it);
- ``torch-compile-fp32``: ``torch.compile(model)`` with its defaults (Inductor), compiled
  for each timed shape during the warm-up;
- ``ort-plain-fp32`` / ``ov-plain-fp32``: ONNX Runtime (all graph optimisations, its
  default) and OpenVINO (``INFERENCE_PRECISION_HINT=f32``, otherwise its defaults) on a plain
  ``torch.onnx.export`` of the official model at the timed shape (a static shape, which is
  the most favourable case for both runtimes): no folding passes, no esr-deploy settings.

Every runner uses the same number of threads (:func:`esr_deploy.cpu.default_threads` unless
given). Results are plain JSON-able dicts, one per peer::

    {"peer": "ov-plain-fp32", "description": "...",
     "latency_ms": {"1x3x256x256": {"median": ..., "p10": ..., "p90": ..., "mean": ...,
                                    "runs": ...}}}

or ``{"peer": ..., "description": ..., "skipped": "<why it cannot run here>"}``. The caller's
own engines can be timed in the same interleaving (``engines``) and come back in the same
form under ``"engine"`` instead of ``"peer"``. Where the runners of one shape do not fit in
memory together they are timed in groups, interleaved within each (``"group"``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from esr_deploy.cpu import bf16_unavailable_reason, default_threads
from esr_deploy.memory import available_memory, peak_bytes, reset_peak, resident_bytes
from esr_deploy.threads import torch_threads
from esr_deploy.validate.latency import measure_interleaved

__all__ = [
    "PEERS",
    "Loader",
    "Runner",
    "measure_peers",
    "peer_runners",
    "shape_key",
    "vs_best_peer",
]

log = logging.getLogger(__name__)

#: A runner takes one float32 NCHW LR array and returns when its output is ready.
Runner = Callable[[np.ndarray], object]
#: A loader builds a runner (a session, a compiled model) when it is called.
Loader = Callable[[], Runner]
#: memory left free beyond twice the largest runner's footprint (see :func:`_time_shape`)
HEADROOM = 1 << 30

#: peer id → what it is, as the results describe it
PEERS: Mapping[str, str] = {
    "eager-fp32": "PyTorch eager fp32 (official model)",
    "eager-bf16": "PyTorch eager bf16 autocast + channels_last (official model)",
    "torch-compile-fp32": "torch.compile fp32 (Inductor defaults)",
    "ort-plain-fp32": "ONNX Runtime, plain torch.onnx.export (all graph optimisations)",
    "ov-plain-fp32": "OpenVINO f32, plain torch.onnx.export (default hints)",
}


def shape_key(hw: Sequence[int]) -> str:
    """The manifest's latency key of a 1×3×H×W input, e.g. ``1x3x256x256``."""
    return f"1x3x{int(hw[0])}x{int(hw[1])}"


def _eager(model: nn.Module) -> Runner:
    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def _eager_bf16(model: nn.Module) -> Runner:
    def run(x: np.ndarray) -> object:
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(t).float()

    return run


def plain_onnx(model: nn.Module, hw: Sequence[int]) -> bytes:
    """``torch.onnx.export`` of ``model`` at 1×3×H×W as a user would call it (its default
    exporter; the TorchScript one where that fails), serialized."""
    sample = torch.zeros(1, 3, int(hw[0]), int(hw[1]))
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(model, (sample,), None, dynamo=True, verbose=False)
            assert program is not None
            return bytes(program.model_proto.SerializeToString())
        except Exception as exc:  # the exporters raise many untyped errors
            log.info("dynamo export failed (%s); using the TorchScript exporter", exc)
            buf = io.BytesIO()
            torch.onnx.export(model, (sample,), buf, dynamo=False)  # type: ignore[arg-type]
            return buf.getvalue()
        finally:
            logger.setLevel(level)


def _ort(onnx_bytes: bytes, threads: int) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _ov(onnx_bytes: bytes, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(onnx_bytes)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})


@dataclass(frozen=True)
class _Peer:
    name: str
    make: Callable[[Sequence[int]], Runner] | None  # per shape; None = skipped
    skipped: str = ""


def _same(runner: Runner) -> Callable[[Sequence[int]], Runner]:
    """A factory that returns one runner for every shape (the eager and compiled peers)."""

    def make(hw: Sequence[int]) -> Runner:
        return runner

    return make


def _exported(model: nn.Module, threads: int, runtime: str) -> Callable[[Sequence[int]], Runner]:
    def make(hw: Sequence[int]) -> Runner:
        onnx_bytes = plain_onnx(model, hw)
        return _ort(onnx_bytes, threads) if runtime == "ort" else _ov(onnx_bytes, threads)

    return make


def peer_runners(
    model: nn.Module, threads: int, peers: Sequence[str] = tuple(PEERS)
) -> list[_Peer]:
    """The peers named in ``peers``, each a factory of a runner for one H×W (or skipped with
    the reason). ``model``: the official model in eval mode (not modified)."""
    out = []
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        if name == "eager-fp32":
            out.append(_Peer(name, _same(_eager(model))))
        elif name == "eager-bf16":
            why = bf16_unavailable_reason()
            if why:
                out.append(_Peer(name, None, why))
                continue
            # Module.to(memory_format=...) converts the parameters in place: a copy keeps
            # the caller's model (and the fp32 peers) as they were
            cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            out.append(_Peer(name, _same(_eager_bf16(cl))))
        elif name == "torch-compile-fp32":
            out.append(_Peer(name, _same(_eager(torch.compile(model)))))  # type: ignore[arg-type]
        else:
            out.append(_Peer(name, _exported(model, threads, name.split("-")[0])))
    return out


def measure_peers(
    model: nn.Module | None,
    data_range: float,
    shapes: Sequence[Sequence[int]] = ((256, 256),),
    rounds: int = 7,
    large_rounds: int | None = None,
    peers: Sequence[str] = tuple(PEERS),
    engines: Mapping[str, Loader] | None = None,
    threads: int | None = None,
    warmup: int = 2,
    available: Callable[[], int] = available_memory,
) -> list[dict[str, Any]]:
    """Time every peer (and the caller's ``engines``) interleaved at each shape.

    Input: uniform random values in ``[0, data_range)``, seed 0, 1×3×H×W float32. Shapes
    with more than 512×512 pixels use ``large_rounds`` rounds (default ``rounds``). A peer
    that fails to build or run at a shape gets ``"failed": {"<shape>": "<first line>"}`` and
    is left out of that shape's timing. ``model`` may be None when no peer is asked for
    (the engines alone are timed). ``engines``: name → *loader* (a callable that returns
    the runner), called once per shape when the engine's turn comes, so that its runner can
    be let go when memory is short (see :func:`_time_shape`). Returns the list described in
    the module docstring, peers first, then engines, in the order given.
    """
    threads = threads or default_threads()
    if model is None:
        if peers:
            raise ValueError(f"peers {', '.join(peers)} need the model; none was given")
        found = []
    else:
        found = peer_runners(model.eval(), threads, peers)
    rows: list[dict[str, Any]] = []
    for p in found:
        row: dict[str, Any] = {"peer": p.name, "description": PEERS[p.name]}
        if p.make is None:
            row["skipped"] = p.skipped
        rows.append(row)
    loaders: list[tuple[dict[str, Any], Callable[[Sequence[int]], Runner]]] = [
        (row, p.make) for p, row in zip(found, rows, strict=True) if p.make is not None
    ]
    for name, load in (engines or {}).items():
        rows.append({"engine": name})
        loaders.append((rows[-1], _ignore_shape(load)))
    with torch_threads(threads):
        for hw in shapes:
            n = large_rounds if large_rounds and hw[0] * hw[1] > 512 * 512 else rounds
            _time_shape(loaders, hw, data_range, n, warmup, available)
    return rows


def _ignore_shape(load: Loader) -> Callable[[Sequence[int]], Runner]:
    return lambda _hw: load()


def _time_shape(
    loaders: Sequence[tuple[dict[str, Any], Callable[[Sequence[int]], Runner]]],
    hw: Sequence[int],
    data_range: float,
    rounds: int,
    warmup: int,
    available: Callable[[], int],
) -> None:
    """Build each runner at ``hw``, run it ``1 + warmup`` times (the first call is its build
    probe: a runner that fails there is a ``failed`` row) and time the runners interleaved.

    Memory: a runner keeps what its first calls allocated (ONNX Runtime plans its memory
    pattern in the first call and allocates it in the second: about 8 GiB for IMDN at
    720×1280), so all of them at once may not fit. Each runner's footprint is the peak
    resident growth of its build and those calls (:mod:`esr_deploy.memory`). Before the
    next runner is built, if less than ``2 × largest footprint + HEADROOM`` is available
    (room for it and for the largest transient of the ones held), the runners held so far
    are timed as one group and let go. Runners are interleaved within their group only; rows
    timed in more than one group per shape say which group (``"group": {"<shape>": k}``).
    """
    key = shape_key(hw)
    x = np.random.default_rng(0).random((1, 3, int(hw[0]), int(hw[1])), dtype=np.float32)
    x = (x * data_range).astype(np.float32)
    held: list[tuple[dict[str, Any], Runner]] = []
    groups: list[list[dict[str, Any]]] = []
    largest = 0
    for row, make in loaders:
        if held and available() < 2 * largest + HEADROOM:
            groups.append(_time_group(held, x, key, rounds))
            held = []  # the group's runners are let go here
            gc.collect()
        base = resident_bytes()
        reset_peak()
        runner = _built(make, hw, x, 1 + warmup, row)
        if runner is None:
            continue
        footprint = peak_bytes() - base
        largest = max(largest, footprint)
        log.info("%s at %s: footprint %.2f GiB, %.2f GiB available, %d held",
                 row.get("peer") or row.get("engine"), key, footprint / 2**30,
                 available() / 2**30, len(held) + 1)  # fmt: skip
        held.append((row, runner))
        del runner
    groups.append(_time_group(held, x, key, rounds))
    if len(groups) > 1:
        for k, rows in enumerate(groups):
            for row in rows:
                row.setdefault("group", {})[key] = k


def _built(
    make: Callable[[Sequence[int]], Runner],
    hw: Sequence[int],
    x: np.ndarray,
    calls: int,
    row: dict[str, Any],
) -> Runner | None:
    """The runner ``make`` builds for ``hw``, called ``calls`` times on ``x`` (the first call
    builds lazily, as ``torch.compile`` does, and fails here rather than in the timing), or
    None with the first line of the error under the row's ``failed`` (a runner that cannot
    run is a result, not the end)."""
    try:
        runner = make(hw)
        for _ in range(calls):
            runner(x)
    except Exception as exc:
        row.setdefault("failed", {})[shape_key(hw)] = (str(exc).strip().splitlines() or ["?"])[0]
        return None
    return runner


def _time_group(
    group: Sequence[tuple[dict[str, Any], Runner]],
    x: np.ndarray,
    key: str,
    rounds: int,
) -> list[dict[str, Any]]:
    """Time ``group``'s runners interleaved on ``x``; their rows get the stats under ``key``."""
    if group:
        runs = [partial(r, x) for _, r in group]  # warmed up as they were built
        for (row, _), s in zip(group, measure_interleaved(runs, 0, rounds), strict=True):
            row.setdefault("latency_ms", {})[key] = s.to_dict()
    return [row for row, _ in group]


def vs_best_peer(
    peer_rows: Sequence[Mapping[str, Any]], key: str, chosen_ms: float, fp32_only: bool = False
) -> dict[str, Any]:
    """The fastest peer timed at shape ``key`` (of the fp32 ones with ``fp32_only``) and how
    many times faster an engine of median ``chosen_ms`` is: ``{"peer", "median_ms",
    "ratio"}`` (ratio = peer's median / ``chosen_ms``), or ``{}`` where no peer ran."""
    ran = [
        (float(r["latency_ms"][key]["median"]), str(r["peer"]))
        for r in peer_rows
        if key in r.get("latency_ms", {}) and (not fp32_only or str(r["peer"]).endswith("fp32"))
    ]
    if not ran:
        return {}
    ms, name = min(ran)
    return {"peer": name, "median_ms": round(ms, 3), "ratio": round(ms / chosen_ms, 3)}
