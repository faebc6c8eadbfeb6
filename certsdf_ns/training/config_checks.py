"""Checks on the certsdf model configuration before anything is allocated.

Invalid numbers (σ ≤ 0, ε outside (0, ½), a grid too coarse to hold a surface) are
reported together in one message. A grid that would not fit in memory is refused with the
estimate and the largest resolution that fits, instead of swapping the machine to a halt.

Memory model (measured with peak RSS of real training steps on CPU, torch 2.14, fused Adam):
the occupancy grid costs 16–27 float32 copies of R³ beyond a fixed base (25 at R=128,
27 at R=192, 16.5 at R=256 and R=320: parameters, gradient, Adam's two moments, and the
sigmoid/smoothing/probit intermediates of forward and backward plus the regularisers).
The estimate uses 28 copies, above every measurement.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional

from certsdf_ns.certified import sigma_problems
from certsdf_ns.errors import CertSDFInputError

if TYPE_CHECKING:
    from certsdf_ns.method.model import CertSDFModelConfig

GRID_COPIES = 28
"""float32 copies of the R³ grid alive at the peak of a training step (calibrated, see module doc)."""
BASE_BYTES = 1.0e9
"""Python, torch, nerfstudio and per-batch ray buffers at the sizes certsdf uses."""
MIN_RESOLUTION = 8
"""Below this the grid cannot hold a closed surface with room for σ around it."""
FIT_MARGIN = 0.8
"""A suggested resolution keeps its estimate under this fraction of the available memory."""


def training_memory_bytes(cfg: "CertSDFModelConfig", resolution: Optional[int] = None) -> float:
    """Estimated peak memory of training certsdf with this config (grid + colour field + base)."""
    r = cfg.grid_resolution if resolution is None else resolution
    grid = GRID_COPIES * 4.0 * r**3
    if cfg.colour_encoding == "hash":
        # nerfstudio's torch hash grid allocates every level in full: parameters, gradient, 2 Adam moments.
        colour = cfg.hash_levels * 2.0**cfg.hash_log2_size * 2 * 4 * 4
    else:
        colour = cfg.dense_features * cfg.dense_resolution**3 * 4 * 5  # + grid_sample backward buffer
    return grid + colour + BASE_BYTES


def largest_fitting_resolution(cfg: "CertSDFModelConfig", available: float) -> int:
    """The largest multiple of 8 whose estimate stays under FIT_MARGIN of `available` (0 if none)."""
    best = 0
    r = MIN_RESOLUTION
    while training_memory_bytes(cfg, r) <= FIT_MARGIN * available:
        best, r = r, r + 8
    return best


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def model_config_problems(cfg: "CertSDFModelConfig") -> List[str]:
    """Every value of the model config that cannot work, as sentences naming the CLI flag."""
    problems = []
    flag = "--pipeline.model."
    for name in ("sigma_voxels", "sigma_start_voxels", "sharpness_voxels", "sharpness_start_voxels"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{flag}{name.replace('_', '-')} is {value}; it must be a positive number of voxels.")
    if cfg.grid_resolution < MIN_RESOLUTION:
        problems.append(
            f"{flag}grid-resolution is {cfg.grid_resolution}; it must be at least {MIN_RESOLUTION} nodes per axis."
        )
    start = cfg.grid_start_resolution
    if start != 0 and not MIN_RESOLUTION <= start < cfg.grid_resolution:
        problems.append(
            f"{flag}grid-start-resolution is {start}; it must be 0 (no growth) or between {MIN_RESOLUTION} and "
            f"grid-resolution − 1 ({cfg.grid_resolution - 1}): the grid only grows."
        )
    if cfg.grid_growth_step < 0:
        problems.append(f"{flag}grid-growth-step is {cfg.grid_growth_step}; it must be >= 0.")
    if not (math.isfinite(cfg.grid_crop_margin) and 0.0 <= cfg.grid_crop_margin <= 1.0):
        problems.append(
            f"{flag}grid-crop-margin is {cfg.grid_crop_margin}; it must lie in [0, 1] (a fraction of the scene box's longest side)."
        )
    if not 0.0 < cfg.eps < 0.5:
        problems.append(f"{flag}eps is {cfg.eps}; it must lie strictly between 0 and 0.5 (p̂ is clamped to [eps, 1-eps]).")
    if cfg.anneal_steps < 0:
        problems.append(f"{flag}anneal-steps is {cfg.anneal_steps}; it must be >= 0.")
    if not 0.0 < cfg.band_opacity < 0.5:
        problems.append(
            f"{flag}band-opacity is {cfg.band_opacity}; it must lie strictly between 0 and 0.5 (the opacity a "
            "skipped stretch of ray may hold)."
        )
    if cfg.trace_brick_voxels < 1 or cfg.trace_iterations < 0:
        problems.append(f"{flag}trace-brick-voxels must be >= 1 and trace-iterations >= 0.")
    return problems


def sigma_warnings(cfg: "CertSDFModelConfig") -> List[str]:
    """Legal but extreme σ: numerically fine, geometrically useless (the grid's own criteria,
    :func:`certsdf_ns.certified.sigma_problems`, in voxel units)."""
    extent = cfg.grid_resolution - 1  # the box spans R − 1 voxels per axis
    notes = []
    for name in ("sigma_start_voxels", "sigma_voxels"):
        value = getattr(cfg, name)
        notes += [f"--pipeline.model.{name.replace('_', '-')} (in voxels): {p}" for p in sigma_problems(value, 1.0, extent)]
    return notes


def check_model_config(cfg: "CertSDFModelConfig", available_bytes: Optional[float]) -> List[str]:
    """Raise CertSDFInputError listing every problem (memory included); return warnings."""
    problems = model_config_problems(cfg)
    if available_bytes is not None and cfg.grid_resolution >= MIN_RESOLUTION:
        need = training_memory_bytes(cfg)
        if need > available_bytes:
            fit = largest_fitting_resolution(cfg, available_bytes)
            r = cfg.grid_resolution
            advice = (
                f"Use --pipeline.model.grid-resolution {fit} or lower (estimate {_gb(training_memory_bytes(cfg, fit))})."
                if fit
                else "Even the smallest grid does not fit: reduce --pipeline.model.hash-log2-size or free memory."
            )
            problems.append(
                f"a {r}³ grid needs about {_gb(need)} to train ({GRID_COPIES} float32 copies of the grid for "
                f"parameters, gradient, Adam state and smoothing buffers = {_gb(GRID_COPIES * 4.0 * r**3)}, plus the "
                f"colour field and {_gb(BASE_BYTES)} base), but only {_gb(available_bytes)} is available. {advice}"
            )
    if problems:
        raise CertSDFInputError("invalid certsdf configuration: " + " ".join(problems))
    return sigma_warnings(cfg)
