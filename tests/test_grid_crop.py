"""The grid crop (`--pipeline.model.grid-crop`): at the regrid step the occupancy grid moves to the box
of the surface the training rays met, plus a margin, with about as many nodes. In the model (unit
tests: the box, the lattice, the optimizer, checkpoints, the fallback) and through real `ns-train
certsdf` runs (the crop happens, the run resumes after it, ns-eval and certsdf-export read it)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from nerfstudio.engine.optimizers import Optimizers

from conftest import ns, ns_train_args, run_cli

from certsdf_ns.method.crop import COLLECT_STEPS, MIN_SEEN_RAYS, lattice_for_box
from certsdf_ns.method.model import CertSDFModelConfig
from certsdf_ns.training.optim import FusedAdamOptimizerConfig

BOX = SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
CENTRE = torch.tensor([0.2, -0.1, 0.05])
RADIUS = 0.35


def cropping_model(**overrides):
    settings = dict(grid_resolution=25, grid_growth_step=3, grid_crop=True, grid_crop_margin=0.05)
    cfg = CertSDFModelConfig(
        hash_log2_size=10, hash_max_res=64, hash_levels=4, num_coarse_samples=48, num_fine_samples=16,
        sampler="uniform", **{**settings, **overrides},
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg.setup(scene_box=BOX, num_train_data=4)


def with_optimizer(model) -> Optimizers:
    optimizers = Optimizers(
        {"geometry": {"optimizer": FusedAdamOptimizerConfig(lr=0.01), "scheduler": None}},
        {"geometry": model.get_param_groups()["geometry"]},
    )
    model.get_training_callbacks(TrainingCallbackAttributes(optimizers=optimizers, grad_scaler=None, pipeline=None, trainer=None))
    return optimizers


def put_ball(model) -> None:
    geometry = model.field.geometry
    with torch.no_grad():
        geometry.logits.copy_(torch.where((geometry.grid_points() - CENTRE).norm(dim=-1) < RADIUS, 8.0, -8.0))


def rays_at_ball(n: int = 1024) -> RayBundle:
    """Rays from 6 directions (±x, ±y, ±z), spread over a square around the ball: most hit it, the rest miss."""
    gen = torch.Generator().manual_seed(0)
    axis = torch.randint(0, 3, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    directions = torch.zeros(n, 3)
    directions[torch.arange(n), axis] = sign
    origins = CENTRE + (torch.rand(n, 3, generator=gen) * 2 - 1) * 0.45
    origins[torch.arange(n), axis] = -2.0 * sign
    return RayBundle(origins=origins, directions=directions, pixel_area=torch.full((n, 1), 1e-4),
                     camera_indices=torch.zeros(n, 1, dtype=torch.long))  # fmt: skip


def train_step(model, step: int, optimizers: Optimizers) -> None:
    """What the trainer does around the forward pass: the step's callback, a forward pass, an optimizer step."""
    model.before_training_step(step)
    model.train()
    outputs = model(rays_at_ball())
    logits = model.field.geometry.logits
    logits.grad = torch.zeros_like(logits)
    outputs["rgb"].sum().backward()  # any gradient: the test is about the lattice, not the fit
    optimizers.optimizer_step_all()
    logits.grad = None


def test_the_grid_moves_to_the_box_of_the_seen_surface_with_as_many_nodes() -> None:
    model = cropping_model()
    optimizers = with_optimizer(model)
    geometry = model.field.geometry
    put_ball(model)
    logits = geometry.logits
    for step in range(3):
        train_step(model, step, optimizers)
        assert geometry.resolution == (25, 25, 25) and model.grown_at is None
    assert logits in optimizers.optimizers["geometry"].state
    with torch.no_grad():  # (a graph kept across the crop would pin the parameter's old shape in autograd)
        before = geometry.sdf_grid().clone()
    before_points = geometry.grid_points().reshape(-1, 3)
    sigma_voxels = model.field.smoothing_voxels()[0]

    model.before_training_step(3)
    assert model.grown_at == 3
    box = geometry.aabb
    margin = 0.05 * 2.0
    # The box holds the ball (the rays met its surface on every side) with the margin, to within one voxel of
    # the old grid (a ray's expected depth lies a little inside a soft surface), and lies in the scene box.
    h = 2.0 / 24
    assert (box[0] >= BOX.aabb[0]).all() and (box[1] <= BOX.aabb[1]).all()
    assert (box[0] <= CENTRE - RADIUS - margin + h).all() and (box[1] >= CENTRE + RADIUS + margin - h).all()
    # ... and is much smaller than the scene box: the ball's box is 0.9 wide and nothing else was seen.
    assert ((box[1] - box[0]) < 1.2).all()
    # About 25³ nodes over it, in nearly cubic cells, each a fraction of the old one; σ stays in voxels.
    nodes = math.prod(geometry.resolution)
    assert 0.85 * 25**3 <= nodes <= 1.2 * 25**3
    voxel = geometry.voxel_size
    assert float(voxel.max() / voxel.min()) < 1.1
    assert float(voxel.max()) < 0.6 * 2.0 / 24
    assert model.field.smoothing_voxels()[0] == pytest.approx(sigma_voxels)
    assert model.field.voxel == pytest.approx(float(voxel.min()))
    # The optimizer keeps the parameter, with new data, and restarts its moments.
    assert geometry.logits is logits and logits.shape == geometry.resolution
    assert logits not in optimizers.optimizers["geometry"].state
    # The same object: where the coarse SDF was clear of the surface, the sign stays (inside and outside the box).
    clear = before.reshape(-1).abs() > 3 * 2.0 / 24
    after = geometry.sdf(before_points)
    assert (torch.sign(after) == torch.sign(before.reshape(-1)))[clear].all()
    # Training goes on at the new lattice, and the grid is cropped once only.
    train_step(model, 4, optimizers)
    shape = geometry.resolution
    model.config.anneal_stretch = 0.5  # a re-fitted plan moving the regrid step earlier
    train_step(model, 5, optimizers)
    assert geometry.resolution == shape and torch.equal(geometry.aabb, box)


def test_a_crop_waits_for_surface_rays_then_regrids_over_the_scene_box() -> None:
    """An empty grid: no ray meets a surface. The crop waits COLLECT_STEPS steps, then gives up (the grid
    keeps the scene box); with growth configured it still grows."""
    model = cropping_model(grid_start_resolution=13)
    optimizers = with_optimizer(model)
    geometry = model.field.geometry
    with torch.no_grad():
        geometry.logits.fill_(-8.0)
    train_step(model, 3, optimizers)
    assert geometry.resolution == (13, 13, 13) and model.grown_at is None
    model.before_training_step(3 + COLLECT_STEPS)
    assert geometry.resolution == (25, 25, 25) and model.grown_at == 3 + COLLECT_STEPS
    assert torch.equal(geometry.aabb, BOX.aabb)


def test_a_cropped_checkpoint_loads_into_a_fresh_model_and_is_refused_without_the_crop() -> None:
    trained = cropping_model()
    put_ball(trained)
    trained.train()
    trained.before_training_step(0)
    trained(rays_at_ball())
    trained.before_training_step(3)
    state = trained.state_dict()
    assert tuple(state["field.geometry.logits"].shape) != (25, 25, 25)
    fresh = cropping_model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.field.geometry.logits, state["field.geometry.logits"])
    assert torch.equal(fresh.field.geometry.aabb, state["field.geometry.aabb"])
    x = torch.rand(500, 3) * 2 - 1
    assert torch.allclose(fresh.field.sdf_at(x), trained.field.sdf_at(x))
    # A resumed run after its crop does not crop again.
    fresh.before_training_step(10)
    assert torch.equal(fresh.field.geometry.aabb, state["field.geometry.aabb"])
    with pytest.raises(SystemExit) as stop:
        cropping_model(grid_crop=False).load_state_dict(state)
    assert stop.value.code == 2


def test_the_lattice_for_a_box_has_about_the_nodes_asked_for_in_near_cubes() -> None:
    for extent in ([1.0, 1.0, 1.0], [0.5, 2.0, 1.3], [0.05, 3.0, 3.0]):
        box = torch.tensor([[0.0, 0.0, 0.0], extent])
        res = lattice_for_box(box, 100**3)
        cells = torch.tensor(extent) / (torch.tensor(res) - 1)
        assert float(cells.max() / cells.min()) < 1.25
        assert 0.8 * 100**3 <= math.prod(res) <= 1.3 * 100**3 or min(res) == 8
    assert MIN_SEEN_RAYS > 0


# -- through ns-train ------------------------------------------------------------------------------
ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--pipeline.model.grid-resolution", "24", "--pipeline.model.grid-crop", "True",
    "--pipeline.model.grid-growth-step", "25", "--pipeline.datamanager.train-num-rays-per-batch", "256",
    "--steps-per-eval-batch", "0", "--steps-per-eval-image", "0", "--steps-per-eval-all-images", "0",
    "--eval-at-end", "False", "--max-train-minutes", "0",
]  # fmt: skip


def finished(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_cropped_run_resumes_evaluates_and_exports_a_mesh_inside_its_box(scene24: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = finished(run_cli(ns_train_args(scene24, out, "c", *ARGS, "--max-num-iterations", "30"), timeout=600))
    found = re.search(r"grid cropped from 24³ to (\d+)x(\d+)x(\d+) nodes over the box .* at step 25\.", first)
    assert found, first[-3000:]
    run = out / "c" / "certsdf" / "t"
    models = run / "nerfstudio_models"
    saved = torch.load(sorted(models.glob("*.ckpt"))[-1])["pipeline"]
    shape = tuple(int(n) for n in found.groups())
    assert tuple(saved["_model.field.geometry.logits"].shape) == shape
    box = saved["_model.field.geometry.aabb"]
    scene_box = saved["_model.field.aabb"]
    assert (box[0] >= scene_box[0]).all() and (box[1] <= scene_box[1]).all() and not torch.equal(box, scene_box)

    resumed = finished(run_cli(ns_train_args(scene24, out, "c", *ARGS, "--max-num-iterations", "3", "--load-dir", models), timeout=600))
    assert "grid cropped" not in resumed
    last = torch.load(sorted(models.glob("*.ckpt"))[-1])
    assert last["step"] == 32 and tuple(last["pipeline"]["_model.field.geometry.logits"].shape) == shape

    metrics = tmp_path / "eval.json"
    finished(run_cli([ns("ns-eval"), "--load-config", run / "config.yml", "--output-path", metrics], timeout=600))
    assert metrics.stat().st_size > 0
    export = tmp_path / "export"
    finished(run_cli([ns("certsdf-export"), "--load-config", run / "config.yml", "--output-dir", export], timeout=600))
    import trimesh

    meshes = sorted(export.glob("*.ply"))
    assert meshes, list(export.iterdir())
    vertices = torch.from_numpy(trimesh.load(meshes[0], force="mesh").vertices).float()
    # A Blender-format scene's frame is nerfstudio's: the mesh lies in the cropped grid's box.
    voxel = float(((box[1] - box[0]) / (torch.tensor(shape) - 1)).max())
    assert len(vertices) > 0
    assert (vertices >= box[0] - voxel).all() and (vertices <= box[1] + voxel).all()
