"""The wall-clock budget (`--max-train-minutes`), through real `ns-train certsdf` subprocesses, and
the schedules it fits to the planned number of steps (unit tests).

Budgeted tiny runs (24 px scene, 16³ grid, 256 rays per step) take a few seconds of training each;
their timing tolerance is a few seconds because the machine is shared.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from conftest import ns, ns_train_args, run_cli, start_cli_runs

from certsdf_ns.method.model import CertSDFModelConfig
from certsdf_ns.training.budget import SchedulePlan, planned_total_steps
from certsdf_ns.training.optim import (
    FusedAdamOptimizerConfig,
    PlainFloatExponentialDecaySchedulerConfig,
    fit_scheduler_to_plan,
)
from certsdf_ns.training.trainer import PLAN_KEY, SECONDS_KEY

BUDGET_MIN = 0.25  # 15 s of training
TOLERANCE_S = 5.0  # the runs stop before a step that would not fit; a step takes up to ~2.5 s on a loaded machine
ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--pipeline.model.grid-resolution", "16", "--pipeline.datamanager.train-num-rays-per-batch", "256",
    "--budget-warmup-steps", "3", "--steps-per-eval-batch", "20", "--steps-per-eval-image", "50",
]  # fmt: skip


@pytest.fixture(scope="module")
def scene(scene24: Path) -> Path:
    return scene24


def train_args(scene: Path, out: Path, *extra) -> list:
    return ns_train_args(scene, out, "b", *ARGS, *extra)


def finished(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def train(scene: Path, out: Path, *extra) -> str:
    return finished(run_cli(train_args(scene, out, *extra), timeout=600))


RESUME_BUDGET_MIN = 0.4  # 24 s


@pytest.fixture(scope="module")
def first_runs(scene: Path, tmp_path_factory) -> Dict[str, Tuple[Future, Path]]:
    """The module's runs that need no other run, started together, two at a time (budgets are time of
    training, which each run measures itself): name -> (future of the finished process, output folder)."""
    runs = {
        "budget": ["--max-train-minutes", BUDGET_MIN],
        # Stopped early by the step limit; test_resume_trains_only_the_time_left resumes it.
        "resume": ["--max-train-minutes", RESUME_BUDGET_MIN, "--max-num-iterations", 4],
    }
    if not torch.cuda.is_available():  # the CPU default applies without CUDA
        # The plain command, with the CPU default budget shortened to keep the test fast.
        runs["plain"] = ["--cpu-default-minutes", 0.05]
    outs = {name: tmp_path_factory.mktemp(name) for name in runs}
    futures = start_cli_runs({name: (train_args(scene, outs[name], *extra), {"timeout": 600}) for name, extra in runs.items()})
    return {name: (futures[name], outs[name]) for name in runs}


def checkpoints(run: Path) -> Dict[int, Dict]:
    return {
        int(p.stem.split("-")[1]): torch.load(p, map_location="cpu", weights_only=True)
        for p in sorted((run / "nerfstudio_models").glob("step-*.ckpt"))
    }


@pytest.fixture(scope="module")
def budget_run(first_runs):
    future, out = first_runs["budget"]
    return out / "b" / "certsdf" / "t", finished(future.result())


def test_budget_stops_on_time_with_a_loadable_checkpoint(budget_run, tmp_path: Path) -> None:
    run, stdout = budget_run
    assert "time budget reached" in stdout
    (step, state), *_ = reversed(checkpoints(run).items())
    assert abs(state[SECONDS_KEY] - 60 * BUDGET_MIN) < TOLERANCE_S, state[SECONDS_KEY]
    # The checkpoint is the last step trained (nerfstudio's loop had moved one past it).
    assert state["step"] == step
    proc = run_cli([ns("ns-eval"), "--load-config", run / "config.yml", "--output-path", tmp_path / "m.json"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "psnr" in (tmp_path / "m.json").read_text()


def test_startup_line_states_the_plan(budget_run) -> None:
    _, stdout = budget_run
    (line,) = [l for l in stdout.splitlines() if l.startswith("[certsdf] plan:")]
    assert f"train for {BUDGET_MIN:g} min of training time or 30000 steps" in line
    assert "eval batch every 20 steps, eval image every 50 steps, and at the end" in line
    assert "--max-train-minutes" in line and "--max-num-iterations" in line


def test_config_records_the_fitted_anneal(budget_run) -> None:
    run, _ = budget_run
    plan = SchedulePlan.from_dict(checkpoints(run)[max(checkpoints(run))][PLAN_KEY])
    assert plan is not None and plan.hold_steps == 3 and plan.total_steps > plan.hold_steps
    # config.yml is a python-tagged YAML; read the two values the trainer wrote.
    text = (run / "config.yml").read_text()
    assert f"anneal_start_step: {plan.hold_steps}\n" in text
    stretch = float(text.split("anneal_stretch: ")[1].split("\n")[0])
    assert math.isclose(stretch, plan.stretch(30_000))


def test_resume_trains_only_the_time_left(scene: Path, first_runs) -> None:
    budget_min = RESUME_BUDGET_MIN
    # Stopped early by the step limit, then resumed with the same budget and no step limit.
    future, out = first_runs["resume"]
    first = finished(future.result())
    run = out / "b" / "certsdf" / "t"
    before = checkpoints(run)
    spent = before[max(before)][SECONDS_KEY]
    assert "time budget reached" not in first and spent < 60 * budget_min - TOLERANCE_S
    resumed = train(scene, out, "--max-train-minutes", budget_min, "--load-dir", run / "nerfstudio_models")
    assert f"{spent / 60:.3g} min already spent" in resumed
    after = checkpoints(run)
    final = after[max(after)]
    assert "time budget reached" in resumed
    assert abs(final[SECONDS_KEY] - 60 * budget_min) < TOLERANCE_S, (spent, final[SECONDS_KEY])
    # The step → schedule map is the one fixed before the interruption (bit-exact resume).
    assert final[PLAN_KEY] == before[max(before)][PLAN_KEY]


# -- the schedules follow the planned length (unit tests) --------------------------------------------
def test_planned_total_steps() -> None:
    # 100 s left at 0.5 s/step after step 19: 200 more steps, capped by the step limit.
    assert planned_total_steps(20, 20.0, 0.5, 120.0, 30_000) == 220
    assert planned_total_steps(20, 20.0, 0.5, 120.0, 100) == 100
    assert planned_total_steps(20, 200.0, 0.5, 120.0, 30_000) == 21  # out of time: at least one step


def test_learning_rate_follows_the_plan() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = FusedAdamOptimizerConfig(lr=0.1, fused=False).setup([param])
    config = PlainFloatExponentialDecaySchedulerConfig(lr_final=0.01, max_steps=30_000)
    scheduler = config.setup().get_scheduler(optimizer, 0.1)
    plan = SchedulePlan(hold_steps=20, total_steps=620)  # 600 steps stand for the reference 30,000
    assert fit_scheduler_to_plan(scheduler, config, plan, 30_000)
    lrs = []
    for _ in range(700):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(lr == pytest.approx(0.1) for lr in lrs[:21])  # held through the warm-up
    assert lrs[320] == pytest.approx(math.sqrt(0.1 * 0.01))  # half-way in log space
    assert lrs[620] == pytest.approx(0.01) and lrs[699] == pytest.approx(0.01)
    assert all(isinstance(lr, float) for lr in lrs)  # checkpoints stay weights_only-loadable


def test_anneal_follows_the_plan() -> None:
    cfg = CertSDFModelConfig(grid_resolution=16, sigma_start_voxels=4.0, sigma_voxels=1.0, anneal_steps=1000)
    model = cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=4)
    plan = SchedulePlan(hold_steps=20, total_steps=620)
    # As the trainer's _apply_plan does: 1000 of 30,000 reference steps become 20 of 600.
    cfg.anneal_start_step, cfg.anneal_stretch = plan.hold_steps, plan.stretch(30_000)
    assert model.scheduled_smoothing(0)[0] == pytest.approx(4.0)
    assert model.scheduled_smoothing(20)[0] == pytest.approx(4.0)
    assert model.scheduled_smoothing(30)[0] == pytest.approx(2.0)  # log-linear mid-point
    assert model.scheduled_smoothing(40)[0] == pytest.approx(1.0)
    assert model.scheduled_smoothing(600)[0] == pytest.approx(1.0)


def test_plan_is_timed_after_the_density_maps_warm_up() -> None:
    """By default the plan's timing window is the 20 steps after the density map's warm-up and blend
    (their fog steps are slow: timed on them, a 10-minute lego run fitted its schedules to 419 of 686
    steps); an explicit --budget-warmup-steps sets the end of the window."""
    from types import SimpleNamespace

    from certsdf_ns.method_config import certsdf_trainer_config
    from certsdf_ns.training.trainer import CertSDFTrainer

    def window(model: CertSDFModelConfig, **changes):
        fake = SimpleNamespace(config=dataclasses.replace(certsdf_trainer_config, **changes),
                               pipeline=SimpleNamespace(model=SimpleNamespace(config=model)))  # fmt: skip
        return CertSDFTrainer.budget_timing_window(fake)

    # The unbiased map, resolved as the model does without a background (20) and with one (100).
    synthetic = CertSDFModelConfig(density_map="unbiased", unbiased_warmup_steps=20)
    assert window(synthetic) == (40, 60)
    assert window(CertSDFModelConfig(density_map="unbiased", unbiased_warmup_steps=100)) == (120, 140)
    assert window(CertSDFModelConfig()) == (2, 20)  # the paper map (the default): no warm-up of its own
    assert window(synthetic, budget_warmup_steps=3) == (2, 3)


def test_cpu_default_budget_applies_only_to_the_plain_command() -> None:
    from certsdf_ns.method_config import certsdf_trainer_config

    def budget(**changes) -> object:
        return dataclasses.replace(certsdf_trainer_config, **changes).budget_minutes()

    cpu = certsdf_trainer_config.machine.device_type == "cpu"
    assert budget() == (30.0 if cpu else None)  # CUDA keeps its 30,000 steps
    assert budget(max_num_iterations=500) is None  # the user chose a step count
    assert budget(max_train_minutes=0.0) is None  # budget turned off
    assert budget(max_train_minutes=5.0) == 5.0


def test_plain_command_states_the_cpu_default(first_runs) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU default applies without CUDA")
    stdout = finished(first_runs["plain"][0].result())
    (line,) = [l for l in stdout.splitlines() if l.startswith("[certsdf] plan:")]
    assert "train for 0.05 min of training time (the CPU default) or 30000 steps" in line
    assert "time budget reached" in stdout
