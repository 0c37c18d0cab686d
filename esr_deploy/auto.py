"""Former home of ``--target auto``, now :mod:`esr_deploy.compiling.auto`; re-exported for the
benchmarks that still import it from here."""

from __future__ import annotations

from esr_deploy.compiling.auto import AUTO, AUTO_CANDIDATES, AUTO_MAX_PSNR_DROP, compile_auto

__all__ = ["AUTO", "AUTO_CANDIDATES", "AUTO_MAX_PSNR_DROP", "compile_auto"]
