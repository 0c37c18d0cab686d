"""Running the user's architecture code: imports, constructors and forward, as they really are.

A user's ``--arch`` names a module and a callable (a class or a factory) that esr-deploy has
never seen. That code may fail in any way, print while it builds, pin itself to CUDA, or
import packages that are not installed. This module is the one place that turns all of it
into what the CLI can report:

* :func:`import_user_callable` imports ``package.module:name``; a module that is found but
  imports a package that is not installed is reported as "install X", and any other failure
  while importing is a :class:`UserCodeError` with the file and line in the user's code.
* :func:`build_user_model` calls the callable; any exception is a :class:`UserCodeError` with
  its message and the user's file and line. On a machine without CUDA, ``.cuda()`` calls made
  while building are ignored (the model is built on the CPU, where the code allows), and a
  note says so.
* :func:`user_code_error` recognises an exception raised later from the user's code (its
  forward, during any step of a compile) by the frames of its traceback, so the CLI answers
  exit 2 with the user's file and line instead of an internal error.

Frames count as the user's when their file lies under a folder registered by
:func:`import_user_callable` (the folder of the imported module's top-level package, or the
module's own folder) and not inside esr-deploy.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esr_deploy.errors import RecipeError, UserCodeError

log = logging.getLogger(__name__)

#: Import names whose pip distribution has another name.
PIP_NAMES: dict[str, str] = {
    "cv2": "opencv-python",
    "PIL": "pillow",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "mmcv": "mmcv",
    "timm": "timm",
}

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Folders whose files are the user's model code (filled as user modules are imported).
_USER_ROOTS: set[Path] = set()


def register_user_code(module: Any) -> None:
    """Count the files of ``module``'s top-level package (or the module itself) as user code."""
    top = sys.modules.get(module.__name__.partition(".")[0], module)
    for m in (top, module):
        paths = list(getattr(m, "__path__", []) or [])
        file = getattr(m, "__file__", None)
        if file:
            paths.append(str(Path(file).parent))
        for p in paths:
            root = Path(p).resolve()
            if root != _PACKAGE_DIR and _PACKAGE_DIR not in root.parents:
                _USER_ROOTS.add(root)


def _register_found(module_name: str) -> None:
    """Register the folder of a user module that was found but failed while importing."""
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:  # a parent package that itself fails to import
        spec = None
    if spec is not None and spec.origin:
        _USER_ROOTS.add(Path(spec.origin).resolve().parent)


def _is_user_file(filename: str) -> bool:
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    if path == _PACKAGE_DIR or _PACKAGE_DIR in path.parents:
        return False
    return any(root == path.parent or root in path.parents for root in _USER_ROOTS)


def user_frame(exc: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame of ``exc`` in the user's code."""
    found = None
    if isinstance(exc, SyntaxError) and exc.filename and _is_user_file(exc.filename):
        return f"{exc.filename}:{exc.lineno}"
    for frame in traceback.extract_tb(exc.__traceback__):
        if _is_user_file(frame.filename):
            found = f"{frame.filename}:{frame.lineno} in {frame.name}"
    return found


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500] if text else ''}".rstrip(": ")


def user_code_error(exc: BaseException, what: str = "the model's code") -> UserCodeError | None:
    """A :class:`UserCodeError` for ``exc`` when it was raised from the user's code, else
    ``None`` (an error of esr-deploy or its libraries, which stays an internal error)."""
    where = user_frame(exc)
    if where is None:
        return None
    return UserCodeError(
        f"{what} raised {_describe(exc)} — at {where} — fix the model code (or its "
        "arguments); esr-deploy runs it as it is."
    )


def _missing_dependency(exc: ModuleNotFoundError, module_name: str) -> str | None:
    """The top-level name of the package ``module_name`` imports but cannot find, if that
    is what ``exc`` says (rather than ``module_name`` itself not being found)."""
    missing = exc.name or ""
    if not missing:
        return None
    if module_name == missing or module_name.startswith(missing + "."):
        return None
    return missing.partition(".")[0]


def import_user_callable(spec: str) -> Callable[..., Any]:
    """Import ``package.module:name`` (from the current directory and PYTHONPATH too) and
    return the callable it names: a class or a factory function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RecipeError(
            f"Architecture '{spec}' is not of the form package.module:Class — "
            "write it e.g. as my_models.net:MyNet (or my_models.net:make_model)."
        )
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # only for this import: the rest of the process keeps its own sys.path
        sys.path.insert(0, cwd)
    try:
        with user_stdout_to_stderr():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = _missing_dependency(exc, module_name)
        if missing is None:
            raise RecipeError(
                f"Could not import module '{module_name}' for architecture '{spec}': {exc} — "
                "run from the folder that contains it or add that folder to PYTHONPATH."
            ) from exc
        _register_found(module_name)
        where = user_frame(exc)
        raise UserCodeError(
            f"Module '{module_name}' was found, but it imports '{missing}', which is not "
            f"installed{f' (at {where})' if where else ''} — install it "
            f"(pip install {PIP_NAMES.get(missing, missing)}) in this environment."
        ) from exc
    except Exception as exc:  # the user's module may raise anything while importing
        _register_found(module_name)
        raise user_code_error(exc, f"Importing '{module_name}'") or UserCodeError(
            f"Importing '{module_name}' raised {_describe(exc)} — fix the module."
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)
    register_user_code(module)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(
                f"Module '{module_name}' has no attribute '{attr}' (architecture '{spec}') — "
                "check the class or function name."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(
            f"'{spec}' is a {type(obj).__name__}, not a class or function — point it at the "
            "network class or at a function that returns the network."
        )
    return obj  # type: ignore[no-any-return]


@contextmanager
def user_stdout_to_stderr() -> Iterator[None]:
    """While user code runs, what it prints goes to stderr (``--json`` stdout stays one
    JSON document)."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved


@contextmanager
def _cpu_instead_of_cuda(ignored: list[str]) -> Iterator[None]:
    """Without CUDA, ``Tensor.cuda()`` and ``Module.cuda()`` return their object unchanged."""
    if torch.cuda.is_available():
        yield
        return
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda

    def tensor_stay(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ignored.append("Tensor.cuda()")
        return self

    def module_stay(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        ignored.append(f"{type(self).__name__}.cuda()")
        return self

    torch.Tensor.cuda = tensor_stay  # type: ignore[method-assign,assignment]
    nn.Module.cuda = module_stay  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = tensor_cuda  # type: ignore[method-assign]
        nn.Module.cuda = module_cuda  # type: ignore[method-assign]


def build_user_model(
    factory: Callable[..., Any], arch: str, arch_args: dict[str, Any], recipe_name: str
) -> nn.Module:
    """``factory(**arch_args)`` in eval mode; see the module docstring for the failures."""
    ignored: list[str] = []
    try:
        with user_stdout_to_stderr(), _cpu_instead_of_cuda(ignored):
            model = factory(**arch_args)
    except TypeError as exc:
        if user_frame(exc) is None:  # the call itself: arguments that do not fit
            raise RecipeError(
                f"Could not build {arch} for recipe '{recipe_name}' — the constructor "
                f"rejected the arguments {arch_args}: {exc} — fix arch_args in the recipe "
                "(or --arch-args) to match the class's signature."
            ) from exc
        raise user_code_error(exc, f"Building {arch}") from exc  # type: ignore[misc]
    except Exception as exc:  # user constructors raise anything
        raise user_code_error(exc, f"Building {arch}") or UserCodeError(
            f"Building {arch} raised {_describe(exc)} — fix the model code or its arguments."
        ) from exc
    if not isinstance(model, nn.Module):
        raise RecipeError(
            f"{arch} returned a {type(model).__name__}, not a torch.nn.Module — point "
            "--arch / the recipe's arch at the network class or a function returning it."
        )
    if ignored:
        log.warning(
            "%s called %s while being built; CUDA is not available here, so the model was "
            "built on the CPU", arch, ", ".join(sorted(set(ignored))),
        )  # fmt: skip
    return model.cpu().eval()
