"""certsdf's console messages, through nerfstudio's rich console: the one way the plugin talks."""

import warnings

from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.startup import ignore_import_noise


def log(message: str) -> None:
    """Print ``[certsdf] message`` verbatim: with markup on, rich would read "[certsdf]" as a style
    tag and drop it, and brackets in paths or values would vanish the same way."""
    CONSOLE.print(f"[certsdf] {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``[certsdf] warning: message`` in yellow: something the user may want to act on."""
    CONSOLE.print(f"[certsdf] warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


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
    - :data:`~certsdf_ns.startup.NERFSTUDIO_IMPORT_NOISE`, torch's FutureWarnings for the deprecated
      APIs nerfstudio's modules use when they are imported. Under `ns-*` commands they come before
      any plugin loads and the package's start-up hook hides them (:mod:`certsdf_ns.startup`);
      certsdf's own commands (certsdf-export, certsdf-bench, certsdf-demo) call this first.
    """
    warnings.filterwarnings("ignore", message=r"<class 'certsdf_ns\..*'> does not match any type in Union")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing is deprecated")
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
        category=FutureWarning,
        module=r"nerfstudio\.engine\.trainer\Z",
    )
    ignore_import_noise()

