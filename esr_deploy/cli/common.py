"""What every ``esr-deploy`` command shares: the app, the consoles, the error boundary, the
options several commands take, and the typed requests those options build.

This is the only place errors become messages and exit codes: 0 ok, 1 internal error (a bug,
with its traceback), 2 bad input, 3 validation failed, 4 target unavailable
(:mod:`esr_deploy.errors`). Messages go to stderr; with ``--json`` stdout carries one JSON
document and nothing else. Nothing heavy is imported here: ``esr-deploy --help`` loads typer
and rich only, and each command imports its work when it runs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand

from esr_deploy import __version__
from esr_deploy.errors import EsrDeployError

if TYPE_CHECKING:
    from esr_deploy.loading.detect import ModelSource

#: The help is click's plain layout (rich_markup_mode=None): flags read as flags, every
#: option shows its metavar (PATH, HxW, ...), and long defaults wrap instead of being cut.
app = typer.Typer(
    name="esr-deploy",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


class _Command(TyperCommand):
    """A command whose help names each argument by its metavar (BUNDLE, IMAGE|DIR...) alone,
    without typer's type tag (``<path>``, ``<list[str]>``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = _no_type_tag  # type: ignore[method-assign]


def _no_type_tag(ctx: object) -> None:
    return None


def command(name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``@command()``: register a function as an esr-deploy command (``app.command``)."""
    return app.command(name, cls=_Command)


err = Console(stderr=True)
out = Console()

T = TypeVar("T")

RAY_HELP = (
    "Run on Ray: 'local' (a Ray started on this machine) or a cluster address "
    "(ray://host:10001); needs the ray extra of esr-deploy."
)

# Options several commands take, one definition each.
Ray = Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=RAY_HELP)]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout and nothing else.")
]
ExpectDigest = Annotated[
    str | None,
    typer.Option(
        "--expect-digest",
        metavar="SHA256",
        help="Refuse the bundle unless its digest is this one, as `compile` printed it "
        "(sha256:<hex>).",
    ),
]
BundleArg = Annotated[
    Path, typer.Argument(metavar="BUNDLE", help="Engine bundle folder.", show_default=False)
]
Recipe = Annotated[
    str | None,
    typer.Option(
        "--recipe", "-r", metavar="NAME|TOML", help="Zoo recipe name or path to a recipe .toml."
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        metavar="MODULE:CLASS",
        help="Your architecture: pkg.module:Class, or a function that returns the nn.Module.",
    ),
]
ArchArgs = Annotated[
    str | None,
    typer.Option(
        metavar="JSON", help="Constructor arguments of --arch, e.g. '{\"channels\": 32}'."
    ),
]
Scale = Annotated[
    int | None, typer.Option(metavar="N", help="Upscaling factor of --arch (2, 3, 4, ...).")
]
DataRange = Annotated[
    float | None,
    typer.Option(
        metavar="1|255", help="Input range --arch was trained with: 1 or 255 (with --arch)."
    ),
]


def model_source(
    checkpoint: Path,
    recipe: str | None,
    arch: str | None,
    arch_args: str | None,
    scale: int | None = None,
    data_range: float | None = None,
) -> ModelSource:
    """The typed request for "which model": a checkpoint and its recipe, named or detected."""
    from esr_deploy.loading.detect import ModelSource

    return ModelSource(checkpoint, recipe, arch, arch_args, scale, data_range)


def print_error(message: str) -> None:
    # The message is plain text: escape it so that "[tolerances.fp32]" or a pip extra
    # like "esr-deploy[tensorrt]" is printed, not taken for rich markup and dropped.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """A line for the user on stderr, printed as written (no markup, no highlighting)."""
    err.print(text, highlight=False, markup=False, soft_wrap=True)


def run(fn: Callable[[], T], json_output: bool = False) -> T:
    """Run a command body; turn EsrDeployError into a message and its exit code."""
    try:
        return fn()
    except EsrDeployError as exc:
        if json_output and exc.details is not None:
            sys.stdout.write(json.dumps(exc.details, indent=2) + "\n")
        print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as exc:  # the user's model code may raise anything, anywhere
        from esr_deploy.targets import missing_compile_side

        if missing_compile_side(exc):
            raise  # a runtime-only install: main() says what to install
        from esr_deploy.loading.user_code import user_code_error

        user_error = user_code_error(exc)
        if user_error is None:
            raise  # esr-deploy's own bug: exit 1 with the traceback
        print_error(str(user_error))
        raise typer.Exit(user_error.exit_code) from None


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )


def write_json(value: object) -> None:
    """``value`` as the one JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"esr-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Deployment compiler for efficient super-resolution networks: checkpoint → validated
    engine bundle.

    Shell completion: `esr-deploy --install-completion` (bash, zsh, fish, PowerShell), or
    `esr-deploy --show-completion` to see the script first.
    """
