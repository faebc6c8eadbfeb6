"""Keep a CPU training step's large buffers in the process heap (glibc), instead of returning them
to the OS at every free.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
gives it back with `munmap` when freed. A training step on a 256³ grid makes dozens of 64 MB
temporaries (the smoothing's products, sigmoid, Φ⁻¹, the regularisers and their gradients), so
every step faults in every page of each of them again: measured on lego, this was 44% of a 256³
step and 16% of a 192³ one (docs/studies/plateau.md, "The allocator"). Turning glibc's mmap path
off and raising its trim threshold keeps freed blocks for the next step. Resident memory then stays
near its peak instead of dropping between steps; the peak itself is the same.

Nothing here imports nerfstudio or torch. Other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory above the heap's top is returned to the OS only beyond this."""
TOP_PAD_BYTES = 64 << 20
"""Each growth of the heap asks the OS for this much more than needed."""

USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
"""Environment variables by which a user tunes glibc's allocator: when one is set, theirs is kept."""


def keep_freed_buffers() -> bool:
    """Tune glibc's allocator as the module docstring says; True when it was done.

    Does nothing (False) off Linux, on a C library other than glibc, or when the user set one of
    :data:`USER_SETTINGS`."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has mallopt but not these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(M_TOP_PAD, TOP_PAD_BYTES))
