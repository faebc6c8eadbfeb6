"""Render outputs that show the certified SDF itself, for the viewer's output dropdown.

Colour convention (here and in the viewer's slices): matplotlib's diverging ``RdBu``, white at
sdf = 0, dark red at sdf = −scale (inside), dark blue at sdf = +scale (outside), clipped
beyond. With scale = σ·Φ⁻¹(1 − ε), the largest |sdf| the certificate can give, saturated blue
reads "certified to be at least this far from the surface".
"""

from __future__ import annotations

import functools
from typing import Dict

import matplotlib
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


@functools.lru_cache(maxsize=None)
def _rdbu_lut() -> Tensor:
    """The 256-entry RdBu table (matplotlib is already a nerfstudio dependency)."""
    cmap = matplotlib.colormaps["RdBu"]
    return torch.tensor(cmap(np.linspace(0.0, 1.0, 256))[:, :3], dtype=torch.float32)


def diverging_colours(values: Float[Tensor, "*bs"], scale: float) -> Float[Tensor, "*bs 3"]:
    """RdBu colours in [0, 1]: −scale → dark red, 0 → white, +scale → dark blue (clipped)."""
    t = (values.float() / max(float(scale), 1e-12)).clamp(-1.0, 1.0) * 0.5 + 0.5
    lut = _rdbu_lut().to(values.device)
    return lut[(t * 255.0).round().long()]


def ray_sdf_outputs(
    sdf_samples: Float[Tensor, "*rays samples 1"], max_distance: float, band: float
) -> Dict[str, Tensor]:
    """Viewer outputs from the certified SDF at a ray's samples.

    ``ray_min_sdf`` is min_t sdf(r(t)) over the ray's samples inside the box, in world units:
    for a ray that misses the surface it is a certified lower bound on how close the ray
    passes to it (≥ 0); for a ray that enters the object it is minus how deep it gets
    (capped at the certificate's range). Because sdf is 1-Lipschitz, the sample minimum is
    within half a sample spacing of the true minimum.

    ``ray_min_sdf_rgb`` is the same value pre-coloured (RdBu over ±max_distance), with rays
    whose |min| < ``band`` painted black: an outline of the certified zero level in the
    image. It is an RGB output, so nerfstudio's viewer shows it as is, independent of the
    colormap / normalise settings that would otherwise rescale it per frame.
    """
    ray_min = sdf_samples.amin(dim=-2)
    rgb = diverging_colours(ray_min[..., 0], max_distance)
    rgb = torch.where(ray_min.abs() < band, torch.zeros_like(rgb), rgb)
    return {"ray_min_sdf": ray_min, "ray_min_sdf_rgb": rgb}
