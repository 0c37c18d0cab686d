"""Typed errors: every failure a user can fix is an :class:`EsrDeployError`.

Messages follow one shape: *what failed — what was seen — what to do*. The CLI is the
only place these become text on stderr and an exit code; library code raises them and
never prints.

Exit codes (documented in the README):

====  =====================================================================
0     success
1     internal error (a bug: please report it with the traceback)
2     bad input: checkpoint, recipe, image, option, output folder
3     validation failed: parity, task quality or a pass verification
4     target unavailable on this machine
====  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_VALIDATION_FAILED = 3
EXIT_TARGET_UNAVAILABLE = 4


class EsrDeployError(Exception):
    """Base class of all user-facing errors; ``exit_code`` is what the CLI returns."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        #: Structured data for ``--json`` output (e.g. the failing manifest).
        self.details = details


class CheckpointError(EsrDeployError):
    """The checkpoint file is missing, unreadable, unsafe or holds bad tensors."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle would import or call code that is not a tensor or plain container."""


class KeyMismatchError(CheckpointError):
    """The state_dict does not match the architecture's parameters (keys or shapes)."""


class RecipeError(EsrDeployError):
    """A recipe is missing, malformed, or no recipe matches a checkpoint."""


class DataError(EsrDeployError):
    """An image or validation set cannot be read or is inconsistent."""


class OutputError(EsrDeployError):
    """The output location cannot be written."""


class ExportError(EsrDeployError):
    """The model could not be exported to a valid ONNX graph."""


class PassError(EsrDeployError):
    """A graph pass failed or changed the model's output beyond its tolerance."""

    exit_code = EXIT_VALIDATION_FAILED


class ValidationError(EsrDeployError):
    """An engine failed parity, task-quality or latency checks."""

    exit_code = EXIT_VALIDATION_FAILED


class TargetUnavailable(EsrDeployError):
    """The requested target cannot run on this machine (the message says why)."""

    exit_code = EXIT_TARGET_UNAVAILABLE


class BundleError(EsrDeployError):
    """An engine bundle is missing files, corrupt, or was built for another machine."""


class TilingError(EsrDeployError):
    """A tiled run cannot be planned or assembled (bad tile size, image smaller than the
    network's minimum input, a graph whose receptive field cannot be read)."""


class NoRecipeMatch(RecipeError):
    """No zoo recipe (and no architecture spandrel recognises) loads the checkpoint."""


class UserCodeError(EsrDeployError):
    """The user's architecture code failed: an import, its constructor or its forward
    (the message names the file and line in the user's code)."""
