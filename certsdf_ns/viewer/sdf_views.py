"""Axis-aligned slices of the certified SDF, as pictures.

Plain functions of tensors (no viewer, no viser), unit-tested directly; :mod:`certsdf_ns.viewer.controls`
only moves the results into the viser scene. Colours follow :mod:`certsdf_ns.method.sdf_outputs`
(RdBu over ±σ·Φ⁻¹(1 − ε), white at sdf = 0); meshes come from :mod:`certsdf_ns.export.mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.method.sdf_outputs import diverging_colours

AXES = ("x", "y", "z")


# -- axis-aligned slices ----------------------------------------------------------------------
@dataclass
class SlicePlane:
    """An axis-aligned rectangle through the scene box, in world units.

    Image convention (the one viser's image planes use): pixel row r runs along the local
    +y axis and column c along local +x, so ``rotation``'s columns are (u, v, normal): the
    world axes that columns, rows and the plane normal follow. (u, v, n) is a cyclic
    permutation of (x, y, z), hence a proper rotation.
    """

    axis: int
    """Index of the normal axis (0, 1, 2 for x, y, z)."""
    centre: Float[np.ndarray, "3"]
    """World position of the plane's centre."""
    rotation: Float[np.ndarray, "3 3"]
    """Local-to-world rotation; columns are the u, v and normal axes."""
    width: float
    """Extent along u (image columns), world units."""
    height: float
    """Extent along v (image rows), world units."""


def slice_plane(aabb: Float[Tensor, "2 3"], axis: int, offset: float) -> SlicePlane:
    """The plane normal to ``axis`` at ``offset`` ∈ [−1, 1] across the box (0 = centre)."""
    lo, hi = aabb[0].double().cpu().numpy(), aabb[1].double().cpu().numpy()
    u, v = (axis + 1) % 3, (axis + 2) % 3
    centre = (lo + hi) / 2.0
    centre[axis] += float(np.clip(offset, -1.0, 1.0)) * (hi[axis] - lo[axis]) / 2.0
    rotation = np.eye(3)[:, [u, v, axis]]
    return SlicePlane(axis, centre, rotation, float(hi[u] - lo[u]), float(hi[v] - lo[v]))


def slice_points(plane: SlicePlane, max_pixels: int = 256) -> Float[Tensor, "H W 3"]:
    """World positions of the pixel centres; the longer side gets ``max_pixels`` pixels."""
    longest = max(plane.width, plane.height)
    w = max(2, round(max_pixels * plane.width / longest))
    h = max(2, round(max_pixels * plane.height / longest))
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h - 0.5
    rot = torch.from_numpy(plane.rotation)
    local = torch.stack(torch.meshgrid(rows * plane.height, cols * plane.width, indexing="ij"), dim=-1)  # [H, W, (v, u)]
    world = torch.from_numpy(plane.centre) + local[..., 1:2] * rot[:, 0] + local[..., 0:1] * rot[:, 1]
    return world.float()


@torch.no_grad()
def sdf_slice(
    geometry: CertifiedSDFGrid, axis: int, offset: float, max_pixels: int = 256
) -> Tuple[Float[Tensor, "H W"], SlicePlane]:
    """The certified SDF on an axis-aligned plane (the same trilinear lookup rendering uses)."""
    plane = slice_plane(geometry.aabb, axis, offset)
    points = slice_points(plane, max_pixels).to(geometry.aabb.device)
    values = geometry.sdf(points.reshape(-1, 3)).reshape(points.shape[:2])
    return values.cpu(), plane


def zero_crossings(values: Float[Tensor, "H W"]) -> Tensor:
    """Pixels on the zero level: a sign change to a 4-neighbour, on the side nearer to zero.

    Taking only the nearer pixel of each straddling pair gives a contour one pixel wide.
    """
    inside = values < 0
    mask = torch.zeros_like(inside)
    for dim in (0, 1):
        a = values.narrow(dim, 0, values.shape[dim] - 1)
        b = values.narrow(dim, 1, values.shape[dim] - 1)
        change = inside.narrow(dim, 0, values.shape[dim] - 1) != inside.narrow(dim, 1, values.shape[dim] - 1)
        first = change & (a.abs() <= b.abs())
        second = change & (b.abs() < a.abs())
        mask.narrow(dim, 0, values.shape[dim] - 1).logical_or_(first)
        mask.narrow(dim, 1, values.shape[dim] - 1).logical_or_(second)
    return mask


def sdf_slice_image(
    values: Float[Tensor, "H W"], max_distance: float, iso_step: float | None = None
) -> Int[np.ndarray, "H W 3"]:
    """uint8 RGB picture of an SDF slice: RdBu over ±max_distance, zero level in black,
    optional darker iso-distance lines every ``iso_step`` (e.g. every σ)."""
    rgb = diverging_colours(values, max_distance)
    if iso_step is not None and iso_step > 0:
        # Contours of floor(sdf / step): lines at ±step, ±2·step, ... (none where the
        # certificate saturates, since the clamped SDF is constant there).
        band = torch.floor(values / iso_step)
        iso = torch.zeros_like(values, dtype=torch.bool)
        iso[:-1] |= band[:-1] != band[1:]
        iso[:, :-1] |= band[:, :-1] != band[:, 1:]
        rgb = torch.where(iso[..., None], rgb * 0.55, rgb)
    rgb = torch.where(zero_crossings(values)[..., None], torch.zeros_like(rgb), rgb)
    return (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
