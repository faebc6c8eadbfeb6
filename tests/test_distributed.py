"""certsdf in several processes, as nerfstudio's launcher runs it (`--machine.num-devices 2`), on CPU.

Every run here is two gloo processes running nerfstudio's `train_loop`: one through the real
`ns-train` CLI, the others through `nerfstudio.scripts.train.main` in this process (the CLI minus
argument parsing, which saves two interpreter start-ups). The runs are tiny (48 px images, 32³
grid, 512 rays per process and step). Every wait has a timeout, so a hang fails the test.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import tyro

from conftest import ns, run_cli
from hooks.sitecustomize import FAIL_RANK_ENV, fault_env

from certsdf_ns.errors import CertSDFInputError
from certsdf_ns.training import distributed
from certsdf_ns.training.trainer import PLAN_KEY, RANK_RNG_KEY, RNG_KEY, SECONDS_KEY

pytestmark = pytest.mark.timeout(300, func_only=True)

STEPS = 60  # enough for a surface to form: certsdf-export finds one
ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True", "--machine.num-devices", "2",
    "--machine.device-type", "cpu", "--steps-per-eval-batch", "0", "--steps-per-eval-image", STEPS,
    "--pipeline.datamanager.train-num-rays-per-batch", "512", "--pipeline.model.grid-resolution", "32",
    "--pipeline.model.hash-log2-size", "12", "--pipeline.model.hash-max-res", "128",
]  # fmt: skip
LAST_STEP = re.compile(r"process (\d) of 2: trained to step (\d+)\.")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from certsdf_ns.data.scenes import make_scene

    return make_scene(tmp_path_factory.mktemp("ddp") / "scene", image_size=48, n_train=12, n_val=2, n_test=2)


def _main(*args) -> None:
    """`ns-train certsdf ARGS` in this process: nerfstudio's main after tyro's parsing."""
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts import train

    train.main(tyro.cli(AnnotatedBaseConfigUnion, args=["certsdf", *[str(a) for a in args]]))


def _last_steps(output: str) -> Dict[int, int]:
    """The last step each process reports, by process number."""
    return {int(p): int(s) for p, s in LAST_STEP.findall(output)}


def _checkpoints(run: Path) -> List[Path]:
    return sorted((run / "nerfstudio_models").glob("step-*.ckpt"))


@pytest.fixture(scope="module")
def run_a(scene: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = run_cli(
        [ns("ns-train"), "certsdf", "--data", scene, "--output-dir", out, "--experiment-name", "ddp",
         "--timestamp", "a", "--max-num-iterations", STEPS, "--steps-per-save", 30, *ARGS],
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "ddp" / "certsdf" / "a", proc.stdout


def test_two_processes_train_evaluate_save_and_end(run_a, tmp_path: Path) -> None:
    run, stdout = run_a
    assert _last_steps(stdout) == {1: STEPS - 1, 2: STEPS - 1}, stdout[-2000:]
    assert [p.name for p in _checkpoints(run)] == [f"step-{STEPS - 1:09d}.ckpt"]
    state = torch.load(_checkpoints(run)[-1], map_location="cpu", weights_only=True)
    # The single-process key layout (certsdf's readers expect it), and one RNG stream per rank.
    assert not [k for k in state["pipeline"] if k.startswith("_model.module.")]
    assert len(state[RANK_RNG_KEY]) == 2
    assert not torch.equal(state[RANK_RNG_KEY][0]["torch"], state[RANK_RNG_KEY][1]["torch"])
    assert torch.equal(state[RANK_RNG_KEY][0]["torch"], state[RNG_KEY]["torch"])
    # Rank 0 alone wrote the run folder: one config, one event file.
    assert (run / "config.yml").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 1

    # ns-eval and certsdf-export load it like any run (their code, in this process).
    from nerfstudio.scripts.eval import ComputePSNR

    from certsdf_ns.export.mesh_export import main as export_main

    ComputePSNR(load_config=run / "config.yml", output_path=tmp_path / "metrics.json").main()
    assert '"psnr"' in (tmp_path / "metrics.json").read_text()
    assert export_main(["--load-config", str(run / "config.yml"), "--output-dir", str(tmp_path), "--resolution", "64"]) == 0
    assert (tmp_path / "certsdf_mesh.ply").stat().st_size > 0


def test_resumed_run_continues_and_a_budget_stops_both_ranks_at_one_step(run_a, scene: Path, capfd) -> None:
    """Resume run A in two processes with a budget that leaves ~8 s of training: both ranks stop after
    the same step (rank 0's clock decides), beyond the step resumed from."""
    run, _ = run_a
    saved = torch.load(_checkpoints(run)[-1], map_location="cpu", weights_only=True)
    minutes = (saved[SECONDS_KEY] + 8.0) / 60.0
    _main(
        "--data", scene, "--output-dir", run.parent.parent.parent,
        "--experiment-name", "ddp", "--timestamp", "resumed", "--load-dir", run / "nerfstudio_models",
        "--max-num-iterations", 1000, "--max-train-minutes", minutes, "--budget-warmup-steps", 3, *ARGS,
    )  # fmt: skip
    output = capfd.readouterr().out
    loaded = f"Done loading Nerfstudio checkpoint from {run / 'nerfstudio_models' / f'step-{STEPS - 1:09d}.ckpt'}"
    assert re.sub(r"\s", "", output).count(re.sub(r"\s", "", loaded)) == 2, output[-3000:]  # rich wraps long paths
    last = _last_steps(output)
    assert set(last) == {1, 2} and last[1] == last[2] > STEPS - 1, output[-3000:]
    assert f"time budget reached after step {last[1]}" in output
    resumed = run.parent / "resumed"
    state = torch.load(_checkpoints(resumed)[-1], map_location="cpu", weights_only=True)
    assert state["step"] == last[1] and state[SECONDS_KEY] > saved[SECONDS_KEY]
    assert PLAN_KEY in state and len(state[RANK_RNG_KEY]) == 2


def _step_gradients(rank: int, data: Path, port: int, out: Path) -> None:
    """One training step's logits gradient through DDP, on the same rays, with the grid's smoothing
    shared among the two processes and with each process smoothing the whole grid (in a spawned process)."""
    from datetime import timedelta

    import torch.distributed as dist

    from certsdf_ns.method_config import certsdf_trainer_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank, timeout=timedelta(minutes=2))
    torch.manual_seed(42 + rank)
    config = copy.deepcopy(certsdf_trainer_config)
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.train_num_rays_per_batch = 256
    model_config = config.pipeline.model
    model_config.grid_resolution, model_config.hash_log2_size, model_config.hash_max_res = 37, 12, 128  # uneven slabs
    pipeline = config.pipeline.setup(device="cpu", test_mode="val", world_size=2, local_rank=rank)
    model = pipeline.model
    assert model._shards is not None and model._shards.part == rank  # the pipeline shares the grid by default
    generator = torch.Generator().manual_seed(0)  # the same grid on both ranks, with a surface somewhere
    with torch.no_grad():
        model.field.geometry.logits.copy_(3.0 * torch.randn(model.field.geometry.resolution, generator=generator))
    pipeline.train()
    model.set_schedule_step(30)
    ray_bundle, batch = pipeline.datamanager.next_train(30)  # each rank its own rays
    grads = []
    for shards in (model._shards, None):
        model.set_grid_shards(shards)
        torch.manual_seed(7 + rank)  # the same PDF samples both ways
        loss = model.get_loss_dict(pipeline._model(ray_bundle), batch)  # forward through DDP
        sum(loss.values()).backward()  # the gradient all-reduce
        grads.append(model.field.geometry.logits.grad.clone())
        pipeline._model.zero_grad()
    torch.save(grads, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_shared_grid_gives_every_rank_the_whole_grids_gradient(scene: Path, tmp_path: Path) -> None:
    """Each process smooths and regularises its slab of the grid's rows, the processes exchange the node
    SDF, and the step's gradient is the one of every process smoothing the whole grid, on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_step_gradients, args=(scene, port, tmp_path), nprocs=2)
    (shared0, whole0), (shared1, whole1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert float(whole0.abs().max()) > 0
    torch.testing.assert_close(shared0, whole0, rtol=1e-4, atol=1e-5 * float(whole0.abs().max()))
    torch.testing.assert_close(shared1, shared0, rtol=0, atol=0)  # DDP: every rank the same gradient
    torch.testing.assert_close(whole1, whole0, rtol=0, atol=0)


def test_a_failed_rank_ends_the_run_with_a_message(scene: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    """Rank 1 raises at step 5: the launcher stops rank 0 (blocked in the gradient all-reduce), says
    which process failed and why, and the checkpoint saved at step 4 is complete."""
    for key, value in fault_env({FAIL_RANK_ENV: "1:5"}).items():  # the spawned processes inherit it
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        _main(
            "--data", scene, "--output-dir", tmp_path, "--experiment-name", "ddp", "--timestamp", "f",
            "--max-num-iterations", 20, "--steps-per-save", 2, *ARGS,
        )  # fmt: skip
    assert stopped.value.code == 1
    err = capfd.readouterr().err
    assert "certsdf error: training process 2 of 2 (rank 1) failed: RuntimeError: " in err, err[-3000:]
    assert "fails at step 5" in err and "the other processes were stopped" in err
    assert "The newest checkpoint, step-000000004.ckpt, is complete" in re.sub(r"\s+", " ", err)
    run = tmp_path / "ddp" / "certsdf" / "f"
    assert [p.name for p in _checkpoints(run)] == ["step-000000004.ckpt"]
    assert torch.load(_checkpoints(run)[0], map_location="cpu", weights_only=True)["step"] == 4
    assert not (run / "nerfstudio_models.partial").exists()


@pytest.mark.parametrize(
    "machine, expected",
    [
        (dict(device_type="mps"), "mps cannot train in several processes"),
        (dict(num_machines=2, dist_url="auto"), "needs --machine.dist-url tcp://HOST:PORT"),
        (dict(num_machines=2, machine_rank=2, dist_url="tcp://10.0.0.1:7000"), "must lie in 0..1"),
        (dict(num_devices=0), "must both be at least 1"),
    ],
)
def test_machine_settings_that_cannot_work_are_refused(machine, expected) -> None:
    from nerfstudio.configs.base_config import MachineConfig

    with pytest.raises(CertSDFInputError, match=re.escape(expected)):
        distributed.check_machine(MachineConfig(**{"num_devices": 2, "device_type": "cpu", **machine}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of CUDA on a machine without it")
def test_cuda_processes_without_cuda_exit_2_before_spawning(tmp_path: Path, capsys) -> None:
    """What ns-train calls before launching (the trainer config's save_config): one message, exit 2,
    where nerfstudio's worker would fail on `assert torch.cuda.is_available()` in every process."""
    from nerfstudio.configs.method_configs import all_methods

    config = copy.deepcopy(all_methods["certsdf"])
    config.output_dir, config.machine.device_type, config.machine.num_devices = tmp_path, "cuda", 2
    config.set_timestamp()
    with pytest.raises(SystemExit) as stopped:
        config.save_config()
    assert stopped.value.code == 2
    assert "has no CUDA device. Pass --machine.device-type cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "failure, status, expected",
    [
        (dict(exit_code=2), 2, "training process 2 of 4 (rank 1) stopped on the error above"),
        (dict(exit_code=-9, signal_name="SIGKILL"), 1, "training process 2 of 4 (rank 1) was killed by SIGKILL (out of memory?)"),
        (dict(exit_code=1), 1, "training process 2 of 4 (rank 1) exited with status 1"),
    ],
)
def test_a_failed_process_is_reported_by_rank_with_its_exit_status(failure, status, expected, tmp_path, capsys) -> None:
    """The parent's report for processes that ended without a Python traceback (bad input on a rank, which
    printed its own message and exited 2; a kill): machine 0 of 2, two devices each."""
    from nerfstudio.configs.method_configs import all_methods
    from torch.multiprocessing.spawn import ProcessExitedException

    config = copy.deepcopy(all_methods["certsdf"])
    config.output_dir, config.timestamp = tmp_path, "r"
    config.machine.num_devices, config.machine.num_machines = 2, 2
    err = ProcessExitedException("process 1 terminated", error_index=1, error_pid=1234, **failure)
    assert distributed.report_failed_process(err, config) == status
    message = re.sub(r"\s+", " ", capsys.readouterr().err)
    assert expected in message and "No checkpoint was saved." in message
    config.get_checkpoint_dir().mkdir(parents=True)
    (config.get_checkpoint_dir() / "step-000000007.ckpt").write_bytes(b"")
    assert distributed.report_failed_process(err, config) == status
    message = re.sub(r"\s+", " ", capsys.readouterr().err)
    assert "The newest checkpoint, step-000000007.ckpt, is complete" in message
    assert f"continue with --load-dir {config.get_checkpoint_dir()}" in message
