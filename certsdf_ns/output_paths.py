"""Output locations checked before any work: every certsdf CLI calls these first.

A CLI that finds out only after training or meshing that it cannot write its result throws
the work away (and, without these checks, ends in a traceback). Here the location is
created if needed and a probe file is written and removed in it, which is the only test
that is right on read-only mounts, pseudo-filesystems such as /proc, quota-limited disks and
for root (who passes every permission-bit check but still cannot write a read-only mount).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PROBE_PREFIX = ".certsdf-write-test-"


class OutputLocationError(ValueError):
    """An output location that cannot be created or written; the message names the option and path.

    Not a CertSDFInputError only to keep this module free of heavy imports (certsdf-make-scene and
    certsdf-eval-mesh use it without torch); ns-train's checks re-raise it as one.
    """


def _kind(path: Path) -> str:
    """'a file', 'a folder', ... for messages about something that is in the way."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link to {os.readlink(path)}"
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    return "not a regular file or folder (a device, socket or pipe)"


def check_writable_dir(path: Path, option: str) -> Path:
    """Create folder `path` (with parents) and prove it writable; OutputLocationError naming `option` if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputLocationError(f"{option} {path} is {_kind(path)}, not a folder; pass a folder to write into.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is {_kind(blocker)}" if blocker is not None else (err.strerror or str(err))
        raise OutputLocationError(f"{option} {path} cannot be created ({why}); choose a writable location.") from err
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=PROBE_PREFIX):
            pass
    except OSError as err:
        raise OutputLocationError(
            f"{option} {path} is not writable ({err.strerror or err}); choose a writable location."
        ) from err
    return path


def check_writable_file(path: Path, option: str) -> Path:
    """The file `path` can be written: not a folder, and its folder exists (or can be made) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{option} {path} is a folder; pass a file name.")
    if path.exists() and not path.is_file():
        raise OutputLocationError(f"{option} {path} is {_kind(path)}; pass a regular file name.")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputLocationError(f"{option} {path} exists and is not writable.")
    check_writable_dir(path.parent, f"{option} {path}: its folder")
    return path
