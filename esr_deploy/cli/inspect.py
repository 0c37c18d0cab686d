"""Commands that look without building: ``targets``, ``recipes``, ``inspect`` and
``validate`` (re-run a bundle's parity and PSNR here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esr_deploy.cli.common import (
    Arch,
    ArchArgs,
    BundleArg,
    DataRange,
    ExpectDigest,
    JsonFlag,
    Recipe,
    Scale,
    command,
    err,
    model_source,
    note,
    out,
    run,
    setup_logging,
    write_json,
)
from esr_deploy.errors import EsrDeployError


@command()
def targets(json_output: JsonFlag = False) -> None:
    """List the targets and whether each runs here (and why not)."""
    from esr_deploy.targets import availability_all

    rows = availability_all()
    if json_output:
        write_json(
            [
                {
                    "target": t.name,
                    "available": a.ok,
                    "reason": a.reason,
                    "description": t.description,
                }
                for t, a in rows
            ]
        )
        return
    from esr_deploy.cli.display import targets_table

    out.print(targets_table(rows))


@command()
def recipes() -> None:
    """List the zoo's recipes and what spandrel detects.

    spandrel recognises further architectures from a state dict alone; they are used when no
    zoo recipe matches a checkpoint.
    """

    def body() -> None:
        from rich.table import Table

        from esr_deploy.loading.spandrel import INSTALL_HINT, spandrel_architectures
        from esr_deploy.recipe import zoo_recipes

        table = Table(title="recipes")
        for col in ("name", "scale", "range", "arch", "description"):
            table.add_column(col)
        for r in zoo_recipes():
            table.add_row(r.name, f"x{r.scale}", f"0..{r.data_range:g}", r.arch, r.description)
        out.print(table)
        found = spandrel_architectures()
        if not found:
            out.print(f"spandrel is not installed ({INSTALL_HINT}): no detection beyond the zoo")
            return
        table = Table(title="detected by spandrel when no recipe matches (RGB, 0..1)")
        for col in ("architecture", "name", "usable here"):
            table.add_column(col)
        for a in found:
            table.add_row(a.id, a.name, "yes" if a.usable else f"no: {a.why_not}")
        out.print(table)

    run(body)


InspectPath = Annotated[
    Path,
    typer.Argument(
        metavar="CHECKPOINT|BUNDLE",
        help="A checkpoint (.pth/.pt/.ckpt) or an engine bundle folder.",
        show_default=False,
    ),
]


@command()
def inspect(
    path: InspectPath,
    recipe: Recipe = None,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    scale: Scale = None,
    data_range: DataRange = None,
    expect_digest: ExpectDigest = None,
    json_output: JsonFlag = False,
) -> None:
    """Show what a checkpoint or a bundle holds, building nothing.

    A checkpoint: its architecture, NTIRE metrics, smallest accepted input and what each pass
    would do (without doing it). A bundle: its manifest and digest, opened by the strict
    reader.
    """
    setup_logging()

    def body() -> None:
        from esr_deploy.inspection import inspect_bundle, inspect_checkpoint

        if path.is_dir():
            info = inspect_bundle(path, expect_digest)
        else:
            from esr_deploy.loading.user_code import user_stdout_to_stderr

            source = model_source(path, recipe, arch, arch_args, scale, data_range)
            with user_stdout_to_stderr():
                info = inspect_checkpoint(source)
        if json_output:
            write_json(info)
            return
        from esr_deploy.cli.display import info_table

        out.print(info_table(str(path), info))

    run(body, json_output)


ValDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--val",
        metavar="DIR",
        help="Validation set folder (repeatable; default: the small set packaged with esr-deploy).",
    ),
]
ReferenceCheckpoint = Annotated[
    Path | None,
    typer.Option(
        metavar="CHECKPOINT",
        help="Checkpoint for the PyTorch reference (default: the bundle's fp32 ONNX is the "
        "reference; nothing the bundle names is imported or read).",
    ),
]


@command()
def validate(
    bundle: BundleArg,
    val: ValDirs = None,
    checkpoint: ReferenceCheckpoint = None,
    recipe: Recipe = None,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    expect_digest: ExpectDigest = None,
    json_output: JsonFlag = False,
) -> None:
    """Re-run a bundle's parity and PSNR validation on this machine."""
    setup_logging()

    def body() -> None:
        from esr_deploy.cli.display import summary_table
        from esr_deploy.errors import ValidationError
        from esr_deploy.loading.user_code import user_stdout_to_stderr
        from esr_deploy.progress import RichProgress
        from esr_deploy.validate.rerun import validate_bundle

        if checkpoint is None and (recipe or arch or arch_args):
            raise EsrDeployError(
                "--recipe, --arch and --arch-args name the model of --checkpoint — give the "
                "checkpoint too, or none of them to compare with the bundle's fp32 ONNX."
            )
        named = model_source(checkpoint, recipe, arch, arch_args) if checkpoint else None
        with user_stdout_to_stderr():  # what model code prints must not corrupt --json
            report = validate_bundle(
                bundle, tuple(val or ()), named, RichProgress(err), digest=expect_digest
            )
        if json_output:
            write_json(report)
        else:
            note(f"reference: {report['reference']}")
            out.print(summary_table(report, bundle))
        if report["failures"]:
            raise ValidationError("Validation failed — " + "; ".join(report["failures"]))

    run(body, json_output=False)
