"""What the receptive-field analysis reports, and how it says why tiling is not exact.

**Not exact.** Three things break "tiled == untiled" and are reported by node name: ops whose
output depends on the whole image (ReduceMean over H/W, global pooling, instance/group
normalisation, softmax over a spatial axis: ``global_nodes``); Resize whose output size or
scale is read from another tensor's shape, so that its sampling positions depend on the image
size (RLFN's ESA: ``size_dependent_nodes``; the field computed for them is still used, but a
tile samples them elsewhere than the whole image does, 48–51 dB from the untiled output on
Set14's baboon, unless the runner gives them the whole image's positions, as
:mod:`esr_deploy.runtime.resize_geometry` does; element-wise ops on values computed from the image
size are listed there too); ops on spatial tensors the analysis does not know, including
coordinate grids built with Range from the image size (``unknown_nodes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from esr_deploy.runtime.tiling.ops import SAMPLING_OPS


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` found; ``radius`` is the overlap tiling needs."""

    #: (rows, cols): LR pixels beyond its own that an output pixel depends on, per side.
    radius: tuple[int, int]
    #: Window starts must be multiples of this (cumulative stride of strided convs / pools).
    alignment: tuple[int, int]
    #: Nodes whose output depends on the whole image: tiling can never be exact.
    global_nodes: tuple[str, ...] = ()
    #: Resize/Upsample whose sampling positions depend on the input size (and ops on values
    #: computed from it): tiles match closely, not exactly.
    size_dependent_nodes: tuple[str, ...] = ()
    #: Ops on spatial tensors this analysis does not know: the field is not reliable.
    unknown_nodes: tuple[str, ...] = ()
    #: (node name, op type) of every node named above, for messages.
    op_types: tuple[tuple[str, str], ...] = ()

    @property
    def exact(self) -> bool:
        """Tiling with ``radius`` and ``alignment`` reproduces the untiled output exactly."""
        return not (self.global_nodes or self.size_dependent_nodes or self.unknown_nodes)

    def describe(self) -> str:
        """One sentence for users, naming the nodes that make tiling inexact."""
        ops = dict(self.op_types)

        def both(v: tuple[int, int], unit: str) -> str:
            return f"{v[0]}{unit}" if v[0] == v[1] else f"{v[0]} rows / {v[1]} cols{unit}"

        head = (
            f"receptive field ±{both(self.radius, ' LR pixels')}, "
            f"alignment {both(self.alignment, '')}"
        )
        samplers = [n for n in self.size_dependent_nodes if ops.get(n) in SAMPLING_OPS]
        reasons: list[str] = []
        for names, one, many in (
            (self.global_nodes, "depends on the whole image", "depend on the whole image"),
            (
                samplers,
                "samples at positions that depend on the image size",
                "sample at positions that depend on the image size",
            ),
            (
                [n for n in self.size_dependent_nodes if n not in samplers],
                "uses values computed from the image size",
                "use values computed from the image size",
            ),
            (
                self.unknown_nodes,
                "is not understood by the receptive-field analysis",
                "are not understood by the receptive-field analysis",
            ),
        ):
            if not names:
                continue
            shown = [f"`{n}` ({ops.get(n, '?')})" for n in names[:3]]
            listed = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else shown[0]
            if len(names) > 3:
                listed = f"{', '.join(shown)} and {len(names) - 3} more"
            reasons.append(f"{listed} {one if len(names) == 1 else many}")
        if not reasons:
            return f"{head}; exact"
        return f"{head}; not exact: {'; '.join(reasons)}"
