"""``esr-deploy inspect``, ``validate``, ``targets`` and ``recipes``, run as a user does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cli_helpers import RLFN, ZOO, Run, esr_deploy, one_error, sha256

from esr_deploy.targets import availability, get_target


def test_validate_inspect_on_the_bundle(compiled: tuple[Run, Path]) -> None:
    _, bundle = compiled
    run = esr_deploy("validate", bundle, cwd=bundle.parent)
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert "rlfn_x4" in run.stdout and "set5_crops" in run.stdout
    run = esr_deploy("inspect", bundle, "--json", cwd=bundle.parent)
    assert run.code == 0, run.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert json.loads(run.stdout)["files_verified"] == len(manifest["files"]) >= 3


def test_inspect_checkpoint(tmp_path: Path) -> None:
    run = esr_deploy("inspect", RLFN, "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    info = json.loads(run.stdout)
    assert (info["recipe"], info["scale"], info["sha256"]) == ("rlfn_x4", 4, sha256(RLFN))


def test_validate_refuses_a_modified_engine(compiled: tuple[Run, Path], tmp_path: Path) -> None:
    _, bundle = compiled
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    engine = copy / json.loads((copy / "manifest.json").read_text())["engine"]["file"]
    with engine.open("ab") as fh:
        fh.write(b"\0")
    run = esr_deploy("validate", copy, cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    for word in (str(engine), "does not match its manifest", "recompile"):
        assert word in run.stderr, run.stderr


def test_validate_a_missing_bundle(tmp_path: Path) -> None:
    run = esr_deploy("validate", "engines/nothing-here", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    for word in ("engines/nothing-here", "does not exist", "esr-deploy compile"):
        assert word in one_error(run), run.stderr


# --------------------------------------------------------------------------------------
# Listing commands
# --------------------------------------------------------------------------------------


def test_targets_says_what_runs_here_and_why_not(tmp_path: Path) -> None:
    run = esr_deploy("targets", cwd=tmp_path)
    assert run.code == 0, run.stderr
    cells = [line.replace("│", " ").split() for line in run.stdout.splitlines()]
    rows = {c[0]: " ".join(c) for c in cells if c and c[0] in ("ort-fp32", "trt-fp16")}
    assert rows["ort-fp32"].split()[1] == "yes"
    trt = availability(get_target("trt-fp16"))
    if not trt.ok:
        assert rows["trt-fp16"].split()[1] == "no"
        assert trt.reason in rows["trt-fp16"]


def test_recipes_lists_the_zoo(tmp_path: Path) -> None:
    run = esr_deploy("recipes", cwd=tmp_path)
    assert run.code == 0, run.stderr
    for name in ZOO:
        assert name in run.stdout
