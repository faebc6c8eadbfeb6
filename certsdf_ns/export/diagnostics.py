"""Is the learned geometry a surface or fog? Checks of a trained grid against a ground-truth mesh.

Two numbers, used by the tests and the benchmarks:
- sign agreement: the fraction of random points, more than `margin` from the true surface,
  where sign(sdf) matches inside/outside of the ground-truth mesh;
- visible fog: the fraction of points more than `fog_distance` from the true surface (and
  outside it) whose density would make them visible, i.e. whose opacity over one voxel
  exceeds `alpha_threshold` (default 0.01: 1% of the light stopped within a voxel).

And where the zero set sits relative to the true surface:
- signed offset: median/mean of (p − q)·n_q between samples p of the zero-level mesh (as
  `certsdf-export` extracts it) and their nearest true samples q with outward normals n_q
  (see certsdf_ns.export.geometry_eval); negative = the zero set lies inside the object;
- sdf at the true surface: the median certified SDF at samples of the true surface. To first
  order it is −offset (a zero set shifted inward by d reads sdf ≈ +d on the true surface) and
  needs no mesh extraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import trimesh

from certsdf_ns.method.field import CertSDFField


@dataclass
class SurfaceReport:
    sign_agreement: float
    """Fraction of far-from-surface points whose SDF sign matches the ground truth."""
    inside_agreement: float
    """The same, over far points inside the object only (the interior is what fog models miss)."""
    visible_fog_fraction: float
    """Fraction of empty points (> fog_distance from the surface) with visible density."""
    negative_node_fraction: float
    """Fraction of grid nodes with negative SDF (inside)."""
    n_sign_points: int
    n_fog_points: int
    alpha_threshold: float
    offset_median: float = float("nan")
    """Median signed offset of the zero set along the true outward normal (negative: inside)."""
    offset_mean: float = float("nan")
    """Mean signed offset."""
    sdf_at_true_surface_median: float = float("nan")
    """Median certified SDF over samples of the true surface (≈ −offset)."""

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def surface_report(
    field: CertSDFField,
    gt_mesh: Union[trimesh.Trimesh, str, Path],
    n_points: int = 20_000,
    margin_voxels: float = 2.0,
    fog_distance: float = 0.1,
    alpha_threshold: float = 0.01,
    seed: int = 0,
) -> SurfaceReport:
    """Compare a trained certsdf field with a ground-truth mesh in the same world frame."""
    mesh = gt_mesh if isinstance(gt_mesh, trimesh.Trimesh) else trimesh.load(str(gt_mesh), force="mesh")
    geometry = field.geometry
    voxel = float(geometry.voxel_size.min())
    rng = np.random.default_rng(seed)
    lo, hi = mesh.bounds[0] - 0.3, mesh.bounds[1] + 0.3
    box = geometry.aabb.cpu().numpy()
    lo, hi = np.maximum(lo, box[0]), np.minimum(hi, box[1])
    pts = rng.uniform(lo, hi, size=(n_points, 3))
    inside = mesh.contains(pts)
    dist = np.abs(trimesh.proximity.signed_distance(mesh, pts))
    x = torch.from_numpy(pts).float().to(geometry.aabb.device)
    sdf = geometry.sdf(x).cpu().numpy()

    far = dist > margin_voxels * voxel
    agreement = float(((sdf < 0) == inside)[far].mean())
    far_inside = far & inside
    inside_agreement = float((sdf[far_inside] < 0).mean()) if far_inside.any() else float("nan")

    empty = (dist > fog_distance) & ~inside
    density = field.density_from_sdf(torch.from_numpy(sdf[empty]).float()).numpy()
    alpha = 1.0 - np.exp(-density * voxel)
    fog = float((alpha > alpha_threshold).mean()) if empty.any() else 0.0

    negative = float((geometry.sdf_grid() < 0).float().mean())
    offset_median, offset_mean, at_surface = zero_set_offset(geometry, mesh, n_points, seed)
    return SurfaceReport(agreement, inside_agreement, fog, negative, int(far.sum()), int(empty.sum()), alpha_threshold,
                         offset_median, offset_mean, at_surface)  # fmt: skip


@torch.no_grad()
def zero_set_offset(geometry, mesh: trimesh.Trimesh, n_points: int = 20_000, seed: int = 0,
                    max_distance: float = 0.05) -> tuple:  # fmt: skip
    """(median offset, mean offset, median sdf at the true surface) of a grid against a mesh; NaN offsets
    when the SDF has no zero crossing."""
    from certsdf_ns.export.geometry_eval import outward_sign, sample_with_normals, signed_offset
    from certsdf_ns.export.mesh import NoSurfaceError, extract_mesh

    gt_pts, gt_nrm = sample_with_normals(mesh, n_points, seed + 1)
    x = torch.from_numpy(gt_pts).float().to(geometry.aabb.device)
    at_surface = float(geometry.sdf(x).median())
    try:
        zero_set = extract_mesh(geometry)
    except NoSurfaceError:
        return float("nan"), float("nan"), at_surface
    pred_pts, _ = sample_with_normals(zero_set, n_points, seed)
    median, mean, _ = signed_offset(pred_pts, gt_pts, outward_sign(mesh) * gt_nrm, max_distance)
    return median, mean, at_surface
