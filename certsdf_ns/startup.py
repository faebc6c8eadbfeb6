"""What certsdf does as a Python process starts, before nerfstudio is imported: nerfstudio-free and cheap.

`ns-train` imports all of nerfstudio's methods before it loads any plugin, and those imports print
torch's FutureWarnings for deprecated APIs that nerfstudio uses. The package therefore installs
``certsdf_ns_startup.pth`` (see ``setup.py``) beside itself. Python runs its one line at the start of
every process in the environment; the line returns at once unless the program is an ``ns-*`` command,
and :func:`quiet_nerfstudio_imports` then hides those warnings only when the command works on
certsdf. Every other program, `ns-train nerfacto` included, sees them as before.
"""

from __future__ import annotations

import builtins
import os
import re
import warnings
from typing import Optional, Sequence, Tuple

# nerfstudio's own deprecation warnings at import: (message's start, category, module the warning is
# attributed to).
NERFSTUDIO_IMPORT_NOISE: Tuple[Tuple[str, str, str], ...] = (
    # nerfstudio's `@torch.jit.script` functions (cameras, utils); torch names itself as the source.
    ("`torch.jit.script` is deprecated", "FutureWarning", "torch.jit._script"),
    # nerfstudio.field_components.activations' `@custom_fwd` / `@custom_bwd`.
    ("`torch.cuda.amp.custom_fwd(args...)` is deprecated", "FutureWarning", "nerfstudio.field_components.activations"),
    ("`torch.cuda.amp.custom_bwd(args...)` is deprecated", "FutureWarning", "nerfstudio.field_components.activations"),
)


def ignore_import_noise() -> None:
    """Hide :data:`NERFSTUDIO_IMPORT_NOISE`, each warning by its message, category and source module
    (`warnings.filterwarnings` keeps one copy of a filter added twice)."""
    for message, category, module in NERFSTUDIO_IMPORT_NOISE:
        warnings.filterwarnings("ignore", re.escape(message), getattr(builtins, category), re.escape(module) + r"\Z")


def _load_config(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--load-config`` (or ``--load_config``, ``--load-config=…``) in `argv`, if any."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.replace("_", "-").partition("=")
        if flag == "--load-config":
            return arg.split("=", 1)[1] if value else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def works_on_certsdf(argv: Sequence[str]) -> bool:
    """Whether the command line `argv` is an ``ns-*`` command on certsdf: ``ns-train certsdf …``, or
    ``ns-viewer``/``ns-export``/``ns-eval``/``ns-render`` with the ``--load-config`` of a certsdf run
    (nerfstudio writes runs to ``OUTPUT/EXPERIMENT/METHOD/TIMESTAMP/config.yml``)."""
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if not program.startswith("ns-"):
        return False
    if program.startswith("ns-train"):
        return len(argv) > 1 and argv[1] == "certsdf"
    config = _load_config(argv[1:])
    if config is None:
        return False
    parts = os.path.normpath(config).split(os.sep)
    return len(parts) >= 3 and parts[-3] == "certsdf"


def quiet_nerfstudio_imports(argv: Sequence[str]) -> None:
    """Called at interpreter start by ``certsdf_ns_startup.pth``: hide nerfstudio's import-time
    deprecation warnings when `argv` is an ``ns-*`` command on certsdf; otherwise do nothing."""
    if works_on_certsdf(argv):
        ignore_import_noise()
