"""The Open Inference Protocol v2 (Triton's and KServe's HTTP/REST API) for one bundle.

Independent of any server: :func:`handle` maps (method, path, headers, body) to (status,
headers, body), so the protocol is unit-tested without Ray and Ray Serve only forwards to it.

The served model is the image interface of ``esr_deploy.load(bundle).upscale``: one input
tensor named as the manifest's input, ``UINT8`` (or ``FP32`` in 0..1) pixels of shape
``[H, W, 3]``, and one output tensor named as the manifest's output, the same datatype, of
shape ``[s·H, s·W, 3]``: the output is exactly ``upscale(input)``.

Routes: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``…/ready`` and ``POST …/infer``. Tensors
travel as JSON ``data`` (flat or nested, row-major) or with the **binary tensor extension**:
the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
tensors' raw little-endian bytes, each input declaring ``parameters.binary_data_size``; an
output asked for with ``parameters.binary_data`` (or the request's ``binary_data_output``) is
returned that way. Every malformed or out-of-profile request gets a 4xx and ``{"error": …}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from esr_deploy.errors import EsrDeployError
from esr_deploy.runtime.manifest import Manifest

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?/?$")

Response = tuple[int, dict[str, str], bytes]


class ProtocolError(EsrDeployError):
    """A request the protocol refuses; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelSpec:
    """What the protocol needs to know of a bundle (from its manifest)."""

    name: str
    input_name: str
    output_name: str
    scale: int
    max_hw: tuple[int, int] | None  # the engine profile's largest input (either orientation)

    @classmethod
    def of(cls, manifest: Manifest) -> ModelSpec:
        return cls(
            name=manifest.name,
            input_name=manifest.inputs[0].name,
            output_name=manifest.outputs[0].name,
            scale=manifest.scale,
            max_hw=manifest.profile.max,
        )

    def metadata(self) -> dict[str, Any]:
        s = self.scale
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "esr-deploy",
            "inputs": [{"name": self.input_name, "datatype": "UINT8", "shape": [-1, -1, 3]}],
            "outputs": [{"name": self.output_name, "datatype": "UINT8", "shape": [-1, -1, 3]}],
            "parameters": {"scale": s, "max_input_hw": list(self.max_hw or [])},
        }

    def max_body_bytes(self) -> int:
        """Largest body a valid request can have: the biggest FP32 image as JSON text."""
        h, w = self.max_hw or (4096, 4096)
        return h * w * 3 * 24 + (1 << 16)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    image: np.ndarray  # H×W×3, uint8 or float32
    binary_output: bool


def _json_error(status: int, message: str) -> Response:
    return status, {"content-type": "application/json"}, json.dumps({"error": message}).encode()


def _json(payload: Any, status: int = 200) -> Response:
    return status, {"content-type": "application/json"}, json.dumps(payload).encode()


def _header_and_blobs(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    raw_length = headers.get(HEADER_LENGTH)
    length = len(body)
    if raw_length is not None:
        if not raw_length.isdigit() or int(raw_length) > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {raw_length!r}, the body has {len(body)} "
                "bytes — give the JSON header's length in bytes"
            )
        length = int(raw_length)
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(
            f"the request body is not JSON ({exc}) — send an OIP v2 request"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError("the request body is not a JSON object — send an OIP v2 request")
    return header, body[length:]


def _tensor(spec: ModelSpec, entry: Any, blobs: bytes) -> np.ndarray:
    if not isinstance(entry, dict):
        raise ProtocolError("an input is not a JSON object — give name, shape, datatype, data")
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if name != spec.input_name:
        raise ProtocolError(f"unknown input {name!r} — this model's input is {spec.input_name!r}")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input datatype {datatype!r} — give UINT8 (or FP32 in 0..1)")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or shape[2] != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ProtocolError(f"input shape {shape!r} — give [H, W, 3] (RGB pixels)")
    h, w, _ = shape
    if spec.max_hw is not None:
        big, small = max(spec.max_hw), min(spec.max_hw)
        if max(h, w) > big or min(h, w) > small:
            raise ProtocolError(
                f"input {h}×{w} exceeds the engine profile's maximum {spec.max_hw} — send a "
                "smaller image or crop it into pieces",
                status=413,
            )
    dtype = DATATYPES[datatype]
    count = h * w * 3
    size = (entry.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or len(blobs) < size:
            raise ProtocolError(
                f"binary_data_size {size} with {len(blobs)} bytes after the header — a "
                f"{datatype} {shape} tensor is {count * dtype.itemsize} bytes"
            )
        return np.frombuffer(blobs[:size], dtype=dtype).reshape(h, w, 3)
    try:
        data = np.asarray(entry.get("data"), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"input data is not a list of numbers ({exc})") from None
    if data.size != count:
        raise ProtocolError(f"input data has {data.size} values — shape {shape} needs {count}")
    if dtype == np.uint8 and (np.any(data < 0) or np.any(data > 255) or np.any(data % 1)):
        raise ProtocolError("UINT8 input data has values outside the integers 0..255")
    if dtype != np.uint8 and not np.isfinite(data).all():
        raise ProtocolError("FP32 input data has NaN or infinite values")
    return data.astype(dtype).reshape(h, w, 3)


def parse_infer(spec: ModelSpec, headers: Mapping[str, str], body: bytes) -> InferRequest:
    """An infer request's image and how to return the output (see the module docstring)."""
    header, blobs = _header_and_blobs(headers, body)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError(f"'inputs' must list exactly one tensor ({spec.input_name!r})")
    image = _tensor(spec, inputs[0], blobs)
    binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise ProtocolError("'outputs' is not a list")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != spec.output_name:
            raise ProtocolError(f"unknown output — this model's output is {spec.output_name!r}")
        binary = bool((out.get("parameters") or {}).get("binary_data", binary))
    rid = header.get("id")
    return InferRequest(str(rid) if rid is not None else None, image, binary)


def encode_infer(spec: ModelSpec, request: InferRequest, output: np.ndarray) -> Response:
    datatype = "UINT8" if output.dtype == np.uint8 else "FP32"
    tensor: dict[str, Any] = {"name": spec.output_name, "datatype": datatype}
    tensor["shape"] = list(output.shape)
    payload: dict[str, Any] = {"model_name": spec.name, "model_version": "1", "outputs": [tensor]}
    if request.id is not None:
        payload["id"] = request.id
    if not request.binary_output:
        tensor["data"] = output.reshape(-1).tolist()
        return _json(payload)
    raw = np.ascontiguousarray(output, dtype=DATATYPES[datatype]).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(payload).encode()
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return 200, headers, header + raw


def handle(
    spec: ModelSpec,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    upscale: Callable[[np.ndarray], np.ndarray],
) -> Response:
    """Answer one HTTP request (headers' names lower-case); never raises for a bad request."""
    try:
        if path.rstrip("/") == "/v2":
            return _json({"name": "esr-deploy", "extensions": ["binary_tensor_data"]})
        if path.rstrip("/") in ("/v2/health/live", "/v2/health/ready"):
            return 200, {}, b""
        match = _MODEL_ROUTE.match(path)
        if match is None:
            return _json_error(404, f"no route {path} — see the OIP v2 paths under /v2")
        name, version, action = match.groups()
        if name != spec.name or version not in (None, "1"):
            return _json_error(404, f"unknown model {name!r} version {version!r}")
        if action is None:
            return _json(spec.metadata())
        if action == "ready":
            return 200, {}, b""
        if method != "POST":
            return _json_error(405, "infer takes POST")
        if len(body) > spec.max_body_bytes():
            raise ProtocolError(f"request body of {len(body)} bytes is too large", status=413)
        request = parse_infer(spec, headers, body)
        return encode_infer(spec, request, upscale(request.image))
    except ProtocolError as exc:
        return _json_error(exc.status, str(exc))
    except EsrDeployError as exc:  # the runtime refused the image (e.g. cannot be tiled)
        return _json_error(422, str(exc))
