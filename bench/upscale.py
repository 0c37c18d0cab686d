"""Tiled vs untiled upscaling of a 1920×1080 LR frame: equality, time and peak memory.

The LR frame is a mosaic of Set14 HR images (mirrored where they do not fill the frame),
1080 rows × 1920 columns. An RLFN ``ort-fp32`` bundle (the bundled example checkpoint,
compiled here unless ``--bundle`` is given) upscales it twice, each in its own process so that
peak memory is that run's alone: untiled, and tiled at 256 LR pixels with the overlap computed
from the graph. Printed: wall time of the upscale call, peak resident memory of the process
(``VmHWM``) and its growth over the loaded engine, the serving module's memory estimate, and
the PSNR between the two float outputs (0..1 after clipping). Results go to
bench/out/upscale.json.

    python bench/upscale.py [--bundle BUNDLE] [--tile 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SHARED = REPO.parent / "shared"
FRAME = (1080, 1920)

CHILD = r"""
import json, sys, time
import numpy as np
from pathlib import Path
import esr_deploy
from esr_deploy.data import read_image

def vm(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

bundle, image, tile, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
up = esr_deploy.load(bundle, max_memory=64 << 30)
lr = read_image(image).transpose(2, 0, 1)[None].astype(np.float32)
lr *= np.float32(up.data_range / 255.0)
plan = up.plan(*lr.shape[2:], tile=None if tile == "none" else int(tile))
rss_loaded = vm("VmRSS")
start = time.perf_counter()
sr = up.run(lr, plan)
seconds = time.perf_counter() - start
np.save(out, sr)
print(json.dumps({
    "seconds": seconds,
    "peak_rss": vm("VmHWM"),
    "rss_after_load": rss_loaded,
    "estimate": up.bytes_per_pixel * (plan.tiles[0].window[1] - plan.tiles[0].window[0])
        * (plan.tiles[0].window[3] - plan.tiles[0].window[2]),
    "tiles": len(plan.tiles) if plan.tiled else 0,
    "overlap": list(plan.overlap),
    "field": up.describe_tiling(),
}))
"""


def mosaic(sr_dir: Path) -> np.ndarray:
    """Set14 HR images laid out left to right, row by row, mirrored to fill 1080×1920."""
    from esr_deploy.data import read_image

    images = [read_image(p) for p in sorted((sr_dir / "Set14" / "HR").iterdir())]
    frame = np.zeros((*FRAME, 3), np.uint8)
    y = x = row_h = 0
    for img in images * 4:
        h, w = img.shape[:2]
        if x + w > FRAME[1]:
            y, x, row_h = y + row_h, 0, 0
        if y >= FRAME[0]:
            break
        hh, ww = min(h, FRAME[0] - y), min(w, FRAME[1] - x)
        frame[y : y + hh, x : x + ww] = img[:hh, :ww]
        x, row_h = x + ww, max(row_h, hh)
    return frame


def compile_bundle(folder: Path) -> Path:
    from esr_deploy.compiling.options import CompileOptions
    from esr_deploy.compiling.pipeline import compile_model
    from esr_deploy.loading.detect import ModelSource
    from esr_deploy.paths import example_checkpoint

    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=example_checkpoint()),
            val_dirs=(),
            out=folder / "rlfn_x4-ort-fp32",
            latency_shapes=(),
        )
    )
    return result.bundle


def run(bundle: Path, image: Path, tile: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(image), tile, str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"upscale ({tile}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from PIL import Image

    from esr_deploy.validate.quality import psnr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp_name:
        tmp = Path(tmp_name)
        bundle = args.bundle or compile_bundle(tmp)
        image = OUT / "set14_mosaic_1920x1080.png"
        Image.fromarray(mosaic(SHARED / "data" / "sr")).save(image)
        untiled = run(bundle, image, "none", tmp / "untiled.npy")
        tiled = run(bundle, image, str(args.tile), tmp / "tiled.npy")
        a = np.clip(np.load(tmp / "untiled.npy") / 255.0, 0, 1)
        b = np.clip(np.load(tmp / "tiled.npy") / 255.0, 0, 1)
        value = psnr(b, a, 1.0)
        same_u8 = float(np.mean(np.round(a * 255) == np.round(b * 255)))
    gib = 2.0**30
    print(f"RLFN x4 ort-fp32, LR {FRAME[0]}×{FRAME[1]} (Set14 mosaic) → {tiled['field']}")
    print(f"{'run':>22} {'seconds':>8} {'peak RSS GiB':>13} {'growth GiB':>11} {'estimate':>9}")
    for name, r in (("untiled", untiled), (f"tiled {args.tile} ({tiled['tiles']})", tiled)):
        print(
            f"{name:>22} {r['seconds']:8.1f} {r['peak_rss'] / gib:13.2f} "
            f"{(r['peak_rss'] - r['rss_after_load']) / gib:11.2f} {r['estimate'] / gib:9.2f}"
        )
    print(
        f"overlap {tiled['overlap']} LR px; tiled vs untiled PSNR {value:.2f} dB; identical "
        f"uint8 pixels {same_u8:.4%}; time ratio tiled/untiled "
        f"{tiled['seconds'] / untiled['seconds']:.2f}; peak memory ratio "
        f"{tiled['peak_rss'] / untiled['peak_rss']:.2f}"
    )
    (OUT / "upscale.json").write_text(
        json.dumps(
            {
                "tile": args.tile,
                "untiled": untiled,
                "tiled": tiled,
                "psnr_db": value,
                "identical_uint8": same_u8,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
