"""How far does the zero set sit from the object with a *perfect* occupancy grid? (issue 13)

    python scripts/studies/voxelized_gt_offset.py SCENE SIGMA_VOXELS...

No training: the ground-truth mesh SCENE/gt_mesh.ply is voxelized onto the nodes of the default
grid (192³ over [-1.5, 1.5]³; occupancy 1 where the node is inside), smoothed with each σ (in
voxels), and the zero set is meshed as `certsdf-export` does (256³ lattice) and on the node
lattice (×1, ×2). The signed offset then measures what smoothing (the curvature shrink ~σ²κ) and
the export lattice alone contribute.
"""

import json
import sys
import time

import numpy as np
import torch
import trimesh

from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.export.geometry_eval import evaluate_mesh
from certsdf_ns.export.mesh import extract_mesh

R = 192
"""Nodes per axis of the default occupancy grid."""


def voxelized_grid(gt: trimesh.Trimesh) -> CertifiedSDFGrid:
    """The default grid over [-1.5, 1.5]³ with occupancy 1 at the nodes inside `gt`, 0 elsewhere."""
    grid = CertifiedSDFGrid(R, ((-1.5,) * 3, (1.5,) * 3), sigma=0.1)
    voxel = float(grid.voxel_size[0])
    pts = grid.grid_points().reshape(-1, 3).numpy()
    lo, hi = gt.bounds[0] - 2 * voxel, gt.bounds[1] + 2 * voxel
    box = np.all((pts >= lo) & (pts <= hi), axis=1)
    t0 = time.time()
    inside = np.zeros(len(pts), bool)
    inside[box] = gt.contains(pts[box])
    print(f"voxel {voxel:.5f}; contains on {box.sum()} nodes in {time.time()-t0:.1f}s; inside {inside.sum()}", flush=True)
    grid.set_occupancy(torch.from_numpy(inside.reshape(R, R, R)).float())
    return grid


def main() -> None:
    scene = sys.argv[1]
    gt = trimesh.load(f"{scene}/gt_mesh.ply", force="mesh")
    grid = voxelized_grid(gt)
    voxel = float(grid.voxel_size[0])
    out = {}
    for sv in (float(a) for a in sys.argv[2:]):
        grid.sigma = sv * voxel
        for res, up in ((256, 1), (0, 1), (0, 2)):
            mesh = extract_mesh(grid, resolution=res, upsample=up)
            m = evaluate_mesh(mesh, gt, n_points=100_000)
            key = f"sigma{sv:g}_res{res}_up{up}"
            out[key] = dict(chamfer=m.chamfer_l1, f01=m.fscore[0.01], f02=m.fscore[0.02], offset_median=m.offset_median,
                            offset_mean=m.offset_mean, offset_median_vox=m.offset_median / voxel, area=float(mesh.area))
            print(key, json.dumps({k: round(v, 5) for k, v in out[key].items()}), flush=True)
    print("gt area", gt.area)


if __name__ == "__main__":
    main()
