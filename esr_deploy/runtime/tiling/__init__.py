"""Tiled super-resolution whose overlap is the network's receptive field, read from its ONNX.

An SR network maps an LR image (H×W) to an HR image (sH×sW). Running it on overlapping
*windows* of the LR image and pasting each window's *core* reproduces the untiled output
exactly when (1) every HR pixel of a core depends only on LR pixels inside its window and
(2) every strided op samples the same grid in the window as in the whole image.

The parts, each a module with its math in its docstring:

- :mod:`.symbolic`: sizes as symbolic expressions in the LR height and width (shape
  arithmetic computed by Shape/Gather/Concat/... nodes);
- :mod:`.lattice`: the per-axis reach ``(stride, lo, hi, ext)`` of a tensor and how
  windows, crops, pixel shuffles, reshapes and resizes transform it;
- :mod:`.rules`: one rule per ONNX op (a registry keyed by op type) mapping its inputs'
  reaches to its outputs';
- :mod:`.analysis`: the walk over the graph that applies the rules and reports a
  :class:`~.field.ReceptiveField` (radius, alignment, and the nodes that make tiling inexact);
- :mod:`.plan`: tile planning and the tiled runner.
"""

from esr_deploy.runtime.tiling.analysis import receptive_field
from esr_deploy.runtime.tiling.field import ReceptiveField
from esr_deploy.runtime.tiling.plan import Tile, plan_tiles, run_tiled

__all__ = ["ReceptiveField", "Tile", "plan_tiles", "receptive_field", "run_tiled"]
