"""Channel pruning on the official RLFN x4: exact removal of zeroed filters, and lossy 25%.

1. The 4 lowest-L1 filters (weights and bias) of every block's c1_r and c2_r zeroed, then
   compiled (exact pruning runs by default): parameters before/after, the expected drop
   (those filters plus their consumers' input slices), parity against the zeroed model.
2. ``--prune-ratio 0.25``: the manifest's pruning report (params, FLOPs, latency ratio
   measured side by side at 256x256, Set5 PSNR drop).

    python bench/prune.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.detect import ModelSource
from esr_deploy.loading.keys import load_weights
from esr_deploy.recipe import find_recipe

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    weights = args.shared / "weights" / "rlfn_x4.pth"
    set5 = args.shared / "data" / "sr" / "Set5"
    model = find_recipe("rlfn_x4").build_model()
    load_weights(model, load_checkpoint(weights))
    nf, blocks = model.conv_1.out_channels, 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("c1_r", "c2_r")):
                idx = torch.argsort(m.weight.abs().flatten(1).sum(1))[:4]
                m.weight[idx], m.bias[idx] = 0, 0
                blocks += name.endswith("c1_r")
    expected = blocks * (2 * 4 * (nf * 9 + 1) + 4 * (nf - 4) * 9 + 4 * nf * 9)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "zeroed.pth"
        torch.save(model.state_dict(), ckpt)
        m = compile_model(
            CompileOptions(
                source=ModelSource(checkpoint=ckpt, recipe="rlfn_x4"),
                val_dirs=(set5,),
                out=Path(tmp) / "a",
                latency_shapes=(),
            )
        ).manifest
        p = m["pruning"]
        print(
            f"exact: params {p['params_before']:,} -> {p['params_after']:,} (drop "
            f"{p['params_before'] - p['params_after']:,}, filters + consumer slices "
            f"{expected:,}); parity vs zeroed model "
            f"{m['validation']['Set5']['parity_min_psnr']} dB",
            flush=True,
        )
        m = compile_model(
            CompileOptions(
                source=ModelSource(checkpoint=weights),
                val_dirs=(set5,),
                out=Path(tmp) / "b",
                latency_shapes=((256, 256),),
                latency_runs=3,
                prune_ratio=0.25,
            )
        ).manifest
        report = {k: v for k, v in m["pruning"].items() if k != "removed_channels"}
        print("lossy --prune-ratio 0.25:", json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
