"""Regularisers of the occupancy grid, with their gradient written out: one pass over the grid each way.

Autograd through ``(occ·(1 − occ)).mean()`` and ``Σ_axes (occ.diff(axis)²).mean()`` keeps a dozen
whole-grid temporaries and runs a backward kernel per operation; on a 192³ grid that was ~0.12 s of a
~1.4 s training step, and ~1.2 s of ~4 s on 256³ (docs/studies/plateau.md).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor


class _OccupancyRegularisers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, occ: Tensor, own: int, shape: Tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(occ)
        ctx.own, ctx.shape = own, shape
        mine = occ.narrow(0, 0, own)
        binary = (mine * (1.0 - mine)).sum() / math.prod(shape)
        tv = occ.diff(dim=0).pow_(2).sum() / _pairs(shape, 0)
        tv = tv + sum(mine.diff(dim=axis).pow_(2).sum() / _pairs(shape, axis) for axis in range(1, occ.dim()))
        return torch.stack([binary, tv])  # type: ignore[list-item]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (occ,) = ctx.saved_tensors
        own, shape = ctx.own, ctx.shape
        grad_binary, grad_tv = grad[0], grad[1]
        # d/docc Σ occ·(1 − occ) = 1 − 2·occ, on this slab's own rows
        scale = grad_binary / math.prod(shape)
        if own == occ.shape[0]:
            out = (1.0 - 2.0 * occ).mul_(scale)
        else:
            out = torch.zeros_like(occ)
            out.narrow(0, 0, own).copy_(occ.narrow(0, 0, own)).mul_(-2.0).add_(1.0).mul_(scale)
        for axis in range(occ.dim()):
            # d/docc Σ d², d_i = occ_{i+1} − occ_i: +2d_i at i + 1, −2d_i at i
            block = occ if axis == 0 else occ.narrow(0, 0, own)
            target = out if axis == 0 else out.narrow(0, 0, own)
            d = block.diff(dim=axis)
            d.mul_(2.0 * grad_tv / _pairs(shape, axis))
            n = block.shape[axis]
            target.narrow(axis, 1, n - 1).add_(d)
            target.narrow(axis, 0, n - 1).sub_(d)
        return out, None, None


def _pairs(shape: Tuple[int, ...], axis: int) -> int:
    """Neighbouring pairs along ``axis`` in a grid of ``shape``."""
    return math.prod(shape) // shape[axis] * (shape[axis] - 1)


def occupancy_regularisers(
    occ: Float[Tensor, "rows Y Z"], own: Optional[int] = None, shape: Optional[Tuple[int, int, int]] = None
) -> Tuple[Tensor, Tensor]:
    """(binarisation, total variation) of the occupancy grid: mean(occ·(1 − occ)), the mean squared
    difference of neighbouring nodes summed over the axes.

    With ``own`` and ``shape``, ``occ`` is a slab of x-rows of a grid of that ``shape``: its first
    ``own`` rows, and the next row (when there is one) for the differences across the slab's far
    face. The terms are then this slab's share of the whole grid's (same denominators), so the
    slabs' terms add up to the whole grid's."""
    own = occ.shape[0] if own is None else own
    binary, tv = _OccupancyRegularisers.apply(occ, own, tuple(occ.shape) if shape is None else tuple(shape))
    return binary, tv
