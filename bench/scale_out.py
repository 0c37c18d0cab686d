"""Ray against the local path: ``upscale --ray`` throughput and ``serve`` latency (not named
ray.py: a script's folder comes first on sys.path and would shadow the ray package).

1. Batch: 64 crops (96×96) of Set14 HR images upscaled by an RLFN ``ort-fp32`` bundle (the
   bundled example checkpoint, compiled here unless ``--bundle`` is given), once by the local
   path (``Upscaler.upscale_files``, one process) and once by ``upscale --ray`` on a local Ray
   of this machine's CPUs (Ray's start-up excluded, the actors' bundle loading included, as
   the local path's is). Printed: images/s of each and Ray's overhead; the outputs are checked
   byte for byte equal.
2. Serve: the same bundle on Ray Serve (one replica), ``tritonclient.http`` clients sending
   64×64 crops (binary tensors) at concurrency 1, 4 and 16: requests/s, p50 and p99 latency.

Results go to bench/out/ray.json.

    python bench/scale_out.py [--bundle BUNDLE] [--actors 2] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SHARED = REPO.parent / "shared"
CROP = 96
CROPS = 64


def make_crops(folder: Path) -> list[np.ndarray]:
    """64 crops of Set14 HR images on a grid, written as PNGs to ``folder``."""
    folder.mkdir(parents=True)
    crops: list[np.ndarray] = []
    images = sorted((SHARED / "data" / "sr" / "Set14" / "HR").glob("*.png"))
    while len(crops) < CROPS:
        for path in images:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            k = len(crops) // len(images)
            y = (k * 53) % max(1, rgb.shape[0] - CROP)
            x = (k * 71) % max(1, rgb.shape[1] - CROP)
            crops.append(np.ascontiguousarray(rgb[y : y + CROP, x : x + CROP]))
            Image.fromarray(crops[-1]).save(folder / f"{len(crops):03d}.png")
            if len(crops) == CROPS:
                break
    return crops


def bench_batch(bundle: Path, inputs: Path, work: Path, actors: int) -> dict:
    import ray

    from esr_deploy.runtime.upscaler import load, upscale_jobs
    from esr_deploy.serving.ray_batch import RayUpscaleRequest, upscale_on_ray

    start = time.perf_counter()
    records, skipped = load(bundle).upscale_files(upscale_jobs([inputs], work / "local"))
    local_s = time.perf_counter() - start
    assert skipped == 0 and len(records) == CROPS

    ray.init(include_dashboard=False, logging_level="warning")
    request = RayUpscaleRequest(bundle, (inputs,), work / "ray", actors=actors)
    start = time.perf_counter()
    result = upscale_on_ray(request)
    ray_s = time.perf_counter() - start
    assert len(result.written) == CROPS
    equal = all(
        (work / "ray" / p.relative_to(work / "local")).read_bytes() == p.read_bytes()
        for p in (work / "local").rglob("*.png")
    )
    return {
        "images": CROPS,
        "crop": CROP,
        "local_images_per_s": CROPS / local_s,
        "ray_images_per_s": CROPS / ray_s,
        "ray_actors": actors,
        "ray_overhead_pct": 100.0 * (ray_s / local_s - 1.0),
        "outputs_equal": equal,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_serve(bundle: Path, crops: list[np.ndarray], requests: int) -> list[dict]:
    import tritonclient.http as httpclient

    from esr_deploy.serving.ray_serve import ServeRequest, start, stop

    port = _free_port()
    start(ServeRequest(bundle, port=port))
    url = f"127.0.0.1:{port}"
    name = json.loads((bundle / "manifest.json").read_text())["name"]
    probe = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if probe.is_model_ready(name):
                break
        except Exception:
            pass
        time.sleep(0.5)
    images = [np.ascontiguousarray(c[:64, :64]) for c in crops]

    local = threading.local()  # geventhttpclient: one client per thread, used only there

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(url)
        tensor = httpclient.InferInput("lr", [64, 64, 3], "UINT8")
        tensor.set_data_from_numpy(images[i % len(images)])
        t = time.perf_counter()
        local.client.infer(name, [tensor]).as_numpy("sr")
        return time.perf_counter() - t

    results = []
    for concurrency in (1, 4, 16):
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))  # warm: each thread's client connects
            start_t = time.perf_counter()
            lat = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - start_t
        ms = np.array(lat) * 1000
        results.append(
            {
                "concurrency": concurrency,
                "requests": requests,
                "requests_per_s": requests / wall,
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
        print(json.dumps(results[-1]))
    stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--serve-only", action="store_true", help="skip the batch part")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from upscale import compile_bundle  # bench/upscale.py: the RLFN ort-fp32 bundle

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = args.bundle or compile_bundle(work / "bundle")
        crops = make_crops(work / "crops")
        batch = None
        if not args.serve_only:
            batch = bench_batch(bundle, work / "crops", work, args.actors)
            print(json.dumps(batch))
        else:
            import ray

            ray.init(include_dashboard=False, logging_level="warning")
        serve = bench_serve(bundle, crops, args.requests)
    OUT.mkdir(exist_ok=True)
    (OUT / "ray.json").write_text(json.dumps({"batch": batch, "serve": serve}, indent=2) + "\n")


if __name__ == "__main__":
    main()
