"""Property tests of the certified-SDF maths (certsdf_ns.certified), no nerfstudio needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certsdf_ns.certified import CertifiedSDFGrid, probit, sdf_to_density, voxel_gaussian_matrix

AABB = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


def make_grid(res: int, sigma_vox: float, eps: float = 1e-5) -> CertifiedSDFGrid:
    h = 2.0 / (res - 1)
    return CertifiedSDFGrid(res, AABB, sigma=sigma_vox * h, eps=eps)


SHAPES = {
    "sphere": lambda pts: (pts.norm(dim=-1) < 0.5).float(),
    "cube": lambda pts: (pts.abs().amax(dim=-1) < 0.45).float(),
}


CROP_BOX = ((-0.62, -0.7, -0.66), (0.64, 0.62, 0.7))
"""A box around both shapes, uneven on purpose: a cropped grid's lattice has other node counts per axis."""


def shape_grid(shape: str, res: int, sigma_vox: float, grown_from: int = 0, cropped: bool = False) -> CertifiedSDFGrid:
    """A res³ grid (σ in its voxels) holding `shape`; with `grown_from`, the shape is voxelized on a
    grown_from³ grid with the same σ in world units and then regridded to res³, as the coarse-to-fine
    schedule does: the certificate must hold on that (non-binary, interpolated) occupancy too.

    `cropped`: then resampled, as the model's grid crop does, onto about res³ nodes over CROP_BOX (finer,
    nearly cubic voxels, a different count per axis; zero occupancy outside the box), σ kept in voxels."""
    grid = make_grid(res, sigma_vox)
    if grown_from:
        sigma = grid.sigma
        grid = CertifiedSDFGrid(grown_from, AABB, sigma=sigma, eps=grid.eps)
    grid.set_occupancy(SHAPES[shape](grid.grid_points()))
    grid.regrid(res)
    if cropped:
        box = torch.tensor(CROP_BOX)
        extent = box[1] - box[0]
        edge = float(grid.voxel_size[0]) * float(extent.prod() / 8.0) ** (1.0 / 3.0)
        grid.regrid([int(round(float(e) / edge)) + 1 for e in extent], box)
        grid.sigma = sigma_vox * float(grid.voxel_size.min())
    return grid


GROWN = pytest.mark.parametrize("grown_from", [0, 2], ids=["dense", "grown"])
"""Each certificate test on a grid trained at its resolution (0) and on one grown from a coarser grid
(the value is the refinement: the coarse grid has about res / 2 nodes per axis)."""
LATTICES = pytest.mark.parametrize(
    "grown_from, cropped", [(0, False), (2, False), (0, True), (2, True)], ids=["dense", "grown", "cropped", "grown+cropped"]
)
"""GROWN, and each of those cropped to a box around the shape (shape_grid)."""


def coarse(res: int, refinement: int) -> int:
    """Nodes per axis of a grid that `refinement`× finer nodes subdivide into res (0: none)."""
    return 0 if not refinement else (res - 1) // refinement + 1


def test_kernel_rows_are_gaussian_cell_masses() -> None:
    k = voxel_gaussian_matrix(101, 3.0, dtype=torch.float64)
    # a row far from the borders carries the whole Gaussian mass; it is symmetric and peaked
    assert abs(float(k[50].sum()) - 1.0) < 1e-9
    assert torch.allclose(k[50, 40:50].flip(0), k[50, 51:61])
    assert int(k[50].argmax()) == 50
    # near a border, the mass of the (empty) outside is missing: half of it at the first node
    assert abs(float(k[0].sum()) - (0.5 + 0.5 * math.erf(0.5 / (3.0 * math.sqrt(2))))) < 1e-9


@GROWN
@pytest.mark.parametrize("sigma_vox", [0.7, 2.0, 4.0])
def test_plane_is_reproduced(sigma_vox: float, grown_from: int) -> None:
    """Occupancy = half-space {x < c}: the SDF is x − c, to within 2% of σ.

    Grid 64³ on [-1, 1]³; c lies on a cell face (the voxel classifier's boundary), points
    are kept 5σ away from the other faces of the box (whose outside is empty) and inside the
    unclamped band: |x − c| < σ·Φ⁻¹(1−ε) − h, so both nodes around a point are unclamped.
    """
    res = 65
    grid = make_grid(res, sigma_vox)
    pts = grid.grid_points()
    h = float(grid.voxel_size[0])
    c = float(pts[30, 0, 0, 0]) + h / 2
    grid.set_occupancy((pts[..., 0] < c).float())
    if grown_from:
        # The half-space on the coarse grid of every other node, its face at c, grown back to 65³:
        # the node on the face gets occupancy ½, its cell straddles c symmetrically.
        c = float(pts[29, 0, 0, 0])  # midway between coarse nodes 14 and 15: the coarse grid's cell face
        half = CertifiedSDFGrid(coarse(res, grown_from), AABB, sigma=grid.sigma, eps=grid.eps)
        half.set_occupancy((half.grid_points()[..., 0] < c).float())
        half.regrid(res)
        grid = half

    gen = torch.Generator().manual_seed(0)
    margin = 5 * grid.sigma + h
    x = torch.rand(20000, 3, generator=gen) * 2 - 1
    x[:, 0] = c + (torch.rand(20000, generator=gen) * 2 - 1) * (grid.max_distance - h)
    keep = (x[:, 1:].abs() < 1 - margin).all(dim=1) & (x[:, 0] > -1 + margin) & (x[:, 0] < 1 - margin)
    x = x[keep]
    sdf, signed = grid.sdf(x), x[:, 0] - c
    if not grown_from:
        err = (sdf - signed).abs().max().item()
        assert err < 0.02 * grid.sigma, f"plane error {err / grid.sigma:.4f} σ"
        return
    # Grown, the step became a ramp one fine voxel wide (occupancy ½ at the face's node): the zero set
    # is still the plane, the SDF never overestimates the distance to it and falls short by under ~h.
    assert (sdf * signed > 0)[signed.abs() > 0.02 * grid.sigma].all()
    assert (sdf.abs() <= signed.abs() + 0.02 * grid.sigma).all()
    assert (sdf.abs() >= signed.abs() - h - 0.02 * grid.sigma).all()
    on_face = x.clone()
    on_face[:, 0] = c
    assert grid.sdf(on_face).abs().max().item() < 0.02 * grid.sigma


@LATTICES
@pytest.mark.parametrize("shape", ["sphere", "cube"])
def test_sdf_is_a_lower_bound_on_distance_to_the_smoothed_surface(shape: str, grown_from: int, cropped: bool) -> None:
    """|sdf(x)| ≤ dist(x, {p̂ = ½}) + tol; sign correct more than 2 voxels from the surface.

    The smoothed surface is extracted from p̂ computed exactly (no interpolation) on a 2x
    finer lattice, by marching cubes, and sampled densely. Tolerance: 0.35 voxel of the
    certified grid, for the marching-cubes discretisation of the reference surface (linear
    interpolation on a lattice of half a voxel) plus the trilinear interpolation of the SDF.
    """
    import mcubes
    import trimesh
    from scipy.spatial import cKDTree

    res, sigma_vox = 41, 2.0
    grid = shape_grid(shape, res, sigma_vox, coarse(res, grown_from), cropped)
    h = float(grid.voxel_size[0])

    # reference surface {p̂ = ½} from exact p̂ on a 2x finer lattice around the object
    n = 65
    lin = torch.linspace(-0.8, 0.8, n)
    fine = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    p_exact = torch.cat([grid.exact_smoothed_occupancy(chunk) for chunk in fine.split(4096)]).reshape(n, n, n)
    verts, faces = mcubes.marching_cubes(p_exact.numpy().astype(np.float64), 0.5)
    verts = verts * (1.6 / (n - 1)) - 0.8
    surface = trimesh.Trimesh(verts, faces, process=False)
    samples = surface.sample(200_000, seed=0) if "seed" in surface.sample.__code__.co_varnames else surface.sample(200_000)
    tree = cKDTree(np.vstack([samples, verts]))

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4000, 3, generator=gen) * 1.4 - 0.7
    dist = torch.from_numpy(tree.query(x.numpy())[0]).float()
    sdf = grid.sdf(x)
    tol = 0.35 * h
    excess = (sdf.abs() - dist).max().item()
    assert excess <= tol, f"sdf overestimates distance by {excess / h:.3f} voxel"

    inside_smoothed = grid.exact_smoothed_occupancy(x) > 0.5
    far = dist > 2 * h
    agree = ((sdf < 0) == inside_smoothed)[far].float().mean().item()
    assert agree == 1.0


@LATTICES
def test_monte_carlo_randomized_smoothing_matches_grid(grown_from: int, cropped: bool) -> None:
    """E[f(x+δ)] by Monte-Carlo (20k noise draws of the voxel classifier) equals the grid's p̂."""
    res, sigma_vox = 33, 2.5
    grid = shape_grid("sphere", res, sigma_vox, coarse(res, grown_from), cropped)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(40, 3, generator=gen) * 1.2 - 0.6
    n_mc = 20_000
    occ = grid.occupancy()
    h = grid.voxel_size
    p_mc = []
    for xi in x:
        noisy = xi + grid.sigma * torch.randn(n_mc, 3, generator=gen)
        idx = torch.round((noisy - grid.aabb[0]) / h).long()  # the voxel (cell) containing the point
        inside = ((idx >= 0) & (idx < torch.tensor(grid.resolution))).all(dim=1)
        vals = torch.zeros(n_mc)
        ii = idx[inside]
        vals[inside] = occ[ii[:, 0], ii[:, 1], ii[:, 2]]
        p_mc.append(vals.mean())
    p_mc = torch.stack(p_mc)
    p_exact = grid.exact_smoothed_occupancy(x)
    mc_std = torch.sqrt(p_exact * (1 - p_exact) / n_mc).clamp_min(1e-4)
    z = ((p_mc - p_exact) / mc_std).abs()
    assert z.max() < 4.5, f"max z-score {z.max():.2f}"
    # the nodes carry exactly this p̂ ...
    nodes = grid.grid_points()
    node_idx = torch.tensor([[16, 16, 16], [10, 20, 12], [24, 8, 16]])
    on_nodes = nodes[node_idx[:, 0], node_idx[:, 1], node_idx[:, 2]]
    p_grid = grid.smoothed_occupancy_grid()[node_idx[:, 0], node_idx[:, 1], node_idx[:, 2]]
    assert torch.allclose(p_grid, grid.exact_smoothed_occupancy(on_nodes), atol=1e-5)
    # ... and between nodes the interpolated p̂ stays within the MC error as well
    z_interp = ((grid.smoothed_occupancy(x) - p_mc) / mc_std).abs()
    assert z_interp.max() < 5.0


@LATTICES
@pytest.mark.parametrize("shape", ["sphere", "cube"])
def test_sdf_is_one_lipschitz(shape: str, grown_from: int, cropped: bool) -> None:
    """Autograd |∇sdf| ≤ 1.03 at random points (97³ grid, σ = 3 voxels, as in the planning study)."""
    res, sigma_vox = 97, 3.0
    grid = shape_grid(shape, res, sigma_vox, coarse(res, grown_from), cropped)
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(50_000, 3, generator=gen) * 1.8 - 0.9).requires_grad_(True)
    sdf = grid.sdf(x)
    (g,) = torch.autograd.grad(sdf.sum(), x)
    norms = g.norm(dim=-1)
    assert norms.max().item() <= 1.03, f"max |∇sdf| = {norms.max():.4f}"
    # and it is not trivially flat: near the surface the gradient has unit norm
    assert norms.max().item() > 0.9
    # finite differences between random pairs agree (a second, autograd-free check)
    y = x.detach() + 0.05 * torch.nn.functional.normalize(torch.randn(50_000, 3, generator=gen), dim=-1)
    ratio = (grid.sdf(y) - sdf.detach()).abs() / (y - x.detach()).norm(dim=-1)
    assert ratio.max().item() <= 1.03


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_numerics_at_exact_zero_and_one_occupancy(fill: float) -> None:
    grid = make_grid(24, 1.5)
    grid.set_occupancy(torch.full((24, 24, 24), fill))
    x = (torch.rand(1000, 3) * 2.4 - 1.2).requires_grad_(True)
    sdf = grid.sdf(x)
    density = sdf_to_density(sdf, 0.02)
    (gx,) = torch.autograd.grad((sdf + density).sum(), x)
    assert torch.isfinite(sdf).all() and torch.isfinite(density).all() and torch.isfinite(gx).all()
    assert sdf.abs().max() <= grid.max_distance * (1 + 1e-5)
    # gradients w.r.t. the logits stay finite through the clamp as well
    loss = grid.sdf(x.detach()).sum()
    (gl,) = torch.autograd.grad(loss, grid.logits)
    assert torch.isfinite(gl).all()


def test_numerics_at_extreme_logits() -> None:
    grid = make_grid(24, 1.5)
    with torch.no_grad():
        grid.logits.copy_(torch.randn(24, 24, 24) * 1e4)
    x = torch.rand(500, 3) * 2 - 1
    sdf = grid.sdf(x)
    (gl,) = torch.autograd.grad(sdf_to_density(sdf, 0.01).sum(), grid.logits)
    assert torch.isfinite(sdf).all() and torch.isfinite(gl).all()


def test_density_map_is_the_papers() -> None:
    sdf = torch.tensor([-1.0, 0.0, 1.0])
    s, eps = 0.1, 1e-6
    g = torch.sigmoid(-sdf.double() / s)
    expected = -30.0 * torch.log(1 + eps - g)  # reference in float64
    assert torch.allclose(sdf_to_density(sdf, s, 30.0, eps).double(), expected, rtol=1e-4)
    assert sdf_to_density(torch.tensor([-10.0]), s)[0] > sdf_to_density(torch.tensor([10.0]), s)[0]


def test_python_api_shapes_and_validation() -> None:
    grid = CertifiedSDFGrid(resolution=16, aabb=((-1, -1, -1), (1, 1, 1)), sigma=0.2)
    pts = grid.grid_points()
    assert pts.shape == (16, 16, 16, 3)
    assert torch.allclose(pts[0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    grid.set_occupancy((pts.norm(dim=-1) < 0.5).float())
    x = torch.zeros(5, 3)
    assert grid.sdf(x).shape == (5,) and grid.smoothed_occupancy(x).shape == (5,)
    assert (grid.sdf(x) < 0).all()
    with pytest.raises(ValueError):
        grid.sigma = 0.0
    with pytest.raises(ValueError):
        CertifiedSDFGrid(16, sigma=0.1, eps=0.7)
    with pytest.raises(ValueError):
        grid.set_occupancy(torch.zeros(8, 8, 8))


def test_sdf_cache_follows_parameter_updates() -> None:
    grid = make_grid(16, 1.5)
    with torch.no_grad():
        before = grid.sdf_grid().clone()
        grid.logits.add_(5.0)  # in-place, as an optimizer does
        after = grid.sdf_grid()
    assert not torch.allclose(before, after)


def test_normals_point_outward_and_follow_updates() -> None:
    """Normals of a ball are radial; the cached gradient grid is rebuilt after σ changes, an
    optimizer step or set_occupancy (a stale cache would keep the old ball's normals)."""
    grid = make_grid(48, 1.5)
    pts = grid.grid_points()
    grid.set_occupancy((pts.norm(dim=-1) < 0.5).float())
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(500, 3, generator=gen), dim=-1) * 0.5
    cos = (grid.normals(x) * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
    assert float(cos.min()) > 0.98, float(cos.min())

    # the ball moves by +0.3 along x: at (0, 0.5, 0) the old normal was +y, the new one tilts to −x
    grid.set_occupancy(((pts - torch.tensor([0.3, 0.0, 0.0])).norm(dim=-1) < 0.5).float())
    n = grid.normals(torch.tensor([[0.0, 0.5, 0.0]]))[0]
    assert float(n[0]) < -0.3, n

    # an in-place optimizer-like step and a σ change both refresh the cached gradients
    before = grid.sdf_gradient_grid().clone()
    with torch.no_grad():
        grid.logits[:24].add_(10.0)
    assert not torch.allclose(before, grid.sdf_gradient_grid())
    before = grid.sdf_gradient_grid().clone()
    grid.sigma = grid.sigma * 2
    assert not torch.allclose(before, grid.sdf_gradient_grid())


def test_probit_gradient_is_autograds() -> None:
    """Φ⁻¹ with its derivative from the saved value gives autograd's gradient through erfinv, from deep in
    the tails (the SDF's clamp ε = 1e-5) to the middle, in float32 and float64."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        p = torch.cat([torch.tensor([1e-5, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-5]), torch.rand(200)]).to(dtype)
        weights = torch.randn_like(p)
        a = p.clone().requires_grad_()
        (probit(a) * weights).sum().backward()
        b = p.clone().requires_grad_()
        (math.sqrt(2.0) * torch.special.erfinv(2.0 * b - 1.0) * weights).sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(probit(p), math.sqrt(2.0) * torch.special.erfinv(2.0 * p - 1.0), rtol=0, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=0)


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("support", [False, True])
def test_slabs_of_rows_give_the_whole_grids_sdf_and_gradient(parts: int, support: bool) -> None:
    """Each process of a sharded run smooths its slab of x-rows from the occupancy its kernel reaches:
    the slabs together are the whole grid's SDF, and their gradients add up to the whole grid's (also
    with a support ball, more parts than rows, and σ wide enough that a slab reaches past its neighbour)."""
    from certsdf_ns.certified import row_block, row_slabs

    torch.manual_seed(1)
    grid = CertifiedSDFGrid((37, 11, 13), sigma=0.15, support_sphere=((0.1, 0.0, 0.0), 0.8) if support else None)
    with torch.no_grad():
        grid.logits.copy_(torch.randn(grid.resolution) * 3)
    weights = torch.randn(grid.resolution)
    whole = grid.sdf_grid()
    (whole * weights).sum().backward()
    expected = grid.logits.grad.clone()
    grid.logits.grad = None
    slabs = row_slabs(37, parts)
    assert slabs[0][0] == 0 and slabs[-1][1] == 37 and all(a1 == b0 for (_, b0), (a1, _) in zip(slabs, slabs[1:]))
    assert max(b - a for a, b in slabs) - min(b - a for a, b in slabs) <= 1
    rows = [grid.sdf_rows(s) for s in slabs]
    torch.testing.assert_close(torch.cat(rows), whole.detach(), rtol=0, atol=1e-5)
    sum((r * weights[a:b]).sum() for r, (a, b) in zip(rows, slabs)).backward()
    torch.testing.assert_close(grid.logits.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # A slab reads (and sends gradient to) the rows its kernel reaches, and no other.
    grid.sigma = 0.05  # 0.9 voxel: the first half of the rows does not reach the last ones
    grid.logits.grad = None
    grid.sdf_rows((0, 18)).sum().backward()
    touched = torch.nonzero(grid.logits.grad.abs().sum(dim=(1, 2)))[:, 0]
    lo, hi = row_block(grid._kernels[0], (0, 18))
    assert lo <= int(touched.min()) and int(touched.max()) < hi and (support or int(touched.max()) == hi - 1)
    assert 18 < int(touched.max()) < 36
