"""The compile side: options, the target-independent frontend and the per-target backend step.

Named ``compiling`` (as ``loading``), not ``compile``: ``esr_deploy.compile`` is the Python API
function, which a subpackage of that name would shadow once imported.

Modules, in pipeline order: :mod:`~.options` (what a compile is asked), :mod:`~.source` and
:mod:`~.onnx_source` (where the model comes from), :mod:`~.frontend` (load → passes → export
→ reference, once), :mod:`~.backend` (precision → build → validate, per target),
:mod:`~.publish` and :mod:`~.manifest_build` (latency → manifest → report), :mod:`~.pipeline`
(``compile_model``), :mod:`~.auto` (``--target auto``), :mod:`~.api`
(:func:`esr_deploy.compile`), :mod:`~.stages` (``compile_seconds``).
"""

from __future__ import annotations

from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model

__all__ = ["CompileOptions", "CompileResult", "compile_model"]
