"""Cropping the occupancy grid to the object, as DVGO and TensoRF shrink their grids after a coarse stage.

The model records where its training rays meet a surface (:class:`SeenSurface`) in the steps before
its coarse-to-fine regrid, then resamples the grid over that box plus a margin with about as many
nodes as before (:func:`lattice_for_box`): the voxels, and σ with them (σ is set in voxels), shrink by
the cube root of the volume ratio. Outside the new box the base classifier is zero, which is still a
voxel occupancy: the certificate holds unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

MIN_SEEN_RAYS = 256
"""Rays that must have met a surface before a box is drawn around them."""
COLLECT_STEPS = 50
"""Training steps before the regrid during which the rays' surface points are recorded."""


class SeenSurface:
    """The axis-aligned box of the points where training rays met a surface (accumulation above ½, at
    the expected depth), kept as a running minimum and maximum."""

    def __init__(self) -> None:
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None
        self.count = 0

    def clear(self) -> None:
        self.lo = self.hi = None
        self.count = 0

    @torch.no_grad()
    def add(
        self,
        origins: Float[Tensor, "N 3"],
        directions: Float[Tensor, "N 3"],
        depth: Float[Tensor, "N 1"],
        accumulation: Float[Tensor, "N 1"],
    ) -> None:
        hit = accumulation[:, 0] > 0.5
        if not bool(hit.any()):
            return
        points = (origins[hit] + directions[hit] * depth[hit]).float()
        lo, hi = points.min(dim=0).values, points.max(dim=0).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += int(hit.sum())

    def box(self, margin: float, bounds: Float[Tensor, "2 3"]) -> Optional[Float[Tensor, "2 3"]]:
        """The seen points' box grown by ``margin`` (world units) on every side and clipped to ``bounds``;
        None while fewer than MIN_SEEN_RAYS rays met a surface."""
        if self.count < MIN_SEEN_RAYS or self.lo is None or self.hi is None:
            return None
        lo = torch.maximum(self.lo.to(bounds) - margin, bounds[0])
        hi = torch.minimum(self.hi.to(bounds) + margin, bounds[1])
        if not bool((hi > lo).all()):
            return None
        return torch.stack([lo, hi])


def lattice_for_box(box: Float[Tensor, "2 3"], nodes: int, min_resolution: int = 8) -> Tuple[int, int, int]:
    """Nodes per axis of a lattice of about ``nodes`` nodes over ``box`` whose cells are as close to cubes as
    whole numbers of nodes allow."""
    extent = (box[1] - box[0]).double()
    edge = float((extent.prod() / nodes) ** (1.0 / 3.0))
    return tuple(max(min_resolution, int(round(float(e) / edge)) + 1) for e in extent)  # type: ignore[return-value]
