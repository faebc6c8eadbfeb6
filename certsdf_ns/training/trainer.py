"""certsdf's trainer: nerfstudio's, with safe checkpoints, exact resume and early config checks.

What it changes, and why:

- **Atomic checkpoints.** nerfstudio writes `step-XXXXXXXXX.ckpt` in place, so a kill
  mid-write leaves a truncated newest file that `--load-dir`, ns-eval and ns-export then pick.
  Here the checkpoint is written to a sibling folder `<checkpoint_dir>.partial/`, fsynced and
  moved into place with `os.replace`: the checkpoint folder only ever holds complete files,
  and nothing else (nerfstudio parses the step out of *every* name in it, so a temp file
  there would break loading).
- **Resume from the newest complete checkpoint.** Files that fail to load (e.g. truncated by
  a crash of plain nerfstudio) are skipped with a warning.
- **Exact resume.** The torch/numpy/python RNG states go into the checkpoint and are restored
  before the first resumed step: the pixel sampler, stratified sampling and random
  backgrounds all draw from the global torch RNG, which ns-train otherwise re-seeds from
  `machine.seed`, so a resumed run would see different rays than an uninterrupted one.
- **Checks before allocation.** The model config is validated (and the grid's memory
  estimated) before the pipeline is built.
- **Append-only run folders** (see `run_folder`). ns-train's early `save_config` only checks
  the run folder: it refuses a folder that holds another run unless `--load-dir` resumes that
  run, and proves it writable. config.yml is written once the trainer is set up (so it
  records the resolved colour backend, and a run that fails on its input leaves an existing
  config.yml untouched). A save never overwrites a checkpoint this process did not write, and
  keep-latest pruning deletes only this process's own checkpoints.
- **A wall-clock budget** (`--max-train-minutes`, see `budget.py`): training ends when the
  time spent in training iterations (steps, evaluations and checkpoint saves; not start-up or
  data loading) reaches the budget, or at `--max-num-iterations`, whichever comes first. The
  time spent and the schedule plan go into the checkpoint, so a resumed run trains only the
  time left, on the same step → schedule map. On CPU the plain command gets a default budget.
- **A run ends with its result.** Its last step evaluates (the evaluations a full-length run would
  have run, and at least one eval image: nerfstudio evaluates nothing at the last step), and its last
  line gives the PSNR and SSIM, on how many held-out views, the checkpoint and the export command.
- **Full disks.** Free space is checked against the checkpoint's size before each save; a
  save that fails for lack of space removes its partial file, keeps the previous checkpoint
  and exits 2 naming the folder and the space needed.
- **Several processes** (`--machine.num-devices N`, see `distributed.py`). Rank 0 alone writes
  config.yml, checkpoints and logs, prunes, and decides the budget's plan and stop step, which
  it hands to every rank (the all-reduce hangs unless all run the same steps). A checkpoint
  holds every rank's RNG state, so a resumed run draws the rays each rank would have drawn,
  and the single-process key layout, so every loader reads it as any other.
"""

from __future__ import annotations

import os
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np
import psutil
import torch

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import comms, writer
from nerfstudio.utils.misc import step_check
from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.console import log, warn
from certsdf_ns.training import distributed, heap
from certsdf_ns.training.budget import HOLDING, SchedulePlan, format_minutes, planned_total_steps
from certsdf_ns.training.optim import fit_scheduler_to_plan
from certsdf_ns.errors import CertSDFInputError, exit_cleanly
from certsdf_ns.training.config_checks import check_model_config
from certsdf_ns.training.run_folder import (
    SAVE_OVERHEAD_BYTES,
    check_checkpoint_folder,
    check_no_newer_checkpoints,
    checkpoints_in,
    claim_run_folder,
    disk_full_message,
    free_bytes,
    is_disk_full,
    low_space_warning,
    resumes_in_place,
    tensor_bytes,
)

PARTIAL_SUFFIX = ".partial"
RNG_KEY = "certsdf_rng"
RANK_RNG_KEY = "certsdf_rng_ranks"
"""RNG states of every rank of a run in several processes, in rank order (RNG_KEY holds rank 0's)."""
SECONDS_KEY = "certsdf_train_seconds"
PLAN_KEY = "certsdf_schedule_plan"
DEFAULT_MAX_STEPS = 30_000
"""The method's default --max-num-iterations: the run length its schedules are written for."""
EVAL_CADENCES = ("steps_per_eval_batch", "steps_per_eval_image", "steps_per_eval_all_images")
IMAGE_METRICS = "Eval Images Metrics"
"""nerfstudio's name of one eval image's metrics (PSNR, SSIM, …) in its event storage."""
ALL_IMAGES_METRICS = "Eval Images Metrics Dict (all images)"
"""nerfstudio's name of the metrics averaged over every eval image."""


@dataclass
class CertSDFTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, building a :class:`CertSDFTrainer`."""

    _target: Type = field(default_factory=lambda: CertSDFTrainer)
    check_memory: bool = True
    """Refuse to start when the estimated training memory exceeds the available memory."""
    max_train_minutes: Optional[float] = None
    """Budget of training time (minutes), resumed runs included. 0: none; None: cpu_default_minutes on CPU, else none."""
    cpu_default_minutes: float = 30.0
    """The budget (minutes) of a CPU run that sets neither max_train_minutes nor max_num_iterations."""
    budget_warmup_steps: Optional[int] = None
    """Steps a budgeted run trains with held schedules before it plans. None: the density-map warm-up and blend + 20."""
    budget_timing_steps: int = 20
    """The plan's seconds per step are measured over the last this many warm-up steps."""
    schedule_reference_steps: int = DEFAULT_MAX_STEPS
    """Run length (steps) the configured schedules are written for; a budgeted run scales them by planned steps / this."""
    eval_at_end: bool = True
    """Evaluate at the last step (after the budget, if one ends training) and print PSNR and SSIM in the last line."""
    keep_freed_buffers: bool = True
    """On CPU with glibc: keep freed large buffers in the process for the next step (faster steps; RSS stays near its peak)."""

    def budget_minutes(self) -> Optional[float]:
        """The budget this run trains with (minutes), or None."""
        if self.max_train_minutes is not None:
            return self.max_train_minutes if self.max_train_minutes > 0 else None
        if self.budget_is_cpu_default():
            return self.cpu_default_minutes
        return None

    def budget_is_cpu_default(self) -> bool:
        return (
            self.max_train_minutes is None
            and self.machine.device_type == "cpu"
            and self.max_num_iterations == DEFAULT_MAX_STEPS
            and self.cpu_default_minutes > 0
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # nerfstudio's eval_setup (ns-eval, ns-viewer, ns-export) assigns the run's checkpoint
        # folder here and then indexes the sorted step numbers of every name in it: check the
        # folder first, so an empty or cluttered one ends in a message, not an IndexError.
        if name == "load_dir" and value is not None:
            with exit_cleanly():
                check_checkpoint_folder(Path(value))
        super().__setattr__(name, value)

    def claim_run_folder(self) -> None:
        """Refuse a run folder holding another run (unless resuming it) and prove it writable."""
        with exit_cleanly():
            claim_run_folder(self.get_base_dir(), self.get_checkpoint_dir(), self.load_dir, self.load_checkpoint)

    def save_config(self) -> None:
        """ns-train calls this before the trainer exists, just before it launches the training
        process(es): only check the run folder and the machine settings here (and set up a run in
        several processes, `distributed.prepare_launch`). config.yml is written by
        :meth:`write_config` once the trainer is set up."""
        self.claim_run_folder()
        with exit_cleanly():
            distributed.prepare_launch(self)

    def is_viewer_enabled(self) -> bool:
        """nerfstudio's, in rank 0 only: nerfstudio starts a viewer in local rank 0, i.e. on every
        machine of a multi-machine run, where nothing would ever update it."""
        return super().is_viewer_enabled() and comms.is_main_process()

    def is_viewer_legacy_enabled(self) -> bool:
        return super().is_viewer_legacy_enabled() and comms.is_main_process()

    def write_config(self) -> None:
        """nerfstudio's save_config: config.yml in the run folder."""
        super().save_config()


def rng_state() -> Dict[str, Any]:
    """Global RNG states in types that `torch.load(weights_only=True)` accepts (no numpy objects).
    In a run over several processes, each on its own GPU, only that GPU's ("cuda_device"): asking
    for all of them would open a CUDA context on every GPU in every process."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and distributed.is_distributed():
        state["cuda_device"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `<folder>.partial/<name>`, fsync, then os.replace onto `path`.

    A failed write (e.g. a full disk) removes its partial file before re-raising; only a
    killed process leaves one behind, in the .partial folder where nothing loads it.
    """
    partial_dir = path.parent.with_name(path.parent.name + PARTIAL_SUFFIX)
    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir / path.name
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception:
        tmp.unlink(missing_ok=True)  # frees the space it took, too
        _remove_if_empty(partial_dir)
        raise
    os.replace(tmp, path)
    _remove_if_empty(partial_dir)  # leaves no clutter next to the checkpoints
    try:  # make the rename itself durable (POSIX; not possible on every filesystem/OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def newest_complete_checkpoint(folder: Path) -> Tuple[Path, Dict[str, Any]]:
    """The highest-step `step-*.ckpt` in `folder` that loads, with its contents.

    Other names in the folder are ignored; unloadable checkpoints are skipped with a warning.
    """
    if not folder.is_dir():
        raise CertSDFInputError(f"--load-dir {folder} is not a folder (expected .../nerfstudio_models).")
    skipped = []
    for path in reversed(checkpoints_in(folder)):
        try:
            state = torch.load(path, map_location="cpu")
        except Exception as err:  # truncated zips and bad pickles raise many types; all mean "unusable"
            skipped.append(f"{path.name} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        if skipped:
            warn(f"skipped incomplete checkpoint(s) {', '.join(skipped)}; using {path}.")
        return path, state
    detail = f" ({len(skipped)} unreadable: {', '.join(skipped)})" if skipped else ""
    raise CertSDFInputError(f"--load-dir {folder} holds no complete step-XXXXXXXXX.ckpt checkpoint{detail}.")


def single_process_state_dict(pipeline: torch.nn.Module) -> Dict[str, Any]:
    """The pipeline's state dict with the keys of a run in one process: DDP puts its model under
    `_model.module.`; nerfstudio's loader strips that, certsdf's readers expect `_model.`."""
    ddp = "_model.module."
    return {("_model." + k[len(ddp) :] if k.startswith(ddp) else k): v for k, v in pipeline.state_dict().items()}


def load_checkpoint_file(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise CertSDFInputError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu")
    except Exception as err:  # see newest_complete_checkpoint
        raise CertSDFInputError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}).") from err


class CertSDFTrainer(Trainer):
    """nerfstudio's Trainer with atomic checkpoints, exact resume and early config checks."""

    config: CertSDFTrainerConfig

    def __init__(self, config: CertSDFTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        if comms.is_main_process():
            config.claim_run_folder()  # again, for callers that skip ns-train's save_config
        with exit_cleanly():
            available = None
            if config.check_memory:
                # This process's GPU, or its share of the machine's memory (every process holds a whole model).
                on_cuda = config.machine.device_type == "cuda" and torch.cuda.is_available()
                available = (
                    torch.cuda.mem_get_info(local_rank)[0]
                    if on_cuda
                    else psutil.virtual_memory().available // comms.get_local_size()
                )
            for note in check_model_config(config.pipeline.model, available):
                warn(note)
        if config.keep_freed_buffers and config.machine.device_type == "cpu":
            heap.keep_freed_buffers()
        super().__init__(config, local_rank, world_size)
        if world_size > 1 and self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)  # collectives of Python objects run on the current device
        self._resume_rng: Optional[Dict[str, Any]] = None
        budget = config.budget_minutes()
        self._budget: Optional[float] = None if budget is None else 60.0 * budget
        """The budget in seconds, or None."""
        self._train_seconds = 0.0
        """Training time of the closed intervals (this process and, when resumed, the runs before it)."""
        self._mark: Optional[float] = None
        """perf_counter at the start of the open interval (a step and its evaluation), or None."""
        self._plan: Optional[SchedulePlan] = None
        """The schedules' step plan of a budgeted run, once fixed (restored when resuming)."""
        self._first_step, self._seconds_at_start = 0, 0.0
        """The first step and the training seconds of this process's run."""
        self._seconds_after_first = 0.0
        """The training seconds once this process's first step is done (its one-off costs left out of the stop rule)."""
        self._warm_reference: Optional[Tuple[int, float]] = None
        self._growth_reference: Optional[Tuple[int, float]] = None
        """(step, training seconds) after the first step on a grown grid: the start of the re-plan's timing."""
        self._replanned_for: Optional[int] = None
        """The grid growth (its step) the plan was last fitted again for."""
        self._stopped_at: Optional[int] = None
        """The last step trained when the budget stopped training."""
        self._stop_seconds = 0.0
        """Training seconds at that point (the end-of-budget evaluation and save come after)."""
        self._written: List[Path] = []
        """Checkpoints this process wrote, oldest first: the only ones it may overwrite or prune."""
        self._result: Optional[Tuple[Dict[str, float], int]] = None
        """The final image evaluation's metrics and number of views, once it ran."""
        self._result_printed = False

    def setup(self, test_mode="val") -> None:
        super().setup(test_mode=test_mode)  # loads the checkpoint to resume from, if any
        if self._plan is not None or self._budget is not None:
            self._apply_plan(self._plan or HOLDING)  # before config.yml records the anneal
        if comms.is_main_process():
            # Only now: the backend is resolved, and the run got past its data and checkpoint checks.
            self.config.write_config()
            self._warn_if_low_space(self._expected_checkpoint_bytes())
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)  # last, so nothing in setup draws from the restored stream

    def _checkpoint_to_load(self) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        cfg = self.config
        if cfg.load_dir is not None:
            if cfg.load_step is None:
                return newest_complete_checkpoint(Path(cfg.load_dir))
            path = Path(cfg.load_dir) / f"step-{cfg.load_step:09d}.ckpt"
            return path, load_checkpoint_file(path)
        if cfg.load_checkpoint is not None:
            return Path(cfg.load_checkpoint), load_checkpoint_file(Path(cfg.load_checkpoint))
        return None, None

    def _load_checkpoint(self) -> None:
        with exit_cleanly():
            path, state = self._checkpoint_to_load()
            if state is not None and resumes_in_place(self.checkpoint_dir, self.config.load_dir, self.config.load_checkpoint):
                check_no_newer_checkpoints(self.checkpoint_dir, state["step"])
        if state is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")  # nerfstudio's own words
            return
        self._start_step = state["step"] + 1
        # The model refuses a checkpoint that does not fit its config, naming the setting (checkpoint_fit).
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        self._resume_rng = self._rng_of_this_rank(state)
        self._train_seconds = float(state.get(SECONDS_KEY, 0.0))
        self._plan = SchedulePlan.from_dict(state.get(PLAN_KEY))
        if state.get(RNG_KEY) is None:
            warn(f"{path} has no RNG state; resumed steps draw different rays.")
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}")

    def _rng_of_this_rank(self, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The RNG state this process resumes with: its rank's when the checkpoint's run had as many
        processes, else rank 0's for rank 0 and none (the seeded stream) for the others."""
        rank, world = comms.get_rank(), comms.get_world_size()
        ranks = state.get(RANK_RNG_KEY)
        if world > 1 and ranks is not None and len(ranks) == world:
            return ranks[rank]
        if world > 1 and state.get(RNG_KEY) is not None and rank == 0:
            saved = len(ranks) if ranks is not None else 1
            warn(
                f"the checkpoint was saved by {saved} process(es), this run has {world}: ranks 1..{world - 1} "
                "draw other rays than an uninterrupted run."
            )
        return state.get(RNG_KEY) if rank == 0 else None

    # -- the budget -------------------------------------------------------------------------
    def train_seconds(self) -> float:
        """Training time spent so far, including the runs this one resumes."""
        return self._train_seconds + (0.0 if self._mark is None else time.perf_counter() - self._mark)

    def train(self) -> None:
        self._first_step, self._seconds_at_start = self._start_step, self._train_seconds
        if comms.is_main_process():
            log(self.plan_message())
        super().train()

    def plan_message(self) -> str:
        """The one start-up line: what this run will do and how to change it."""
        cfg = self.config
        if self._budget is None:
            what = f"train {cfg.max_num_iterations} steps (no time budget)"
        else:
            source = " (the CPU default)" if cfg.budget_is_cpu_default() else ""
            what = (
                f"train for {format_minutes(self._budget)} of training time{source} or "
                f"{cfg.max_num_iterations} steps, whichever comes first"
            )
            if self._train_seconds > 0:
                what += f", {format_minutes(self._train_seconds)} already spent"
            if self._plan is None:
                start, end = self.budget_timing_window()
                what += f"; schedules fitted to the steps that fit, timed over steps {start}..{end}"
        evals = [
            f"{label} every {getattr(cfg, name)} steps"
            for name, label in zip(EVAL_CADENCES, ("eval batch", "eval image", "all eval images"))
            if 0 < getattr(cfg, name) <= cfg.max_num_iterations
        ]
        if cfg.eval_at_end:
            end = "at the end" + (" (after the budget)" if self._budget is not None else "")
            evals.append(f"and {end}" if evals else f"eval {end}")
        how = "--max-train-minutes M (0: no budget) or --max-num-iterations N; eval with --steps-per-eval-image N"
        return f"plan: {what}; {', '.join(evals) or 'no evaluation'}. Change with {how}."

    def _close_interval(self) -> None:
        """Add the open interval (a step and its evaluation) to the training time."""
        if self._mark is not None:
            self._train_seconds += time.perf_counter() - self._mark
            self._mark = None

    def train_iteration(self, step: int):
        # Counted from here to the end of this step's evaluation; what follows until the next
        # step (a checkpoint save, added by save_checkpoint; a pause from the viewer, not counted).
        self._close_interval()
        self._mark = time.perf_counter()
        loss, loss_dict, metrics_dict = super().train_iteration(step)
        if self._budget is not None:
            self._after_budgeted_step(step)
        # nerfstudio logs these with float(); detached after the backward pass, torch does not warn
        # about converting a tensor that requires grad.
        return loss.detach(), {name: value.detach() for name, value in loss_dict.items()}, metrics_dict

    def _after_budgeted_step(self, step: int) -> None:
        """Plan after the warm-up, keep the progress display's ETA on the budget, stop in time.
        In several processes rank 0's clock decides the plan and the stop, for every rank."""
        assert self._budget is not None
        spent, done = self.train_seconds(), step - self._first_step + 1
        start, end = self.budget_timing_window()
        if done == start:
            self._warm_reference = (step, spent)
        planned: Optional[Tuple[int, int]] = None  # (hold_steps, total_steps) of a new plan
        per_step = 0.0
        last = self._start_step + self.config.max_num_iterations
        if self._plan is None and done >= end:
            ref_step, ref_spent = self._warm_reference or (self._first_step - 1, self._seconds_at_start)
            per_step = (spent - ref_spent) / max(step - ref_step, 1)
            planned = (step + 1, planned_total_steps(step + 1, spent, per_step, self._budget, last))
        grown = getattr(self.pipeline.model, "grown_at", None)
        if self._plan is not None and grown is not None and grown != self._replanned_for:
            # The grid grew (coarse-to-fine): its steps cost more from here, so the plan is fitted
            # again to the steps that still fit, timed after the growth's first (one-off) step.
            window = max(self.config.budget_timing_steps // 2, 3)
            if step == grown + 1:
                self._growth_reference = (step, spent)
            elif self._growth_reference is not None and step == self._growth_reference[0] + window:
                per_step = (spent - self._growth_reference[1]) / window
                planned = (self._plan.hold_steps, planned_total_steps(step + 1, spent, per_step, self._budget, last))
                self._replanned_for = grown
        if done == 1:
            self._seconds_after_first = spent
        # The next step's cost is the mean of this process's steps after its first: the first carries
        # one-off costs (allocations, lazy imports; seconds under load) and, counted in, stopped short
        # budgets after one step. With only the first step done the budget alone decides.
        per_step_here = (spent - self._seconds_after_first) / (done - 1) if done > 1 else 0.0
        if self._growth_reference is not None and step > self._growth_reference[0]:
            per_step_here = (spent - self._growth_reference[1]) / (step - self._growth_reference[0])  # on the grown grid
        left = self._budget - spent
        self._show_budget_eta(step, left)
        stop = left <= 0.0 or left < per_step_here  # the next step would not fit
        hold_0, total_0, stop_0 = distributed.from_rank_zero((*(planned or (None, None)), float(stop)), self.device)
        if hold_0 is not None and total_0 is not None:
            self._plan = SchedulePlan(int(hold_0), int(total_0))
            self._apply_plan(self._plan)
            if comms.is_main_process():
                self.config.write_config()  # config.yml records the anneal this run uses
                log(
                    f"budget plan: {per_step:.2f} s per step, so schedules fitted to steps "
                    f"{self._plan.hold_steps}..{self._plan.total_steps}."
                )
        if stop_0:
            self._stopped_at, self._stop_seconds = step, spent
            self.stop_training = True

    def budget_timing_window(self) -> Tuple[int, int]:
        """(first, last) steps of this process, counted from 1, whose mean time plans a budgeted run:
        the last `budget_timing_steps` of the warm-up, never the first step (one-off costs:
        allocations, lazy imports)."""
        cfg = self.config
        warmup = cfg.budget_warmup_steps
        if warmup is None:
            model = self.pipeline.model.config
            transient = 0
            if getattr(model, "density_map", None) == "unbiased":
                transient = int(model.unbiased_warmup_steps or 0) + int(model.unbiased_blend_steps)
            warmup = transient + 20
        return max(2, warmup - cfg.budget_timing_steps), max(warmup, 3)

    def _show_budget_eta(self, step: int, seconds_left: float) -> None:
        """nerfstudio's ETA is (max_iter − step) × the mean step time: move max_iter so it reads
        the budget's remaining time (and "% done" the budget's fraction)."""
        if not writer.is_initialized():
            return
        mean = writer.GLOBAL_BUFFER["events"].get(writer.EventName.ITER_TRAIN_TIME.value, {}).get("avg", 0.0)
        end = self._start_step + self.config.max_num_iterations
        if mean > 0:
            writer.GLOBAL_BUFFER["max_iter"] = min(end, step + max(seconds_left, 0.0) / mean)

    def _apply_plan(self, plan: SchedulePlan) -> None:
        """Fit the learning-rate schedulers and the σ/s anneal to ``plan`` (see budget.py)."""
        reference = self.config.schedule_reference_steps
        model_config = self.pipeline.model.config
        model_config.anneal_start_step = plan.hold_steps
        model_config.anneal_stretch = plan.stretch(reference)
        # Re-apply σ/s at the current step (None before the first step: training starts at 0).
        self.pipeline.model.set_schedule_step(self.pipeline.model.step or 0)
        for name, scheduler in self.optimizers.schedulers.items():
            if not fit_scheduler_to_plan(scheduler, self.config.optimizers[name]["scheduler"], plan, reference):
                warn(f"the {name} learning-rate schedule is not an exponential decay without warm-up; it keeps its steps.")

    def eval_iteration(self, step: int) -> None:
        super().eval_iteration(step)
        last = self._start_step + self.config.max_num_iterations - 1
        if self.config.eval_at_end and step in (self._stopped_at, last):
            self._final_eval(step)
        self._close_interval()

    def _final_eval(self, step: int) -> None:
        """At the run's last step: the evaluations a full-length run would have run that this step did
        not, and one eval image if no image was evaluated (nerfstudio evaluates none at the last step)."""
        cfg = self.config
        saved = {name: getattr(cfg, name) for name in EVAL_CADENCES}
        ran = {n: step_check(step, v) for n, v in saved.items()}
        due = {n: 0 < v <= cfg.max_num_iterations and not ran[n] for n, v in saved.items()}
        if not any(ran[n] or due[n] for n in EVAL_CADENCES[1:]):
            due["steps_per_eval_image"] = True  # the result line needs an image's PSNR and SSIM
        try:
            for name in EVAL_CADENCES:  # cadence 1 runs at any step > 0; 0 never runs
                object.__setattr__(cfg, name, 1 if due[name] else 0)
            super().eval_iteration(step)
        finally:
            for name, value in saved.items():
                object.__setattr__(cfg, name, value)
        self._result = self._image_metrics(step)

    def _image_metrics(self, step: int) -> Optional[Tuple[Dict[str, float], int]]:
        """(metrics, number of views) of this step's image evaluation, as nerfstudio logged it (every eval
        image rather than one when both ran), or None."""
        logged = {e["name"]: e["event"] for e in writer.EVENT_STORAGE if e["step"] == step}
        if ALL_IMAGES_METRICS in logged:
            return logged[ALL_IMAGES_METRICS], len(self.pipeline.datamanager.eval_dataset)
        if IMAGE_METRICS in logged:
            return logged[IMAGE_METRICS], 1
        return None

    def result_line(self) -> str:
        """The run's last line: its final PSNR and SSIM, its checkpoint, and the command that exports its mesh."""
        cfg = self.config
        if self._result is not None:
            metrics, views = self._result
            held_out = len(self.pipeline.datamanager.eval_dataset)
            what = f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} on {views} of {held_out} held-out views"
        elif not cfg.eval_at_end:
            what = "not evaluated (--eval-at-end False)"
        elif not self.pipeline.datamanager.eval_dataset:
            what = "not evaluated (no held-out views)"
        elif not (cfg.is_tensorboard_enabled() or cfg.is_wandb_enabled() or cfg.is_comet_enabled()):
            what = f"not evaluated (--vis {cfg.vis} runs no evaluation; add tensorboard)"
        else:
            what = "not evaluated (training stopped before its last step)"
        run = cfg.get_base_dir()
        checkpoint = self._written[-1] if self._written else self.checkpoint_dir
        config, out = shlex.quote(str(run / "config.yml")), shlex.quote(str(run / "export"))
        export = f"certsdf-export --load-config {config} --output-dir {out}"
        return f"result at step {self.step}: {what}; checkpoint {checkpoint}; export the mesh: {export}"

    def _after_train(self) -> None:
        if self._stopped_at is not None:
            # nerfstudio's loop has already moved self.step to the next, untrained step.
            self.step = self._stopped_at
            after = self.train_seconds() - self._stop_seconds
            if comms.is_main_process():
                log(
                    f"time budget reached after step {self._stopped_at} ({format_minutes(self._stop_seconds)} of "
                    f"training; the evaluation at the end took {after:.0f} s more)."
                )
        if distributed.is_distributed():
            log(f"process {comms.get_rank() + 1} of {comms.get_world_size()}: trained to step {self.step}.")
        super()._after_train()  # the final checkpoint; with the viewer open, _train_complete_viewer waits
        self._print_result()

    def _train_complete_viewer(self) -> None:
        self._print_result()  # before the viewer keeps the process running
        super()._train_complete_viewer()

    def _print_result(self) -> None:
        if comms.is_main_process() and not self._result_printed:
            self._result_printed = True
            log(self.result_line())

    # -- saving -----------------------------------------------------------------------
    def _expected_checkpoint_bytes(self) -> int:
        """Size of a checkpoint before the first step: the pipeline's tensors plus Adam's two
        moments per trainable parameter (its state is created at the first step)."""
        params = sum(p.numel() * p.element_size() for p in self.pipeline.parameters() if p.requires_grad)
        return tensor_bytes(self.pipeline.state_dict()) + 2 * params + SAVE_OVERHEAD_BYTES

    def _warn_if_low_space(self, need: int) -> None:
        note = low_space_warning(self.checkpoint_dir, need, free_bytes(self.checkpoint_dir))
        if note is not None:
            warn(note)

    def save_checkpoint(self, step: int) -> None:
        """Every rank calls this at the same steps (nerfstudio's loop); rank 0 alone writes."""
        started, counting = time.perf_counter(), self._mark is None
        ranks_rng = self._gather_ranks(step)
        if not comms.is_main_process():
            return
        self._save_checkpoint(step, ranks_rng)
        if counting:  # a save between steps counts as training time (inside an open interval it already does)
            self._train_seconds += time.perf_counter() - started

    def _gather_ranks(self, step: int) -> Optional[List[Dict[str, Any]]]:
        """Every rank's RNG state for the checkpoint (None in one process), once rank 0 has checked that
        all ranks are at this step with the same parameters and the same cached node SDF (the grid the
        certified sampler and the renders reuse until the logits change): a checkpoint holds rank 0's."""
        if not distributed.is_distributed():
            return None
        model = self.pipeline.model
        with torch.no_grad():
            tensors = [*model.parameters(), model.field.geometry.sdf_grid()]
        mine = {"step": step, "state": distributed.fingerprint(tensors), "rng": rng_state()}
        ranks = distributed.gather(mine)
        for rank, theirs in enumerate(ranks):
            if theirs["step"] != step or not distributed.same_fingerprint(theirs["state"], ranks[0]["state"]):
                raise RuntimeError(
                    f"rank {rank} is at step {theirs['step']} with parameters or SDF that differ from rank 0's at step "
                    f"{step}: the processes no longer train the same model, so no checkpoint is saved."
                )
        return [r["rng"] for r in ranks]

    def _save_checkpoint(self, step: int, ranks_rng: Optional[List[Dict[str, Any]]] = None) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        if ckpt_path.exists() and ckpt_path not in self._written:
            with exit_cleanly():  # the run-folder checks make this unreachable; the guard keeps it so
                raise CertSDFInputError(f"refusing to overwrite {ckpt_path}, which this run did not write.")
        state = {
            "step": step,
            "pipeline": single_process_state_dict(self.pipeline),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            RNG_KEY: rng_state(),
            SECONDS_KEY: self.train_seconds(),
        }
        if self._plan is not None:
            state[PLAN_KEY] = self._plan.as_dict()
        if ranks_rng is not None:
            state[RANK_RNG_KEY] = ranks_rng
        need = tensor_bytes(state) + SAVE_OVERHEAD_BYTES
        self._warn_if_low_space(need)
        try:
            atomic_torch_save(state, ckpt_path)
        except Exception as err:
            if not is_disk_full(err):
                raise
            kept = checkpoints_in(self.checkpoint_dir)
            with exit_cleanly():
                raise CertSDFInputError(
                    disk_full_message(self.checkpoint_dir, ckpt_path.name, need, kept[-1] if kept else None)
                ) from None
        if ckpt_path in self._written:  # the final save can repeat the last periodic one
            self._written.remove(ckpt_path)
        self._written.append(ckpt_path)
        if self.config.save_only_latest_checkpoint:
            # Keep-latest pruning: only checkpoints this process wrote (never a resumed run's own).
            for old in self._written[:-1]:
                old.unlink(missing_ok=True)
            self._written = self._written[-1:]
