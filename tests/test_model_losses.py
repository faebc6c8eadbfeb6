"""certsdf's training losses on a small model, in-process (no data, no CLI)."""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from certsdf_ns.method.model import CertSDFModelConfig


def make_model(alpha_loss_mult: float):
    cfg = CertSDFModelConfig(
        grid_resolution=24, hash_log2_size=10, hash_max_res=64, hash_levels=4, num_coarse_samples=32,
        num_fine_samples=16, init_logit=-2.0, alpha_loss_mult=alpha_loss_mult,
        # pinned, not the defaults: the haze the tests need depends on σ and s, and on the paper's
        # density map (under the unbiased map a constant SDF has no opacity at all)
        sigma_voxels=1.5, sigma_start_voxels=1.5, sharpness_voxels=0.5, sharpness_start_voxels=0.5, density_map="paper",
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])), num_train_data=4)


def rays(n: int = 64) -> RayBundle:
    """Rays along +z from z = −2 through the box: they cross 2 units of the initial haze."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=gen) * 1.6 - 0.8
    origins = torch.cat([xy, torch.full((n, 1), -2.0)], dim=-1)
    directions = torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3)
    return RayBundle(origins=origins, directions=directions, pixel_area=torch.full((n, 1), 1e-4),
                     camera_indices=torch.zeros(n, 1, dtype=torch.long))  # fmt: skip


def losses(model, image):
    model.train()
    outputs = model(rays(image.shape[0]))
    return outputs, model.get_loss_dict(outputs, {"image": image})


def test_alpha_loss_is_the_bce_of_accumulation_against_alpha() -> None:
    model = make_model(alpha_loss_mult=0.05)
    image = torch.cat([torch.rand(64, 3), torch.zeros(64, 1)], dim=-1)  # empty pixels: alpha 0
    outputs, loss = losses(model, image)
    acc = outputs["accumulation"].detach().clamp(1e-5, 1 - 1e-5)
    assert float(acc.mean()) > 0.05  # the initial haze (occupancy 0.12 everywhere) is visible
    expected = 0.05 * float(-torch.log1p(-acc).mean())
    assert math.isclose(float(loss["alpha_loss"].detach()), expected, rel_tol=1e-4)


@pytest.mark.parametrize("mult, channels", [(0.0, 4), (0.05, 3)])
def test_alpha_loss_is_off_without_weight_or_alpha(mult: float, channels: int) -> None:
    _, loss = losses(make_model(alpha_loss_mult=mult), torch.rand(64, channels))
    assert "alpha_loss" not in loss


def test_alpha_loss_pushes_a_faint_haze_down_where_the_colour_loss_hardly_does() -> None:
    """On empty pixels, a haze of opacity a costs the colour loss ~a² (random backgrounds), whose
    gradient vanishes with a; the BCE's does not. Both push occupancy down (positive gradient
    on the logits), the BCE far harder."""
    model = make_model(alpha_loss_mult=1.0)
    with torch.no_grad():
        model.field.geometry.logits.fill_(-6.0)  # occupancy 0.0025: a faint haze
    image = torch.cat([torch.rand(64, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(64, 1)], dim=-1)
    outputs, loss = losses(model, image)
    acc = float(outputs["accumulation"].mean())
    assert 0.005 < acc < 0.1, acc
    logits = model.field.geometry.logits
    (g_colour,) = torch.autograd.grad(loss["rgb_loss"], logits, retain_graph=True)
    (g_alpha,) = torch.autograd.grad(loss["alpha_loss"], logits)
    assert float(g_colour.sum()) > 0 and float(g_alpha.sum()) > 0  # both lower the occupancy
    assert float(g_alpha.sum()) > 20 * float(g_colour.sum()), (float(g_alpha.sum()), float(g_colour.sum()))


def test_occupancy_regularisers_match_autograd_in_value_and_gradient() -> None:
    """The grid's binarisation and TV terms, whose gradient is written out, against autograd on the plain
    expressions, on a non-cubic grid (each axis's difference has its own count)."""
    from certsdf_ns.method.grid_losses import occupancy_regularisers

    torch.manual_seed(0)
    logits = torch.randn(7, 5, 9, dtype=torch.float64)
    mults = torch.tensor([0.7, -1.3], dtype=torch.float64)
    a = logits.clone().requires_grad_()
    binary, tv = occupancy_regularisers(torch.sigmoid(a))
    (mults[0] * binary + mults[1] * tv).backward()
    b = logits.clone().requires_grad_()
    occ = torch.sigmoid(b)
    ref_binary = (occ * (1.0 - occ)).mean()
    ref_tv = sum((occ.diff(dim=d) ** 2).mean() for d in range(3))
    (mults[0] * ref_binary + mults[1] * ref_tv).backward()
    torch.testing.assert_close(binary, ref_binary.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(tv, ref_tv.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda x: torch.stack(occupancy_regularisers(x)), torch.rand(4, 3, 5, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_occupancy_regularisers_of_slabs_add_up_to_the_whole_grids(parts: int) -> None:
    """A sharded run's processes each regularise a slab of x-rows (plus the next row, for the differences
    across its far face): the slabs' terms and gradients add up to the whole grid's."""
    from certsdf_ns.certified import row_slabs
    from certsdf_ns.method.grid_losses import occupancy_regularisers

    torch.manual_seed(2)
    occ = torch.rand(7, 5, 9, dtype=torch.float64)
    a = occ.clone().requires_grad_()
    whole = torch.stack(occupancy_regularisers(a))
    whole.sum().backward()
    b = occ.clone().requires_grad_()
    total = torch.zeros(2, dtype=torch.float64)
    for lo, hi in row_slabs(7, parts):
        if hi > lo:
            total = total + torch.stack(occupancy_regularisers(b[lo : min(hi + 1, 7)], own=hi - lo, shape=(7, 5, 9)))
    total.sum().backward()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-15)
