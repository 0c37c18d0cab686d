"""A complete manifest as ``compile`` writes it, for tests that need one without compiling
(the keys and JSON types :class:`esr_deploy.runtime.manifest.Manifest` reads)."""

from __future__ import annotations

import copy
from typing import Any

from esr_deploy.runtime.manifest import SCHEMA_VERSION

_SAMPLE: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "name": "m",
    "target": "ort-fp32",
    "precision": "fp32",
    "backend": "onnxruntime",
    "backend_version": "1.2.3",
    "scale": 2,
    "data_range": 255.0,
    "color_order": "RGB",
    "layout": "NCHW",
    "inputs": [{"name": "lr", "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
    "outputs": [{"name": "sr", "dtype": "float32", "shape": ["N", 3, "H*2", "W*2"]}],
    "profile": {"min": [4, 4], "opt": [64, 64], "max": [1080, 1920]},
    "checkpoint": {"path": "/ckpt/m.pth", "sha256": "0" * 64},
    "engine": {
        "file": "engine.onnx",
        "backend_version": "1.2.3",
        "device": {"kind": "cpu", "flags": ["avx2", "avx512f"]},
        "settings": {"intra_op_num_threads": 1},
    },
    "reference_onnx": "model.fp32.onnx",
    "export": {"input_range": {"min_hw": [4, 4]}, "batch": {"min": 1, "max": 64}},
    "passes": [],
    "metrics": {"params": 10},
    "validation": {
        "Set5": {
            "images": 5,
            "engine_psnr_y": 30.0,
            "psnr_drop": 0.001,
            "parity_min_psnr": 90.0,
            "required": {"parity_min_psnr": 60.0, "max_psnr_drop": 0.01},
        },
    },  # fmt: skip
    "latency_ms": {"1x3x64x64": {"median": 1.5, "p10": 1.4, "p90": 1.7, "runs": 10}},
    "files": {"engine.onnx": "a" * 64, "model.fp32.onnx": "b" * 64},
}


def sample_manifest(**changes: Any) -> dict[str, Any]:
    """A fresh copy of the sample, top-level keys replaced by ``changes``."""
    manifest = copy.deepcopy(_SAMPLE)
    manifest.update(changes)
    return manifest
