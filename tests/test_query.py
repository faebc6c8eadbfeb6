"""certsdf_ns.export.query: point queries, safe sphere tracing, the safety margin, the .npz grid and loading
a checkpoint without nerfstudio's trainer. All on small analytic grids (seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from certsdf_ns.certified import CertifiedSDFGrid
from certsdf_ns.export.query import DEFAULT_MARGIN_VOXELS, CertifiedSDF

R, RADIUS = 48, 0.5
AABB = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
VOXEL = 2.0 / (R - 1)


def node_points() -> torch.Tensor:
    axis = torch.linspace(-1.0, 1.0, R)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def analytic_sphere(margin: float = 0.0, **frame) -> CertifiedSDF:
    """Node values |x| − r: the exact SDF of a sphere sampled at the nodes."""
    return CertifiedSDF(node_points().norm(dim=-1) - RADIUS, torch.tensor(AABB), sigma=0.05, eps=1e-5,
                        safety_margin=margin, **frame)  # fmt: skip


def random_points(n: int, lo: float = 0.1, hi: float = 0.9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    return direction * (lo + (hi - lo) * torch.rand(n, 1, generator=gen))


def test_distance_and_gradient_match_the_analytic_sphere() -> None:
    sdf = analytic_sphere()
    x = random_points(4000, 0.3, 0.9)  # away from the kink of |x| at the centre
    res = sdf.query(x)
    exact = x.norm(dim=-1) - RADIUS
    # Trilinear interpolation of |x| − r: error O(h²/|x|), under a tenth of a voxel here.
    assert float((res.distance - exact).abs().max()) < 0.1 * VOXEL
    cos = (res.gradient * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
    assert float(cos.min()) > 0.99
    assert not bool(((res.inside != (exact < 0)) & (exact.abs() > 0.1 * VOXEL)).any())


def test_first_hit_lies_on_the_marching_cubes_surface() -> None:
    """Sphere-traced hits against marching cubes of the same node grid: within a voxel, never inside."""
    import mcubes

    grid = CertifiedSDFGrid(R, AABB, sigma=2 * VOXEL)
    occ = (grid.grid_points() - torch.tensor([0.1, -0.05, 0.0])).norm(dim=-1) <= RADIUS
    occ |= (grid.grid_points() - torch.tensor([-0.3, 0.3, 0.2])).abs().max(dim=-1).values <= 0.3  # a box: edges
    grid.set_occupancy(occ.float())
    sdf = CertifiedSDF.from_grid(grid, safety_margin=0.0)
    vertices, faces = mcubes.marching_cubes(sdf.sdf_nodes.numpy().astype(np.float64), 0.0)
    mesh = trimesh.Trimesh(-1.0 + vertices * VOXEL, faces)

    gen = torch.Generator().manual_seed(1)
    origins = torch.nn.functional.normalize(torch.randn(300, 3, generator=gen), dim=-1) * 3.0
    targets = (torch.rand(300, 3, generator=gen) - 0.5) * 0.6
    hits = sdf.raycast(origins, targets - origins)  # unnormalised directions: t in their units
    assert hits.hit.float().mean() > 0.9
    p = hits.points[hits.hit]
    _, dist, _ = trimesh.proximity.closest_point(mesh, p.numpy())
    assert dist.max() < VOXEL, dist.max() / VOXEL
    # Safe: the tracer stops just outside (distance ≥ 0 up to its tolerance), never past the surface.
    assert float(sdf.distance(p).min()) > -1e-3 * VOXEL
    normal_cos = (hits.normals[hits.hit] * torch.nn.functional.normalize(targets - origins, dim=-1)[hits.hit]).sum(-1)
    assert float(normal_cos.max()) < 0.0  # the normal faces the incoming ray


def test_interpolant_lipschitz_constant_is_exact() -> None:
    """A plane's SDF interpolates exactly (constant 1); a kink at a node (|x|, a cone apex) gives √3 at
    the apex cell's corner, as the corner formula says."""
    from certsdf_ns.export.query import interpolant_lipschitz

    normal = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -0.5]), dim=0)
    plane = node_points() @ normal - 0.1
    assert interpolant_lipschitz(plane, [VOXEL] * 3) == pytest.approx(1.0, abs=1e-4)
    axis = torch.arange(3.0)
    g = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1)  # |x| from node 0
    assert interpolant_lipschitz(g, [1.0] * 3) == pytest.approx(math.sqrt(3.0), rel=1e-5)


def test_rays_that_miss_and_rays_that_start_inside() -> None:
    sdf = analytic_sphere()
    origins = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.9, -3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    hits = sdf.raycast(origins, directions)
    assert hits.hit.tolist() == [True, False, True, False]
    assert float(hits.t[0]) == pytest.approx(2.5, abs=0.1 * VOXEL)
    assert float(hits.t[2]) == 0.0 and math.isinf(float(hits.t[1]))
    assert torch.isnan(hits.points[1]).all()


def test_margin_is_subtracted_everywhere() -> None:
    """distance(m) = distance(0) − m; a point within m outside the zero set counts as inside; the first
    hit moves m towards the ray origin (head-on)."""
    m = 3 * VOXEL
    raw, safe = analytic_sphere(0.0), analytic_sphere(m)
    x = random_points(1000)
    assert torch.allclose(safe.distance(x), raw.distance(x) - m, atol=1e-6)
    assert torch.equal(safe.gradient(x), raw.gradient(x))
    shell = random_points(200, RADIUS + 0.2 * m, RADIUS + 0.8 * m)
    assert bool((~raw.query(shell).inside).all()) and bool(safe.query(shell).inside.all())
    o, d = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    assert float(raw.raycast(o, d).t - safe.raycast(o, d).t) == pytest.approx(m, abs=0.1 * VOXEL)


def test_default_margin_is_in_voxels() -> None:
    sdf = CertifiedSDF(node_points().norm(dim=-1) - RADIUS, torch.tensor(AABB), 0.05, 1e-5)
    assert sdf.safety_margin == pytest.approx(DEFAULT_MARGIN_VOXELS * VOXEL)


def test_npz_round_trip_keeps_values_margin_and_frame(tmp_path: Path) -> None:
    """The file stores sdf − margin; loading restores the same distances, or those of another margin."""
    angle = 0.3
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1]])
    transform = np.concatenate([rotation, [[0.1], [0.0], [-0.2]]], axis=1)
    m = 0.02
    sdf = analytic_sphere(m, transform=transform, scale=2.0)
    path = sdf.save_npz(tmp_path / "grid.npz")
    data = np.load(path)
    nodes_raw = sdf.sdf_nodes.numpy()
    assert np.allclose(data["sdf"], nodes_raw - m * 2.0)  # margin stored in query units, grid in grid units
    assert float(data["safety_margin"]) == m and float(data["scale"]) == 2.0
    x = random_points(500, 0.0, 0.2)  # inside the grid's box after the transform
    loaded = CertifiedSDF.from_npz(path)
    assert torch.allclose(loaded.distance(x), sdf.distance(x), atol=1e-6)
    assert torch.allclose(CertifiedSDF.from_npz(path, safety_margin=0.0).distance(x), sdf.distance(x) + m, atol=1e-6)
    # The frame: a point x maps to scale·(R x + t); distances are in query units (divided by the scale).
    xg = 2.0 * (x.double() @ torch.from_numpy(rotation).T + torch.tensor([0.1, 0.0, -0.2]))
    exact = (xg.norm(dim=-1) - RADIUS) / 2.0 - m
    assert float((loaded.distance(x).double() - exact).abs().max()) < 0.1 * VOXEL


def test_from_checkpoint_loads_the_step_asked_for(trained_run) -> None:
    """`step` picks that checkpoint (σ from the model's schedule at it); a step the run never saved is
    refused with the steps it has."""
    from certsdf_ns.errors import CertSDFInputError
    from certsdf_ns.export.run import load_run

    run = load_run(trained_run.config, step=100)
    assert run.step == 100 and run.checkpoint.name == "step-000000100.ckpt"
    early = CertifiedSDF.from_checkpoint(trained_run.config, step=100, safety_margin=0.0, frame="nerfstudio")
    late = CertifiedSDF.from_checkpoint(trained_run.config, safety_margin=0.0, frame="nerfstudio")
    model = run.model
    assert early.sigma == pytest.approx(model.scheduled_smoothing(100)[0] * model.voxel)
    x = run.model.field.aabb[0] + (run.model.field.aabb[1] - run.model.field.aabb[0]) * torch.rand(500, 3)
    torch.testing.assert_close(early.distance(x), model.field.sdf_at(x).detach(), atol=1e-5, rtol=0)
    assert float((early.distance(x) - late.distance(x)).abs().max()) > 1e-3  # 200 more steps moved the surface
    with pytest.raises(CertSDFInputError, match=r"no checkpoint of step 7 \(it has steps 100, 200, 299\)"):
        CertifiedSDF.from_checkpoint(trained_run.config, step=7)


def test_write_sdf_grid_stores_the_margin_in_voxels(tmp_path: Path) -> None:
    from certsdf_ns.export.mesh_export import write_sdf_grid

    grid = CertifiedSDFGrid(R, AABB, sigma=2 * VOXEL)
    grid.set_occupancy((grid.grid_points().norm(dim=-1) <= RADIUS).float())
    loaded = CertifiedSDF.from_npz(write_sdf_grid(grid, tmp_path / "g.npz", margin_voxels=1.5))
    x = random_points(300)
    assert loaded.safety_margin == pytest.approx(1.5 * VOXEL)
    assert torch.allclose(loaded.distance(x), grid.sdf(x).detach() - 1.5 * VOXEL, atol=1e-5)
