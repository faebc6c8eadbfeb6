"""The background of a real capture: what a ray meets after it leaves the object's region.

A photograph's background (the room, the table beyond the object, the sky) reaches to
infinity, and the certified grid covers only the object's region (a ball, see
:mod:`certsdf_ns.data.region`). Without a model of the rest, the photometric loss paints the
room onto the region's walls, and the certified SDF's zero set becomes a box around the
scene. So outside the region certsdf renders a separate radiance field, NeRF++ / NeuS style:

- samples from where the ray leaves the region (or, for a ray that misses it, from its closest
  approach) to a far plane, spaced linearly in disparity (nerfstudio's `LinearDisparitySampler`,
  as nerfstudio's NeuS-facto samples its background);
- positions measured in region radii and contracted into a ball of radius 2 (nerfstudio's
  `SceneContraction`, L2: the region's ball maps to itself, infinity to the sphere of radius 2);
- a field on the contracted space: nerfstudio's `NerfactoField` (`background-model nerfacto`,
  NeuS-facto's choice, fast with tinycudann) or a dense feature volume read by trilinear
  interpolation plus a small colour MLP (`background-model grid`). On CPU the dense volume costs
  ~0.13 s per training step for 4096 rays × 16 samples, forward and backward, against ~1.3 s for
  the torch `NerfactoField` (`scripts/studies/background_field_cost.py`).

The background is composited behind the foreground: rgb = rgb_fg + (1 − acc_fg)·rgb_bg. It
never enters the certified SDF, the mesh export or the viewer's SDF views, and the foreground's
accumulation alone is what masks supervise.
"""

from __future__ import annotations

from typing import Literal, Tuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from nerfstudio.cameras.rays import RaySamples
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.encodings import SHEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.field_components.spatial_distortions import SceneContraction
from nerfstudio.fields.nerfacto_field import NerfactoField

from certsdf_ns.certified import sample_grid

BackgroundKind = Literal["grid", "nerfacto"]
CONTRACTED_BOX = ((-2.0, -2.0, -2.0), (2.0, 2.0, 2.0))
"""SceneContraction maps all of space into the ball of radius 2, so into this box."""


class RegionContraction(SceneContraction):
    """nerfstudio's L2 scene contraction of positions measured from the region's centre in region
    radii: the region's ball is left as it is, everything beyond is drawn into the shell 1 ≤ |x| < 2."""

    def __init__(self, centre: Float[Tensor, "3"], radius: float) -> None:
        super().__init__(order=2)
        self.register_buffer("centre", centre.detach().clone().float(), persistent=False)
        self.radius = float(radius)

    def forward(self, positions):  # type: ignore[override]
        return super().forward((positions - self.centre) / self.radius)


class GridBackgroundField(nn.Module):
    """Density and colour on the contracted space from a dense [C, R, R, R] feature volume.

    Channel 0 is the density's pre-activation (trunc_exp, as nerfacto); the others go through a small
    MLP to the colour. One trilinear lookup per sample (`certified.sample_grid`), so the cost is that
    of a grid_sample, not of a hash grid.

    With ``view_dependent`` the view direction's spherical harmonics join the features. Every ray
    through the object also meets the background behind it, so a direction-dependent background could
    paint the object there, differently for each view; on DTU without masks a view-independent one did
    not keep more of the object, so the default is view-dependent (README, "Real captures").
    """

    def __init__(
        self, contraction: RegionContraction, resolution: int, features: int, hidden_dim: int, view_dependent: bool = True
    ) -> None:
        super().__init__()
        self.contraction = contraction
        self.register_buffer("box", torch.tensor(CONTRACTED_BOX), persistent=False)
        self.volume = nn.Parameter(1e-2 * torch.randn(features + 1, resolution, resolution, resolution))
        self.direction_encoding = SHEncoding(levels=4, implementation="torch") if view_dependent else None
        self.colour_mlp = MLP(
            in_dim=features + (self.direction_encoding.get_out_dim() if view_dependent else 0),
            num_layers=2,
            layer_width=hidden_dim,
            out_dim=3,
            activation=nn.ReLU(),
            out_activation=nn.Sigmoid(),
            implementation="torch",
        )

    def forward(self, ray_samples: RaySamples) -> Tuple[Float[Tensor, "*bs 1"], Float[Tensor, "*bs 3"]]:
        positions = ray_samples.frustums.get_positions()
        shape = positions.shape[:-1]
        values = sample_grid(self.volume, self.contraction(positions.reshape(-1, 3)), self.box)
        density = trunc_exp(values[:, :1] - 1.0)  # starts thin (e^-1), as nerfacto's density bias
        features = values[:, 1:]
        if self.direction_encoding is not None:
            dirs = self.direction_encoding((ray_samples.frustums.directions.reshape(-1, 3) + 1.0) / 2.0)
            features = torch.cat([features, dirs], dim=-1)
        rgb = self.colour_mlp(features)
        return density.reshape(*shape, 1), rgb.reshape(*shape, 3)


class NerfactoBackgroundField(nn.Module):
    """nerfstudio's NerfactoField on the region's contraction (NeuS-facto's background), with the
    average appearance embedding outside training."""

    def __init__(self, contraction: RegionContraction, num_images: int, implementation: Literal["tcnn", "torch"]) -> None:
        super().__init__()
        self.field = NerfactoField(
            torch.tensor(CONTRACTED_BOX),
            num_images=num_images,
            spatial_distortion=contraction,
            use_average_appearance_embedding=True,
            implementation=implementation,
        )

    def forward(self, ray_samples: RaySamples) -> Tuple[Float[Tensor, "*bs 1"], Float[Tensor, "*bs 3"]]:
        outputs = self.field(ray_samples)
        return outputs[FieldHeadNames.DENSITY], outputs[FieldHeadNames.RGB]


def build_background_field(
    kind: BackgroundKind,
    centre: Float[Tensor, "3"],
    radius: float,
    num_images: int,
    grid_resolution: int,
    grid_features: int,
    hidden_dim: int,
    implementation: Literal["tcnn", "torch"],
    view_dependent: bool = True,
) -> nn.Module:
    contraction = RegionContraction(centre, radius)
    if kind == "nerfacto":
        return NerfactoBackgroundField(contraction, num_images, implementation)
    return GridBackgroundField(contraction, grid_resolution, grid_features, hidden_dim, view_dependent)


def background_start(
    origins: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"], centre: Float[Tensor, "3"], radius: float, min_t: float
) -> Float[Tensor, "N 1"]:
    """Where each ray's background begins: where it leaves the ball (centre, radius), or, for a ray
    that misses the ball, its closest approach to the centre (never before ``min_t``)."""
    d2 = (directions * directions).sum(-1, keepdim=True)
    offset = origins - centre
    closest = -(offset * directions).sum(-1, keepdim=True) / d2
    discriminant = closest**2 - ((offset * offset).sum(-1, keepdim=True) - radius**2) / d2
    leaves = closest + torch.sqrt(discriminant.clamp_min(0.0))
    return torch.where(discriminant > 0, leaves, closest).clamp_min(min_t)
