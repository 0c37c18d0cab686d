"""The Open Inference Protocol v2 parsing and encoding, without a server (no Ray).

The upscale function is the real tiny bundle's ``esr_deploy.load(...).upscale``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtime.test_upscaler import _write_bundle

import esr_deploy
from esr_deploy.runtime.upscaler import Upscaler
from esr_deploy.serving.oip import HEADER_LENGTH, ModelSpec, handle

INFER = "/v2/models/tiny_sr/infer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Upscaler:
    return esr_deploy.load(_write_bundle(tmp_path_factory.mktemp("t") / "b", max_hw=(40, 60)))


@pytest.fixture(scope="module")
def spec(tiny: Upscaler) -> ModelSpec:
    return ModelSpec.of(tiny.bundle.manifest)


def _binary_body(image: np.ndarray, datatype: str, extra: int = 0) -> tuple[bytes, dict]:
    raw = image.tobytes()
    header = {
        "inputs": [
            {
                "name": "lr",
                "shape": list(image.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(raw) + extra},
            }
        ],
        "outputs": [{"name": "sr", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    return text + raw, {HEADER_LENGTH: str(len(text))}


def test_binary_round_trip_equals_upscale(spec: ModelSpec, tiny: Upscaler) -> None:
    image = np.random.default_rng(0).random((9, 13, 3), dtype=np.float32)
    body, headers = _binary_body(image, "FP32")
    status, out_headers, payload = handle(spec, "POST", INFER, headers, body, tiny.upscale)
    assert status == 200, payload
    n = int(out_headers[HEADER_LENGTH])
    header = json.loads(payload[:n])
    [tensor] = header["outputs"]
    assert tensor["shape"] == [18, 26, 3] and tensor["datatype"] == "FP32"
    got = np.frombuffer(payload[n:], "<f4").reshape(18, 26, 3)
    assert np.array_equal(got, tiny.upscale(image))


@pytest.mark.parametrize(
    ("mutate", "status", "message"),
    [
        (lambda b, h: (b, {HEADER_LENGTH: "99999"}), 400, "Inference-Header-Content-Length"),
        (lambda b, h: (b[:-5], h), 400, "binary_data_size"),
        (lambda b, h: (b"[1, 2]", {}), 400, "not a JSON object"),
        (lambda b, h: (b"\xff\xfe", {}), 400, "not JSON"),
        (lambda b, h: (json.dumps({"inputs": []}).encode(), {}), 400, "exactly one"),
    ],
)
def test_malformed_requests_get_a_4xx(
    spec: ModelSpec, tiny: Upscaler, mutate, status: int, message: str
) -> None:
    body, headers = mutate(*_binary_body(np.zeros((4, 5, 3), np.uint8), "UINT8"))
    got, _, payload = handle(spec, "POST", INFER, headers, body, tiny.upscale)
    assert got == status and message in json.loads(payload)["error"]


def test_json_tensors_are_checked(spec: ModelSpec, tiny: Upscaler) -> None:
    def infer(data: object, shape: list[int], datatype: str = "UINT8") -> tuple[int, dict]:
        body = {"inputs": [{"name": "lr", "shape": shape, "datatype": datatype, "data": data}]}
        raw = json.dumps(body).encode()
        status, _, payload = handle(spec, "POST", INFER, {}, raw, tiny.upscale)
        return status, json.loads(payload)

    status, reply = infer([[[1, 2, 3]] * 2] * 2, [2, 2, 3])  # nested lists are fine
    assert status == 200 and reply["outputs"][0]["shape"] == [4, 4, 3]
    assert infer([1, 2, 3], [2, 2, 3])[0] == 400  # too few values
    assert "0..255" in infer([300] * 12, [2, 2, 3])[1]["error"]
    assert "NaN" in infer([float("nan")] * 12, [2, 2, 3], "FP32")[1]["error"]
    status, reply = infer([0] * 3 * 41 * 41, [41, 41, 3])  # profile 40×60: short side 41 > 40
    assert status == 413 and "exceeds" in reply["error"]
    assert infer([0] * 3 * 5 * 61, [5, 61, 3])[0] == 413  # long side 61 > 60
    assert infer([0] * 3 * 60 * 40, [60, 40, 3])[0] == 200  # either orientation


def test_routes(spec: ModelSpec, tiny: Upscaler) -> None:
    assert handle(spec, "GET", "/v2/health/live", {}, b"", tiny.upscale)[0] == 200
    status, _, payload = handle(spec, "GET", "/v2/models/tiny_sr/versions/1", {}, b"", tiny.upscale)
    assert status == 200 and json.loads(payload)["parameters"]["scale"] == 2
    assert handle(spec, "GET", "/v2/models/nope", {}, b"", tiny.upscale)[0] == 404
    assert handle(spec, "GET", INFER, {}, b"", tiny.upscale)[0] == 405
    assert handle(spec, "GET", "/etc/passwd", {}, b"", tiny.upscale)[0] == 404


def test_cli_serve_refuses_a_bad_bundle_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from esr_deploy.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app, ["serve", str(tmp_path), "--replicas", "3", "--max-replicas", "2"]
    )
    assert result.exit_code == 2 and "replicas" in result.output
