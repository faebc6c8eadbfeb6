"""Shared fixtures: one tiny generated scene and one real `ns-train certsdf` run per test session.

Every end-to-end test (eval, export, viewer, resume) reuses the same trained run so the suite
trains once. The run goes through the real CLI as a subprocess, started with the session when a
selected test needs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest

from forked_cli import forkable, run_forked

# One torch thread per process, read by torch when it is imported: here (before the test modules import
# it) and in every process the suite starts. The suite runs a training beside the tests, often two
# processes at a time, on machines with few cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# A small but real configuration: 48x48 images, 64^3 grid, 2048 rays per step, 300 steps
# (about 2.5 minutes on 2 CPU cores).
TINY_TRAIN_ARGS = [
    "--pipeline.datamanager.train-num-rays-per-batch", "2048",
    "--pipeline.model.grid-resolution", "64",
    "--pipeline.model.hash-log2-size", "15",
    "--pipeline.model.hash-max-res", "256",
    "--pipeline.model.anneal-steps", "200",
]  # fmt: skip


def ns(cmd: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(BIN / cmd)


def run_cli(args, timeout: float = 900, cwd: Path | None = None, env_extra: dict | None = None):
    """Run a CLI to completion. Python warnings are off unless `env_extra` sets PYTHONWARNINGS; an
    entry of None removes that variable (PYTHONWARNINGS None: Python's default filters, as a user has).
    A console script of this environment runs in a process forked from an interpreter that imported
    nerfstudio already (`tests/forked_cli.py`), unless only a real subprocess reproduces the run."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    for name, value in (env_extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    target = forkable([str(a) for a in args], env)
    if target is not None:
        return run_forked(target, args, timeout, cwd, env)
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )




def warning_lines(output: str) -> List[str]:
    """The lines of a command's output that are warnings: Python's ("file:line: SomeWarning: message",
    then the source line under it) and any other line with "Warning" or "warn(" in it (a rich console's
    "Warning: …"). certsdf's own "[certsdf] warning: …" lines are not warnings of other packages."""
    found: List[str] = []
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        if "Warning" in lines[i] or "warn(" in lines[i]:
            found.append(lines[i])
        i += 1
    return found


@dataclass
class TrainedRun:
    scene: Path
    config: Path
    checkpoint_dir: Path
    steps: int
    stdout: str


@pytest.fixture(scope="session")
def scene24(tmp_path_factory) -> Path:
    """A 24 px generated scene (8 training views): for runs that test the trainer, not the picture."""
    from certsdf_ns.data.scenes import make_scene

    return make_scene(tmp_path_factory.mktemp("scene24") / "scene", image_size=24, n_train=8, n_val=2, n_test=2)


def ns_train_args(scene: Path, out: Path, experiment: str, *args) -> list:
    """`ns-train certsdf` on `scene`, writing its run to out/experiment/certsdf/t."""
    return [ns("ns-train"), "certsdf", "--data", scene, "--output-dir", out, "--experiment-name", experiment,
            "--timestamp", "t", *args]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    from certsdf_ns.data.scenes import make_scene

    return make_scene(tmp_path_factory.mktemp("scene") / "tiny", image_size=48, n_train=40, n_val=4, n_test=4)


@pytest.fixture(scope="session")
def _trained_run_started(tiny_scene: Path, tmp_path_factory) -> Tuple[Future, Path, int]:
    """The shared run's `ns-train`, started in a background thread: (its future, output folder, steps)."""
    out = tmp_path_factory.mktemp("outputs")
    steps = 300
    args = [
        ns("ns-train"), "certsdf", "--data", tiny_scene, "--output-dir", out,
        "--experiment-name", "e2e", "--timestamp", "run", "--vis", "tensorboard",
        "--max-num-iterations", steps, "--steps-per-save", 100, "--save-only-latest-checkpoint", "False",
        "--viewer.quit-on-train-completion", "True", *TINY_TRAIN_ARGS,
    ]  # fmt: skip
    return start_cli_runs({"train": (args, {"timeout": 1200})})["train"], out, steps


# Runs that test modules declare at import (`early_run`), started in a second lane once the shared
# run has ended: module name -> {run name: factory(folder) -> (CLI arguments, run_cli kwargs, payload)}.
_EARLY: Dict[str, Dict[str, Callable[[Path], Tuple[Sequence, Dict, Any]]]] = {}
_EARLY_STARTED: Dict[str, Future] = {}


def early_run(name: str, factory: Callable[[Path], Tuple[Sequence, Dict, Any]]) -> None:
    """Declare, at a test module's import, a CLI run its tests need: when a test of that module is
    selected, the run starts during the session, after the shared run, one early run at a time, on the
    core the other tests leave idle while they wait for a single process. ``factory(folder)`` returns
    (arguments, run_cli keyword arguments, payload for the test); it runs in that lane, so it may
    prepare files (and skip: the skip reaches the test)."""
    _EARLY.setdefault(factory.__module__, {})[name] = factory


def early_result(name: str) -> Tuple[subprocess.CompletedProcess, Any]:
    """The finished early run `name` and its payload (waits for it)."""
    return _EARLY_STARTED[name].result()


@pytest.fixture(scope="session", autouse=True)
def _shared_run_starts_with_the_session(request, tmp_path_factory) -> None:
    """When a selected test uses `trained_run`, its training starts with the session, beside the first
    test files (on a second core, when there is one) rather than when its first user comes. The
    selected modules' early runs follow it in a lane of their own."""
    shared = None
    if any("trained_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        shared = request.getfixturevalue("_trained_run_started")[0]
    modules = {item.module.__name__ for item in request.session.items if getattr(item, "module", None)}
    lane = ThreadPoolExecutor(max_workers=1)

    def run(name: str, factory) -> Tuple[subprocess.CompletedProcess, Any]:
        if shared is not None:
            wait([shared])
        args, kwargs, payload = factory(tmp_path_factory.mktemp(f"early_{name}"))
        return run_cli(args, **kwargs), payload

    for module in sorted(modules & set(_EARLY)):
        for name, factory in _EARLY[module].items():
            _EARLY_STARTED[name] = lane.submit(run, name, factory)
    lane.shutdown(wait=False)


@pytest.fixture(scope="session")
def trained_run(_trained_run_started, tiny_scene: Path) -> TrainedRun:
    future, out, steps = _trained_run_started
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "e2e" / "certsdf" / "run"
    return TrainedRun(tiny_scene, run_dir / "config.yml", run_dir / "nerfstudio_models", steps, proc.stdout)


def start_cli_runs(runs: Dict[str, Tuple[Sequence, Dict]], workers: int = 2) -> Dict[str, Future]:
    """Start CLIs through `run_cli` in background threads, `workers` at a time: name -> future of its
    finished process. `runs`: name -> (arguments, keyword arguments of run_cli). Each nerfstudio CLI
    spends ~10 s of CPU importing; two at a time keep both cores of a 2-core machine busy."""
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {name: pool.submit(run_cli, args, **kwargs) for name, (args, kwargs) in runs.items()}
    pool.shutdown(wait=False)
    return futures


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a viser server or a viewer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
