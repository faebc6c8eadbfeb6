"""Run folders are append-only; checkpoint folders are checked before loading; saves survive a full disk.

- **A folder that holds a run is never reused by accident.** ns-train writes into
  `<output-dir>/<experiment-name>/<method>/<timestamp>/`; a second run with the same name and
  timestamp would overwrite config.yml and, with nerfstudio's keep-latest pruning, delete the
  first run's checkpoints. certsdf refuses to start there unless the run resumes itself
  (`--load-dir <that folder>/nerfstudio_models`), and never overwrites or deletes a checkpoint
  the current process did not write (see `CertSDFTrainer.save_checkpoint`).
- **Loading checks the checkpoint folder.** nerfstudio's `eval_load_checkpoint` (ns-eval,
  ns-viewer, ns-export) parses a step out of every name in the folder and takes the last:
  an empty folder is an IndexError, a stray file a ValueError. The checks here name the folder.
- **Disk space.** A checkpoint's size is known before it is written (the bytes of its
  tensors); free space is compared against it before each save, and a save that fails for
  lack of space is recognised through PyTorch's wrapping ("unexpected pos" RuntimeError whose
  context is the OSError) so the trainer can say so and keep the previous checkpoint.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, List, Optional

import torch

from certsdf_ns.output_paths import OutputLocationError, check_writable_dir
from certsdf_ns.errors import CertSDFInputError

CONFIG_NAME = "config.yml"
CHECKPOINT_NAME = re.compile(r"step-(\d+)\.ckpt")
SAVE_OVERHEAD_BYTES = 1 << 16
"""Zip headers and pickled non-tensor state of a checkpoint, on top of its tensors' bytes."""
LOW_SPACE_SAVES = 2
"""Warn when the disk holds fewer than this many more checkpoints."""
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def step_of(path: Path) -> int:
    """The step in a `step-XXXXXXXXX.ckpt` name."""
    match = CHECKPOINT_NAME.fullmatch(path.name)
    assert match is not None, path
    return int(match.group(1))


def checkpoints_in(folder: Path) -> List[Path]:
    """`step-*.ckpt` files in `folder`, oldest step first (none if the folder is missing)."""
    if not folder.is_dir():
        return []
    return sorted((folder / n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)), key=step_of)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- run folders


def resumes_in_place(checkpoint_dir: Path, load_dir: Optional[Path], load_checkpoint: Optional[Path]) -> bool:
    """Whether --load-dir / --load-checkpoint point into this run's own checkpoint folder."""
    own = checkpoint_dir.resolve()
    return (load_dir is not None and Path(load_dir).resolve() == own) or (
        load_checkpoint is not None and Path(load_checkpoint).resolve().parent == own
    )


def existing_run_message(run_dir: Path, checkpoint_dir: Path) -> Optional[str]:
    """What of a previous run `run_dir` holds (config.yml, checkpoints), or None if nothing."""
    held = [CONFIG_NAME] if (run_dir / CONFIG_NAME).exists() else []
    ckpts = checkpoints_in(checkpoint_dir)
    if ckpts:
        held.append(f"{len(ckpts)} checkpoint(s), newest {ckpts[-1].name}")
    return ", ".join(held) or None


def claim_run_folder(run_dir: Path, checkpoint_dir: Path, load_dir: Optional[Path], load_checkpoint: Optional[Path]) -> None:
    """Refuse a run folder that holds another run (unless resuming it); prove it writable.

    Called before config.yml is written and before anything is loaded or allocated.
    """
    held = existing_run_message(run_dir, checkpoint_dir)
    if held is not None and not resumes_in_place(checkpoint_dir, load_dir, load_checkpoint):
        raise CertSDFInputError(
            f"the run folder {run_dir} already holds a run ({held}); certsdf never overwrites a run. "
            f"To continue that run, pass --load-dir {checkpoint_dir}. To start a new one, pass another "
            "--timestamp (or none: the default is the current time) or --experiment-name. "
            "To discard the old run, delete the folder yourself."
        )
    try:
        check_writable_dir(run_dir, "--output-dir: the run folder")
    except OutputLocationError as err:
        raise CertSDFInputError(str(err)) from err


def check_no_newer_checkpoints(checkpoint_dir: Path, loaded_step: int) -> None:
    """Resuming in place from an older checkpoint would overwrite the run's newer ones: refuse."""
    newer = [p.name for p in checkpoints_in(checkpoint_dir) if step_of(p) > loaded_step]
    if newer:
        raise CertSDFInputError(
            f"resuming {checkpoint_dir} from step {loaded_step} would overwrite its newer checkpoint(s) "
            f"{', '.join(newer)}. Resume from the newest (omit --load-step), or resume into a new run folder "
            "(another --timestamp) to branch off."
        )


# --------------------------------------------------------------------------- loading


def check_checkpoint_folder(folder: Path) -> List[Path]:
    """The checkpoints of a folder about to be loaded by nerfstudio's eval path; CertSDFInputError if unusable."""
    folder = Path(folder)
    if not folder.exists():
        raise CertSDFInputError(
            f"checkpoint folder {folder} does not exist: the run saved no checkpoint (it stopped before its first "
            "save, see --steps-per-save) or its folder was moved."
        )
    if not folder.is_dir():
        raise CertSDFInputError(f"checkpoint folder {folder} is a file, not a folder.")
    try:
        names = os.listdir(folder)
    except OSError as err:
        raise CertSDFInputError(f"checkpoint folder {folder} cannot be read ({err.strerror}).") from err
    stray = sorted(n for n in names if not CHECKPOINT_NAME.fullmatch(n))
    if stray:
        raise CertSDFInputError(
            f"checkpoint folder {folder} holds {', '.join(stray[:5])}, which is not a step-XXXXXXXXX.ckpt checkpoint; "
            "nerfstudio reads a step out of every name there, so move other files out of it."
        )
    if not names:
        raise CertSDFInputError(
            f"checkpoint folder {folder} is empty: the run saved no checkpoint (it stopped before its first save, "
            "see --steps-per-save). Train again or resume from another run's checkpoints."
        )
    return checkpoints_in(folder)


# --------------------------------------------------------------------------- disk space


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested checkpoint state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem that holds `folder` (or its nearest existing parent)."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    return shutil.disk_usage(existing).free


def low_space_warning(folder: Path, need: int, free: int) -> Optional[str]:
    """A warning when `free` bytes hold fewer than LOW_SPACE_SAVES checkpoints of `need` bytes."""
    if free >= LOW_SPACE_SAVES * need:
        return None
    outcome = "the next save will fail" if free < need else "a later save may fail"
    return (
        f"the disk holding {folder} has {_mib(free)} free and a checkpoint needs about {_mib(need)}: "
        f"{outcome}. Free some space (training continues)."
    )


def is_disk_full(err: BaseException) -> bool:
    """Whether a save failed for lack of space: an OSError ENOSPC/EDQUOT/EFBIG anywhere in the chain
    (torch.save wraps it in a RuntimeError 'unexpected pos ...')."""
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(checkpoint_dir: Path, name: str, need: int, kept: Optional[Path]) -> str:
    """The message of a save that failed for lack of space."""
    keep = (
        f"The newest complete checkpoint {kept.name} is kept; after freeing space, continue with --load-dir {checkpoint_dir}."
        if kept is not None
        else "No earlier checkpoint of this run exists."
    )
    return (
        f"the disk holding {checkpoint_dir} is full: saving {name} needs about {_mib(need)} "
        f"({_mib(free_bytes(checkpoint_dir))} free now). The partial file was removed. {keep}"
    )
