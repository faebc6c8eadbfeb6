"""One budgeted training run: `ns-train <method>` in a subprocess, stopped after N seconds of training.

The clock is *training* time: it starts when the first training iteration *ends* and excludes
the time spent writing checkpoints, which the benchmark asks for and the method would not
otherwise pay. Everything before -- imports, data loading, model construction, and the first
iteration, which absorbs lazy initialisation and, for nerfacto/tensorf, waiting for their
data-loading process to start and cache the images -- is reported as `startup_s`. Both come
from the timing records of :mod:`certsdf_ns.bench.peer_train`.

At the budget the process gets SIGINT (the launcher then finishes the iteration and saves a
final checkpoint); after a grace period, and always on the way out, its whole process group
gets SIGKILL. Peak RSS is polled with psutil over the process and all its children (nerfacto
and tensorf load data in a child process).

Checkpoints are written every K steps but most are deleted as soon as a newer one exists:
only the latest checkpoint before each of the log-spaced evaluation times is kept (a 200 MB
checkpoint every few seconds would fill the disk).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import psutil

from certsdf_ns.bench.methods import NEVER, MethodSpec, TrainSettings
from certsdf_ns.bench.peer_train import TIMING_ENV


@dataclass
class Checkpoint:
    step: int
    path: str
    iterations: int
    """Training iterations completed when it was written, not counting the first (outside the clock)."""
    train_time_s: float
    """Training time when the checkpoint was taken, excluding earlier checkpoint writes."""
    wall_time_s: float
    """Raw wall-clock since the first training iteration started (checkpoint writes included)."""


@dataclass
class RunResult:
    """What one budgeted run did; serialised into the run's JSON."""

    method: str
    scene: str
    run_name: str
    status: str = "ok"
    """'ok', 'failed' or 'skipped'."""
    reason: str = ""
    budget_s: float = 0.0
    command: List[str] = field(default_factory=list)
    config_path: str = ""
    log_path: str = ""
    returncode: Optional[int] = None
    startup_s: float = float("nan")
    """Process start to the end of the first training iteration (outside the clock)."""
    first_iteration_s: float = float("nan")
    """Duration of the first iteration (part of startup_s)."""
    train_time_s: float = float("nan")
    """Training time at the last checkpoint (checkpoint writes excluded)."""
    checkpoint_write_s: float = 0.0
    """Total time spent writing checkpoints (excluded from the time axis)."""
    steps: int = 0
    """Training iterations inside the clock at the last checkpoint (the first one is not counted)."""
    rays_per_batch: int = 0
    rays_per_sec: float = float("nan")
    """steps × rays_per_batch / train_time_s."""
    peak_rss_mb: float = float("nan")
    """Peak resident memory of the training process and all its children."""
    peak_rss_main_mb: float = float("nan")
    """Peak resident memory of the training process alone."""
    mean_load_1m: float = float("nan")
    """Mean 1-minute load average while training: above the core count, timings are polluted."""
    stopped_by: str = ""
    """'budget' (SIGINT at the budget), 'own budget' (a method run with its own budget ended by
    itself), 'exit' (ended by itself: a crash otherwise) or 'kill'."""
    checkpoints: List[Checkpoint] = field(default_factory=list)
    kept_checkpoints: List[Checkpoint] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def eval_targets(budget_s: float, n_points: int, min_fraction: float = 1.0 / 32.0) -> List[float]:
    """Log-spaced training times at which checkpoints are kept and evaluated (the last is the budget)."""
    if n_points <= 1:
        return [float(budget_s)]
    return [float(t) for t in np.geomspace(budget_s * min_fraction, budget_s, n_points)]


def select_checkpoints(ckpts: Sequence[Checkpoint], targets: Sequence[float], first: bool = True) -> List[Checkpoint]:
    """The first checkpoint (unless `first` is False), the latest one at or before each target time,
    and the last one."""
    if not ckpts:
        return []
    ordered = sorted(ckpts, key=lambda c: c.step)
    keep = {ordered[0].step, ordered[-1].step} if first else {ordered[-1].step}
    for t in targets:
        before = [c for c in ordered if c.train_time_s <= t]
        if before:
            keep.add(before[-1].step)
    return [c for c in ordered if c.step in keep]


class _Timing:
    """Incremental reader of the launcher's JSONL timing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.first_iteration: Optional[float] = None
        self.start: Optional[float] = None
        """The clock's zero: the end of the first training iteration."""
        self.exit: Optional[float] = None
        self.write_s = 0.0
        self.checkpoints: List[Checkpoint] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            rec = json.loads(line)
            if rec["event"] == "start":
                self.first_iteration = rec["time"]
            elif rec["event"] == "warm":
                self.start = rec["time"]
            elif rec["event"] == "checkpoint" and self.start is not None:
                wall = rec["save_start"] - self.start
                # A run stopped by its own budget saves its last step again (same file): one checkpoint, listed once.
                if not any(c.step == rec["step"] for c in self.checkpoints):
                    self.checkpoints.append(Checkpoint(rec["step"], rec["path"], rec["iterations"] - 1, wall - self.write_s, wall))
                self.write_s += rec["save_end"] - rec["save_start"]
            elif rec["event"] == "exit":
                self.exit = rec["time"]

    def train_time(self, now: float) -> float:
        return 0.0 if self.start is None else now - self.start - self.write_s


def _rss_mb(proc: psutil.Process) -> tuple:
    """(process + children, process alone) resident memory in MB; (0, 0) when it is gone."""
    try:
        main = proc.memory_info().rss
        total = main
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20, main / 2**20
    except psutil.Error:
        return 0.0, 0.0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (the launcher and any data-loading children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def trial_run_dir(out_dir: Path, run_name: str, ns_method: str) -> Path:
    """The ns-train run folder of one trial (its config.yml and nerfstudio_models/)."""
    return Path(out_dir) / "runs" / run_name / "bench" / ns_method / "run"


def run_budgeted(
    spec: MethodSpec,
    scene: Path,
    settings: TrainSettings,
    budget_s: float,
    out_dir: Path,
    run_name: str,
    keep_targets: Sequence[float],
    steps_per_save: Optional[int] = None,
    grace_s: float = 90.0,
    startup_timeout_s: float = 900.0,
    poll_s: float = 0.5,
    on_progress: Optional[Callable[[float], None]] = None,
    keep_first: bool = True,
    own_budget: bool = False,
) -> RunResult:
    """Train `spec` on `scene` for `budget_s` seconds of training; see the module docstring.

    `keep_first`: keep the run's first checkpoint for evaluation too. `own_budget` (certsdf only):
    the method gets the budget as its own `--max-train-minutes`, plans its schedules for it, saves
    its last checkpoint and exits by itself, as the plain `ns-train certsdf` command does on CPU;
    SIGINT comes only if it overruns by `grace_s`. Its own clock also counts the checkpoint writes
    that the bench asks for (about 1 s per save of a 192³ run), so it trains slightly less than a
    bench-stopped run of the same budget.

    Returns a RunResult whose `kept_checkpoints` are the ones left on disk for evaluation.
    """
    result = RunResult(spec.name, str(scene), run_name, budget_s=budget_s, rays_per_batch=settings.rays_per_batch)
    runnable, why = spec.runnable()
    if not runnable:
        result.status, result.reason = "skipped", why
        return result

    run_dir = Path(out_dir) / "runs" / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    timing_path = run_dir / "timing.jsonl"
    timing_path.unlink(missing_ok=True)
    log_path = run_dir / "train.log"
    k = steps_per_save or settings.steps_per_save
    trainer_opts = [
        "--output-dir", str(run_dir.resolve()), "--experiment-name", "bench", "--timestamp", "run",
        "--vis", "tensorboard", "--max-num-iterations", str(NEVER),
        "--steps-per-save", str(k), "--save-only-latest-checkpoint", "False",
        "--steps-per-eval-batch", str(NEVER), "--steps-per-eval-image", str(NEVER),
        "--steps-per-eval-all-images", str(NEVER),
    ]  # fmt: skip
    if own_budget:
        # No evaluation at the budget's end either: the bench evaluates the last checkpoint itself.
        trainer_opts += ["--max-train-minutes", f"{budget_s / 60.0:.6g}", "--eval-at-end", "False"]
        # The budget's own evaluation is the run's last checkpoint (always kept). The bench's clock leaves
        # out the first step that certsdf's counts, so "the latest checkpoint at or before the budget" on
        # the bench's clock can be an earlier one, evaluated twice over.
        keep_targets = [t for t in keep_targets if t < budget_s]
    stop_at = budget_s + (grace_s if own_budget else 0.0)
    cmd = [sys.executable, "-m", "certsdf_ns.bench.peer_train", spec.ns_method, *trainer_opts, *spec.train_args(scene, settings)]
    result.command = cmd
    result.log_path = str(log_path)
    result.config_path = str((trial_run_dir(out_dir, run_name, spec.ns_method) / "config.yml").resolve())
    env = dict(os.environ, **{TIMING_ENV: str(timing_path.resolve()), "PYTHONWARNINGS": "ignore"})

    timing = _Timing(timing_path)
    peak, peak_main = 0.0, 0.0
    launched = time.time()
    sigint_at: Optional[float] = None
    deleted: set = set()
    loads: List[float] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        ps = psutil.Process(proc.pid)
        try:
            while True:
                now = time.time()
                total, main = _rss_mb(ps)
                peak, peak_main = max(peak, total), max(peak_main, main)
                timing.poll()
                done = proc.poll() is not None
                trained = timing.train_time(now)
                if timing.start is not None:
                    loads.append(os.getloadavg()[0])
                if on_progress is not None:
                    on_progress(min(trained, budget_s))
                if done:
                    result.stopped_by = result.stopped_by or "exit"
                    break
                if sigint_at is None:
                    if timing.start is not None and trained >= stop_at:
                        proc.send_signal(signal.SIGINT)
                        sigint_at, result.stopped_by = now, "budget"
                    elif timing.start is None and now - launched > startup_timeout_s:
                        proc.send_signal(signal.SIGINT)
                        sigint_at, result.stopped_by = now, "startup-timeout"
                elif now - sigint_at > grace_s:
                    result.stopped_by = "kill"
                    break
                _prune(timing.checkpoints, keep_targets, deleted, first=keep_first)
                time.sleep(poll_s)
        finally:
            _kill_group(proc)
    timing.poll()
    result.returncode = proc.returncode
    result.peak_rss_mb, result.peak_rss_main_mb = peak, peak_main
    result.mean_load_1m = float(np.mean(loads)) if loads else float("nan")
    result.checkpoint_write_s = timing.write_s
    result.checkpoints = list(timing.checkpoints)
    if timing.start is not None:
        result.startup_s = timing.start - launched
        if timing.first_iteration is not None:
            result.first_iteration_s = timing.start - timing.first_iteration
    _prune(timing.checkpoints, keep_targets, deleted, final=True, first=keep_first)
    kept = select_checkpoints(timing.checkpoints, keep_targets, keep_first)
    result.kept_checkpoints = [c for c in kept if Path(c.path).exists()]
    if timing.checkpoints:
        last = max(timing.checkpoints, key=lambda c: c.step)
        result.train_time_s = last.train_time_s
        result.steps = last.iterations
        if last.train_time_s > 0:
            result.rays_per_sec = result.steps * settings.rays_per_batch / last.train_time_s
    if timing.start is None:
        result.status, result.reason = "failed", f"training never started (see {log_path})"
    elif result.stopped_by == "exit" and own_budget and proc.returncode == 0:
        result.stopped_by = "own budget"
    elif result.stopped_by == "exit":  # max iterations is "never": ending alone is a crash
        result.status = "failed"
        result.reason = f"ns-train exited by itself (code {proc.returncode}) before the budget (see {log_path})"
    elif not result.kept_checkpoints:
        result.status, result.reason = "failed", f"no checkpoint written (see {log_path})"
    return result


def _prune(ckpts: List[Checkpoint], targets: Sequence[float], deleted: set, final: bool = False, first: bool = True) -> None:
    """Delete checkpoints that will not be evaluated. The newest is kept while training (it may
    still be the latest one before a target) and whenever it is still being written."""
    if len(ckpts) < 2 and not final:
        return
    keep = {c.step for c in select_checkpoints(ckpts, targets, first)}
    newest = max(c.step for c in ckpts) if ckpts else -1
    for c in ckpts:
        if c.step in keep or c.step in deleted or (c.step == newest and not final):
            continue
        Path(c.path).unlink(missing_ok=True)
        deleted.add(c.step)

