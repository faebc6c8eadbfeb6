"""Where do the images put the surface, relative to the certified SDF's zero set? (issue 13)

    python scripts/studies/zero_set_bias.py --load-config RUN/config.yml --scene SCENE [--views 8]

On a trained grid, with no further training, along the rays of the scene's training cameras:

* silhouettes: on pixels within ±`band` pixels of the ground-truth silhouette, the rendered
  opacity of the *same grid* under the paper's density map and under the unbiased (NeuS) map,
  against the images' alpha. The unbiased map's opacity is ½ where a ray is tangent to the zero
  set, so (Σ opacity − Σ alpha) / (silhouette length) is the signed offset, in pixels, of the
  zero-set silhouette (unbiased) or of the rendered silhouette the training fitted (paper) from
  the true one; positive = outside;
* head-on: on pixels well inside the silhouette, the depth where T = ½ under each map minus the
  depth of the ray's first zero crossing of the SDF, in units of the sharpness s.

Both maps are integrated numerically with `samples` uniform steps over the box (no sampler).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from certsdf_ns.certified import sdf_to_density, unbiased_alphas
from certsdf_ns.export.run import load_run


def camera_rays(frame: dict, angle_x: float, size: int) -> tuple:
    """Blender/NeRF convention: camera looks down −z, y up; returns origins, unit directions [H, W, 3]."""
    c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float32)[:3]
    focal = 0.5 * size / math.tan(0.5 * angle_x)
    j, i = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    dirs = torch.stack([(i + 0.5 - size / 2) / focal, -(j + 0.5 - size / 2) / focal, -torch.ones_like(i)], -1)
    d = torch.nn.functional.normalize(dirs @ c2w[:, :3].T, dim=-1)
    return c2w[:, 3].expand_as(d), d, focal


@torch.no_grad()
def integrate(grid, sdf_nodes, o, d, sharpness, samples, density_scale, density_eps):
    """(paper T [N, S+1], unbiased T [N, S+1], sdf at edges [N, S+1], t edges [N, S+1]) along the box chord."""
    aabb = grid.aabb
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (aabb[0] - o) * inv, (aabb[1] - o) * inv
    near, far = torch.minimum(t0, t1).max(-1).values.clamp_min(0), torch.maximum(t0, t1).min(-1).values
    u = torch.linspace(0.0, 1.0, samples + 1)
    t = near[:, None] + (far - near)[:, None] * u[None]
    x = o[:, None] + d[:, None] * t[..., None]
    f = grid.sdf(x.reshape(-1, 3), sdf_nodes).reshape(t.shape)
    dt = t.diff(dim=-1)
    mid = 0.5 * (f[:, 1:] + f[:, :-1])
    depth = torch.cumsum(sdf_to_density(mid, sharpness, density_scale, density_eps) * dt, -1)
    paper = torch.cat([torch.ones_like(t[:, :1]), torch.exp(-depth)], -1)
    unb = torch.cumprod(torch.cat([torch.ones_like(t[:, :1]), 1.0 - unbiased_alphas(f, sharpness)], -1), -1)
    return paper, unb, f, t


def first_crossing(t: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
    """Per row: first t where y drops below level (linear interpolation); NaN if never."""
    below = y < level
    has = below.any(-1)
    i = torch.argmax(below.int(), dim=-1).clamp_min(1)
    r = torch.arange(len(t))
    a = (y[r, i - 1] - level) / (y[r, i - 1] - y[r, i]).clamp_min(1e-12)
    out = t[r, i - 1] + a * (t[r, i] - t[r, i - 1])
    return torch.where(has, out, torch.full_like(out, math.nan))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load-config", type=Path, required=True)
    p.add_argument("--scene", type=Path, required=True, help="Blender-format scene with train/ RGBA images")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--band", type=int, default=4, help="silhouette band half-width (pixels)")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    model = load_run(args.load_config).model
    grid = model.field.geometry
    voxel = float(grid.voxel_size.min())
    s = model.config.sharpness_voxels * voxel
    scale, eps = model.config.density_scale, model.config.density_eps
    sdf_nodes = grid.sdf_grid()
    meta = json.loads((args.scene / "transforms_train.json").read_text())
    frames = meta["frames"][:: max(1, len(meta["frames"]) // args.views)][: args.views]
    sil = {"paper": [], "unbiased": []}
    head = {"paper": [], "unbiased": []}
    for frame in frames:
        alpha = np.asarray(Image.open(args.scene / (frame["file_path"] + ".png")), dtype=np.float32)[..., 3] / 255.0
        size = alpha.shape[0]
        o, d, focal = camera_rays(frame, meta["camera_angle_x"], size)
        mask = alpha > 0.5
        edge = mask ^ ndimage.binary_erosion(mask)
        length = float(edge.sum())  # silhouette length in pixels (inner boundary pixels)
        band = ndimage.binary_dilation(edge, iterations=args.band)
        inner = ndimage.binary_erosion(mask, iterations=3 * args.band)
        bsel = torch.from_numpy(band)
        paper, unb, f, t = integrate(grid, sdf_nodes, o[bsel], d[bsel], s, args.samples, scale, eps)
        a_gt = float(alpha[band].sum())
        # Pixel size at the object's depth (camera distance to the origin) in world units.
        pixel = float(o[0, 0].norm()) / focal
        for name, T in (("paper", paper), ("unbiased", unb)):
            opacity = float((1.0 - T[:, -1]).sum())
            sil[name].append((opacity - a_gt) / length * pixel)
        isel = torch.from_numpy(inner)
        idx = torch.nonzero(isel.reshape(-1))[:, 0]
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:1500]]
        paper, unb, f, t = integrate(grid, sdf_nodes, o.reshape(-1, 3)[idx], d.reshape(-1, 3)[idx], s, args.samples, scale, eps)
        zero = first_crossing(t, f, 0.0)
        for name, T in (("paper", paper), ("unbiased", unb)):
            half = first_crossing(t, T, 0.5)
            ok = torch.isfinite(half) & torch.isfinite(zero)
            head[name] += ((half - zero)[ok] / s).tolist()
    result = {
        "sharpness": s, "voxel": voxel, "views": len(frames),
        "silhouette_offset_world": {k: float(np.mean(v)) for k, v in sil.items()},
        "silhouette_offset_voxels": {k: float(np.mean(v) / voxel) for k, v in sil.items()},
        "head_on_half_T_behind_zero_crossing_in_s": {k: float(np.median(v)) for k, v in head.items()},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
