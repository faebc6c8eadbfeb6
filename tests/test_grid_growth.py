"""The coarse-to-fine schedule: the grid grows from `grid-start-resolution` to `grid-resolution` at
`grid-growth-step`, in the model (unit tests) and through real `ns-train certsdf` runs: a run grows,
resumes across the growth, its checkpoints of either stage load, and a budgeted run fits its plan
again to the grown grid's slower steps."""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from nerfstudio.engine.optimizers import Optimizers

from conftest import ns, ns_train_args, run_cli, start_cli_runs

from certsdf_ns.method.model import CertSDFModelConfig
from certsdf_ns.training.optim import FusedAdamOptimizerConfig

BOX = SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))


def grown_model(**overrides):
    settings = dict(grid_start_resolution=12, grid_resolution=23, grid_growth_step=3)
    cfg = CertSDFModelConfig(
        hash_log2_size=10, hash_max_res=64, hash_levels=4, num_coarse_samples=16, num_fine_samples=8,
        **{**settings, **overrides},
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg.setup(scene_box=BOX, num_train_data=4)


def test_the_grid_grows_at_its_step_and_keeps_its_shape_and_smoothing() -> None:
    model = grown_model()
    optimizers = Optimizers(
        {"geometry": {"optimizer": FusedAdamOptimizerConfig(lr=0.01), "scheduler": None}},
        {"geometry": model.get_param_groups()["geometry"]},
    )
    model.get_training_callbacks(TrainingCallbackAttributes(optimizers=optimizers, grad_scaler=None, pipeline=None, trainer=None))
    geometry = model.field.geometry
    with torch.no_grad():  # a ball of radius 0.5 on the coarse grid
        geometry.logits.copy_(torch.where(geometry.grid_points().norm(dim=-1) < 0.5, 6.0, -6.0))
    logits = geometry.logits
    sigma_world = []
    for step in range(3):
        model.before_training_step(step)
        assert geometry.resolution == (12, 12, 12) and model.grown_at is None
        sigma_world.append(geometry.sigma)
        logits.grad = torch.ones_like(logits)
        optimizers.optimizer_step_all()
    assert logits in optimizers.optimizers["geometry"].state
    coarse_sdf = geometry.sdf_grid().clone()
    coarse_points = geometry.grid_points()

    model.before_training_step(3)
    assert geometry.resolution == (23, 23, 23) and model.grown_at == 3
    assert geometry.logits is logits and logits.shape == (23, 23, 23)  # the optimizer's parameter, new data
    assert logits not in optimizers.optimizers["geometry"].state  # Adam's moments restart at the new shape
    # σ and s stay 2 and ¼ voxel: in world units they follow the finer voxel.
    assert model.field.smoothing_voxels() == pytest.approx((2.0, 0.25))
    assert geometry.sigma == pytest.approx(sigma_world[-1] * 11 / 22)
    # The same surface, with less smoothing: where the coarse SDF is clear of the surface, the sign stays.
    fine_at_coarse = geometry.sdf(coarse_points.reshape(-1, 3)).reshape(coarse_sdf.shape)
    clear = coarse_sdf.abs() > 2 * model.field.cell_edge(12)
    assert (torch.sign(fine_at_coarse) == torch.sign(coarse_sdf))[clear].all()
    # Training goes on at the new shape, and the grid never shrinks again.
    logits.grad = torch.ones_like(logits)
    optimizers.optimizer_step_all()
    assert optimizers.optimizers["geometry"].state[logits]["exp_avg"].shape == (23, 23, 23)
    model.config.anneal_stretch = 10.0  # a re-fitted plan moving the growth step later
    model.before_training_step(4)
    assert geometry.resolution == (23, 23, 23)


def test_a_checkpoint_of_either_stage_loads_into_a_fresh_model() -> None:
    trained = grown_model()
    trained.before_training_step(5)  # grown, without optimizers
    for state in (grown_model().state_dict(), trained.state_dict()):
        fresh = grown_model()
        fresh.load_state_dict(state)
        assert fresh.field.geometry.logits.shape == state["field.geometry.logits"].shape
        assert torch.equal(fresh.field.geometry.logits, state["field.geometry.logits"])
    # A checkpoint of another resolution is still refused with the flag that differs.
    other = grown_model(grid_start_resolution=0, grid_resolution=16).state_dict()
    with pytest.raises(SystemExit) as stop:
        grown_model().load_state_dict(other)
    assert stop.value.code == 2


def test_without_a_start_resolution_the_grid_never_changes() -> None:
    model = grown_model(grid_start_resolution=0)
    assert model.field.geometry.resolution == (23, 23, 23)
    model.before_training_step(100)
    assert model.field.geometry.resolution == (23, 23, 23) and model.grown_at is None


# -- through ns-train ------------------------------------------------------------------------------
ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--pipeline.model.grid-start-resolution", "12", "--pipeline.model.grid-resolution", "20",
    "--pipeline.datamanager.train-num-rays-per-batch", "256", "--steps-per-eval-batch", "0",
    "--steps-per-eval-image", "0", "--steps-per-eval-all-images", "0", "--eval-at-end", "False",
]  # fmt: skip


@pytest.fixture(scope="module")
def scene(scene24: Path) -> Path:
    return scene24


def train_args(scene: Path, out: Path, *extra) -> list:
    return ns_train_args(scene, out, "g", *ARGS, *extra)


@pytest.fixture(scope="module")
def runs(scene: Path, tmp_path_factory) -> Dict[str, Tuple[Future, Path]]:
    outs = {name: tmp_path_factory.mktemp(name) for name in ("stopped", "budget")}
    specs = {
        # Stopped before its growth step (6): resumed across it below.
        "stopped": (train_args(scene, outs["stopped"], "--max-num-iterations", "4", "--pipeline.model.grid-growth-step", "6",
                               "--max-train-minutes", "0", "--steps-per-save", "2"), {}),  # fmt: skip
        # Budgeted, growing half-way through the planned steps (the reference schedule is 30000 steps).
        "budget": (train_args(scene, outs["budget"], "--max-train-minutes", "0.25", "--budget-warmup-steps", "3",
                              "--pipeline.model.grid-growth-step", "15000"), {}),  # fmt: skip
    }
    futures = start_cli_runs(specs)
    return {name: (futures[name], outs[name]) for name in specs}


def finished(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_run_resumed_across_its_growth_grows_and_its_checkpoint_evaluates(scene: Path, runs, tmp_path: Path) -> None:
    future, out = runs["stopped"]
    first = finished(future.result())
    assert "grid grown" not in first
    run = out / "g" / "certsdf" / "t"
    models = run / "nerfstudio_models"
    assert torch.load(sorted(models.glob("*.ckpt"))[-1])["pipeline"]["_model.field.geometry.logits"].shape == (12, 12, 12)
    resumed = finished(run_cli(train_args(scene, out, "--max-num-iterations", "4", "--pipeline.model.grid-growth-step", "6",
                                          "--max-train-minutes", "0", "--load-dir", models), timeout=600))  # fmt: skip
    assert re.search(r"grid grown from 12³ to 20³ nodes at step 6\.", resumed)
    last = sorted(models.glob("*.ckpt"))[-1]
    assert torch.load(last)["step"] == 7
    assert torch.load(last)["pipeline"]["_model.field.geometry.logits"].shape == (20, 20, 20)
    metrics = tmp_path / "eval.json"
    finished(run_cli([ns("ns-eval"), "--load-config", run / "config.yml", "--output-path", metrics], timeout=600))
    assert metrics.stat().st_size > 0


def test_a_budgeted_run_fits_its_plan_again_after_the_growth(runs) -> None:
    future, _ = runs["budget"]
    output = finished(future.result())
    plans = re.findall(r"schedules fitted to steps (\d+)\.\.(\d+)", output)
    grown = re.search(r"grid grown from 12³ to 20³ nodes at step (\d+)\.", output)
    assert grown is not None and len(plans) == 2, output[-3000:]
    (hold, first_total), (hold_again, second_total) = plans
    assert hold_again == hold  # the schedules keep their start; only their end moves
    assert int(hold) < int(grown.group(1)) < int(first_total)
    assert "time budget reached" in output
