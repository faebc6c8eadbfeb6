"""What nerfstudio 1.1.5's peers need to be built and reloaded here: no internet, torch ≥ 2.6.

nerfstudio's models build `torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity` in
`populate_modules`; torchmetrics then fetches AlexNet weights from the internet and, offline,
the model cannot even be constructed. The benchmarks never use LPIPS, so before any model is
built we replace the class with :class:`LpipsStub`, which returns NaN: a missing measurement
must not look like a perfect (0) or a real score.

Their checkpoints also hold numpy float64 learning rates (nerfstudio's exponential-decay
scheduler computes them with numpy), which torch ≥ 2.6's default `torch.load(weights_only=True)`
refuses, so `eval_setup` (ns-eval, ns-export, our evaluator) cannot reload a nerfacto or tensorf
checkpoint. :func:`allow_numpy_scalars_in_checkpoints` allow-lists exactly those numpy types
rather than turning the safe loader off.
"""

from __future__ import annotations

import torch
from torch import nn

CHECKPOINT_NOTE = "numpy scalar/dtype allow-listed for torch.load(weights_only=True): peer checkpoints store numpy float64 learning rates"
LPIPS_NOTE = "LPIPS disabled offline: torchmetrics' LPIPS is replaced by a stub returning NaN (AlexNet weights cannot be downloaded)"


class LpipsStub(nn.Module):
    """Drop-in for LearnedPerceptualImagePatchSimilarity that loads nothing and returns NaN."""

    is_certsdf_bench_stub = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


def install_lpips_stub(announce: bool = True) -> None:
    """Patch torchmetrics so that every later `from torchmetrics.image.lpip import
    LearnedPerceptualImagePatchSimilarity` (nerfstudio imports it inside populate_modules)
    gets the stub. Idempotent."""
    import torchmetrics.image
    import torchmetrics.image.lpip as lpip

    if getattr(lpip.LearnedPerceptualImagePatchSimilarity, "is_certsdf_bench_stub", False):
        return
    lpip.LearnedPerceptualImagePatchSimilarity = LpipsStub  # type: ignore[misc]
    # `from torchmetrics.image import LearnedPerceptualImagePatchSimilarity` reads the package too.
    if hasattr(torchmetrics.image, "LearnedPerceptualImagePatchSimilarity"):
        torchmetrics.image.LearnedPerceptualImagePatchSimilarity = LpipsStub  # type: ignore[attr-defined]
    if announce:
        from nerfstudio.utils.rich_utils import CONSOLE

        CONSOLE.print(f"[yellow][certsdf-bench] {LPIPS_NOTE}.")


def allow_numpy_scalars_in_checkpoints() -> None:
    """Allow-list numpy scalars (and their dtypes) for torch's weights-only unpickler."""
    import numpy as np
    import torch.serialization

    try:  # the name numpy 1.x pickles scalars under (the pinned numpy is < 2)
        from numpy.core.multiarray import scalar
    except ImportError:  # numpy 2 moved it
        from numpy._core.multiarray import scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    torch.serialization.add_safe_globals([scalar, np.dtype, *dtypes])


def prepare_offline_peers(announce: bool = True) -> None:
    """Everything a peer needs before nerfstudio builds or reloads it (see the module docstring)."""
    install_lpips_stub(announce)
    allow_numpy_scalars_in_checkpoints()
