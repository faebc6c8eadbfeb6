"""The one mesh extractor: a level set of a grid → PyMCubes → world frame → outward faces.

Every mesh certsdf makes goes through :func:`level_set_mesh`: ``certsdf-export``, the viewer's
Extract-mesh button, the benchmarks, and the certificate check (which meshes p̂ = ½).

The certified SDF lives on the occupancy grid's nodes and is trilinear in between, so
:func:`extract_mesh` samples it on a lattice over the scene box first:

* ``resolution=N``: N samples per axis, each the trilinear value of the node SDF; on an
  axis-aligned lattice trilinear interpolation is separable (three 1-D linear
  interpolations), so this is three matrix products with the same numbers as
  ``geometry.sdf(x)``, ~20x faster on CPU than grid_sample per point;
* ``resolution=0, upsample=K``: the node grid refined K times per cell, (R−1)·K+1 samples per
  axis; K = 1 meshes the certified node SDF itself, with no interpolation.
"""

from __future__ import annotations

from typing import List, Sequence

import mcubes
import numpy as np
import torch
import trimesh
from jaxtyping import Float
from torch import Tensor

from certsdf_ns.certified import CertifiedSDFGrid, separable_apply


class NoSurfaceError(RuntimeError):
    """The field does not cross the level in the box: there is nothing to mesh."""


def level_set_mesh(
    values: Float[np.ndarray, "X Y Z"],
    origin: Float[np.ndarray, "3"],
    spacing: Float[np.ndarray, "3"],
    level: float = 0.0,
    outside: str = "above",
) -> trimesh.Trimesh:
    """Marching cubes of ``values == level`` on a lattice whose sample (i, j, k) sits at
    ``origin + (i, j, k)·spacing``; faces oriented outward.

    ``outside="above"``: the outside is where values exceed the level (an SDF, positive
    outside); ``"below"``: where they are smaller (an occupancy or p̂). PyMCubes orients each
    face towards larger values; faces are flipped when that is inward.

    Raises :class:`NoSurfaceError` when the level is never crossed.
    """
    if outside not in ("above", "below"):
        raise ValueError(f"outside must be 'above' or 'below', got {outside!r}")
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if not lo < level < hi:
        side = "above" if lo >= level else "below"
        raise NoSurfaceError(
            f"no surface: the field is {side} the level {level:g} everywhere in the scene box "
            f"(min {lo:.4g}, max {hi:.4g} over {'x'.join(str(n) for n in values.shape)} samples)."
        )
    vertices, faces = mcubes.marching_cubes(values, level)
    vertices = np.asarray(origin, np.float64) + vertices * np.asarray(spacing, np.float64)
    faces = faces[:, ::-1] if outside == "above" else faces
    return trimesh.Trimesh(vertices, np.ascontiguousarray(faces), process=False)


def check_lattice_args(resolution: int, upsample: int) -> None:
    """ValueError unless resolution is 0 or >= 2, upsample >= 1, and upsample is only used with 0."""
    if resolution < 0 or resolution == 1 or upsample < 1:
        raise ValueError(f"need --resolution 0 or >= 2 and --upsample >= 1, got {resolution} and {upsample}")
    if resolution > 0 and upsample != 1:
        raise ValueError("--upsample refines the node grid and applies to --resolution 0 only")


def lattice_counts(resolution: int, upsample: int, grid_resolution: Sequence[int]) -> List[int]:
    """Samples per axis of the marching-cubes lattice: ``resolution``, or the node grid refined
    ``upsample`` times per cell when resolution is 0."""
    check_lattice_args(resolution, upsample)
    return [(r - 1) * upsample + 1 if resolution == 0 else resolution for r in grid_resolution]


def lattice_coordinates(resolution: int, upsample: int, grid_resolution: Sequence[int]) -> List[Tensor]:
    """Per-axis sample positions in node-index units (0 … R−1) of the occupancy grid."""
    counts = lattice_counts(resolution, upsample, grid_resolution)
    return [torch.linspace(0.0, float(r - 1), n, dtype=torch.float64) for r, n in zip(grid_resolution, counts)]


def interpolation_matrix(u: Tensor, num_nodes: int) -> Float[Tensor, "M R"]:
    """Linear interpolation along one axis as a matrix: row m holds 1 − t and t at the two
    nodes around the fractional node index u[m]."""
    i0 = u.floor().long().clamp(0, num_nodes - 2)
    t = (u - i0).float()
    rows = torch.arange(len(u))
    w = torch.zeros(len(u), num_nodes)
    w[rows, i0] = 1.0 - t
    w[rows, i0 + 1] = t
    return w


@torch.no_grad()
def sample_sdf_lattice(geometry: CertifiedSDFGrid, coords: Sequence[Tensor]) -> Float[Tensor, "X Y Z"]:
    """Trilinear SDF on the lattice coords[0] × coords[1] × coords[2] (node-index units): the
    values of ``geometry.sdf(x)`` at those points, computed separably."""
    grid = geometry.sdf_grid().detach().cpu().float()
    matrices = tuple(interpolation_matrix(u, n) for u, n in zip(coords, grid.shape))
    return separable_apply(grid, matrices)  # type: ignore[arg-type]


@torch.no_grad()
def extract_mesh(
    geometry: CertifiedSDFGrid, resolution: int = 256, upsample: int = 1, level: float = 0.0
) -> trimesh.Trimesh:
    """Outward-oriented mesh of {sdf = level} in the grid's world frame; NoSurfaceError if empty.

    ``level`` > 0 gives an offset surface (e.g. a safety shell ``level`` outside the zero set).
    """
    coords = lattice_coordinates(resolution, upsample, geometry.resolution)
    sdf = sample_sdf_lattice(geometry, coords).numpy()
    lo, hi = float(sdf.min()), float(sdf.max())
    if lo >= level or hi <= level:
        empty = lo >= level
        sign = ("positive" if empty else "negative") if level == 0.0 else ("above" if empty else "below") + f" {level:g}"
        where = "the occupancy grid is empty (untrained, or nothing was fitted)" if empty else "the whole box is occupied"
        raise NoSurfaceError(
            f"no surface: the certified SDF is {sign} everywhere in the scene box "
            f"(min {lo:.4g}, max {hi:.4g} over {'x'.join(str(len(c)) for c in coords)} samples): {where}."
        )
    origin = geometry.aabb[0].detach().cpu().double().numpy()
    spacing = np.array([float(c[1] - c[0]) for c in coords]) * geometry.voxel_size.double().cpu().numpy()
    return level_set_mesh(sdf, origin, spacing, level, outside="above")
