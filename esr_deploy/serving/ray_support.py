"""The one place Ray is imported (an optional extra) and connected to."""

from __future__ import annotations

from typing import Any

from esr_deploy.errors import EsrDeployError, TargetUnavailable

INSTALL_HINT = "pip install 'esr-deploy[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or :class:`TargetUnavailable` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra's parts this package uses)
    except ImportError as exc:
        raise TargetUnavailable(
            f"Ray is not installed ({exc}) — {INSTALL_HINT} to run on Ray, or leave out --ray."
        ) from None
    return ray


def connect(ray: Any, address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``None``/``"local"``: start one on this machine);
    a process already connected stays on its cluster."""
    if ray.is_initialized():
        return
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=address, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EsrDeployError(
            f"cannot connect to the Ray cluster at {address!r} — {exc} — check the address "
            "(ray://host:10001 or host:6379) and that the cluster is up, or use --ray local."
        ) from None
