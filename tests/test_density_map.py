"""The SDF-to-opacity maps: NeuS's unbiased opacity (certified.unbiased_alphas) against the paper's
density, on analytic SDF profiles, and the model's `density_map` switch on a small grid."""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from certsdf_ns.certified import sdf_to_density, unbiased_alphas
from certsdf_ns.method.model import CertSDFModelConfig

S = 0.004  # sharpness: a quarter voxel of the default 192³ grid over [-1.5, 1.5]³


def transmittance(alphas: torch.Tensor) -> torch.Tensor:
    """T before each edge: [1, (1−α_0), (1−α_0)(1−α_1), …]."""
    return torch.cumprod(torch.cat([torch.ones_like(alphas[..., :1]), 1.0 - alphas], -1), -1)


def crossing(t: torch.Tensor, y: torch.Tensor, level: float) -> float:
    """Where the decreasing y(t) first falls below `level` (linear between samples)."""
    i = int(torch.nonzero(y < level)[0])
    a = (y[i - 1] - level) / (y[i - 1] - y[i])
    return float(t[i - 1] + a * (t[i] - t[i - 1]))


@pytest.mark.parametrize("n", [50, 400, 3000])
def test_head_on_ray_is_half_transmitted_exactly_at_the_zero_crossing(n: int) -> None:
    """f(t) = 0.1 − t (a plane at t = 0.1, hit head-on): T = ½ where f = 0 at any sampling."""
    t = torch.sort(torch.cat([torch.linspace(0.0, 0.2, n, dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)])).values
    T = transmittance(unbiased_alphas(0.1 - t, S))
    zero = int(torch.nonzero(t == 0.1)[0])
    assert float(T[zero]) == pytest.approx(0.5, abs=1e-6)
    # The weights peak at the zero crossing (to the sampling, or a quarter s where the peak is flat).
    weights = T[:-1] - T[1:]
    assert abs(float(t[int(weights.argmax())]) - 0.1) <= max(2 * 0.2 / n, 0.25 * S)


def test_paper_density_puts_half_transmittance_three_s_behind_the_zero_crossing() -> None:
    """The bias the unbiased map removes: optical depth to f = 0 is 30·s·π²/12 ≈ 0.1 (T ≈ 0.9)."""
    t = torch.linspace(0.0, 0.2, 20001, dtype=torch.float64)
    density = sdf_to_density(0.1 - t, S)
    depth = torch.cat([torch.zeros(1, dtype=t.dtype), torch.cumsum(0.5 * (density[1:] + density[:-1]) * t.diff(), 0)])
    T = torch.exp(-depth)
    assert float(T[10000]) == pytest.approx(math.exp(-30 * S * math.pi**2 / 12), rel=1e-3)
    behind = crossing(t, T, 0.5) - 0.1
    assert 2.5 * S < behind < 3.5 * S


@pytest.mark.parametrize("h_over_s", [-1.0, 0.0, 1.0, 3.0])
def test_grazing_ray_ends_with_transmittance_sigmoid_of_its_clearance(h_over_s: float) -> None:
    """f(t) = h + t²/(2R) (a sphere of radius R passed at clearance h): final T = sigmoid(h/s)."""
    R, h = 0.3, h_over_s * S
    t = torch.linspace(-0.3, 0.3, 4001, dtype=torch.float64)
    f = h + t**2 / (2 * R)
    T = transmittance(unbiased_alphas(f, S))
    expected = torch.sigmoid(torch.tensor(h / S)) / torch.sigmoid(f[0] / S)
    assert float(T[-1]) == pytest.approx(float(expected), abs=1e-3)


def test_deep_inside_is_opaque_and_finite() -> None:
    """Down to the SDF's clamp (~ −30 s) the log-sigmoid form neither underflows nor gives NaN."""
    f = torch.linspace(0.05, -0.15, 200)
    f.requires_grad_(True)
    alphas = unbiased_alphas(f, S)
    T = transmittance(alphas)
    assert torch.isfinite(alphas).all() and float(T[-1]) < 1e-6
    T[-1].backward()
    assert torch.isfinite(f.grad).all()


# --------------------------------------------------------------------------- the model's switch


def make_model(density_map: str, warmup: int = 0, blend: int = 0):
    cfg = CertSDFModelConfig(
        grid_resolution=48, hash_log2_size=10, hash_max_res=64, hash_levels=4, num_coarse_samples=64,
        num_fine_samples=32, sigma_voxels=1.5, sigma_start_voxels=1.5, sharpness_voxels=0.25,
        sharpness_start_voxels=0.25, density_map=density_map, unbiased_warmup_steps=warmup, unbiased_blend_steps=blend,
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])), num_train_data=4)


def ball(model, radius: float = 0.5) -> None:
    geometry = model.field.geometry
    geometry.set_occupancy((geometry.grid_points().norm(dim=-1) <= radius).float())


def head_on_rays(n: int = 16) -> RayBundle:
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=gen) * 0.2 - 0.1
    origins = torch.cat([xy, torch.full((n, 1), -2.0)], dim=-1)
    return RayBundle(origins=origins, directions=torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3),
                     pixel_area=torch.full((n, 1), 1e-4), camera_indices=torch.zeros(n, 1, dtype=torch.long))  # fmt: skip


@torch.no_grad()
def test_unbiased_depth_sits_on_the_zero_set_and_the_paper_depth_behind_it() -> None:
    """Expected depth of head-on rays into a ball vs the SDF's zero crossing on the same rays."""
    offsets = {}
    for kind in ("unbiased", "paper"):
        model = make_model(kind)
        ball(model)
        model.set_schedule_step(1000)
        model.eval()
        bundle = head_on_rays()
        depth = model(bundle)["depth"][:, 0]
        t = torch.linspace(1.0, 2.0, 20001)
        pts = bundle.origins[:, None] + bundle.directions[:, None] * t[None, :, None]
        sdf = model.field.geometry.sdf(pts.reshape(-1, 3)).reshape(-1, len(t))
        zero = torch.tensor([crossing(t, row, 0.0) for row in sdf])
        offsets[kind] = float((depth - zero).median()) / model.field.sharpness
    assert abs(offsets["unbiased"]) < 0.5, offsets  # in units of s
    # The paper map renders the surface behind its zero set (expected depth ~1.2 s; T = ½ at ~3 s).
    assert offsets["paper"] > 1.0, offsets


@pytest.mark.parametrize("step, expected", [(0, 0.0), (10, 0.0), (15, 0.5), (20, 1.0), (500, 1.0)])
def test_warm_up_then_blend(step: int, expected: float) -> None:
    model = make_model("unbiased", warmup=10, blend=10)
    model.set_schedule_step(step)
    assert model.unbiased_fraction() == pytest.approx(expected)
    assert make_model("paper").unbiased_fraction() == 0.0


def test_gradients_flow_from_the_untrained_grid_only_through_the_warm_up() -> None:
    """An untrained grid has a constant SDF inside the box: the unbiased opacity is ~0 and its
    gradient on the logits is orders of magnitude below the paper map's, hence the warm-up."""
    grads = {}
    for step in (0, 100):
        model = make_model("unbiased", warmup=10, blend=10)
        model.set_schedule_step(step)
        model.train()
        outputs = model(head_on_rays(64))
        image = torch.cat([torch.full((64, 3), 0.5), torch.ones(64, 1)], dim=-1)  # opaque pixels
        loss = model.get_loss_dict(outputs, {"image": image})["rgb_loss"]
        (g,) = torch.autograd.grad(loss, model.field.geometry.logits)
        grads[step] = float(g.abs().sum())
    assert grads[0] > 0.0
    assert grads[100] < 0.05 * grads[0], grads
