"""Peers: every runner a user would pick instead of an engine is built from the real
runtimes, computes the model, and is timed side by side with the caller's engines."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from esr_deploy.cpu import bf16_unavailable_reason
from esr_deploy.memory import reset_peak
from esr_deploy.validate.peers import (
    HEADROOM,
    PEERS,
    measure_peers,
    plain_onnx,
    shape_key,
    vs_best_peer,
)


class _TinyUpscaler(nn.Module):
    """conv → ReLU → conv → pixel shuffle ×2, on 0..255 input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tail(torch.relu(self.head(x / 255.0)))
        return nn.functional.pixel_shuffle(y, 2) * 255.0


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _TinyUpscaler().eval()


def test_plain_export_computes_the_model(model: nn.Module) -> None:
    session = ort.InferenceSession(plain_onnx(model, (12, 20)), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 3, 12, 20), dtype=np.float32) * 255
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == (1, 3, 24, 40)
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_peers_and_engines_are_timed_side_by_side(model: nn.Module) -> None:
    calls: list[tuple[int, ...]] = []

    def engine(x: np.ndarray) -> object:
        calls.append(x.shape)
        return x

    def load_engine() -> Callable[[np.ndarray], object]:
        return engine

    peers = [p for p in PEERS if p != "torch-compile-fp32"]
    rows = measure_peers(
        model, 255.0, shapes=((16, 24), (20, 12)), rounds=3, peers=peers,
        engines={"mine": load_engine}, threads=1,
    )  # fmt: skip
    json.dumps(rows)  # plain JSON
    assert [r.get("peer") for r in rows[:-1]] == peers and rows[-1]["engine"] == "mine"
    # build probe 1 + warm-up 2 + 3 rounds × (rewarm + timed) per shape
    assert calls == [(1, 3, 16, 24)] * 9 + [(1, 3, 20, 12)] * 9
    assert all("group" not in row for row in rows)  # a few kB each: one interleaving
    for row in rows:
        if row.get("peer") == "eager-bf16" and bf16_unavailable_reason():
            assert "bf16" in row["skipped"] and "latency_ms" not in row
            continue
        assert "failed" not in row and "skipped" not in row
        for key in (shape_key((16, 24)), shape_key((20, 12))):
            stats = row["latency_ms"][key]
            assert stats["runs"] == 3 and 0 < stats["p10"] <= stats["median"] <= stats["p90"]


def test_a_peer_that_cannot_run_is_a_result() -> None:
    """A model that fails at the timed size: every peer's row says so, with the shape and
    the first line of the error, and nothing is timed (no exception escapes)."""

    class NeedsRoom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.max_pool2d(x, 3)

    rows = measure_peers(NeedsRoom(), 1.0, shapes=((2, 2),), rounds=1,
                         peers=["eager-fp32", "ort-plain-fp32"], threads=1)  # fmt: skip
    for row in rows:
        assert list(row["failed"]) == ["1x3x2x2"] and row["failed"]["1x3x2x2"]
        assert "latency_ms" not in row


class _Holder:
    """A runner that holds ``MIB`` MiB for as long as it lives, as a session holds its arena,
    and logs when it is built and freed."""

    MIB = 64

    def __init__(self, name: str, events: list[tuple[str, str]]) -> None:
        self.block = np.ones(self.MIB << 20, dtype=np.uint8)  # touched: resident
        events.append(("load", name))
        weakref.finalize(self, events.append, ("free", name))

    def __call__(self, x: np.ndarray) -> object:
        return self.block[:1].sum()


@pytest.mark.skipif(not reset_peak(), reason="no /proc/self/clear_refs: peaks not measurable")
def test_runners_that_do_not_fit_together_are_timed_in_groups_and_let_go(
    model: nn.Module,
) -> None:
    """With room for one holder at a time, each is built, timed and freed before the next is
    built, and the rows say which group they were timed in; with room for all, one group."""
    events: list[tuple[str, str]] = []
    engines = {n: partial(_Holder, n, events) for n in "abc"}
    tight = 2 * (_Holder.MIB << 20) + HEADROOM - 1  # < 2 × footprint + headroom: no room
    rows = measure_peers(model, 1.0, ((8, 8),), rounds=2, peers=[], engines=engines,
                         threads=1, available=lambda: tight)  # fmt: skip
    names = "abc"
    assert events == [(what, n) for n in names for what in ("load", "free")]
    assert [r["group"] for r in rows] == [{"1x3x8x8": k} for k in range(3)]
    assert all(r["latency_ms"]["1x3x8x8"]["runs"] == 2 for r in rows)
    events.clear()
    rows = measure_peers(model, 1.0, ((8, 8),), rounds=2, peers=[], engines=engines,
                         threads=1, available=lambda: 1 << 50)  # fmt: skip
    assert events[:3] == [("load", n) for n in names] and len(events) == 6
    assert all("group" not in r and r["latency_ms"]["1x3x8x8"]["runs"] == 2 for r in rows)


def test_engines_alone_need_no_model() -> None:
    calls: list[int] = []

    def load() -> Callable[[np.ndarray], object]:
        return lambda x: calls.append(x.shape[-1])

    rows = measure_peers(None, 1.0, ((4, 6),), rounds=2, peers=(), engines={"mine": load},
                         threads=1, warmup=1)  # fmt: skip
    assert rows == [{"engine": "mine", "latency_ms": {"1x3x4x6": rows[0]["latency_ms"]["1x3x4x6"]}}]
    assert rows[0]["latency_ms"]["1x3x4x6"]["runs"] == 2 and calls == [6] * 6
    with pytest.raises(ValueError, match="need the model"):
        measure_peers(None, 1.0, peers=["eager-fp32"])


def test_best_peer_is_the_fastest_that_ran_and_can_be_fp32_only() -> None:
    rows = [
        {"peer": "eager-bf16", "latency_ms": {"k": {"median": 10.0}}},
        {"peer": "ov-plain-fp32", "latency_ms": {"k": {"median": 20.0}}},
        {"peer": "eager-fp32", "latency_ms": {"k": {"median": 40.0}}},
        {"peer": "ort-plain-fp32", "failed": {"k": "boom"}},
    ]
    assert vs_best_peer(rows, "k", 5.0) == {"peer": "eager-bf16", "median_ms": 10.0, "ratio": 2.0}
    best = vs_best_peer(rows, "k", 5.0, fp32_only=True)
    assert best == {"peer": "ov-plain-fp32", "median_ms": 20.0, "ratio": 4.0}
    assert vs_best_peer(rows, "other", 5.0) == {}


def test_unknown_peer_is_refused(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        measure_peers(model, 255.0, peers=["tensorflow"])
