"""The latency regression gate (``esr_deploy.gate`` and ``esr-deploy bench``).

- Statistics: :func:`ratio_interval` / :func:`baseline_interval` on synthetic timings whose
  true ratio is known: no false alarm on equal or noisy timings, a clear slowdown found, seeded.
- End to end, no mocks: the bundled RLFN compiled once to ``ort-fp32`` (the *fast* bundle),
  and a genuine *slow* bundle made from it: its ONNX is the 4-way geometric self-ensemble of
  the same network (identity, horizontal, vertical and both flips of the input, each output
  flipped back, averaged) — 4× the convolutions, as a real (if costly) SR deployment does —
  built into an engine by the ONNX Runtime backend and written with checksums through
  :class:`StagedBundle`, so it passes :func:`open_bundle`. The gate then runs through the real
  CLI in a subprocess. The slowdown is about 4×, far beyond the 10% margin, so the verdicts
  do not depend on the timing noise of a shared 2-core machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

# The CLI helpers of the command-line tests (tests/ is on sys.path, see test_compile.py).
from cli_helpers import Run, assert_refused, esr_deploy, one_error
from onnx import helper, numpy_helper

from esr_deploy.bundle import MANIFEST, REFERENCE_ONNX, StagedBundle
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.errors import EXIT_BAD_INPUT, EXIT_VALIDATION_FAILED, EsrDeployError
from esr_deploy.gate.options import parse_max_regression
from esr_deploy.gate.report import BenchReport, EngineTiming, LatencyRegression
from esr_deploy.gate.statistics import baseline_interval, ratio_interval
from esr_deploy.loading.detect import ModelSource
from esr_deploy.paths import example_checkpoint
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.targets import require_available
from esr_deploy.validate.latency import LatencyStats

SHAPE = "64x64"
KEY = "1x3x64x64"
RUNS = 9  # timed rounds per CLI bench
#: Flipped axes of each self-ensemble member (NCHW: 2 = H, 3 = W).
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


# ---------------------------------------------------------------------------- statistics


def _timings(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    """Log-normal run times (ms) around ``median``: the right-skewed shape of real timings."""
    return median * np.exp(rng.normal(0.0, sigma, n))


def test_identical_distributions_give_an_interval_around_one() -> None:
    rng = np.random.default_rng(1)
    cand, ref = _timings(rng, 20.0, 0.05, 20), _timings(rng, 20.0, 0.05, 20)
    ratio, low, high = ratio_interval(cand, ref)
    assert low <= ratio <= high
    assert low < 1.0 < high
    assert high - low < 0.15  # small noise, narrow interval


def test_clear_slowdown_has_its_whole_interval_above_the_margin() -> None:
    rng = np.random.default_rng(2)
    cand, ref = _timings(rng, 30.0, 0.03, 9), _timings(rng, 20.0, 0.03, 9)
    ratio, low, high = ratio_interval(cand, ref)
    assert 1.4 < ratio < 1.6
    assert low > 1.3 and high < 1.7


def test_heavy_noise_gives_a_wide_interval_and_no_false_alarm() -> None:
    rng = np.random.default_rng(3)
    # a true slowdown of 20%, buried in noise of sigma 0.5 over 9 runs
    cand, ref = _timings(rng, 24.0, 0.5, 9), _timings(rng, 20.0, 0.5, 9)
    ratio, low, high = ratio_interval(cand, ref)
    assert high - low > 0.5
    assert low < 1.0 < high
    assert not low > 1.1  # the gate's condition with --max-regression 10%


def test_paired_resampling_cancels_noise_shared_by_a_round() -> None:
    """Interleaving pays off: noise that slows a whole round (another job on the machine)
    cancels in the paired interval, not in the one that treats the samples as unrelated."""
    rng = np.random.default_rng(4)
    round_noise = np.exp(rng.normal(0.0, 0.4, 15))  # shared by both engines in a round
    cand = 30.0 * round_noise * np.exp(rng.normal(0.0, 0.01, 15))
    ref = 20.0 * round_noise * np.exp(rng.normal(0.0, 0.01, 15))
    _, low_p, high_p = ratio_interval(cand, ref, paired=True)
    _, low_u, high_u = ratio_interval(cand, ref, paired=False)
    assert low_p > 1.3 and high_p < 1.7
    assert high_u - low_u > 3 * (high_p - low_p)


def test_intervals_are_seeded() -> None:
    rng = np.random.default_rng(5)
    cand, ref = _timings(rng, 22.0, 0.2, 60), _timings(rng, 20.0, 0.2, 60)
    first = ratio_interval(cand, ref, seed=7)
    assert ratio_interval(cand, ref, seed=7) == first
    assert ratio_interval(cand, ref, seed=8)[1:] != first[1:]
    assert ratio_interval(cand, ref, seed=8)[0] == first[0]  # the point estimate has no noise
    assert baseline_interval(cand, 20.0, seed=7) == baseline_interval(cand, 20.0, seed=7)


def test_baseline_interval_is_the_median_over_the_recorded_number() -> None:
    cand = [10.0, 11.0, 12.0, 13.0, 50.0]
    ratio, low, high = baseline_interval(cand, 6.0)
    assert ratio == pytest.approx(2.0)
    assert 10.0 / 6.0 <= low <= ratio <= high <= 50.0 / 6.0


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        ratio_interval([1.0], [1.0], confidence=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        baseline_interval([], 1.0)


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.10), ("0.1", 0.10), (" 25 % ", 0.25), ("0", 0.0), ("150%", 1.5)]
)
def test_max_regression_accepts_percentages_and_fractions(text: str, value: float) -> None:
    assert parse_max_regression(text) == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("abc", ["not a number", "10%"]),
        ("-5%", ["negative"]),
        ("nan", ["not finite"]),
        ("10", ["ambiguous", "10%"]),
    ],
)
def test_max_regression_refuses_nonsense(text: str, words: list[str]) -> None:
    with pytest.raises(EsrDeployError) as info:
        parse_max_regression(text)
    assert info.value.exit_code == EXIT_BAD_INPUT
    for word in words:
        assert word in str(info.value)


def _report(ratio: float, low: float, high: float, max_regression: float = 0.1) -> BenchReport:
    def side(role: str, median: float) -> EngineTiming:
        stats = LatencyStats(median, median * 0.9, median * 1.1, median, 9)
        return EngineTiming(role, f"/engines/{role}", "rlfn_x4", "ort-fp32", {}, stats)

    return BenchReport(
        shape=(64, 64),
        input_key=KEY,
        runs=9,
        warmup=1,
        candidate=side("candidate", 20.0 * ratio),
        reference=side("reference", 20.0),
        reference_kind="bundle",
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        confidence=0.95,
        resamples=2000,
        max_regression=max_regression,
    )


def test_gate_flags_only_an_interval_entirely_above_the_margin() -> None:
    _report(1.0, 0.95, 1.05).raise_for_regression()  # no change
    _report(1.08, 1.05, 1.11).raise_for_regression()  # significant, but within the 10%
    _report(1.3, 0.9, 1.8).raise_for_regression()  # large, but noise: not significant
    regressed = _report(1.5, 1.4, 1.6)
    assert regressed.regression and regressed.to_dict()["regression"] is True
    with pytest.raises(LatencyRegression) as info:
        regressed.raise_for_regression()
    assert info.value.exit_code == EXIT_VALIDATION_FAILED
    message = str(info.value)
    for word in (KEY, "30.00 ms", "20.00 ms", "1.500x", "[1.400x, 1.600x]", "1.100x", "10%"):
        assert word in message, message
    assert info.value.details == regressed.to_dict()


# ---------------------------------------------------------------------------- bundles


def self_ensemble(model: onnx.ModelProto, flips: tuple[tuple[int, ...], ...]) -> onnx.ModelProto:
    """The same network run on flipped copies of its input, each output flipped back, and the
    outputs averaged. Weights are shared; every member's activations are its own (its nodes
    and tensors are renamed), so no runtime can merge the members: ``len(flips)``× the work."""
    graph = model.graph
    x, y = graph.input[0].name, graph.output[0].name
    weights = {init.name for init in graph.initializer}
    extra = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "tta/start"),
        numpy_helper.from_array(np.array([-(2**63) + 1], dtype=np.int64), "tta/end"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "tta/step"),
        numpy_helper.from_array(np.array(1.0 / len(flips), dtype=np.float32), "tta/mean"),
    ]

    def flip(src: str, dst: str, axes: tuple[int, ...]) -> list[onnx.NodeProto]:
        nodes, cur = [], src
        for axis in axes:
            axis_name = f"tta/axis{axis}"
            if axis_name not in {i.name for i in extra}:
                extra.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axis_name))
            out = f"{dst}/{axis}" if axis != axes[-1] else dst
            nodes.append(
                helper.make_node(
                    "Slice", [cur, "tta/start", "tta/end", axis_name, "tta/step"], [out]
                )
            )
            cur = out
        return nodes

    nodes: list[onnx.NodeProto] = []
    outputs = []
    for k, axes in enumerate(flips):
        prefix = f"tta{k}/"
        member_in = f"{prefix}{x}" if axes else x
        nodes += flip(x, member_in, axes)

        def rename(name: str, prefix: str = prefix, member_in: str = member_in) -> str:
            if name == "" or name in weights:
                return name
            return member_in if name == x else prefix + name

        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [prefix + n for n in node.output]
            nodes.append(copy)
        member_out = prefix + y
        if axes:
            nodes += flip(member_out, f"{member_out}/unflipped", axes)
            member_out = f"{member_out}/unflipped"
        outputs.append(member_out)
    nodes.append(helper.make_node("Sum", outputs, ["tta/sum"]))
    nodes.append(helper.make_node("Mul", ["tta/sum", "tta/mean"], [y]))
    ensemble = helper.make_graph(
        nodes, f"{graph.name}_tta{len(flips)}", graph.input, graph.output,
        list(graph.initializer) + extra,
    )  # fmt: skip
    out = helper.make_model(ensemble, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.checker.check_model(out)
    return out


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled RLFN compiled to ort-fp32, latency recorded at 64x64 only."""
    out = tmp_path_factory.mktemp("bench") / "fast"
    compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=example_checkpoint()),
            target="ort-fp32",
            out=out,
            latency_shapes=((64, 64),),
            latency_runs=3,
        )
    )
    return out


@pytest.fixture(scope="module")
def slow(fast: Path) -> Path:
    """A genuine bundle whose engine does 4× the work of ``fast``'s: its 4-way self-ensemble."""
    manifest = json.loads((fast / MANIFEST).read_text())
    _, backend = require_available(manifest["target"])
    with StagedBundle(fast.parent / "slow") as staged:
        ensemble = self_ensemble(onnx.load(str(fast / REFERENCE_ONNX)), FLIPS)
        onnx.save(ensemble, str(staged.dir / REFERENCE_ONNX))
        built = backend.build(staged.dir / REFERENCE_ONNX, staged.dir, manifest["precision"])
        for name in manifest["files"]:  # the report and its pictures, as they were
            if name not in (REFERENCE_ONNX, manifest["engine"]["file"]):
                shutil.copy(fast / name, staged.dir / name)
        manifest.update(
            name=f"{manifest['name']}_tta{len(FLIPS)}",
            engine={
                "file": built.engine_file,
                "backend_version": built.backend_version,
                "device": dict(built.device),
                "settings": dict(built.settings),
            },
            latency_ms={},  # not measured: the gate measures it
        )
        staged.write_manifest(manifest)
        return staged.commit()


def bench(*args: object, cwd: Path, runs: int = RUNS) -> Run:
    """``esr-deploy bench ARGS`` at 64x64 with ``runs`` timed rounds (no extra warm-up
    round: each engine runs once as a check, and each timed call follows an untimed one)."""
    return esr_deploy("bench", *args, "--shape", SHAPE, "--runs", runs, "--warmup", 0, cwd=cwd)


def test_slow_bundle_is_genuine_and_does_more_work(fast: Path, slow: Path) -> None:
    fast_bundle, slow_bundle = open_bundle(fast), open_bundle(slow)  # checksums verified
    assert slow_bundle.manifest["files"].keys() == fast_bundle.manifest["files"].keys()

    def convs(bundle_dir: Path) -> int:
        engine = onnx.load(str(bundle_dir / "engine.onnx"))
        return sum(node.op_type == "Conv" for node in engine.graph.node)

    assert convs(slow) >= 3.5 * convs(fast)  # no member was merged away by the optimiser
    # and it computes what it claims: the mean of the fast engine's flipped predictions
    _, backend = require_available("ort-fp32")
    fast_engine, slow_engine = (
        backend.load(b.engine_path, b.manifest["engine"]["settings"])
        for b in (fast_bundle, slow_bundle)
    )
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32) * 255.0
    expected = np.mean(
        [np.flip(fast_engine.run(np.flip(x, axes).copy()), axes) for axes in FLIPS], axis=0
    )
    got = slow_engine.run(x)
    assert got.shape == (1, 3, 128, 128)
    np.testing.assert_allclose(got, expected, atol=1e-2)  # float32 sums, range 0..255


def test_slow_engine_against_fast_is_a_regression(fast: Path, slow: Path, tmp_path: Path) -> None:
    run = bench(slow, "--against", fast, "--max-regression", "10%", "--json", cwd=tmp_path)
    shown = f"exit {run.code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.code == EXIT_VALIDATION_FAILED, shown
    report = json.loads(run.stdout)  # all of stdout is the report, regression or not
    assert report["regression"] is True
    assert report["reference_kind"] == "bundle"
    assert report["shape"] == KEY and report["runs"] == 9
    assert report["max_regression"] == pytest.approx(0.1)
    assert report["ci_low"] > 1.1 and report["ci_low"] <= report["ratio"] <= report["ci_high"]
    assert report["ratio"] > 2.5, shown  # 4x the convolutions
    assert report["candidate"]["latency_ms"]["runs"] == report["reference"]["latency_ms"]["runs"]
    message = one_error(run)
    assert "Traceback" not in run.stderr
    for word in ("Latency regression", KEY, f"{report['ratio']:.3f}x", "CI", "1.100x", "10%"):
        assert word in message, f"{word!r} not in the message\n{shown}"


def test_same_engine_is_not_a_regression(fast: Path, tmp_path: Path) -> None:
    run = bench(fast, "--against", fast, "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["regression"] is False
    assert report["ci_low"] <= 1.1 and report["ci_low"] <= report["ratio"] <= report["ci_high"]
    assert 0.5 < report["ratio"] < 2.0  # the same engine: only the machine's noise


def test_baseline_of_the_same_bundle_passes(fast: Path, tmp_path: Path) -> None:
    # The recorded median was measured during the compile, minutes ago, under whatever load
    # the shared machine had then (on a busy 2-core runner the same engine's latency was seen
    # to move by 50% within a minute) — the reason the gate prefers --against, which times
    # both engines now. This test is about the baseline path, so its margin is generous.
    run = bench(fast, "--baseline", fast / MANIFEST, "--max-regression", "200%", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "candidate" in run.stdout and "reference (recorded)" in run.stdout
    assert "ratio candidate/reference" in run.stdout
    assert "allowed at most 3.000x" in run.stdout and "max regression 200%" in run.stdout
    assert "same machine type" in run.stderr  # always said for a recorded baseline
    assert "warning" not in run.stderr  # recorded on this very machine


def test_slow_engine_against_a_foreign_baseline_is_a_regression_with_a_warning(
    fast: Path, slow: Path, tmp_path: Path
) -> None:
    manifest = json.loads((fast / MANIFEST).read_text())
    manifest["engine"]["device"]["model"] = "Some Other CPU 9000"
    baseline = tmp_path / "release-manifest.json"
    baseline.write_text(json.dumps(manifest))
    run = bench(slow, "--baseline", baseline, cwd=tmp_path, runs=5)  # one engine, ~4x slower
    shown = f"exit {run.code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.code == EXIT_VALIDATION_FAILED, shown
    assert "Some Other CPU 9000" in run.stderr and "not comparable" in run.stderr, shown
    assert "REGRESSION" in run.stdout, shown  # the human-readable table and verdict
    message = one_error(run)
    for word in ("Latency regression", KEY, "baseline median recorded in", str(baseline), "CI"):
        assert word in message, f"{word!r} not in the message\n{shown}"


def test_timing_only_without_a_reference(fast: Path, tmp_path: Path) -> None:
    run = esr_deploy("bench", fast, "--shape", SHAPE, "--runs", "3", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["reference_kind"] == "none" and report["reference"] is None
    assert report["ratio"] is None and report["regression"] is False
    stats = report["candidate"]["latency_ms"]
    assert stats["runs"] == 3 and 0 < stats["p10"] <= stats["median"] <= stats["p90"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-regression", "abc"], ["--max-regression 'abc'", "not a number", "10%"]),
        (["--max-regression", "-10%"], ["negative"]),
        (["--shape", "64by64"], ["--shape '64by64'", "HxW"]),
        (["--shape", "8x8"], ["below the smallest input 15x15"]),
        (["--runs", "1"], ["--runs 1", "at least 3"]),
        (["--against", "{fast}", "--baseline", "{manifest}"], ["--against and --baseline"]),
        (["--shape", "48x48", "--baseline", "{manifest}"], ["1x3x48x48", "it has: 1x3x64x64"]),
        (["--baseline", "{tmp}/nowhere.json"], ["nowhere.json", "no such file"]),
    ],
)
def test_bad_input_is_refused(
    fast: Path, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    subs = {"fast": str(fast), "manifest": str(fast / MANIFEST), "tmp": str(tmp_path)}
    argv = [a.format(**subs) for a in args]
    run = esr_deploy("bench", fast, *argv, cwd=tmp_path)
    assert_refused(run, EXIT_BAD_INPUT, words, tmp_path)
