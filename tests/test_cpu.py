"""The CPU probe: flags parsed from ``/proc/cpuinfo`` texts of the three CPU kinds this project
runs on, what follows from them for bf16 and int8, and the bf16 targets on *this* CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from esr_deploy import cpu
from esr_deploy.backends.openvino import _hint, capabilities
from esr_deploy.targets import availability, get_target

DATA = Path(__file__).parent / "data"


def _flags(name: str) -> frozenset[str]:
    return cpu.parse_cpuinfo((DATA / f"cpuinfo_{name}.txt").read_text())[1]


@pytest.mark.parametrize(
    ("name", "model", "bf16", "vnni"),
    [
        ("zen3", "AMD EPYC-Milan Processor", False, False),
        ("zen4", "AMD EPYC 9B14", True, True),
        ("spr", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", True, True),
    ],
)
def test_each_cpu_kind_says_what_it_has(name: str, model: str, bf16: bool, vnni: bool) -> None:
    found_model, flags = cpu.parse_cpuinfo((DATA / f"cpuinfo_{name}.txt").read_text())
    assert found_model == model and "avx2" in flags
    reason = cpu.bf16_unavailable_reason(flags)
    assert (reason == "") is bf16
    if not bf16:
        assert "not native" in reason and "AVX-512 BF16" in reason
    assert cpu.has_int32_dot_products(flags) is vnni


def test_only_the_first_flags_line_counts_and_an_empty_text_has_none() -> None:
    text = "model name : A\nflags : avx2 fma\n\nmodel name : B\nflags : avx512f\n"
    assert cpu.parse_cpuinfo(text) == ("A", frozenset({"avx2", "fma"}))
    assert cpu.parse_cpuinfo("") == (None, frozenset())


def test_manifest_form_records_only_the_flags_that_matter() -> None:
    info = cpu.cpu_info()
    assert info["kind"] == "cpu" and info["cores"] >= 1
    assert set(info.get("flags", [])) <= set(cpu.RECORDED_FLAGS)
    assert set(info.get("flags", [])) == set(cpu.RECORDED_FLAGS) & cpu.flags()


@pytest.mark.parametrize("target", ["ov-bf16"])
def test_bf16_targets_exist_exactly_where_bf16_is_native(target: str) -> None:
    """Right for the CPU the suite runs on: available only with native bf16, otherwise
    refused with the reason (and never offered as an emulated engine)."""
    status = availability(get_target(target))
    native = cpu.bf16_unavailable_reason() == ""
    if not native:
        assert not status.ok and "not native" in status.reason
    else:
        assert status.ok is ("BF16" in capabilities()), status.reason


def test_ov_int8_runs_its_float_part_in_bf16_only_where_bf16_is_native() -> None:
    hint = _hint("int8", capabilities())
    native = cpu.bf16_unavailable_reason() == "" and "BF16" in capabilities()
    assert hint == ("bf16" if native else "f32")
