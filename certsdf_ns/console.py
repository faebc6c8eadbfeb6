"""certsdf's console messages, through nerfstudio's rich console: the one way the plugin talks."""

import builtins
import re
import warnings
from typing import Optional, Tuple

from nerfstudio.utils.rich_utils import CONSOLE


def log(message: str) -> None:
    """Print ``[certsdf] message`` verbatim: with markup on, rich would read "[certsdf]" as a style
    tag and drop it, and brackets in paths or values would vanish the same way."""
    CONSOLE.print(f"[certsdf] {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``[certsdf] warning: message`` in yellow: something the user may want to act on."""
    CONSOLE.print(f"[certsdf] warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


# nerfstudio's own deprecation warnings at import: (message's start, category, module the warning is
# attributed to). Literal texts, so that the same entries serve `warnings.filterwarnings` here and a
# child process's PYTHONWARNINGS (whose fields Python reads literally).
NERFSTUDIO_IMPORT_NOISE: Tuple[Tuple[str, str, str], ...] = (
    # nerfstudio's `@torch.jit.script` functions (cameras, utils); torch names itself as the source.
    ("`torch.jit.script` is deprecated", "FutureWarning", "torch.jit._script"),
    # nerfstudio.field_components.activations' `@custom_fwd` / `@custom_bwd`.
    ("`torch.cuda.amp.custom_fwd(args...)` is deprecated", "FutureWarning", "nerfstudio.field_components.activations"),
    ("`torch.cuda.amp.custom_bwd(args...)` is deprecated", "FutureWarning", "nerfstudio.field_components.activations"),
)


def silence_known_noise() -> None:
    """Hide third-party warnings that say nothing a certsdf user can act on, each by its message and
    the module it comes from. Installed by the entry point (``certsdf_ns.method_config``), so it
    covers what nerfstudio prints after plugins load; real errors and every other warning stay
    visible.

    - tyro: "<class 'certsdf_ns…'> does not match any type in Union": certsdf's dataparser config
      is not one of nerfstudio's dataparser subcommands, by design (no subcommand is needed);
    - torch: "Using a non-tuple sequence for multidimensional indexing is deprecated", raised
      inside nerfstudio's Cameras on every rendered image;
    - torch's FutureWarning for `torch.cuda.amp.GradScaler`, which nerfstudio's Trainer creates
      (disabled on CPU);
    - :data:`NERFSTUDIO_IMPORT_NOISE`, torch's FutureWarnings for the deprecated APIs nerfstudio's
      modules use when they are imported. Under `ns-train` they come before any plugin loads;
      certsdf's own commands (certsdf-export, certsdf-bench) call this first, and certsdf-demo
      gives its `ns-train` the same filters (:func:`python_warnings_env`), so they print nothing of it.
    """
    warnings.filterwarnings("ignore", message=r"<class 'certsdf_ns\..*'> does not match any type in Union")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing is deprecated")
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
        category=FutureWarning,
        module=r"nerfstudio\.engine\.trainer\Z",
    )
    for message, category, module in NERFSTUDIO_IMPORT_NOISE:
        warnings.filterwarnings("ignore", re.escape(message), getattr(builtins, category), re.escape(module) + r"\Z")


def python_warnings_env(current: Optional[str]) -> str:
    """PYTHONWARNINGS for a child `ns-train`: `current` (the user's, kept) followed by filters that
    hide :data:`NERFSTUDIO_IMPORT_NOISE`, which nerfstudio prints before certsdf's plugin loads.
    Later entries take precedence, so these hide only their own three messages."""
    ours = [f"ignore:{message}:{category}:{module}" for message, category, module in NERFSTUDIO_IMPORT_NOISE]
    return ",".join(([current] if current else []) + ours)
