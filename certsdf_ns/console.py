"""certsdf's console messages, through nerfstudio's rich console."""

from nerfstudio.utils.rich_utils import CONSOLE


def log(message: str) -> None:
    """Print ``[certsdf] message`` verbatim: with markup on, rich would read "[certsdf]" as a style
    tag and drop it, and brackets in paths or values would vanish the same way."""
    CONSOLE.print(f"[certsdf] {message}", markup=False, highlight=False)
