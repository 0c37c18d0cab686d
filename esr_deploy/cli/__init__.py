"""The ``esr-deploy`` command line (``esr-deploy --help``; ``python -m esr_deploy.cli``).

One module per group of commands, each mapping its options onto a typed request and
rendering the result: :mod:`.compile` (compile, compile --matrix), :mod:`.inspect` (targets,
recipes, inspect, validate), :mod:`.gate` (bench), :mod:`.serving` (upscale, export, serve);
:mod:`.common` holds the app, the error boundary (exit codes) and the shared options,
:mod:`.display` the tables. Importing this package loads typer and rich, nothing heavy.
"""

from __future__ import annotations

import importlib

from esr_deploy.cli.common import app, err
from esr_deploy.errors import EXIT_BAD_INPUT

# Each module registers its commands on import; this order is the order of `--help`.
for _module in ("compile", "inspect", "gate", "serving"):
    importlib.import_module(f"esr_deploy.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """The console script: the app under the name ``esr-deploy`` (also for ``python -m``,
    so usage lines and shell completion name the command the user types)."""
    try:
        app(prog_name="esr-deploy")
    except SystemExit as exc:  # keep typer's own exit codes (usage errors are 2)
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        raise SystemExit(code) from None
    except ModuleNotFoundError as exc:
        from esr_deploy.targets import missing_compile_side

        missing = missing_compile_side(exc)
        if missing is None:
            raise
        err.print(
            f"[bold red]error:[/] this command needs the compile side of esr-deploy, and "
            f"{missing} is not installed (a runtime-only install runs bundles: upscale, "
            "inspect BUNDLE, bench, targets) — pip install 'esr-deploy\\[compile]' (install "
            "torch==2.13.0 first for the CPU build; see the README).",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(EXIT_BAD_INPUT) from None
