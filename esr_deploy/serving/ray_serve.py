"""``esr-deploy serve``: a bundle behind Ray Serve, speaking the Open Inference Protocol v2.

Each replica opens the bundle once through :func:`esr_deploy.runtime.upscaler.load`, pinned to
the digest the driver read through the strict reader, and answers every HTTP request with
:func:`esr_deploy.serving.oip.handle` (the protocol lives there, independent of Ray). A bad
request is answered with a 4xx by the protocol and never raises, so it cannot take a replica
down. With ``max_replicas > replicas`` Ray Serve autoscales between the two on the number of
ongoing requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr_deploy.errors import EsrDeployError
from esr_deploy.serving.oip import ModelSpec, handle
from esr_deploy.serving.ray_support import connect, import_ray

APP_NAME = "esr-deploy"
#: requests one replica works on at once (more wait in Serve's queue)
MAX_ONGOING = 4


@dataclass(frozen=True)
class ServeRequest:
    """What ``serve`` was asked to do (the CLI maps its options to this)."""

    bundle: Path
    replicas: int = 1
    max_replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    digest: str | None = None


class OipReplica:
    """One replica: the bundle loaded once, requests answered by :func:`oip.handle`."""

    def __init__(self, bundle: str, digest: str) -> None:
        from esr_deploy.runtime.upscaler import load

        self.upscaler = load(bundle, digest=digest)
        self.spec = ModelSpec.of(self.upscaler.bundle.manifest)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, out_headers, payload = await asyncio.to_thread(
            handle,
            self.spec,
            request.method,
            request.url.path,
            headers,
            body,
            self.upscaler.upscale,
        )
        return Response(payload, status_code=status, headers=out_headers)


def start(request: ServeRequest) -> str:
    """Deploy the bundle on Ray Serve (connecting to or starting Ray); returns the base URL."""
    from esr_deploy.runtime.bundle_reader import open_bundle

    if not 1 <= request.replicas <= request.max_replicas:
        raise EsrDeployError(
            f"--replicas {request.replicas}, --max-replicas {request.max_replicas} — give "
            "1 ≤ replicas ≤ max-replicas."
        )
    bundle = open_bundle(request.bundle, digest=request.digest)
    ray = import_ray()
    from ray import serve

    connect(ray, request.address)
    serve.start(http_options={"host": request.host, "port": request.port})
    options: dict[str, Any] = {"max_ongoing_requests": MAX_ONGOING}
    if request.max_replicas > request.replicas:
        options["autoscaling_config"] = {
            "min_replicas": request.replicas,
            "max_replicas": request.max_replicas,
            "target_ongoing_requests": MAX_ONGOING // 2,
        }
    else:
        options["num_replicas"] = request.replicas
    deployment = serve.deployment(name="oip", **options)(OipReplica)
    serve.run(
        deployment.bind(str(bundle.path), bundle.digest),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{request.host}:{request.port}"


def stop() -> None:
    from ray import serve

    serve.delete(APP_NAME)


def serve_forever(request: ServeRequest, on_started: Callable[[str], None]) -> None:
    """:func:`start`, then keep serving until interrupted (Ctrl-C)."""
    url = start(request)
    on_started(url)
    try:
        while True:
            time.sleep(1.0)
    finally:
        stop()
