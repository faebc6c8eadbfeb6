"""Does the certified distance bound the distance to the *real* object? With and without the margin.

    python -m certsdf_ns.bench.margin --load-config RUN/config.yml --gt-mesh SCENE/gt_mesh.ply [--json OUT]

The certified SDF never overestimates the distance to its own zero set; a user wants a bound on
the distance to the real surface. At query points *outside* the ground-truth object (half uniform
in the object's bounding box grown by 0.3, half near the true surface: a surface sample pushed along
a random direction by |N(0, (2 voxels)²)|), with d the exact distance to the ground-truth mesh
(trimesh closest point, no sampling floor), the bound holds at x when

    sdf(x) − margin ≤ d(x) + tolerance       (tolerance 0.1 voxel by default)

Reported for margin 0 and for each margin asked (default: 0.5, 1 and 2 voxels), over all the outside
points and over the near ones (d < 4σ: beyond the certified range σ·Φ⁻¹(1 − ε) the clamped SDF
is almost always below d, which would flatter the fraction), plus quantiles of sdf − d in voxels:
the margin a target fraction needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import trimesh

from certsdf_ns.export.query import CertifiedSDF


@dataclass
class MarginReport:
    voxel: float
    tolerance_voxels: float
    n_outside: int
    n_near: int
    fraction_all: Dict[str, float] = field(default_factory=dict)
    """Margin (voxels, as a string) → fraction of outside points where the bound holds."""
    fraction_near: Dict[str, float] = field(default_factory=dict)
    """The same over the outside points within 4σ of the true surface."""
    excess_quantiles_voxels: Dict[str, float] = field(default_factory=dict)
    """Quantiles of (sdf − d) over the near points, in voxels (the margin needed for that quantile,
    before the tolerance)."""

    def to_json(self) -> dict:
        return asdict(self)


def outside_query_points(gt: trimesh.Trimesh, voxel: float, box: np.ndarray, n_points: int, seed: int) -> np.ndarray:
    """Half uniform around the object, half near its surface; only those outside it are kept."""
    rng = np.random.default_rng(seed)
    lo, hi = np.maximum(gt.bounds[0] - 0.3, box[0]), np.minimum(gt.bounds[1] + 0.3, box[1])
    uniform = rng.uniform(lo, hi, size=(n_points // 2, 3))
    base, _ = trimesh.sample.sample_surface(gt, n_points - n_points // 2, seed=seed)
    direction = rng.normal(size=base.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    near = np.clip(base + direction * np.abs(rng.normal(0.0, 2.0 * voxel, size=(len(base), 1))), box[0], box[1])
    points = np.concatenate([uniform, near])
    return points[~gt.contains(points)]


@torch.no_grad()
def margin_report(sdf: CertifiedSDF, gt: trimesh.Trimesh, margins_voxels: Sequence[float] = (0.5, 1.0, 2.0),
                  n_points: int = 20_000, tolerance_voxels: float = 0.1, seed: int = 0) -> MarginReport:  # fmt: skip
    """Fractions of outside points where sdf − margin ≤ d_true + tolerance (see the module docstring)."""
    voxel = sdf.voxel
    box = sdf.aabb.numpy().astype(np.float64)  # the grid frame is the query frame for generated scenes
    points = outside_query_points(gt, voxel, box, n_points, seed)
    _, d_true, _ = trimesh.proximity.closest_point(gt, points)
    raw = sdf.distance(torch.from_numpy(points).float()).double().numpy() + sdf.safety_margin
    excess = raw - d_true
    near = d_true < 4.0 * sdf.sigma / sdf.scale
    report = MarginReport(voxel, tolerance_voxels, len(points), int(near.sum()))
    for m in [0.0, *margins_voxels]:
        holds = excess - m * voxel <= tolerance_voxels * voxel
        report.fraction_all[f"{m:g}"] = float(holds.mean())
        report.fraction_near[f"{m:g}"] = float(holds[near].mean())
    for q in (0.5, 0.9, 0.99, 0.999):
        report.excess_quantiles_voxels[f"{q:g}"] = float(np.quantile(excess[near], q) / voxel)
    return report


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m certsdf_ns.bench.margin", description=__doc__.split("\n")[0])
    p.add_argument("--load-config", type=Path, required=True, help="config.yml of a certsdf run")
    p.add_argument("--gt-mesh", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--margins-voxels", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--n-points", type=int, default=20_000)
    p.add_argument("--tolerance-voxels", type=float, default=0.1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sdf = CertifiedSDF.from_checkpoint(args.load_config, args.step, safety_margin=0.0)
    gt = trimesh.load(str(args.gt_mesh), force="mesh")
    report = margin_report(sdf, gt, args.margins_voxels, args.n_points, args.tolerance_voxels)
    text = json.dumps(report.to_json(), indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
