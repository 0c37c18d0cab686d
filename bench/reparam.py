"""Compile every training-form zoo model and compare its deploy graph with the closed form.

For each training-form recipe: random weights with BN statistics calibrated on a real LR
image, compiled with the default passes to ort-fp32 and validated on Set5. Prints the conv
and parameter counts of the training form, of the compiled ONNX and of the published deploy
architecture (``deploy_spec``), and the parity of the engine against the training form.
Exit 1 if a count differs or parity is below 70 dB.

    python bench/reparam.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.detect import ModelSource
from esr_deploy.recipe import find_recipe
from esr_deploy.zoo.training import calibration_image, deploy_spec, randomize

REPO = Path(__file__).resolve().parent.parent
TRAINING_FORMS = ("ecbsr_m4c16_x4", "fmen_train_x4", "rlfn_rep_x4", "repvgg_sr_x4", "dbb_sr_x4")
PARITY_FLOOR_DB = 70.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    set5 = args.shared / "data" / "sr" / "Set5"
    ok = True
    print(
        f"{'recipe':<15} {'training convs/params':>22} {'compiled':>16} {'closed form':>16} "
        f"{'min parity dB':>13}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in TRAINING_FORMS:
            recipe = find_recipe(name)
            model = recipe.build_model()
            randomize(model, seed=0, calibration=calibration_image(recipe.data_range))
            ckpt = Path(tmp) / f"{name}.pth"
            torch.save(model.state_dict(), ckpt)
            m = compile_model(
                CompileOptions(
                    source=ModelSource(checkpoint=ckpt, recipe=name),
                    val_dirs=(set5,),
                    out=Path(tmp) / name,
                    latency_shapes=(),
                )
            ).manifest
            spec = deploy_spec(name)
            t = m["metrics"]["training_form"]
            got = (m["metrics"]["onnx_convs"], m["metrics"]["onnx_params"])
            parity = m["validation"]["Set5"]["parity_min_psnr"]
            ok &= got == (spec.convs, spec.params) and parity >= PARITY_FLOOR_DB
            print(
                f"{name:<15} {t['convs']:>8} / {t['params']:>11,} {got[0]:>4} / {got[1]:>9,} "
                f"{spec.convs:>4} / {spec.params:>9,} {parity:>13.1f}",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
