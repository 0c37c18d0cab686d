"""The GPU probe the GPU backends share: what it says on this machine, GPU or not."""

from __future__ import annotations

import torch

from esr_deploy.gpu import MIN_COMPUTE_CAPABILITY, cc_tuple, cuda_availability, gpu_info, gpu_slug


def test_compute_capability_forms_compare_in_order() -> None:
    assert cc_tuple("8.6") == (8, 6) == cc_tuple((8, 6))
    assert cc_tuple("9") == (9, 0)
    assert cc_tuple(None) is None
    assert cc_tuple("7.5") < cc_tuple("8.0")  # type: ignore[operator]


def test_gpu_slug_is_a_file_name_per_gpu_model_and_capability() -> None:
    assert gpu_slug("NVIDIA H100 80GB HBM3", "9.0") == "nvidia-h100-80gb-hbm3-sm90"
    assert gpu_slug("Tesla T4", (7, 5)) == "tesla-t4-sm75"
    assert gpu_slug("", "8.0") == "gpu-sm80"


def test_gpu_info_and_availability_agree_with_torch() -> None:
    info = gpu_info()
    assert info["kind"] == "gpu" and info["cuda"] == torch.version.cuda
    status = cuda_availability("fp32")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert info["compute_capability"] == f"{major}.{minor}"
        assert info["name"] == torch.cuda.get_device_name() and info["memory_mib"] > 0
        assert status.ok
        for precision, need in MIN_COMPUTE_CAPABILITY.items():
            assert cuda_availability(precision).ok == ((major, minor) >= need)
    else:
        assert info["name"] is None and info["compute_capability"] is None
        assert not status.ok
        assert "no CUDA GPU is visible to PyTorch" in status.reason
        assert torch.__version__ in status.reason
        assert not cuda_availability("fp16").ok
