"""The help a newcomer reads, shell completion, and what ``--help`` loads.

Every command's ``--help`` is rendered by the real app (typer's CliRunner, 80 columns) and
read as a user would: flags shown as flags (no ``<bool>``), values named by a metavar (PATH,
HxW, ...) rather than a Python type (``<list[Path]>``, ``<str>``), nothing cut off with an
ellipsis, and every option and argument described.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from esr_deploy.cli import app

#: what typer prints for a parameter without a metavar: a Python type in angle brackets
PYTHON_TYPE = re.compile(r"<(bool|str|int|float|path|Path|list\[[^>]*\]|tuple\[[^>]*\])>")
#: typer's own options, described by typer
BUILTIN = {"help", "install_completion", "show_completion"}


def _group() -> Any:
    """The click group typer builds from the app (typer vendors click: read it by duck type)."""
    return typer.main.get_command(app)


def _commands() -> list[tuple[str, ...]]:
    return [()] + [(name,) for name in _group().commands]


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="esr-deploy", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_listed_without_truncation() -> None:
    text = _help(())
    listed = text.split("Commands:")[1].splitlines()
    names = {path[0] for path in _commands() if path}
    assert names == {"compile", "targets", "recipes", "inspect", "validate", "bench",
                     "upscale", "export", "serve"}  # fmt: skip
    for line in listed:
        assert not line.rstrip().endswith(("...", "…")), line
    for words in ("--install-completion", "--show-completion", "--version"):
        assert words in text


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "esr-deploy")
def test_help_reads_as_written(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "<bool>" not in text, text
    assert PYTHON_TYPE.search(text) is None, PYTHON_TYPE.search(text)
    assert "list[" not in text and "…" not in text, text
    command = _group().commands[path[0]] if path else _group()
    for param in command.params:
        if param.name in BUILTIN:
            continue
        where = f"{' '.join(path) or 'esr-deploy'}: {param.name}"
        assert getattr(param, "help", None), f"{where} has no help"
        is_argument = param.param_type_name == "argument"
        if not is_argument:
            assert all(opt in text for opt in param.opts), where
        if is_argument or not param.is_flag:  # a value is named (PATH, HxW, N), never typed
            assert param.metavar and param.metavar in text, f"{where} has no metavar"


def test_flags_are_shown_as_flags() -> None:
    """``--json  Print ...``: a flag's help follows its name, with no type or value between."""
    text = _help(("compile",))
    flags = [p for p in _group().commands["compile"].params if getattr(p, "is_flag", False)]
    assert {"--json", "--no-latency", "--profile", "--no-search"} <= {p.opts[-1] for p in flags}
    for param in flags:
        long = next(o for o in param.opts if o.startswith("--"))
        row = re.compile(rf"^\s+(-\w, )?{long}\s+(\S+)")
        found = [m for m in map(row.match, text.splitlines()) if m]
        assert found and found[0].group(2) == param.help.split()[0], long


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esr_deploy.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_shell_completion_completes_commands_and_options() -> None:
    # Typer detects the calling shell unless told not to; CI runs pytest under sh, which it
    # does not support, so name the shell explicitly as its own tests do.
    script = _cli(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert script.returncode == 0, script.stderr
    assert "_ESR_DEPLOY_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _esr_deploy_completion esr-deploy" in script.stdout
    words = {"_ESR_DEPLOY_COMPLETE": "complete_bash", "COMP_WORDS": "esr-deploy comp",
             "COMP_CWORD": "1"}  # fmt: skip
    assert _cli(env=words).stdout.split() == ["compile"]
    words.update(COMP_WORDS="esr-deploy compile --no-l", COMP_CWORD="2")
    assert _cli(env=words).stdout.split() == ["--no-latency"]


def test_help_loads_no_heavy_module() -> None:
    """``esr-deploy --help`` imports typer and rich only: no torch, ONNX or backend."""
    code = (
        "import json, sys\n"
        "from esr_deploy.cli import main\n"
        "sys.argv = ['esr-deploy', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = {m.split(".")[0] for m in json.loads(run.stderr)}
    heavy = {"torch", "onnx", "onnxruntime", "openvino", "numpy", "PIL", "tensorrt"}
    assert loaded & heavy == set()
