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
  estimated) before the pipeline is built; the config is re-saved after setup so that
  config.yml records the resolved colour backend.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type

import numpy as np
import psutil
import torch

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.training.config_checks import check_model_config
from certsdf_ns.errors import CertSDFInputError, exit_cleanly

CHECKPOINT_NAME = re.compile(r"step-(\d+)\.ckpt")
PARTIAL_SUFFIX = ".partial"
RNG_KEY = "certsdf_rng"
# Test hook: "STEP:MARKER" pauses the save of checkpoint STEP after its first 64 KiB are on disk,
# touching MARKER, so a test can SIGKILL the process deterministically mid-write.
PAUSE_ENV = "CERTSDF_TEST_PAUSE_IN_SAVE"


@dataclass
class CertSDFTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, building a :class:`CertSDFTrainer`."""

    _target: Type = field(default_factory=lambda: CertSDFTrainer)
    check_memory: bool = True
    """Refuse to start when the estimated training memory exceeds the available memory."""


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


def atomic_torch_save(obj: Any, path: Path, step: int = -1) -> None:
    """torch.save to `<folder>.partial/<name>`, fsync, then os.replace onto `path`."""
    partial_dir = path.parent.with_name(path.parent.name + PARTIAL_SUFFIX)
    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir / path.name
    hook = os.environ.get(PAUSE_ENV, "")
    with open(tmp, "wb") as f:
        target = f
        if hook and int(hook.split(":", 1)[0]) == step:
            target = _PauseMidWrite(f, Path(hook.split(":", 1)[1]))
        torch.save(obj, target)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        partial_dir.rmdir()  # only succeeds when empty: leaves no clutter next to the checkpoints
    except OSError:
        pass
    try:  # make the rename itself durable (POSIX; not possible on every filesystem/OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
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
            CONSOLE.print(f"[yellow]certsdf: skipped incomplete checkpoint(s) {', '.join(skipped)}; using {path}.")
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
        with exit_cleanly():
            available = None
            if config.check_memory:
                on_cuda = config.machine.device_type == "cuda" and torch.cuda.is_available()
                available = torch.cuda.mem_get_info()[0] if on_cuda else psutil.virtual_memory().available
            for note in check_model_config(config.pipeline.model, available):
                CONSOLE.print(f"[yellow]certsdf warning: {note}", soft_wrap=True)
        super().__init__(config, local_rank, world_size)
        self._resume_rng: Optional[Dict[str, Any]] = None

    def setup(self, test_mode="val") -> None:
        super().setup(test_mode=test_mode)
        if self.local_rank == 0:
            self.config.save_config()  # now with the backend the model resolved
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
        if state is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        self._start_step = state["step"] + 1
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        self._resume_rng = state.get(RNG_KEY)
        if self._resume_rng is None:
            CONSOLE.print(f"[yellow]certsdf: {path} has no RNG state; resumed steps draw different rays.")
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}")

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline  # DDP
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            RNG_KEY: rng_state(),
        }
        atomic_torch_save(state, ckpt_path, step)
        if self.config.save_only_latest_checkpoint:
            for f in self.checkpoint_dir.glob("*.ckpt"):
                if f != ckpt_path:
                    f.unlink()
