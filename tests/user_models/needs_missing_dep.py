"""A user module that is found but imports a package that is not installed (issue 18,
class 7). The package name is made up so the test does not depend on what is installed."""

from __future__ import annotations

import sr_toolbox_that_is_not_installed  # noqa: F401
from torch import nn


class NeedsToolboxSR(nn.Module):
    pass
