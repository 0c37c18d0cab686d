"""The compile side: options, the target-independent frontend and the per-target backend step.

Named ``compiling`` (as ``loading``), not ``compile``: ``esr_deploy.compile`` is the Python API
function, which a subpackage of that name would shadow once imported.
"""

from __future__ import annotations

from esr_deploy.compiler import CompileOptions, CompileResult, compile_model

__all__ = ["CompileOptions", "CompileResult", "compile_model"]
