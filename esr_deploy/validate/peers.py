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
form under ``"engine"`` instead of ``"peer"``.
"""

from __future__ import annotations

import contextlib
import copy
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
from esr_deploy.threads import torch_threads
from esr_deploy.validate.latency import measure_interleaved

__all__ = ["PEERS", "Runner", "measure_peers", "peer_runners", "shape_key"]

log = logging.getLogger(__name__)

#: A runner takes one float32 NCHW LR array and returns when its output is ready.
Runner = Callable[[np.ndarray], object]

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
    model: nn.Module,
    data_range: float,
    shapes: Sequence[Sequence[int]] = ((256, 256),),
    rounds: int = 7,
    large_rounds: int | None = None,
    peers: Sequence[str] = tuple(PEERS),
    engines: Mapping[str, Runner] | None = None,
    threads: int | None = None,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time every peer (and the caller's ``engines``) interleaved at each shape.

    Input: uniform random values in ``[0, data_range)``, seed 0, 1×3×H×W float32. Shapes
    with more than 512×512 pixels use ``large_rounds`` rounds (default ``rounds``). A peer
    that fails to build or run at a shape gets ``"failed": {"<shape>": "<first line>"}`` and
    is left out of that shape's timing. Returns the list described in the module docstring,
    peers first, then engines, in the order given.
    """
    threads = threads or default_threads()
    model.eval()
    found = peer_runners(model, threads, peers)
    rows: list[dict[str, Any]] = []
    for p in found:
        row: dict[str, Any] = {"peer": p.name, "description": PEERS[p.name]}
        if p.make is None:
            row["skipped"] = p.skipped
        rows.append(row)
    for name in engines or {}:
        rows.append({"engine": name})
    with torch_threads(threads):
        for hw in shapes:
            _time_shape(found, rows, engines or {}, hw, data_range, rounds, large_rounds, warmup)
    return rows


def _time_shape(
    found: Sequence[_Peer],
    rows: list[dict[str, Any]],
    engines: Mapping[str, Runner],
    hw: Sequence[int],
    data_range: float,
    rounds: int,
    large_rounds: int | None,
    warmup: int,
) -> None:
    key = shape_key(hw)
    x = np.random.default_rng(0).random((1, 3, int(hw[0]), int(hw[1])), dtype=np.float32)
    x = (x * data_range).astype(np.float32)
    timed: list[tuple[dict[str, Any], Runner]] = []
    for p, row in zip(found, rows, strict=False):
        if p.make is None:
            continue
        try:
            runner = p.make(hw)
            runner(x)  # builds lazily (torch.compile) and fails here, not in the timing
        except Exception as exc:  # a peer that cannot run is a result, not the end
            row.setdefault("failed", {})[key] = (str(exc).strip().splitlines() or ["?"])[0]
            continue
        timed.append((row, runner))
    engine_rows = rows[len(found) :]
    timed += [(row, engines[row["engine"]]) for row in engine_rows]
    n = large_rounds if large_rounds and hw[0] * hw[1] > 512 * 512 else rounds
    stats = measure_interleaved([partial(r, x) for _, r in timed], warmup=warmup, rounds=n)
    for (row, _), s in zip(timed, stats, strict=True):
        row.setdefault("latency_ms", {})[key] = s.to_dict()
