"""Resume, interruption and determinism, through real `ns-train certsdf` subprocesses.

One module fixture runs four tiny trainings (32 px scene, 32³ grid, 256 rays per step):

- A and C: 50 uninterrupted steps with the same seed (determinism, and the reference);
- B: the same run with a checkpoint every 5 steps, SIGKILLed while writing the step-30
  checkpoint (a test hook pauses that write after its first 64 KiB, so the kill lands
  mid-write every time);
- B2: `--load-dir` on B's checkpoints, 24 more steps to step 49.

The σ/s schedules anneal over 40 steps, so the resume happens mid-schedule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ns
from hooks.sitecustomize import PAUSE_ENV, fault_env

from certsdf_ns.training.trainer import PARTIAL_SUFFIX, newest_complete_checkpoint

STEPS = 50
KILL_AT = 30  # B dies while writing this checkpoint...
LAST_COMPLETE = 25  # ...so its newest complete one is this (checkpoints every 5 steps)
RUN_ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True", "--logging.steps-per-log", "1",
    "--pipeline.model.grid-resolution", "32", "--pipeline.datamanager.train-num-rays-per-batch", "256",
    "--pipeline.model.hash-log2-size", "14", "--pipeline.model.hash-levels", "4",
    "--pipeline.model.hash-max-res", "64", "--pipeline.model.num-coarse-samples", "32",
    "--pipeline.model.num-fine-samples", "16", "--pipeline.model.sigma-start-voxels", "3.0",
    "--pipeline.model.anneal-steps", "40",
]  # fmt: skip


@dataclass
class Runs:
    out: Path
    logs: Dict[str, str]
    killed_listing: List[str]
    partial_files: List[Path]

    def run_dir(self, name: str) -> Path:
        return self.out / name / "certsdf" / "t"

    def final_checkpoint(self, name: str) -> Dict:
        (path,) = sorted((self.run_dir(name) / "nerfstudio_models").glob("step-*.ckpt"))
        return torch.load(path, map_location="cpu", weights_only=True)

    def scalars(self, name: str, tag: str) -> Dict[int, float]:
        events = EventAccumulator(str(self.run_dir(name)), size_guidance={"scalars": 0})
        events.Reload()
        return {e.step: e.value for e in events.Scalars(tag)}


def _start(scene: Path, out: Path, name: str, extra: List[str], env_extra: Dict[str, str] | None = None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    cmd = [ns("ns-train"), "certsdf", "--data", str(scene), "--output-dir", str(out), "--experiment-name", name,
           "--timestamp", "t", *RUN_ARGS, *extra]  # fmt: skip
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log


def _finish(proc, log, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from certsdf_ns.data.scenes import make_scene

    root = tmp_path_factory.mktemp("robust_runs")
    scene = make_scene(root / "scene", image_size=32, n_train=20, n_val=2, n_test=2)
    out = root / "out"
    out.mkdir()
    marker = root / "paused-in-save"
    started = {
        "A": _start(scene, out, "A", ["--max-num-iterations", str(STEPS)]),
        "C": _start(scene, out, "C", ["--max-num-iterations", str(STEPS)]),
        "B": _start(
            scene, out, "B", ["--max-num-iterations", str(STEPS), "--steps-per-save", "5"],
            fault_env({PAUSE_ENV: f"{KILL_AT}:{marker}"}),
        ),  # fmt: skip
    }
    b_proc, b_log = started["B"]
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert b_proc.poll() is None, (out / "B.log").read_text()[-3000:]
            assert time.time() < deadline, "B never reached the paused checkpoint write"
            time.sleep(0.2)
        os.killpg(b_proc.pid, signal.SIGKILL)  # mid-write of step-000000030.ckpt
        b_proc.wait()
    finally:
        _finish(b_proc, b_log, timeout=1)
    b_models = out / "B" / "certsdf" / "t" / "nerfstudio_models"
    killed_listing = sorted(os.listdir(b_models))
    partial_files = sorted(b_models.with_name(b_models.name + PARTIAL_SUFFIX).iterdir())

    b2 = _start(scene, out, "B2", ["--load-dir", str(b_models), "--max-num-iterations", str(STEPS - LAST_COMPLETE - 1)])
    for proc, log in (started["A"], started["C"], b2):
        _finish(proc, log, timeout=900)
    logs = {name: (out / f"{name}.log").read_text() for name in ("A", "B", "C", "B2")}
    for name in ("A", "C", "B2"):
        proc = b2[0] if name == "B2" else started[name][0]
        assert proc.returncode == 0, logs[name][-3000:]
    return Runs(out, logs, killed_listing, partial_files)


def test_sigkill_mid_write_leaves_only_complete_checkpoints(runs: Runs) -> None:
    """After SIGKILL during the step-30 write, the checkpoint folder holds only the complete step-25
    file (loadable with torch.load's defaults) and names nerfstudio's own parser accepts; the
    half-written file sits in the sibling .partial folder and is indeed truncated."""
    assert runs.killed_listing == ["step-000000025.ckpt"]
    # nerfstudio's trainer and eval_utils parse every name in the folder like this:
    assert [int(x[x.find("-") + 1 : x.find(".")]) for x in runs.killed_listing] == [25]
    b_models = runs.run_dir("B") / "nerfstudio_models"
    assert torch.load(b_models / "step-000000025.ckpt", map_location="cpu", weights_only=True)["step"] == 25
    assert [p.name for p in runs.partial_files] == ["step-000000030.ckpt"]
    with pytest.raises(Exception):
        torch.load(runs.partial_files[0], map_location="cpu", weights_only=True)


def test_resume_picks_newest_complete_checkpoint(runs: Runs, tmp_path: Path) -> None:
    """B2 resumed from step 25; and a truncated newer checkpoint (what plain nerfstudio leaves
    after a crash) is skipped in favour of the newest complete one."""
    assert "Done loading Nerfstudio checkpoint from" in runs.logs["B2"]
    assert "step-000000025.ckpt" in runs.logs["B2"]
    folder = tmp_path / "nerfstudio_models"
    folder.mkdir()
    good = runs.run_dir("B") / "nerfstudio_models" / "step-000000025.ckpt"
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "step-000000040.ckpt").write_bytes(good.read_bytes()[:50_000])
    (folder / "notes.txt").write_text("not a checkpoint")  # would crash nerfstudio's own name parsing
    path, state = newest_complete_checkpoint(folder)
    assert path.name == good.name and state["step"] == 25


def _state_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _state_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_resume_is_bitwise_equal_to_uninterrupted_run(runs: Runs) -> None:
    """Killed at step 30, resumed from 25, run to 49: step counter, every parameter and buffer,
    Adam state, LR schedulers and RNG state equal the uninterrupted run bit for bit, and the
    losses and σ schedule logged after the resume are identical."""
    resumed, reference = runs.final_checkpoint("B2"), runs.final_checkpoint("A")
    assert resumed["step"] == reference["step"] == STEPS - 1
    for key in ("pipeline", "optimizers", "schedulers", "certsdf_rng"):
        _state_equal(resumed[key], reference[key], key)
    loss_a, loss_b2 = runs.scalars("A", "Train Loss"), runs.scalars("B2", "Train Loss")
    assert sorted(loss_b2) == list(range(26, STEPS))
    assert all(loss_b2[s] == loss_a[s] for s in loss_b2)
    sigma_a, sigma_b2 = runs.scalars("A", "Train Metrics Dict/sigma_voxels"), runs.scalars("B2", "Train Metrics Dict/sigma_voxels")
    assert all(sigma_b2[s] == sigma_a[s] for s in sigma_b2)
    assert sigma_a[26] > sigma_a[45]  # the schedule was still annealing across the resume


def test_same_seed_gives_identical_losses(runs: Runs) -> None:
    """Two fresh CPU runs with the same seed log identical losses at each of the first 50 steps
    and end with bitwise-identical weights."""
    loss_a, loss_c = runs.scalars("A", "Train Loss"), runs.scalars("C", "Train Loss")
    assert sorted(loss_a) == list(range(STEPS))
    assert [loss_a[s] for s in range(STEPS)] == [loss_c[s] for s in range(STEPS)]
    assert len(set(loss_a.values())) > STEPS // 2  # the losses really change from step to step
    _state_equal(runs.final_checkpoint("A")["pipeline"], runs.final_checkpoint("C")["pipeline"], "pipeline")


def test_saved_config_records_resolved_backend(runs: Runs) -> None:
    """config.yml is rewritten after setup, so it records the backend actually built, not 'auto'."""
    text = (runs.run_dir("A") / "config.yml").read_text()
    assert "backend: torch" in text and "backend: auto" not in text
    assert "certsdf_ns.training.trainer.CertSDFTrainerConfig" in text
