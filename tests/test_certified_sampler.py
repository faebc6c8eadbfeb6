"""The certified sampler skips only what the certificate proves empty (issue 15).

Safety: along every ray, each point the sampler skips (outside [t_in, t_out]) has interpolated SDF ≥ the
band d_τ, checked against a dense reference march of 4096 points per ray, on random grids, thin shells one
voxel thick, grazing rays, adversarial layouts and a trained grid. Equivalence: on the trained checkpoint,
images rendered with the certified sampler match a dense reference sampler within 0.1 dB PSNR.
"""

from __future__ import annotations

import math

import pytest
import torch

from certsdf_ns.certified import (
    TRILINEAR_LIPSCHITZ,
    CertifiedSDFGrid,
    band_brick_distance,
    band_distance,
    band_interval,
    certified_sdf_from_smoothed,
    sample_grid,
)

RES = 48
BAND = band_distance(0.25 * 2.0 / (RES - 1), 1e-4)  # s = ¼ voxel of a [-1, 1]³ grid: 2.3 voxels


def grid_from(occupancy: torch.Tensor, sigma_voxels: float = 2.0) -> CertifiedSDFGrid:
    grid = CertifiedSDFGrid(occupancy.shape[0], sigma=sigma_voxels * 2.0 / (occupancy.shape[0] - 1))
    grid.set_occupancy(occupancy)
    return grid


def node_coords(res: int = RES) -> torch.Tensor:
    axis = torch.linspace(-1.0, 1.0, res)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def box_interval(o: torch.Tensor, d: torch.Tensor):
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0, t1 = (-1.0 - o) * inv, (1.0 - o) * inv
    return torch.minimum(t0, t1).amax(-1).clamp_min(0.0), torch.maximum(t0, t1).amin(-1)


def skipped_violations(grid: CertifiedSDFGrid, o: torch.Tensor, d: torch.Tensor, band: float = BAND, **kw):
    """(worst SDF − band over all skipped reference points (≥ 0 is safe), intervals, dense SDF) for rays o + t·d."""
    near, far = box_interval(o, d)
    sdf_nodes = grid.sdf_grid().detach()
    bricks = (band_brick_distance(sdf_nodes, band, 4), 4)
    t_in, t_out, lowest, lookups = band_interval(sdf_nodes, grid.aabb, o, d, near, far, band, bricks, **kw)
    u = torch.linspace(0.0, 1.0, 4096)
    t = near[:, None] + (far - near)[:, None] * u[None]  # dense reference march
    sdf = sample_grid(sdf_nodes, (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3), grid.aabb).reshape(t.shape)
    skipped = ((t < t_in[:, None] - 1e-5) | (t > t_out[:, None] + 1e-5)) & (near < far)[:, None]  # rounding of t
    worst = (sdf[skipped] - band).min() if skipped.any() else torch.tensor(math.inf)
    return float(worst), (t_in, t_out, near, far, lookups), sdf


def random_rays(n: int, seed: int = 0, outside: bool = True):
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    target = 0.9 * (torch.rand(n, 3, generator=g) * 2 - 1)
    o = target - 2.5 * d if outside else target
    return o, d


def test_band_is_where_the_opacity_bound_says() -> None:
    s, tau = 0.01, 1e-4
    d = band_distance(s, tau)
    assert torch.sigmoid(torch.tensor(-d / s)).item() == pytest.approx(tau, rel=1e-6)


def test_lipschitz_constant_bounds_every_trilinear_interpolant() -> None:
    """√3 (plus rounding) bounds the interpolant of certified node SDFs, here of random binary grids."""
    from certsdf_ns.export.query import interpolant_lipschitz

    torch.manual_seed(0)
    for sigma in (0.5, 1.0, 2.0):
        grid = grid_from((torch.rand(RES, RES, RES) > 0.7).float(), sigma)
        measured = interpolant_lipschitz(grid.sdf_grid().detach(), grid.voxel_size.tolist())
        assert measured <= TRILINEAR_LIPSCHITZ
    assert measured > 0.5  # the check measured something


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skipped_points_are_certified_free_on_random_grids(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 3, generator=g) * 1.6 - 0.8
    radii = torch.rand(6, generator=g) * 0.25 + 0.05
    x = node_coords()
    occ = ((x[..., None, :] - centres).norm(dim=-1) < radii).any(-1).float()
    occ = torch.maximum(occ, (torch.rand(RES, RES, RES, generator=g) > 0.995).float())  # isolated specks too
    grid = grid_from(occ)
    o, d = random_rays(2000, seed)
    worst, (t_in, t_out, near, far, lookups), _ = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    skipped = ((t_in - near).clamp_min(0) + (far - t_out).clamp_min(0)).clamp(max=(far - near).clamp_min(0))
    assert float(skipped.sum() / (far - near).clamp_min(0).sum()) > 0.3  # and it does skip


def test_thin_shell_one_voxel_thick_is_never_skipped() -> None:
    x = node_coords()
    r = x.norm(dim=-1)
    voxel = 2.0 / (RES - 1)
    occ = ((r > 0.5 - voxel / 2) & (r < 0.5 + voxel / 2)).float()
    grid = grid_from(occ, sigma_voxels=0.5)  # at σ = 1 voxel a 1-voxel shell smooths to p̂ < ½: no zero set
    o, d = random_rays(1500, seed=3)
    worst, (t_in, t_out, near, far, _), sdf = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    crosses = (sdf < 0).any(-1)
    assert crosses.sum() > 100 and bool((t_in < t_out)[crosses].all())
    assert bool((t_in < t_out)[(sdf < BAND).any(-1)].all())


def test_grazing_rays() -> None:
    """Rays passing a ball at clearances from −1 to +6 voxels: the band is kept exactly where it is reached."""
    x = node_coords()
    grid = grid_from((x.norm(dim=-1) < 0.4).float())
    sdf_nodes = grid.sdf_grid().detach()
    voxel = 2.0 / (RES - 1)
    clearance = torch.linspace(-1.0, 6.0, 200) * voxel
    # Find the radius of the zero set along +y, then graze it along x at height r0 + clearance.
    ys = torch.linspace(0.2, 0.6, 4001)
    along = sample_grid(sdf_nodes, torch.stack([torch.zeros_like(ys), ys, torch.zeros_like(ys)], -1), grid.aabb)
    r0 = float(ys[torch.nonzero(along > 0)[0, 0]])
    o = torch.stack([torch.full_like(clearance, -1.5), r0 + clearance, torch.zeros_like(clearance)], -1)
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand_as(o).contiguous()
    worst, (t_in, t_out, *_), sdf = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    reaches = (sdf < BAND).any(-1)
    assert bool((t_in < t_out)[reaches].all()) and reaches.any() and (~reaches).any()


def test_surface_behind_a_long_empty_stretch() -> None:
    """A one-voxel speck at the far side of the box, seen along the box's long diagonal."""
    occ = torch.zeros(RES, RES, RES)
    occ[RES - 4, RES - 4, RES - 4] = 1.0
    grid = grid_from(occ, sigma_voxels=1.0)
    target = node_coords()[RES - 4, RES - 4, RES - 4]
    d = torch.nn.functional.normalize(target + 1.0, dim=0)[None].repeat(5, 1)
    o = torch.full((5, 3), -1.0) + torch.randn(5, 3) * 1e-3 - 0.2 * d
    worst, (t_in, t_out, near, far, lookups), sdf = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    assert bool((t_in < t_out).all())  # the speck is found
    assert float((t_in - near).min()) > 1.5  # after skipping most of the ~3.3 long diagonal
    assert float(lookups.max()) <= 2 * 24  # within the batched iteration budget


def test_two_surfaces_closer_than_the_band() -> None:
    """Two slabs one voxel apart: both crossings are inside [t_in, t_out], the gap is not skipped."""
    x = node_coords()
    voxel = 2.0 / (RES - 1)
    occ = ((x[..., 0].abs() > 0.5 * voxel) & (x[..., 0].abs() < 3.5 * voxel)).float()
    grid = grid_from(occ)
    o, d = random_rays(800, seed=5)
    worst, (t_in, t_out, near, far, _), sdf = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    first, last = sdf.lt(0).float().argmax(-1), sdf.shape[-1] - 1 - sdf.lt(0).flip(-1).float().argmax(-1)
    crosses = sdf.lt(0).any(-1)
    t = near[:, None] + (far - near)[:, None] * torch.linspace(0, 1, 4096)[None]
    t_first, t_last = t.gather(1, first[:, None])[:, 0], t.gather(1, last[:, None])[:, 0]
    assert bool((t_in[crosses] <= t_first[crosses]).all() and (t_out[crosses] >= t_last[crosses]).all())


def test_ray_starting_inside_the_object() -> None:
    x = node_coords()
    grid = grid_from((x.norm(dim=-1) < 0.6).float())
    o, d = random_rays(300, seed=6, outside=False)
    o = o * 0.3  # well inside the ball
    worst, (t_in, t_out, near, far, _), _ = skipped_violations(grid, o, d)
    assert worst >= -1e-5
    assert torch.allclose(t_in, near)  # nothing before the start can be skipped: it is in the band


def test_a_fog_grid_costs_one_march_step() -> None:
    """An untrained grid is all band: the march must stop at once (not be slower than the uniform pass)."""
    grid = CertifiedSDFGrid(RES, sigma=2.0 * 2.0 / (RES - 1), init_logit=-2.0)
    o, d = random_rays(500, seed=7)
    band = band_distance(0.25 * 2.0 / (RES - 1), 1e-4 / (30 * 2 * math.sqrt(3)))  # the warm-up's wide band
    voxel = 2.0 / (RES - 1)
    worst, (t_in, t_out, near, far, lookups), _ = skipped_violations(grid, o, d, band=band, min_step=0.25 * voxel)
    # The box's faces see less fog (outside is empty), so a ray may take a step or two there; the
    # uniform pass it replaces costs 64 + 97 lookups.
    assert worst >= -1e-5 and float(lookups.max()) <= 6.0 and bool((t_in < t_out).all())


def test_trained_grid(trained_run) -> None:
    """Safety on a grid trained through `ns-train certsdf`, at its own band."""
    from certsdf_ns.export.run import load_run

    model = load_run(trained_run.config).model
    grid = model.field.geometry
    voxel = float(grid.voxel_size.min())
    band = band_distance(model.config.sharpness_voxels * voxel, model.config.band_opacity)
    lo, hi = grid.aabb
    g = torch.Generator().manual_seed(8)
    d = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g), dim=-1)
    target = lo + (hi - lo) * (0.05 + 0.9 * torch.rand(3000, 3, generator=g))
    o = target - 3.0 * float((hi - lo).norm()) * d
    near, far = box_interval((o - (lo + hi) / 2) / ((hi - lo) / 2), d / ((hi - lo) / 2))
    sdf_nodes = grid.sdf_grid().detach()
    bricks = (band_brick_distance(sdf_nodes, band, 8), 8)
    t_in, t_out, _, _ = band_interval(sdf_nodes, grid.aabb, o, d, near, far, band, bricks, min_step=0.25 * voxel)
    t = near[:, None] + (far - near)[:, None] * torch.linspace(0.0, 1.0, 4096)[None]
    sdf = sample_grid(sdf_nodes, (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3), grid.aabb).reshape(t.shape)
    skipped = ((t < t_in[:, None] - 1e-5) | (t > t_out[:, None] + 1e-5)) & (near < far)[:, None]  # rounding of t
    assert skipped.float().mean() > 0.2
    assert float(sdf[skipped].min()) >= band - 1e-5


def test_certified_sampler_matches_a_dense_reference(trained_run) -> None:
    """The trained checkpoint's test views, rendered with the certified sampler (the default).

    What skipping changes, in the images: the same views rendered from the certified samples alone and
    from those samples plus 512 dense ones in every skipped stretch differ by at most 2τ per pixel (the
    certificate bounds each skipped stretch's opacity by τ, before and after the band); a band half as
    wide breaks that bound, so the check can fail. And the PSNR: not lower than a dense uniform reference
    over the whole box (512 + 64 samples per ray) by more than 0.1 dB. One-sided, because a reference with
    other sample positions changes the colour quadrature as well (the renderer colours the 8 heaviest
    samples per ray and gives the rest their weighted mean): on this checkpoint the certified render
    scored 28.09 dB, the 512 + 64 reference 27.97, a converged one (1024 + 64, every sample coloured)
    27.91 and the uniform sampler 27.95; a skipped surface would lower the certified render instead."""
    from certsdf_ns.bench.evaluate import load_pipeline, test_views
    from certsdf_ns.bench.sampler_check import sampler_equivalence, skipped_contribution

    result = sampler_equivalence(trained_run.config, trained_run.scene, scale_factor=1.0, n_views=4)
    tau = result["band_opacity"]
    assert result["skipped_max_rgb_change"] <= 2 * tau and result["skipped_max_accumulation_change"] <= 2 * tau, result
    assert result["certified_psnr"] >= result["reference_psnr"] - 0.1, result
    assert result["certified_psnr"] > 20.0  # a real image, not two equal failures
    assert result["certified_lookups_mean"] < result["reference_lookups_mean"]

    _, pipeline = load_pipeline(trained_run.config, trained_run.steps - 1)
    model = pipeline.model.eval()
    cameras, _ = test_views(trained_run.scene, 1.0, 1)
    band = model.band()
    model.band = lambda: 0.5 * band  # an uncertified march: skips stretches that hold density
    too_narrow = skipped_contribution(model, cameras[0:1])
    assert too_narrow["max_accumulation_change"] > 2 * tau, too_narrow


def test_brick_map_is_exact() -> None:
    """Bricks (partial at the far faces) touch the band exactly when one of their nodes does, and the
    distances are Chebyshev distances between bricks, capped."""
    g = torch.Generator().manual_seed(9)
    nodes = torch.rand(18, 18, 18, generator=g)  # 17 cells: four bricks of 4 and a partial one
    band, brick = 0.02, 4
    distance = band_brick_distance(nodes, band, brick, max_bricks=3)
    assert distance.shape == (5, 5, 5)
    touched = torch.zeros(5, 5, 5, dtype=torch.bool)
    for i in range(5):
        for j in range(5):
            for k in range(5):
                block = nodes[i * brick : i * brick + brick + 1, j * brick : j * brick + brick + 1, k * brick : k * brick + brick + 1]
                touched[i, j, k] = bool((block <= band).any())
    assert torch.equal(distance == 0, touched)
    idx = torch.stack(torch.meshgrid(*[torch.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    hits = idx[touched.reshape(-1)]
    cheb = (idx[:, None] - hits[None]).abs().amax(-1).amin(-1).float().clamp(max=3).reshape(5, 5, 5)
    assert torch.equal(distance, cheb)


def test_caches_follow_every_optimizer_step_of_the_method() -> None:
    """The node SDF and the sampler's brick map are cached until the logits change, keyed on the logits'
    version counter. The method's optimizers (torch's fused Adam, which writes the parameters without
    bumping that counter) must still invalidate them at every step, or the sampler keeps a brick map of
    an old surface and marches over where the surface is now."""
    from nerfstudio.engine.optimizers import Optimizers

    from certsdf_ns.method_config import certsdf_trainer_config

    grid = CertifiedSDFGrid(24, sigma=0.2)
    with torch.no_grad():
        grid.logits.copy_((grid.grid_points().norm(dim=-1) < 0.5).float() * 8.0 - 4.0)
    optimizers = Optimizers({"geometry": certsdf_trainer_config.optimizers["geometry"]}, {"geometry": [grid.logits]})
    assert optimizers.optimizers["geometry"].defaults["fused"]  # the case this test is about
    band, brick = 0.05, 4
    for _ in range(3):
        with torch.no_grad():
            cached = grid.sdf_grid()
            grid.derived("band_bricks", lambda: band_brick_distance(cached, band, brick), extra_key=(band,))
        grid.logits.grad = torch.full_like(grid.logits, -1.0)  # grow the ball everywhere
        optimizers.optimizer_step_all()
        with torch.no_grad():
            fresh = certified_sdf_from_smoothed(grid.smoothed_occupancy_grid(), grid.sigma, grid.eps)
            assert not torch.equal(fresh, cached)
            torch.testing.assert_close(grid.sdf_grid(), fresh, rtol=0, atol=0)
            new_bricks = grid.derived("band_bricks", lambda: band_brick_distance(fresh, band, brick), extra_key=(band,))
        assert torch.equal(new_bricks, band_brick_distance(fresh, band, brick))
