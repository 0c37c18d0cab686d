"""``esr-deploy compile`` on bad input, failed validation and the success path.

Every case runs the real CLI in a subprocess (:mod:`cli_helpers`), with real bad files
written to ``tmp_path``. Two compiles of the bundled RLFN run here (one that fails
validation, one that succeeds, shared with the other CLI tests by ``conftest.compiled``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    MANIFEST_KEYS,
    OUT,
    RLFN,
    SCALE,
    SET_KEYS,
    Run,
    RunsShell,
    assert_nothing_written,
    assert_refused,
    copy_val_set,
    esr_deploy,
    one_error,
    rlfn_state_dict,
    sha256,
)
from PIL import Image

from esr_deploy.paths import recipes_dir
from esr_deploy.recipe import zoo_recipes
from esr_deploy.targets import availability, get_target

# --------------------------------------------------------------------------------------
# Bad checkpoints (exit 2)
# --------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    run = esr_deploy("compile", "nowhere/model.pth", "--out", OUT, cwd=tmp_path)
    assert_refused(run, 2, ["nowhere/model.pth", "file not found", "check the path"], tmp_path)


@pytest.mark.parametrize("kind", ["png", "text"])
def test_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "model.pth"
    if kind == "png":
        Image.new("RGB", (8, 8), (200, 10, 10)).save(ckpt, format="PNG")
        seen = "a PNG image"
    else:
        ckpt.write_text("these are not the weights you are looking for\n")
        seen = "text starting with 'these are not"
    run = esr_deploy("compile", ckpt, "--out", OUT, cwd=tmp_path)
    message = assert_refused(
        run, 2, [str(ckpt), "not a readable PyTorch checkpoint", seen, "torch.save"], tmp_path
    )
    assert "file an issue" not in message  # torch's advice to its own users, not to ours


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = RLFN.read_bytes()
    ckpt = tmp_path / "half.pth"
    ckpt.write_bytes(data[: len(data) // 2])
    run = esr_deploy("compile", ckpt, "--out", OUT, cwd=tmp_path)
    assert_refused(
        run, 2, ["not a readable PyTorch checkpoint", "truncated", "copied completely"], tmp_path
    )


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": RunsShell()}, ckpt)
    run = esr_deploy("compile", ckpt, "--out", OUT, cwd=tmp_path)
    global_name = f"{os.system.__module__}.system"  # posix.system on Linux
    assert_refused(
        run, 2, ["refusing to load", global_name, "nothing from it was", "trusted source"],
        tmp_path,
    )  # fmt: skip
    assert not (tmp_path / "MARKER").exists()


def test_keys_of_another_architecture(tmp_path: Path) -> None:
    run = esr_deploy("compile", RLFN, "--recipe", "imdn_x4", "--out", OUT, cwd=tmp_path)
    message = assert_refused(
        run,
        2,
        [
            "does not match the architecture",
            "missing keys",
            "fea_conv.weight",  # IMDN's, absent from the RLFN file
            "unexpected keys",
            "conv_1.weight",  # RLFN's, unknown to IMDN
            "imdn_x4",
            "--recipe rlfn_x4",  # the closest recipe, named as what to do
        ],
        tmp_path,
    )
    closest = message.split("closest to it:")[1]
    assert closest.lstrip().startswith("rlfn_x4 (100%")  # ranked first, whatever else the zoo has


def test_checkpoint_no_recipe_matches(tmp_path: Path) -> None:
    ckpt = tmp_path / "mine.pth"
    gen = torch.Generator().manual_seed(0)
    torch.save(
        {"head.weight": torch.randn(8, 3, 3, 3, generator=gen), "head.bias": torch.zeros(8)},
        ckpt,
    )
    run = esr_deploy("compile", ckpt, "--out", OUT, cwd=tmp_path)
    message = assert_refused(
        run, 2, ["No zoo recipe matches", "closest", "--recipe", "--arch"], tmp_path
    )
    names = {r.name for r in zoo_recipes()}
    assert sum(f"{name} (" in message for name in names) >= 3  # the closest recipes, listed


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights(tmp_path: Path, bad: str) -> None:
    state = rlfn_state_dict()
    name = "block_2.c2_r.weight"
    tensor = state[name].clone()
    tensor.view(-1)[[3, 7]] = float(bad)
    state[name] = tensor
    ckpt = tmp_path / f"{bad}.pth"
    torch.save(state, ckpt)
    run = esr_deploy("compile", ckpt, "--out", OUT, cwd=tmp_path)
    count = "2 NaN, 0 Inf" if bad == "nan" else "0 NaN, 2 Inf"
    assert_refused(run, 2, ["not finite", f"{name} ({count}", "earlier checkpoint"], tmp_path)


# --------------------------------------------------------------------------------------
# Targets (exit 2 unknown, 4 unavailable here)
# --------------------------------------------------------------------------------------


def test_unknown_target(tmp_path: Path) -> None:
    run = esr_deploy("compile", RLFN, "--target", "foo-fp32", "--out", OUT, cwd=tmp_path)
    assert_refused(
        run, 2, ["Unknown target 'foo-fp32'", "ort-fp32", "trt-fp16", "esr-deploy targets"],
        tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize(
    "target", ["trt-fp16", "trt-int8", "ort-cuda-fp32", "ort-trt-fp16", "aoti-cuda-fp16"]
)
def test_unavailable_target_fails_before_any_work(tmp_path: Path, target: str) -> None:
    status = availability(get_target(target))
    if status.ok:
        pytest.skip(f"{target} runs on this machine")
    run = esr_deploy("compile", RLFN, "--target", target, "--out", OUT, cwd=tmp_path)
    assert_refused(
        run,
        4,
        [f"'{target}' cannot run on this machine", status.reason, "available here: ort-fp32"],
        tmp_path,
    )
    assert run.seconds < 20, f"took {run.seconds:.1f} s: the target must be checked first"
    assert "Using" not in run.stderr  # no recipe was resolved: the checkpoint was not read
    # The target is checked before the checkpoint is even opened.
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"\x80\x02garbage")
    run = esr_deploy("compile", damaged, "--target", target, "--out", OUT, cwd=tmp_path)
    assert_refused(run, 4, ["cannot run on this machine"], tmp_path)


# --------------------------------------------------------------------------------------
# Output folder (exit 2)
# --------------------------------------------------------------------------------------


def test_output_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file where the output folder would go\n")
    run = esr_deploy("compile", RLFN, "--out", OUT, cwd=tmp_path)
    shown = run.stderr
    assert run.code == 2, shown
    assert "Traceback" not in run.stdout + run.stderr, shown
    assert "is a file, not a folder" in shown and "--out" in shown, shown
    assert (tmp_path / "out").read_text().startswith("a file")  # untouched
    assert list(tmp_path.rglob("*.partial-*")) == []


def test_output_folder_that_is_not_a_bundle_is_not_replaced(tmp_path: Path) -> None:
    """A compile replaces its output folder: it must refuse a folder of the user's files."""
    mine = tmp_path / "out" / "bundle"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    run = esr_deploy("compile", RLFN, "--out", OUT, cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    for word in ("not empty", "not an esr-deploy bundle", "--out"):
        assert word in run.stderr, run.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert [p.name for p in mine.parent.iterdir()] == ["bundle"]


@pytest.mark.parametrize(
    "stray",
    ['{"title": "my project"}\n', '{"schema_version": 1, "files": {}}\n'],
    ids=["any-manifest", "bundle-like-manifest"],
)
def test_output_folder_with_a_stray_manifest_is_not_replaced(tmp_path: Path, stray: str) -> None:
    """A file named manifest.json does not make a folder a bundle: only a manifest that
    parses as one, in a folder holding nothing it does not list, is replaced."""
    mine = tmp_path / "out" / "bundle"
    mine.mkdir(parents=True)
    (mine / "manifest.json").write_text(stray)
    (mine / "notes.txt").write_text("mine\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()}
    run = esr_deploy("compile", RLFN, "--out", OUT, cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    for word in ("not an esr-deploy bundle", "left untouched", "--out"):
        assert word in " ".join(one_error(run).split()), run.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()} == before
    assert [p.name for p in mine.parent.iterdir()] == ["bundle"]


# --------------------------------------------------------------------------------------
# Validation sets (exit 2)
# --------------------------------------------------------------------------------------


def test_unreadable_validation_image(tmp_path: Path) -> None:
    val = copy_val_set(tmp_path / "myset")
    bad = val / "HR" / "butterfly.png"
    bad.write_bytes(bad.read_bytes()[:200])  # a PNG cut short
    run = esr_deploy("compile", RLFN, "--val", val, "--out", OUT, cwd=tmp_path)
    assert_refused(
        run, 2, ["cannot read image", str(bad.relative_to(tmp_path)), "truncated",
                 "200-byte file", "readable image"],
        tmp_path,
    )  # fmt: skip


def test_lr_hr_size_mismatch(tmp_path: Path) -> None:
    val = copy_val_set(tmp_path / "myset")
    lr_path = val / "LR_bicubic" / f"X{SCALE}" / f"birdx{SCALE}.png"
    with Image.open(lr_path) as im:
        w, h = im.size
        im.crop((0, 0, w - 3, h)).save(lr_path)
    with Image.open(val / "HR" / "bird.png") as im:
        hr_w, hr_h = (v - v % SCALE for v in im.size)
    run = esr_deploy("compile", RLFN, "--val", val, "--out", OUT, cwd=tmp_path)
    assert_refused(
        run,
        2,
        [
            "image bird",
            f"birdx{SCALE}.png is {w - 3}×{h}",
            f"HR is {hr_w}×{hr_h}",
            "regenerate the LR",
        ],
        tmp_path,
    )


def test_missing_validation_folder(tmp_path: Path) -> None:
    run = esr_deploy("compile", RLFN, "--val", "no/such/set", "--out", OUT, cwd=tmp_path)
    assert_refused(run, 2, ["validation set no/such/set not found", "HR/", "LR_bicubic"], tmp_path)


# --------------------------------------------------------------------------------------
# Validation failure (exit 3): one compile, looked at by two tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_compile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """A recipe demanding 199 dB of parity (under the 200 dB cap, above what float32 gives):
    the compile runs to the end, then fails."""
    cwd = tmp_path_factory.mktemp("failed")
    recipe = cwd / "strict.toml"
    recipe.write_text(
        (recipes_dir() / "rlfn_x4.toml").read_text()
        + "\n[tolerances.fp32]\nparity_min_psnr = 199.0\n"
    )
    run = esr_deploy(
        "compile", RLFN, "--recipe", recipe, "--no-latency", "--json", "--out", OUT, cwd=cwd
    )
    return run, cwd


def test_validation_failure_exits_3_and_writes_nothing(failed_compile: tuple[Run, Path]) -> None:
    run, cwd = failed_compile
    shown = f"exit {run.code}\nstderr:\n{run.stderr}"
    assert run.code == 3, shown
    assert "Traceback" not in run.stdout + run.stderr, shown
    message = one_error(run)
    per_image = json.loads(run.stdout)["validation"]["set5_crops"]["per_image"]
    assert {i["name"] for i in per_image} == {"bird", "butterfly", "head"}
    for image in per_image:  # which image, which metric, measured, required
        expected = (
            f"set5_crops/{image['name']}: parity PSNR {image['parity_psnr']:.2f} dB < "
            "required 199.00 dB"
        )
        assert expected in message, shown
    assert "nothing was written" in message and "[tolerances.fp32]" in message, shown
    assert_nothing_written(cwd)
    assert not (cwd / "out").exists()  # the folders staging created are gone too


def test_validation_failure_json_is_the_failing_manifest(
    failed_compile: tuple[Run, Path],
) -> None:
    run, _ = failed_compile
    manifest = json.loads(run.stdout)  # all of stdout is one JSON document
    assert run.stdout.startswith("{") and run.stdout.rstrip().endswith("}")
    assert MANIFEST_KEYS - {"files"} <= set(manifest)
    assert len(manifest["failures"]) == 3
    assert all("parity PSNR" in f and "199.00" in f for f in manifest["failures"])
    assert manifest["validation"]["set5_crops"]["passed"] is False


# --------------------------------------------------------------------------------------
# Success path, validate, inspect
# --------------------------------------------------------------------------------------


def test_compile_json_manifest_matches_the_bundle(compiled: tuple[Run, Path]) -> None:
    run, bundle = compiled
    assert "Traceback" not in run.stdout + run.stderr
    manifest = json.loads(run.stdout)
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["schema_version"] == 1
    assert (manifest["name"], manifest["target"]) == ("rlfn_x4", "ort-fp32")
    assert (manifest["precision"], manifest["backend"]) == ("fp32", "onnxruntime")
    assert (manifest["scale"], manifest["data_range"]) == (4, 255.0)
    assert manifest["checkpoint"]["sha256"] == sha256(RLFN)
    assert isinstance(manifest["passes"], list)
    assert {"params", "flops_256", "activations_256", "convs"} <= set(manifest["metrics"])
    assert manifest["latency_ms"] == {}  # --no-latency
    results = manifest["validation"]["set5_crops"]
    assert SET_KEYS <= set(results)
    assert results["parity_min_psnr"] >= 60.0
    assert "failures" not in manifest
    # The manifest printed is the one written, and its checksums are the files on disk.
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    on_disk = {
        str(p.relative_to(bundle)): sha256(p)
        for p in bundle.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "manifest.sha256")
    }
    assert manifest["files"] == on_disk
    # the digest pins the bundle: printed (stderr with --json) and recorded beside it
    digest = (bundle / "manifest.sha256").read_text().strip()
    assert f"digest: {digest}" in run.stderr and digest.startswith("sha256:")
    assert manifest["engine"]["file"] in on_disk
    assert [p.name for p in bundle.parent.iterdir()] == ["bundle"]  # no staging left


def test_unknown_pass_is_refused_before_any_work(tmp_path: Path) -> None:
    run = esr_deploy(
        "compile", RLFN, "--passes", "fold-reparam,fold-everything", "--out", OUT, cwd=tmp_path
    )
    assert_refused(run, 2, ["Unknown pass", "fold-everything", "fold-bn", "none"], tmp_path)


def test_passes_none_records_no_pass(tmp_path: Path) -> None:
    run = esr_deploy(
        "compile", RLFN, "--passes", "none", "--no-latency", "--json", "--out", OUT, cwd=tmp_path
    )
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["passes"] == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--arch", "tests.user_models.tiny_sr:TinyGatedSR", "--recipe", "rlfn_x4"],
            ["--arch or --recipe, not both"],
        ),
        (["--scale", "2"], ["--scale and --data-range go with --arch"]),
        (["--prune-ratio", "2"], ["--prune-ratio must be between 0 and 1"]),
        (["--prune-ratio", "nan"], ["--prune-ratio must be between 0 and 1"]),
        (["--prune-to", "0"], ["--prune-to must be at least 1"]),
        (["--prune-ratio", "0.5", "--prune-to", "4"], ["--prune-ratio or --prune-to"]),
        (["--passes", ",,"], ["names no pass"]),
    ],
)
def test_contradictory_options_are_refused_before_any_work(tmp_path: Path, args, words) -> None:
    run = esr_deploy("compile", RLFN, *args, "--out", OUT, cwd=tmp_path)
    assert_refused(run, 2, words, tmp_path)


# --------------------------------------------------------------------------------------
# compile --profile, and the typed request the options map onto
# --------------------------------------------------------------------------------------


def test_profile_prints_the_stage_times_the_manifest_records(compiled: tuple[Run, Path]) -> None:
    run, bundle = compiled
    manifest = json.loads((bundle / "manifest.json").read_text())
    seconds = manifest["compile_seconds"]
    assert {"load", "passes", "export", "build", "validate", "total"} <= set(seconds)
    table = run.stderr.split("compile stages (wall time)")[1]
    for stage, value in seconds.items():
        row = next(line for line in table.splitlines() if f" {stage} " in line)
        assert f"{value:.2f}" in row, (stage, row)


def test_the_summary_reads_a_typed_manifest_as_its_json(compiled: tuple[Run, Path]) -> None:
    from esr_deploy.cli.compile import manifest_mapping
    from esr_deploy.runtime.manifest import Manifest

    _, bundle = compiled
    written = json.loads((bundle / "manifest.json").read_text())
    assert manifest_mapping(Manifest.from_json(written)) == written
    assert manifest_mapping(written) == written


def test_profile_table_shares_add_up() -> None:
    from rich.console import Console

    from esr_deploy.cli.display import profile_table

    console = Console(width=80, record=True, color_system=None)
    console.print(profile_table({"load": 1.0, "export": 3.0, "total": 4.0}))
    text = console.export_text()
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in text.splitlines()]
    rows = {c[0]: c[1:] for c in cells if c}
    assert (rows["load"], rows["export"], rows["total"]) == (
        ["1.00", "25%"],
        ["3.00", "75%"],
        ["4.00", "100%"],
    )


def test_options_map_onto_the_compile_request(tmp_path: Path) -> None:
    from esr_deploy.cli.compile import CompileFlags, compile_options
    from esr_deploy.compiling import CompileOptions
    from esr_deploy.errors import EsrDeployError
    from esr_deploy.loading.detect import ModelSource
    from esr_deploy.precision.apply import PrecisionOptions

    source, precision = ModelSource(RLFN), PrecisionOptions()
    flags = CompileFlags(
        "auto", [tmp_path], tmp_path / "b", ["64x48"], 3, 1, False, " fold-bn, none ", 0.5,
        None, True, 0.1, "ov-fp32,ort-fp32", "dynamo",
    )  # fmt: skip
    options = compile_options(source, flags, precision)
    assert options == CompileOptions(
        source=source, target="auto", exporter="dynamo", val_dirs=(tmp_path,),
        out=tmp_path / "b", latency_shapes=((64, 48),), latency_runs=3, large_runs=1,
        passes=("fold-bn", "none"), accept_border_drift=True, prune_ratio=0.5, prune_to=None,
        precision=precision, max_psnr_drop=0.1, auto_candidates=("ov-fp32", "ort-fp32"),
    )  # fmt: skip
    defaults = CompileFlags("ort-fp32", None, None, None, 10, 2, True, "none", None, None,
                            False, None, None, "auto")  # fmt: skip
    options = compile_options(source, defaults, precision)
    assert (options.latency_shapes, options.passes, options.auto_candidates) == ((), (), None)
    assert options.auto_peers is None  # the pipeline's default peers
    for text, peers in (
        ("none", ()),
        ("eager-fp32, ov-plain-fp32", ("eager-fp32", "ov-plain-fp32")),
    ):
        flags = replace(defaults, auto_peers=text)
        assert compile_options(source, flags, precision).auto_peers == peers
    with pytest.raises(EsrDeployError, match="unknown peer.*eager-fp64"):
        compile_options(source, replace(defaults, auto_peers="eager-fp64"), precision)
    bad = CompileFlags("ort-fp32", None, None, ["64"], 10, 2, False, None, None, None,
                       False, None, None, "auto")  # fmt: skip
    with pytest.raises(EsrDeployError, match="--latency-shape '64' is not a shape"):
        compile_options(source, bad, precision)
