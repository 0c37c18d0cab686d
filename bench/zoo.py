"""Compile every official checkpoint to ort-fp32 and compare with the published reference PSNR.

For each checkpoint in ../shared/weights: `compile` with no recipe named, validated on Set5
and Set14; prints the manifest's engine PSNR-Y next to the reference table of
shared/weights/README.md, the difference, and the parity floor. Exit 1 if any model misses
the table by more than 0.01 dB.

    python bench/zoo.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.detect import ModelSource

REPO = Path(__file__).resolve().parent.parent
#: shared/weights/README.md, "Reference PSNR (dB), x4, PyTorch fp32": Set5 Y, Set14 Y.
REFERENCE = {
    "imdn_x4.pth": (32.2096, 28.5820),
    "rlfn_x4.pth": (32.2379, 28.6205),
    "rfdn_aim2020.pth": (32.1589, 28.6451),
    "fmen_ntire2022.pth": (32.0289, 28.5732),
    "dipnet_ntire2023.pth": (31.8053, 28.4416),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    sets = (args.shared / "data" / "sr" / "Set5", args.shared / "data" / "sr" / "Set14")
    worst = 0.0
    print(
        f"{'checkpoint':<22} {'recipe':<10} {'Set5 engine':>11} {'ref':>8} {'Set14 engine':>12} "
        f"{'ref':>8} {'max |diff|':>10} {'min parity dB':>13}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for filename, (ref5, ref14) in REFERENCE.items():
            result = compile_model(
                CompileOptions(
                    source=ModelSource(checkpoint=args.shared / "weights" / filename),
                    val_dirs=sets,
                    out=Path(tmp) / filename,
                    latency_shapes=(),
                )
            )
            v = result.manifest["validation"]
            e5, e14 = v["Set5"]["engine_psnr_y"], v["Set14"]["engine_psnr_y"]
            diff = max(abs(e5 - ref5), abs(e14 - ref14))
            worst = max(worst, diff)
            parity = min(v["Set5"]["parity_min_psnr"], v["Set14"]["parity_min_psnr"])
            print(
                f"{filename:<22} {result.manifest['name']:<10} {e5:>11.4f} {ref5:>8.4f} "
                f"{e14:>12.4f} {ref14:>8.4f} {diff:>10.4f} {parity:>13.1f}",
                flush=True,
            )
    print(f"largest difference to the reference table: {worst:.4f} dB (allowed 0.01)")
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
