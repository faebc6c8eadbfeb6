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
- **Full disks.** Free space is checked against the checkpoint's size before each save; a
  save that fails for lack of space removes its partial file, keeps the previous checkpoint
  and exits 2 naming the folder and the space needed.
"""

from __future__ import annotations

import errno
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np
import psutil
import torch

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.console import warn
from certsdf_ns.errors import CertSDFInputError, exit_cleanly
from certsdf_ns.training.config_checks import check_model_config
from certsdf_ns.training.run_folder import (
    CHECKPOINT_NAME,
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
# Test hook: "STEP:MARKER" pauses the save of checkpoint STEP after its first 64 KiB are on disk,
# touching MARKER, so a test can SIGKILL the process deterministically mid-write.
PAUSE_ENV = "CERTSDF_TEST_PAUSE_IN_SAVE"
# Test hook: "STEP" makes the save of checkpoint STEP fail with ENOSPC after its first 64 KiB,
# as a full disk does (torch.save then raises its "unexpected pos" RuntimeError).
DISK_FULL_ENV = "CERTSDF_TEST_DISK_FULL_IN_SAVE"


@dataclass
class CertSDFTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, building a :class:`CertSDFTrainer`."""

    _target: Type = field(default_factory=lambda: CertSDFTrainer)
    check_memory: bool = True
    """Refuse to start when the estimated training memory exceeds the available memory."""

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
        """ns-train calls this before the trainer exists: only check the run folder here.
        config.yml is written by :meth:`write_config` once the trainer is set up."""
        self.claim_run_folder()

    def write_config(self) -> None:
        """nerfstudio's save_config: config.yml in the run folder."""
        super().save_config()


def rng_state() -> Dict[str, Any]:
    """Global RNG states in types that `torch.load(weights_only=True)` accepts (no numpy objects)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
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


class _PauseMidWrite:
    """File wrapper for the kill test: after 64 KiB, flush, touch the marker and sleep."""

    def __init__(self, f, marker: Path) -> None:
        self.f, self.marker, self.written = f, marker, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += len(data)
        if self.written >= 65536 and not self.marker.exists():
            self.f.flush()
            self.marker.touch()
            time.sleep(600)
        return n

    def flush(self) -> None:
        self.f.flush()


class _FullDiskMidWrite(_PauseMidWrite):
    """File wrapper for the full-disk test: after 64 KiB on disk, every write fails with ENOSPC."""

    def __init__(self, f) -> None:
        super().__init__(f, Path(os.devnull))

    def write(self, data) -> int:
        if self.written >= 65536:
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)


def _test_hook_writer(f, step: int):
    """`f`, or the wrapper a test hook (PAUSE_ENV, DISK_FULL_ENV) asks for at this step."""
    pause = os.environ.get(PAUSE_ENV, "")
    if pause and int(pause.split(":", 1)[0]) == step:
        return _PauseMidWrite(f, Path(pause.split(":", 1)[1]))
    full = os.environ.get(DISK_FULL_ENV, "")
    if full and int(full) == step:
        return _FullDiskMidWrite(f)
    return f


def atomic_torch_save(obj: Any, path: Path, step: int = -1) -> None:
    """torch.save to `<folder>.partial/<name>`, fsync, then os.replace onto `path`.

    A failed write (e.g. a full disk) removes its partial file before re-raising; only a
    killed process leaves one behind, in the .partial folder where nothing loads it.
    """
    partial_dir = path.parent.with_name(path.parent.name + PARTIAL_SUFFIX)
    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir / path.name
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, _test_hook_writer(f, step))
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
    found = sorted(
        (int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := CHECKPOINT_NAME.fullmatch(name))
    )
    skipped = []
    for _, path in reversed(found):
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
        if local_rank == 0:
            config.claim_run_folder()  # again, for callers that skip ns-train's save_config
        with exit_cleanly():
            available = None
            if config.check_memory:
                on_cuda = config.machine.device_type == "cuda" and torch.cuda.is_available()
                available = torch.cuda.mem_get_info()[0] if on_cuda else psutil.virtual_memory().available
            for note in check_model_config(config.pipeline.model, available):
                warn(note)
        super().__init__(config, local_rank, world_size)
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._written: List[Path] = []
        """Checkpoints this process wrote, oldest first: the only ones it may overwrite or prune."""

    def setup(self, test_mode="val") -> None:
        super().setup(test_mode=test_mode)  # loads the checkpoint to resume from, if any
        if self.local_rank == 0:
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
        self._resume_rng = state.get(RNG_KEY)
        if self._resume_rng is None:
            warn(f"{path} has no RNG state; resumed steps draw different rays.")
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}")

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

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        if ckpt_path.exists() and ckpt_path not in self._written:
            with exit_cleanly():  # the run-folder checks make this unreachable; the guard keeps it so
                raise CertSDFInputError(f"refusing to overwrite {ckpt_path}, which this run did not write.")
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline  # DDP
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            RNG_KEY: rng_state(),
        }
        need = tensor_bytes(state) + SAVE_OVERHEAD_BYTES
        self._warn_if_low_space(need)
        try:
            atomic_torch_save(state, ckpt_path, step)
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
