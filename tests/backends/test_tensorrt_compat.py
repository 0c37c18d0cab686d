"""Which machine a TensorRT engine runs on: the manifest check against this GPU and TensorRT
(pure Python, any machine; the precision check of the ONNX is tested with the tiny SR graphs
in ``test_tensorrt.py``)."""

from __future__ import annotations

import logging

import pytest

from esr_deploy.backends.tensorrt import ENGINE_FILE
from esr_deploy.backends.tensorrt_compat import check_gpu_engine
from esr_deploy.errors import BundleError

H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100 = {"kind": "gpu", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
T4 = {"kind": "gpu", "name": "Tesla T4", "compute_capability": "7.5"}


def _engine_entry(
    device: dict[str, str], version: str = "10.13.0.35", hardware: str = "none", vc: bool = False
) -> dict[str, object]:
    return {
        "file": ENGINE_FILE,
        "backend_version": version,
        "device": {**device, "tensorrt": version},
        "settings": {"hardware_compatibility": hardware, "version_compatible": vc},
    }


def test_check_gpu_engine_passes_on_the_same_device() -> None:
    check_gpu_engine(_engine_entry(H100), H100, "10.13.0.35")


def test_check_gpu_engine_refuses_another_compute_capability() -> None:
    with pytest.raises(BundleError) as info:
        check_gpu_engine(_engine_entry(H100), A100, "10.13.0.35")
    message = str(info.value)
    assert "9.0" in message and "8.0" in message
    assert "H100" in message and "A100" in message


def test_check_gpu_engine_refuses_another_tensorrt_version() -> None:
    with pytest.raises(BundleError) as info:
        check_gpu_engine(_engine_entry(H100), H100, "10.14.1.48")
    assert "10.13.0.35" in str(info.value) and "10.14.1.48" in str(info.value)


def test_check_gpu_engine_refuses_without_a_gpu() -> None:
    no_gpu = {"kind": "gpu", "name": None, "compute_capability": None}
    with pytest.raises(BundleError, match="no CUDA GPU"):
        check_gpu_engine(_engine_entry(H100), no_gpu, "10.13.0.35")


def test_hardware_compatible_engine_runs_on_newer_ampere_plus_gpus() -> None:
    entry = _engine_entry(A100, hardware="ampere+")
    check_gpu_engine(entry, H100, "10.13.0.35")
    with pytest.raises(BundleError, match="7.5"):
        check_gpu_engine(entry, T4, "10.13.0.35")


def test_version_compatible_engine_runs_on_newer_tensorrt_only() -> None:
    entry = _engine_entry(H100, version="10.8.0.43", vc=True)
    check_gpu_engine(entry, H100, "10.13.0.35")
    check_gpu_engine(entry, H100, "11.0.0.1")
    with pytest.raises(BundleError, match="10.8.0.43"):
        check_gpu_engine(entry, H100, "10.7.0.23")
    with pytest.raises(BundleError, match="12.0"):
        check_gpu_engine(entry, H100, "12.0.0")
    with pytest.raises(BundleError, match="compute capability"):  # still bound to its GPU
        check_gpu_engine(entry, A100, "10.13.0.35")


def test_other_gpu_model_of_same_capability_only_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    l40 = {"kind": "gpu", "name": "NVIDIA L40S", "compute_capability": "8.9"}
    rtx = {"kind": "gpu", "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    with caplog.at_level(logging.WARNING, logger="esr_deploy.backends.tensorrt_compat"):
        check_gpu_engine(_engine_entry(l40), rtx, "10.13.0.35")
    assert "L40S" in caplog.text and "RTX 4090" in caplog.text
