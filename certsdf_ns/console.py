"""certsdf's console messages, through nerfstudio's rich console: the one way the plugin talks."""

from nerfstudio.utils.rich_utils import CONSOLE


def log(message: str) -> None:
    """Print ``[certsdf] message`` verbatim: with markup on, rich would read "[certsdf]" as a style
    tag and drop it, and brackets in paths or values would vanish the same way."""
    CONSOLE.print(f"[certsdf] {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``[certsdf] warning: message`` in yellow: something the user may want to act on."""
    CONSOLE.print(f"[certsdf] warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")
