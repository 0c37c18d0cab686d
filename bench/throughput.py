"""Throughput of one engine at batch 1 and batch 4: images per second, measured interleaved.

An RLFN ``ort-fp32`` bundle (the bundled example checkpoint, compiled here unless
``--bundle`` is given) runs 256×256 LR inputs (four different Set5 LR images, mirrored up to
256×256) as four calls of one image and as one call of a batch of four, alternately in the
same run (:func:`esr_deploy.validate.latency.measure_interleaved`, each timed call directly
after an untimed call of the same shape), so that the machine's load hits both alike.
Printed: median latency per call and images/s = batch / median, and the ratio. The CPU model
and ISA flags are printed with them; results go to bench/out/throughput.json.

    python bench/throughput.py [--bundle BUNDLE] [--rounds 12] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SHARED = REPO.parent / "shared"
SIDE = 256
SET5 = ("baby", "bird", "butterfly", "head")


def _batch(data_range: float) -> np.ndarray:
    from esr_deploy.data import read_image

    lr_dir = SHARED / "data" / "sr" / "Set5" / "LR_bicubic" / "X4"
    images = []
    for name in SET5:
        img = read_image(lr_dir / f"{name}x4.png").astype(np.float32)
        pad = ((0, max(0, SIDE - img.shape[0])), (0, max(0, SIDE - img.shape[1])), (0, 0))
        img = np.pad(img, pad, mode="symmetric")[:SIDE, :SIDE]
        images.append(img.transpose(2, 0, 1) * np.float32(data_range / 255.0))
    return np.ascontiguousarray(np.stack(images))


def _bundle(path: str | None, workdir: Path) -> Path:
    if path:
        return Path(path)
    from esr_deploy.compiling.options import CompileOptions
    from esr_deploy.compiling.pipeline import compile_model
    from esr_deploy.loading.detect import ModelSource
    from esr_deploy.paths import example_checkpoint

    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=example_checkpoint()),
            target="ort-fp32",
            val_dirs=(),
            out=workdir / "rlfn-ort-fp32",
            latency_shapes=(),
        )
    )
    return result.bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an ort-fp32 bundle (default: compile RLFN here)")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()

    import esr_deploy
    from esr_deploy.cpu import cpu_info
    from esr_deploy.validate.latency import measure_interleaved

    with tempfile.TemporaryDirectory() as tmp:
        up = esr_deploy.load(_bundle(args.bundle, Path(tmp)))
        batch = _batch(up.data_range)
        plan = up.plan(SIDE, SIDE)
        singles = [batch[i : i + 1] for i in range(len(SET5))]

        def one_by_one() -> None:
            for x in singles:
                up.run(x, plan)

        def batched() -> None:
            up.run(batch, plan)

        same = max(
            float(np.abs(up.run(batch, plan)[i] - up.run(singles[i], plan)[0]).max())
            for i in range(len(SET5))
        )
        stats = measure_interleaved([one_by_one, batched], warmup=1, rounds=args.rounds)
    n = len(SET5)
    cpu = cpu_info()
    result = {
        "bundle": "RLFN ort-fp32" if not args.bundle else args.bundle,
        "lr": f"{SIDE}x{SIDE}",
        "batch_1": {
            "median_ms_per_image": stats[0].median_ms / n,
            "images_per_s": 1000.0 * n / stats[0].median_ms,
        },
        "batch_4": {
            "median_ms_per_call": stats[1].median_ms,
            "images_per_s": 1000.0 * n / stats[1].median_ms,
        },
        "rounds": args.rounds,
        "max_abs_batch_vs_single": same,
        "cpu": cpu,
    }
    result["ratio_batch4_over_batch1"] = (
        result["batch_4"]["images_per_s"] / result["batch_1"]["images_per_s"]
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {cpu}")
    print(f"RLFN ort-fp32, {SIDE}x{SIDE} LR, {args.rounds} interleaved rounds:")
    print(f"  batch 1: {result['batch_1']['images_per_s']:.2f} images/s")
    print(f"  batch 4: {result['batch_4']['images_per_s']:.2f} images/s")
    print(f"  ratio batch 4 / batch 1: {result['ratio_batch4_over_batch1']:.2f}")
    print(f"  batch vs single, max abs difference: {same:.3g}")


if __name__ == "__main__":
    main()
