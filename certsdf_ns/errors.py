"""Bad input, and how it reaches the user: one paragraph on stderr, exit status 2, no traceback.

Raised by the data checks, the field (a checkpoint of the other colour backend) and the
trainer (config, memory, checkpoints); :func:`exit_cleanly` wraps the places where a
nerfstudio CLI enters certsdf code, because ns-train/ns-eval print a full traceback for any
exception. ``CERTSDF_DEBUG=1`` re-raises with the traceback instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape

ERROR_CONSOLE = Console(stderr=True, highlight=False)


class CertSDFInputError(ValueError):
    """Input that certsdf cannot use (data, config or checkpoint); the message says what to fix."""


@contextmanager
def exit_cleanly() -> Iterator[None]:
    """Report a :class:`CertSDFInputError` as one paragraph on stderr and exit with status 2.

    Used where nerfstudio's CLIs call into certsdf (dataparser, trainer, checkpoint loading),
    because ns-train/ns-eval print a full traceback for any exception.
    """
    try:
        yield
    except CertSDFInputError as err:
        if os.environ.get("CERTSDF_DEBUG", "0") not in ("", "0"):
            raise
        ERROR_CONSOLE.print(
            f"[bold red]certsdf error:[/bold red] {escape(str(err))} (CERTSDF_DEBUG=1 shows the traceback.)",
            soft_wrap=True,
        )
        raise SystemExit(2) from None
