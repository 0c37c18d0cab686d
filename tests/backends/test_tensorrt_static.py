"""The TensorRT backend checked against the TensorRT API without TensorRT or a GPU.

1. **Types.** mypy checks ``esr_deploy/backends/tensorrt.py`` (and the ONNX Runtime GPU
   backend that imports it) against the installed ``tensorrt-stubs`` package: every
   ``trt.`` attribute, enum member, call signature and method of an object TensorRT returns.
   The project's mypy run cannot see these stubs (the package has no ``py.typed`` and
   ``ignore_missing_imports`` makes ``tensorrt`` ``Any``), so this test copies them onto
   ``mypy_path``. tensorrt-stubs 10.13 has a few signatures Python cannot parse (plugin
   methods with a parameter named ``in``; ``add_scale_nd`` with a parameter without default
   after defaulted ones); the copy repairs them and anything else unparsable fails the test.
   To show the check has teeth, copies of the module with one misspelt TensorRT name each
   (a builder method, an enum member, a method of an object several calls deep, ...) must
   each give a mypy error naming it; and a probe confirms ``tensorrt`` resolves to the stubs.
2. **Removed API.** An ``ast`` scan of the module for TensorRT API that TensorRT 10
   deprecated or removed and TensorRT 11 removes (:data:`REMOVED_API`), including all
   weak-typing precision controls: with strongly typed networks precision comes from the
   ONNX only.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "esr_deploy" / "backends" / "tensorrt.py"
GPU_MODULE = REPO / "esr_deploy" / "backends" / "onnxruntime_gpu.py"

#: (id, correct text, misspelt text): each misspelling must give a mypy error naming it
MUTATIONS = [
    # a method of the Builder (trt.Builder(logger))
    ("builder_method", "create_optimization_profile", "create_optimisation_profile"),
    # an enum member
    ("enum_member", "trt.MemoryPoolType.WORKSPACE", "trt.MemoryPoolType.WORK_SPACE"),
    ("network_flag", "CreationFlag.STRONGLY_TYPED", "CreationFlag.STRONG_TYPED"),
    # methods of objects TensorRT returns: config ← builder, context ← engine ← runtime
    ("config_method", "config.set_timing_cache(", "config.set_timing_cach("),
    ("context_method", "execute_async_v3(", "execute_async_v4("),
    # the parser's error objects (get_error is untyped in the stubs: annotated in the module)
    ("parser_error", "error.node_name()", "error.node_nam()"),
]  # fmt: skip


# ----------------------------------------------------------------------------- the stubs


def _stub_sources() -> list[Path]:
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        message = (
            "tensorrt-stubs is not installed — pip install --no-deps "
            "'tensorrt-stubs==10.13.0.35.1' (the Makefile does)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    roots = [Path(str(dist.locate_file(p))) for p in ("tensorrt", "tensorrt_bindings")]
    assert all((r / "__init__.pyi").is_file() for r in roots), roots
    return roots


_KEYWORD_PARAM = re.compile(r"([(,]\s*)(" + "|".join(keyword.kwlist) + r")(\s*:)")
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->[^()]*:\s*)$")


def _split_params(params: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current] if current.strip() else parts


def _defaults_in_order(line: str) -> str:
    """Give ``= ...`` to a positional parameter without default that follows one with."""
    match = _DEF.match(line)
    if not match:
        return line
    params, seen_default, changed = _split_params(match.group(2)), False, False
    for i, p in enumerate(params):
        name = p.strip()
        if name.startswith("*"):
            break  # keyword-only parameters may lack defaults
        if "=" in name:
            seen_default = True
        elif seen_default and name != "/":
            params[i], changed = f"{p} = ...", True
    if not changed:
        return line
    return match.group(1) + ",".join(params) + match.group(3)


def repair_stub(text: str) -> str:
    """Python-parsable text of a tensorrt-stubs file (see the module docstring)."""
    text = _KEYWORD_PARAM.sub(r"\1\2_\3", text)
    return "\n".join(_defaults_in_order(line) for line in text.splitlines()) + "\n"


def test_repair_stub_fixes_exactly_the_known_defects() -> None:
    assert repair_stub("    def f(self, in: list[int], out: int) -> int:\n") == (
        "    def f(self, in_: list[int], out: int) -> int:\n"
    )
    broken = "    def g(self, a: int = None, b: int) -> X:\n"
    assert repair_stub(broken) == "    def g(self, a: int = None, b: int = ...) -> X:\n"
    fine = "    def h(self, a: int = 1, *, b: int) -> X:\n"
    assert repair_stub(fine) == fine


# ------------------------------------------------------------------------------ mypy run


_RUN_MYPY = (
    "import json, os, sys\n"
    "from mypy import api\n"
    "sys.stdout.write(json.dumps(api.run(sys.argv[1:])))\n"
    "sys.stdout.flush()\n"
    "os._exit(0)\n"
)


@dataclass(frozen=True)
class MypyRun:
    errors: dict[str, list[str]]  # file name → error lines
    notes: dict[str, list[str]]
    exit_status: int
    output: str


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory: pytest.TempPathFactory) -> MypyRun:
    """One mypy run over the module, the GPU module, a probe and every mutant."""
    roots = _stub_sources()
    tmp = tmp_path_factory.mktemp("trt_static")
    stubs = tmp / "stubs"
    for root in roots:
        shutil.copytree(root, stubs / root.name, ignore=shutil.ignore_patterns("*.pyc"))
    for stub in stubs.rglob("*.pyi"):
        text = repair_stub(stub.read_text(encoding="utf-8"))
        try:
            ast.parse(text, filename=str(stub))
        except SyntaxError as exc:
            pytest.fail(f"tensorrt-stubs {stub.name} has syntax this test cannot repair: {exc}")
        stub.write_text(text, encoding="utf-8")

    files = tmp / "files"
    files.mkdir()
    source = MODULE.read_text(encoding="utf-8")
    for ident, correct, wrong in MUTATIONS:
        assert correct in source, f"mutation {ident}: '{correct}' is not in {MODULE.name}"
        (files / f"mutant_{ident}.py").write_text(source.replace(correct, wrong))
    (files / "probe_stubs.py").write_text(
        "import tensorrt as trt\n"
        "reveal_type(trt.Builder)\n"
        "reveal_type(trt.Builder(trt.Logger()).create_builder_config())\n"
        "reveal_type(trt.__version__)\n"
    )
    config = tmp / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "python_version = 3.11\n"
        # everything else untyped stays Any, as in the project's own mypy configuration
        "ignore_missing_imports = True\n"
        f"mypy_path = {stubs}{os.pathsep}{REPO}\n"
        f"cache_dir = {tmp / 'cache'}\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\n"
        "ignore_errors = True\n"
    )
    args = [
        "--config-file",
        str(config),
        "--show-error-codes",
        "--no-pretty",
        str(MODULE),
        str(GPU_MODULE),
        *sorted(str(p) for p in files.iterdir()),
    ]
    # mypy.api.run in a child process that ends with os._exit: a cold in-process run leaves
    # millions of objects whose teardown at interpreter exit costs more than the check
    child = subprocess.run(
        [sys.executable, "-c", _RUN_MYPY, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if child.returncode != 0:
        pytest.fail(f"mypy could not be run:\n{child.stdout}\n{child.stderr}")
    stdout, stderr, status = json.loads(child.stdout)
    errors: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        match = re.match(r"^(.*?):(\d+): (error|note): (.*)$", line)
        if match:
            target = errors if match.group(3) == "error" else notes
            target.setdefault(Path(match.group(1)).name, []).append(line)
    return MypyRun(errors, notes, status, stdout + stderr)


def test_mypy_resolves_tensorrt_to_the_stubs(mypy_run: MypyRun) -> None:
    notes = "\n".join(mypy_run.notes.get("probe_stubs.py", []))
    assert "tensorrt_bindings.tensorrt.Builder" in notes, mypy_run.output
    assert "tensorrt_bindings.tensorrt.IBuilderConfig" in notes, mypy_run.output
    assert re.search(r'Revealed type is "(builtins\.)?str"', notes), mypy_run.output


def test_tensorrt_module_type_checks_against_the_stubs(mypy_run: MypyRun) -> None:
    for name in (MODULE.name, GPU_MODULE.name, "probe_stubs.py"):
        assert name not in mypy_run.errors, "\n".join(mypy_run.errors[name])
    unexpected = {f for f in mypy_run.errors if not f.startswith("mutant_")}
    assert not unexpected, mypy_run.output


@pytest.mark.parametrize(("ident", "correct", "wrong"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_misspelt_tensorrt_name_is_a_mypy_error(
    mypy_run: MypyRun, ident: str, correct: str, wrong: str
) -> None:
    errors = mypy_run.errors.get(f"mutant_{ident}.py", [])
    misspelt = re.findall(r"\w+", wrong.rstrip("("))[-1]
    assert errors, f"mypy did not notice {wrong!r}:\n{mypy_run.output}"
    assert all(misspelt in e and "[attr-defined]" in e for e in errors), "\n".join(errors)


# --------------------------------------------------------------------- removed API scan

#: TensorRT API that TensorRT 10 removed or deprecated and TensorRT 11 removes, keyed by
#: ``Class.MEMBER`` (matched on the last two parts of an attribute chain) or by a bare name
#: (matched wherever it is used: attribute, name, import, ``getattr`` string).
REMOVED_API: dict[str, str] = {
    # weak-typing precision flags: deprecated in 10, removed in 11; precision is the ONNX's
    **{
        f"BuilderFlag.{flag}": "precision builder flag (weak typing): use a strongly typed "
        "network and put the precision in the ONNX"
        for flag in ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")
    },
    "BuilderFlag.STRICT_TYPES": "removed in TensorRT 10",
    "BuilderFlag.OBEY_PRECISION_CONSTRAINTS": "per-layer precision constraints (weak typing)",
    "BuilderFlag.PREFER_PRECISION_CONSTRAINTS": "per-layer precision constraints (weak typing)",
    # implicit INT8 calibration: deprecated in 10, removed in 11 (explicit Q/DQ instead)
    **{
        name: "implicit INT8 calibration: use the explicit Q/DQ ONNX"
        for name in (
            "IInt8Calibrator",
            "IInt8EntropyCalibrator",
            "IInt8EntropyCalibrator2",
            "IInt8MinMaxCalibrator",
            "IInt8LegacyCalibrator",
            "int8_calibrator",
            "CalibrationAlgoType",
            "set_calibration_profile",
            "get_calibration_profile",
            "set_dynamic_range",
            "dynamic_range",
        )
    },
    # per-layer type constraints of weakly typed networks
    "set_output_type": "layer output type constraint (weak typing)",
    "reset_output_type": "layer output type constraint (weak typing)",
    "reset_precision": "layer precision constraint (weak typing)",
    "precision_is_set": "layer precision constraint (weak typing)",
    "platform_has_fast_fp16": "deprecated in TensorRT 10",
    "platform_has_fast_int8": "deprecated in TensorRT 10",
    # implicit batch and explicit-precision networks
    "EXPLICIT_BATCH": "implicit batch was removed in TensorRT 10; the flag is ignored",
    "EXPLICIT_PRECISION": "removed",
    "has_implicit_batch_dimension": "implicit batch was removed in TensorRT 10",
    "max_batch_size": "removed in TensorRT 10",
    # engine building
    "build_engine": "removed in TensorRT 10: use build_serialized_network",
    "build_cuda_engine": "removed: use build_serialized_network",
    "max_workspace_size": "removed in TensorRT 10: use set_memory_pool_limit(WORKSPACE, ...)",
    # binding-index execution: removed in TensorRT 10 (named tensors + execute_async_v3)
    "execute_async_v2": "binding API: use set_tensor_address + execute_async_v3",
    "execute_v2": "binding API: use set_tensor_address + execute_async_v3",
    "execute_async": "binding API: use set_tensor_address + execute_async_v3",
    "execute": "binding API: use set_tensor_address + execute_async_v3",
    "num_bindings": "binding API: use num_io_tensors",
    "binding_is_input": "binding API: use get_tensor_mode",
    "all_binding_shapes_specified": "binding API",
}
#: Bare-name prefixes of the binding API (get_binding_index, set_binding_shape, ...).
REMOVED_PREFIXES = ("get_binding_", "set_binding_")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _why_removed(dotted: str) -> str | None:
    parts = dotted.split(".")
    qualified, name = ".".join(parts[-2:]), parts[-1]
    if len(parts) >= 2 and qualified in REMOVED_API:
        return REMOVED_API[qualified]
    if name in REMOVED_API:
        return REMOVED_API[name]
    if name.startswith(REMOVED_PREFIXES):
        return "binding API: use the named-tensor API"
    return None


def removed_api_uses(source: str, filename: str = "<source>") -> list[str]:
    """``"line N: name — why"`` for every use of :data:`REMOVED_API` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names.append(_dotted(node))
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.alias):
            names.append(node.name.split(".")[-1])
        elif (  # getattr(trt.BuilderFlag, "FP16") and the like
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.append(f"{_dotted(node.args[0])}.{node.args[1].value}")
        for name in names:
            why = _why_removed(name)
            if why:
                found.append(f"line {getattr(node, 'lineno', '?')}: {name} — {why}")
    return sorted(set(found))


@pytest.mark.parametrize("path", [MODULE, GPU_MODULE], ids=lambda p: p.name)
def test_backend_uses_no_removed_tensorrt_api(path: Path) -> None:
    uses = removed_api_uses(path.read_text(encoding="utf-8"), str(path))
    assert not uses, "\n".join(uses)


@pytest.mark.parametrize(
    ("snippet", "name"),
    [
        ("config.set_flag(trt.BuilderFlag.FP16)", "BuilderFlag.FP16"),
        ("config.set_flag(getattr(trt.BuilderFlag, 'INT8'))", "BuilderFlag.INT8"),
        ("config.int8_calibrator = calib", "int8_calibrator"),
        ("class C(trt.IInt8EntropyCalibrator2): pass", "IInt8EntropyCalibrator2"),
        ("from tensorrt import IInt8MinMaxCalibrator", "IInt8MinMaxCalibrator"),
        ("engine = builder.build_engine(network, config)", "build_engine"),
        ("context.execute_async_v2(bindings, stream)", "execute_async_v2"),
        ("i = engine.get_binding_index('lr')", "get_binding_index"),
        ("n = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)", "EXPLICIT_BATCH"),
        ("config.max_workspace_size = 1 << 30", "max_workspace_size"),
    ],
)
def test_removed_api_scan_catches(snippet: str, name: str) -> None:
    uses = removed_api_uses(snippet)
    assert uses and any(name in u for u in uses), uses


def test_removed_api_scan_allows_data_types_and_strong_typing() -> None:
    ok = (
        "dt = trt.DataType.INT8\nh = trt.DataType.HALF\nf = trt.float16\n"
        "n = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
        "config.clear_flag(trt.BuilderFlag.TF32)\nprecision = 'int8'\n"
        "context.execute_async_v3(stream)\n"
    )
    assert removed_api_uses(ok) == []
