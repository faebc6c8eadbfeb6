"""Regularisers of the occupancy grid, with their gradient written out: one pass over the grid each way.

Autograd through ``(occ·(1 − occ)).mean()`` and ``Σ_axes (occ.diff(axis)²).mean()`` keeps a dozen
whole-grid temporaries and runs a backward kernel per operation; on a 192³ grid that was ~0.12 s of a
~1.4 s training step, and ~1.2 s of ~4 s on 256³ (docs/studies/plateau.md).
"""

from __future__ import annotations

from typing import Tuple

import torch
from jaxtyping import Float
from torch import Tensor


class _OccupancyRegularisers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, occ: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(occ)
        binary = (occ * (1.0 - occ)).mean()
        tv = sum(occ.diff(dim=axis).pow_(2).mean() for axis in range(occ.dim()))
        return torch.stack([binary, tv])  # type: ignore[list-item]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (occ,) = ctx.saved_tensors
        grad_binary, grad_tv = grad[0], grad[1]
        # d/docc mean(occ·(1 − occ)) = (1 − 2·occ)/N
        out = (1.0 - 2.0 * occ).mul_(grad_binary / occ.numel())
        for axis in range(occ.dim()):
            # d/docc mean(d²), d_i = occ_{i+1} − occ_i: +2d_i/M at i + 1, −2d_i/M at i
            d = occ.diff(dim=axis)
            d.mul_(2.0 * grad_tv / d.numel())
            n = occ.shape[axis]
            out.narrow(axis, 1, n - 1).add_(d)
            out.narrow(axis, 0, n - 1).sub_(d)
        return out


def occupancy_regularisers(occ: Float[Tensor, "X Y Z"]) -> Tuple[Tensor, Tensor]:
    """(binarisation, total variation) of the occupancy grid: mean(occ·(1 − occ)), the mean squared
    difference of neighbouring nodes summed over the axes."""
    binary, tv = _OccupancyRegularisers.apply(occ)
    return binary, tv
