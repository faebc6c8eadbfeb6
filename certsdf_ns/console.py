"""certsdf's console messages, through nerfstudio's rich console: the one way the plugin talks."""

import warnings

from nerfstudio.utils.rich_utils import CONSOLE


def log(message: str) -> None:
    """Print ``[certsdf] message`` verbatim: with markup on, rich would read "[certsdf]" as a style
    tag and drop it, and brackets in paths or values would vanish the same way."""
    CONSOLE.print(f"[certsdf] {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``[certsdf] warning: message`` in yellow: something the user may want to act on."""
    CONSOLE.print(f"[certsdf] warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


def silence_known_noise() -> None:
    """Hide third-party warnings that say nothing a certsdf user can act on. Installed by the
    entry point (``certsdf_ns.method_config``), so it covers what nerfstudio prints after plugins
    load; real errors and every other warning stay visible.

    - tyro: "<class 'certsdf_ns…'> does not match any type in Union": certsdf's dataparser config
      is not one of nerfstudio's dataparser subcommands, by design (no subcommand is needed);
    - torch: "Using a non-tuple sequence for multidimensional indexing is deprecated", raised
      inside nerfstudio's Cameras on every rendered image;
    - torch's FutureWarnings for `torch.jit.script` and `torch.cuda.amp.custom_fwd/custom_bwd`,
      which nerfstudio's own modules use when its methods are imported. Under `ns-train` they come
      before any plugin loads; certsdf's own commands (certsdf-export, certsdf-bench) call this
      first, so they print nothing of it.
    """
    warnings.filterwarnings("ignore", message=r"<class 'certsdf_ns\..*'> does not match any type in Union")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.script` is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated")
