"""``serve``: one Ray Serve app (a local Ray, 2 CPUs) and ``tritonclient.http`` as the client.

The bundle is the small hand-made x2 network of the runtime tests (ONNX Runtime) with a
300×300 profile; the image is Set5's bird (288×288), whole.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import tritonclient.http as httpclient
from runtime.test_upscaler import _write_bundle
from tritonclient.utils import InferenceServerException

import esr_deploy
from esr_deploy.data import read_source_image
from esr_deploy.serving.ray_serve import ServeRequest, start

MAX_HW = (300, 300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("tiny") / "bundle", max_hw=MAX_HW)


@pytest.fixture(scope="module")
def port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def client(bundle: Path, port: int) -> httpclient.InferenceServerClient:
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    start(ServeRequest(bundle, replicas=1, max_replicas=2, port=port))
    c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60.0)
    deadline = time.monotonic() + 120  # bounded: the proxy and replica come up
    while time.monotonic() < deadline:
        try:
            if c.is_server_ready() and c.is_model_ready("tiny_sr"):
                break
        except Exception:  # connection refused while the proxy starts
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the Serve app did not become ready within 120 s")
    yield c
    c.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def bird(sr_data_dir: Path) -> np.ndarray:
    return read_source_image(sr_data_dir / "Set5" / "HR" / "bird.png").rgb


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("tiny_sr")
    assert meta["name"] == "tiny_sr"
    assert meta["inputs"] == [{"name": "lr", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert meta["outputs"] == [{"name": "sr", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_load_upscale(
    client: httpclient.InferenceServerClient, bundle: Path, bird: np.ndarray, binary: bool
) -> None:
    image = bird if binary else np.ascontiguousarray(bird[:40, :50])  # JSON text is slow
    tensor = httpclient.InferInput("lr", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("sr", binary_data=binary)
    result = client.infer("tiny_sr", [tensor], outputs=[wanted], request_id="r1")
    expected = esr_deploy.load(bundle).upscale(image)
    got = result.as_numpy("sr")
    assert got.dtype == np.uint8 and got.shape == (2 * image.shape[0], 2 * image.shape[1], 3)
    assert np.array_equal(got, expected)
    assert result.get_response()["id"] == "r1"


def _infer(client: httpclient.InferenceServerClient, array: np.ndarray, dtype: str) -> None:
    tensor = httpclient.InferInput("lr", list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    client.infer("tiny_sr", [tensor])


def test_bad_requests_get_4xx_and_the_replica_stays_up(
    client: httpclient.InferenceServerClient, port: int, bird: np.ndarray
) -> None:
    with pytest.raises(InferenceServerException, match=r"give \[H, W, 3\]") as e:
        _infer(client, bird[:, :, :2].copy(), "UINT8")
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="datatype 'INT32'"):
        _infer(client, bird.astype(np.int32), "INT32")
    with pytest.raises(InferenceServerException, match="exceeds the engine profile") as e:
        _infer(client, np.zeros((301, 20, 3), np.uint8), "UINT8")
    assert e.value.status() == "413"
    # a malformed body, straight over HTTP
    url = f"http://127.0.0.1:{port}/v2/models/tiny_sr/infer"
    req = urllib.request.Request(url, data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(req, timeout=30)
    assert http_error.value.code == 400 and b"not JSON" in http_error.value.read()
    # still serving
    small = np.ascontiguousarray(bird[:16, :16])
    tensor = httpclient.InferInput("lr", [16, 16, 3], "UINT8")
    tensor.set_data_from_numpy(small)
    assert client.infer("tiny_sr", [tensor]).as_numpy("sr").shape == (32, 32, 3)
