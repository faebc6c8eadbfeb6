"""Fault injection into checkpoint saves of an `ns-train certsdf` subprocess, for the tests only.

Python imports `sitecustomize` at start-up from its path, so a test that puts this folder first on a
subprocess's PYTHONPATH (:func:`fault_env`) gets these faults in that process, and production code
carries no test hooks. Each fault is asked for through an environment variable:

- ``CERTSDF_TEST_PAUSE_IN_SAVE=STEP:MARKER``: the save of checkpoint STEP pauses after its first
  64 KiB are on disk and touches MARKER, so a test can SIGKILL the process mid-write;
- ``CERTSDF_TEST_DISK_FULL_IN_SAVE=STEP``: the save of checkpoint STEP fails with ENOSPC after its
  first 64 KiB, as a full disk does (torch.save then raises its "unexpected pos" RuntimeError);
- ``CERTSDF_TEST_FAIL_RANK=RANK:STEP``: in a run over several processes, the process of that global
  rank raises at the start of that step (the processes the launcher spawns inherit the environment).

Nothing is imported until the process itself imports `certsdf_ns.training.trainer`; then its
`atomic_torch_save` is wrapped so that torch.save writes through the faulty file for that step, and
its trainer's `train_iteration` so that the chosen rank fails.
"""

from __future__ import annotations

import errno
import importlib.abc
import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Optional

PAUSE_ENV = "CERTSDF_TEST_PAUSE_IN_SAVE"
DISK_FULL_ENV = "CERTSDF_TEST_DISK_FULL_IN_SAVE"
FAIL_RANK_ENV = "CERTSDF_TEST_FAIL_RANK"
HOOKS_DIR = Path(__file__).resolve().parent
TRAINER = "certsdf_ns.training.trainer"
CHUNK = 65536
"""Bytes written before the fault strikes."""


def fault_env(faults: Dict[str, str]) -> Dict[str, str]:
    """Environment entries for a subprocess with these faults (e.g. ``{PAUSE_ENV: "30:/tmp/m"}``):
    the faults, and a PYTHONPATH that starts with this folder and keeps the current one."""
    path = os.pathsep.join(p for p in (str(HOOKS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **faults}


class _PauseMidWrite:
    """File wrapper: after 64 KiB, flush, touch the marker and sleep (until killed)."""

    def __init__(self, f, marker: Path) -> None:
        self.f, self.marker, self.written = f, marker, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += len(data)
        if self.written >= CHUNK and not self.marker.exists():
            self.f.flush()
            self.marker.touch()
            time.sleep(600)
        return n

    def flush(self) -> None:
        self.f.flush()


class _FullDiskMidWrite(_PauseMidWrite):
    """File wrapper: after 64 KiB on disk, every write fails with ENOSPC."""

    def __init__(self, f) -> None:
        super().__init__(f, Path(os.devnull))

    def write(self, data) -> int:
        if self.written >= CHUNK:
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)


def _faulty_writer(step: int):
    """The file wrapper the environment asks for at this checkpoint step, or None."""
    pause = os.environ.get(PAUSE_ENV, "")
    if pause and int(pause.split(":", 1)[0]) == step:
        return lambda f: _PauseMidWrite(f, Path(pause.split(":", 1)[1]))
    full = os.environ.get(DISK_FULL_ENV, "")
    if full and int(full) == step:
        return _FullDiskMidWrite
    return None


def _wrap_saves(trainer) -> None:
    """Make `trainer.atomic_torch_save` write checkpoint files through the faulty writer of their step."""
    original = trainer.atomic_torch_save
    torch = trainer.torch

    def atomic_torch_save(obj, path: Path, *args, **kwargs):
        match = re.fullmatch(r"step-(\d+)\.ckpt", Path(path).name)
        wrap = _faulty_writer(int(match.group(1))) if match else None
        if wrap is None:
            return original(obj, path, *args, **kwargs)
        real_save = torch.save
        torch.save = lambda o, f, *a, **k: real_save(o, wrap(f), *a, **k)
        try:
            return original(obj, path, *args, **kwargs)
        finally:
            torch.save = real_save

    trainer.atomic_torch_save = atomic_torch_save


def _fail_rank(trainer) -> None:
    """Make the trainer of the rank FAIL_RANK_ENV names raise at the start of its step."""
    rank, at = (int(v) for v in os.environ[FAIL_RANK_ENV].split(":"))
    original = trainer.CertSDFTrainer.train_iteration

    def train_iteration(self, step: int):
        from nerfstudio.utils import comms

        if comms.get_rank() == rank and step == at:
            raise RuntimeError(f"{FAIL_RANK_ENV}: rank {rank} fails at step {step}")
        return original(self, step)

    trainer.CertSDFTrainer.train_iteration = train_iteration


class _WrapAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the trainer module as usual, executes it with its own loader, then wraps its saves."""

    def __init__(self) -> None:
        self._loader: Optional[importlib.abc.Loader] = None

    def find_spec(self, name, path=None, target=None):
        if name != TRAINER or self._loader is not None:
            return None
        sys.meta_path.remove(self)  # let the other finders locate the real module
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        if os.environ.get(PAUSE_ENV) or os.environ.get(DISK_FULL_ENV):
            _wrap_saves(module)
        if os.environ.get(FAIL_RANK_ENV):
            _fail_rank(module)


if os.environ.get(PAUSE_ENV) or os.environ.get(DISK_FULL_ENV) or os.environ.get(FAIL_RANK_ENV):
    sys.meta_path.insert(0, _WrapAfterImport())
