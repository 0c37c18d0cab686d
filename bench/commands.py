"""How long the compile-side commands take, start to finish, as a newcomer runs them.

Each command runs in a fresh process (``esr-deploy`` from this virtual environment), one
after another, ``--repeat`` times for the quick ones (the median, min and max of the wall
times are printed) and once for the compiles, whose manifest's ``compile_seconds`` (the wall
time of each stage) is printed too:

- ``esr-deploy --help``, ``esr-deploy targets``;
- ``esr-deploy inspect CKPT`` for the official RLFN, IMDN and FMEN checkpoints;
- ``esr-deploy compile rlfn_x4.pth --target ort-fp32 --val Set5 --val Set14`` (default
  latency shapes 256×256 and 720×1280) and the same with ``--target ov-int8`` and
  ``--target ort-int8`` (their sensitivity searches included).

The CPU model, its flags and the load average at the start are printed first: a busy machine
makes every figure larger. Results: ``bench/out/commands.json``.

    python bench/commands.py [--repeat 5] [--skip-compiles]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from esr_deploy.cpu import cpu_info, default_threads

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ESR_SHARED", REPO.parent / "shared"))
CLI = str(Path(sys.executable).with_name("esr-deploy"))
CHECKPOINTS = ("rlfn_x4.pth", "imdn_x4.pth", "fmen_ntire2022.pth")
SETS = (
    "--val",
    str(SHARED / "data" / "sr" / "Set5"),
    "--val",
    str(SHARED / "data" / "sr" / "Set14"),
)


def timed(args: list[str]) -> float:
    """Wall seconds of ``esr-deploy ARGS`` in a fresh process; a failure ends the bench."""
    start = time.perf_counter()
    done = subprocess.run([CLI, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"esr-deploy {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return seconds


def quick(label: str, args: list[str], repeat: int) -> dict[str, Any]:
    times = [timed(args) for _ in range(repeat)]
    row = {"command": label, "median_s": statistics.median(times), "min_s": min(times),
           "max_s": max(times), "runs": repeat}  # fmt: skip
    print(f"{label:<40} median {row['median_s']:6.2f} s  (min {min(times):.2f}, "
          f"max {max(times):.2f}, {repeat} runs)", flush=True)  # fmt: skip
    return row


def full_compile(target: str, out: Path) -> dict[str, Any]:
    label = f"compile rlfn_x4 --target {target} Set5+Set14"
    args = ["compile", str(SHARED / "weights" / "rlfn_x4.pth"), "--target", target, *SETS,
            "--out", str(out)]  # fmt: skip
    seconds = timed(args)
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest.get("compile_seconds", {})
    print(f"{label:<40} {seconds:6.1f} s  stages: "
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)  # fmt: skip
    return {"command": label, "seconds": seconds, "compile_seconds": stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each quick command")
    parser.add_argument("--skip-compiles", action="store_true", help="the quick commands only")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    info = cpu_info()
    print(f"CPU: {info.get('model')}, {default_threads()} threads; flags: "
          f"{', '.join(info.get('flags', []))}; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    rows = [quick("--help", ["--help"], args.repeat), quick("targets", ["targets"], args.repeat)]
    for name in CHECKPOINTS:
        path = str(SHARED / "weights" / name)
        rows.append(quick(f"inspect {name}", ["inspect", path], args.repeat))
    if not args.skip_compiles:
        with tempfile.TemporaryDirectory(prefix="esr-bench-") as tmp:
            for target in ("ort-fp32", "ov-int8", "ort-int8"):
                rows.append(full_compile(target, Path(tmp) / target))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"cpu": info, "load_average": os.getloadavg(), "rows": rows}
    (args.out / "commands.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
