"""Does the trained grid keep its certificate? |sdf(x)| ≤ distance from x to {p̂ = ½}.

The certified SDF σ·Φ⁻¹(1 − p̂) is 1-Lipschitz, so its magnitude never exceeds the distance to
the *smoothed* surface {p̂ = ½} (not to the true object). Measured here on a trained grid:

1. p̂ at the nodes (`smoothed_occupancy_grid()`, exact) is meshed at ½ by marching cubes at the
   grid resolution; the surface is sampled densely (`surface_samples` area-uniform points plus
   the mesh vertices) and a KD-tree gives each query point's distance d(x) to it;
2. query points: half uniform in the box, half near the surface (a sample pushed along a random
   direction by |N(0, (2 voxels)²)|), where the bound is tight;
3. the bound holds at x when |sdf(x)| ≤ d(x) + tolerance, with sdf the model's trilinear lookup
   and tolerance `tolerance_voxels` voxels (default 0.1). The tolerance absorbs two
   discretisation errors of the *reference*: marching cubes linearises p̂ inside each voxel,
   and a nearest sample is up to half the sample spacing farther than the nearest surface point.

Also reported: the largest certified distance, max |sdf| over the nodes, against its
theoretical cap σ·Φ⁻¹(1 − ε) (p̂ is clamped to [ε, 1 − ε]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from certsdf_ns.export.mesh import NoSurfaceError, level_set_mesh


@dataclass
class CertificateReport:
    bound_fraction: float
    """Fraction of query points with |sdf| ≤ d + tolerance."""
    bound_fraction_strict: float
    """The same with zero tolerance."""
    max_excess_voxels: float
    """Largest (|sdf| − d) over the query points, in voxels (≤ 0 means never exceeded)."""
    tolerance_voxels: float
    n_points: int
    surface_samples: int
    max_abs_sdf: float
    """max |sdf| over the grid nodes (world units)."""
    max_distance_bound: float
    """σ·Φ⁻¹(1 − ε): the largest |sdf| the clamp allows (world units)."""
    sigma: float
    voxel: float
    smoothed_surface_area: float

    def to_json(self) -> dict:
        return asdict(self)


def smoothed_surface(geometry) -> trimesh.Trimesh:
    """{p̂ = ½} from the exact node values, by marching cubes at the grid resolution (world frame)."""
    p_hat = geometry.smoothed_occupancy_grid().detach().cpu().double().numpy()
    origin = geometry.aabb[0].cpu().double().numpy()
    try:
        return level_set_mesh(p_hat, origin, geometry.voxel_size.cpu().double().numpy(), 0.5, outside="below")
    except NoSurfaceError:
        return trimesh.Trimesh()


@torch.no_grad()
def certificate_report(
    geometry, n_points: int = 20_000, surface_samples: int = 1_000_000, tolerance_voxels: float = 0.1, seed: int = 0
) -> CertificateReport:
    """Check the certified bound on a trained `CertifiedSDFGrid` (see the module docstring)."""
    voxel = float(geometry.voxel_size.min())
    sdf_nodes = geometry.sdf_grid().detach()
    max_abs = float(sdf_nodes.abs().max())
    surface = smoothed_surface(geometry)
    common = dict(tolerance_voxels=tolerance_voxels, max_abs_sdf=max_abs, max_distance_bound=geometry.max_distance,
                  sigma=float(geometry.sigma), voxel=voxel)  # fmt: skip
    if len(surface.faces) == 0:
        nan = float("nan")
        return CertificateReport(nan, nan, nan, n_points=0, surface_samples=0, smoothed_surface_area=0.0, **common)

    rng = np.random.default_rng(seed)
    samples, _ = trimesh.sample.sample_surface(surface, surface_samples, seed=seed)
    tree = cKDTree(np.concatenate([samples, surface.vertices]))
    lo, hi = geometry.aabb.cpu().numpy()
    uniform = rng.uniform(lo, hi, size=(n_points // 2, 3))
    base = samples[rng.integers(0, len(samples), n_points - n_points // 2)]
    direction = rng.normal(size=base.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    near = np.clip(base + direction * np.abs(rng.normal(0.0, 2.0 * voxel, size=(len(base), 1))), lo, hi)
    points = np.concatenate([uniform, near])
    dist, _ = tree.query(points, workers=-1)
    x = torch.from_numpy(points).float().to(geometry.aabb.device)
    sdf = geometry.sdf(x, sdf_nodes).abs().cpu().double().numpy()
    excess = sdf - dist
    return CertificateReport(
        bound_fraction=float(np.mean(excess <= tolerance_voxels * voxel)),
        bound_fraction_strict=float(np.mean(excess <= 0.0)),
        max_excess_voxels=float(excess.max() / voxel),
        n_points=len(points),
        surface_samples=len(samples),
        smoothed_surface_area=float(surface.area),
        **common,
    )

