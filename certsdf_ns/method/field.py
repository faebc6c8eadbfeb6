"""The certsdf field: what is at a point (certified SDF, density, colour).

Geometry is :class:`certsdf_ns.certified.CertifiedSDFGrid`; colour is an Instant-NGP-style
field (multiresolution hash grid + small MLP on the view direction) built from nerfstudio's
field components. How rays become pixels lives in :mod:`certsdf_ns.method.model`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from nerfstudio.cameras.rays import RaySamples
from nerfstudio.field_components.encodings import HashEncoding, SHEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.fields.base_field import Field
from nerfstudio.utils.external import TCNN_EXISTS

from certsdf_ns.certified import CertifiedSDFGrid, sdf_to_density, sample_grid
from certsdf_ns.console import log
from certsdf_ns.errors import CertSDFInputError, exit_cleanly
from certsdf_ns.method.checkpoint_fit import backend_message

Backend = Literal["tcnn", "torch"]
_BACKEND_LOGGED = False


def pick_backend(requested: Literal["auto", "tcnn", "torch"] = "auto") -> Backend:
    """tinycudann when it is importable and CUDA is present, torch otherwise; logged once."""
    global _BACKEND_LOGGED
    if requested != "auto":
        return requested
    has_tcnn = torch.cuda.is_available() and importlib.util.find_spec("tinycudann") is not None
    backend: Backend = "tcnn" if has_tcnn else "torch"
    if not _BACKEND_LOGGED:
        why = "tinycudann + CUDA found" if has_tcnn else "no tinycudann/CUDA: pure-torch hash grid"
        log(f"colour field backend: {backend} ({why})")
        _BACKEND_LOGGED = True
    return backend


class DenseFeatureGrid(nn.Module):
    """A dense [C, R, R, R] feature volume read with trilinear interpolation.

    At 128³ on CPU this gives more PSNR per second than the torch hash grid (no hashing,
    one fused grid_sample), at the cost of memory that grows with R³.
    """

    def __init__(self, aabb: Tensor, resolution: int, features: int) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb.clone())
        self.features = nn.Parameter(1e-2 * torch.randn(features, resolution, resolution, resolution))

    def get_out_dim(self) -> int:
        return self.features.shape[0]

    def forward(self, x: Float[Tensor, "N 3"]) -> Float[Tensor, "N C"]:
        return sample_grid(self.features, x, self.aabb, padding="border")


class OneGatherHashEncoding(HashEncoding):
    """nerfstudio's :class:`HashEncoding`, whose torch path reads the 8 corners of each cell in *one*
    indexing op instead of eight.

    The values and the parameter layout are nerfstudio's (checkpoints of either load into the other).
    The cost is in the backward: every indexing op of a table gets its own dense zero-filled gradient
    of the full table (16 levels × 2¹⁹ rows × 2 features), and autograd then adds the eight together;
    on CPU that was ~0.25 s of a ~1.4 s training step (lego, 4096 rays). With tinycudann the fused
    kernel runs and this path is unused.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Corner c takes the ceiling along axis a where bit a of c is set.
        bits = [[(c >> a) & 1 for a in range(3)] for c in range(8)]
        self.register_buffer("_ceil_corner", torch.tensor(bits, dtype=torch.bool)[:, None, :], persistent=False)

    def pytorch_fwd(self, in_tensor: Float[Tensor, "*bs input_dim"]) -> Float[Tensor, "*bs output_dim"]:
        scaled = in_tensor[..., None, :] * self.scalings.view(-1, 1).to(in_tensor.device)  # [..., L, 3]
        lower = torch.floor(scaled)
        offset = scaled - lower  # [..., L, 3]
        corner = self._ceil_corner  # [8, 1, 3]
        vertices = torch.where(corner, torch.ceil(scaled)[..., None, :, :], lower[..., None, :, :])  # [..., 8, L, 3]
        rows = self.hash_fn(vertices.type(torch.int32))  # [..., 8, L]
        weights = torch.where(corner, offset[..., None, :, :], 1.0 - offset[..., None, :, :]).prod(-1, keepdim=True)
        # index_select, not hash_table[rows]: the backward of N-d advanced indexing accumulates with
        # threads in arbitrary order on CPU (a run is then not reproducible bit for bit, and resume
        # not bit-exact); index_select's backward (index_add) is ordered, and as fast.
        corners = torch.index_select(self.hash_table, 0, rows.reshape(-1)).reshape(*rows.shape, -1)
        features = (corners * weights).sum(dim=-3)  # [..., L, F]
        return torch.flatten(features, start_dim=-2, end_dim=-1)


@dataclass
class CertSDFFieldConfig:
    """What is at a point: the certified geometry and the colour field. The model's config
    inherits these fields (so they are `--pipeline.model.*` options) and hands itself to the
    field: the defaults written here are the only ones."""

    grid_resolution: int = 192
    """Occupancy grid nodes per axis over the scene box (at the end of training)."""
    grid_start_resolution: int = 0
    """Grid nodes per axis at the start of training, grown to grid_resolution at grid_growth_step; 0: grid_resolution throughout."""
    eps: float = 1e-5
    """p̂ is clamped to [eps, 1−eps]: the SDF is bounded by ±σ·Φ⁻¹(1−eps)."""
    density_scale: float = 30.0
    """The paper's density map: density = −density_scale·ln(1 + density_eps − G)."""
    density_eps: float = 1e-6
    """ε inside the density logarithm (caps the density inside at density_scale·ln(1/ε))."""
    init_logit: float = -2.0
    """Initial occupancy logit of every voxel (sigmoid(−2) ≈ 0.12: almost empty, but visible to gradients)."""
    init_ball: float = 0.3
    """Real captures: the occupancy starts as a ball of this fraction of the region's radius; 0: a uniform start."""
    # "colour" is this project's spelling; "color" appears only in names nerfstudio gives
    # (background_color, as in every nerfstudio method). Renaming either would break saved
    # configs and the commands in users' scripts.
    colour_encoding: Literal["hash", "dense"] = "hash"
    """Colour features: Instant-NGP hash grid, or a dense feature volume (faster on CPU at 128³)."""
    hash_levels: int = 16
    """Hash grid levels."""
    hash_max_res: int = 1024
    """Finest hash grid resolution (cells per axis)."""
    hash_log2_size: int = 19
    """log2 of the hash table size per level."""
    dense_resolution: int = 128
    """Nodes per axis of the dense colour feature volume (colour_encoding 'dense')."""
    dense_features: int = 8
    """Channels of the dense colour feature volume."""
    hidden_dim_colour: int = 64
    """Width of the colour MLP (neurons per hidden layer)."""
    backend: Literal["auto", "tcnn", "torch"] = "auto"
    """Hash grid / MLP implementation; 'auto': tinycudann on CUDA when importable, else torch (saved as resolved)."""


class CertSDFField(Field):
    """Certified-SDF geometry plus an Instant-NGP colour field.

    Args:
        aabb: scene box [2, 3].
        config: the field's settings (the model passes its own config, which extends them).
        sigma_voxels / sharpness_voxels: the smoothing σ and the density sharpness s to start with,
            in voxels; the model's schedule moves them through :meth:`set_smoothing_voxels`.
        resolution: grid nodes per axis to start with (the model's coarse-to-fine schedule grows it
            with :meth:`regrid`); None: the config's grid_resolution.
        region: (centre, radius) of the object's region on a real capture: the occupancy is zero
            outside that ball (`CertifiedSDFGrid`'s support), so nothing outside it is the object.
    """

    def __init__(
        self,
        aabb: Float[Tensor, "2 3"],
        config: CertSDFFieldConfig,
        sigma_voxels: float,
        sharpness_voxels: float,
        region: Optional[Tuple[Float[Tensor, "3"], float]] = None,
        resolution: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb.clone().float())
        resolution = config.grid_resolution if resolution is None else int(resolution)
        self.voxel = self.cell_edge(resolution)
        """Edge of a grid cell (world units): the unit of σ and s at every boundary (config, viewer, logs)."""
        self.geometry = CertifiedSDFGrid(
            resolution,
            aabb,
            sigma=sigma_voxels * self.voxel,
            eps=config.eps,
            init_logit=config.init_logit,
            support_sphere=None if region is None else (region[0].tolist(), float(region[1])),
        )
        if region is not None and config.init_ball > 0:
            with torch.no_grad():
                ball = (self.geometry.grid_points() - region[0]).norm(dim=-1) <= config.init_ball * float(region[1])
                self.geometry.logits.copy_(torch.where(ball, -config.init_logit, config.init_logit))
        self.sharpness = sharpness_voxels * self.voxel
        self.density_scale = float(config.density_scale)
        self.density_eps = float(config.density_eps)
        # nerfstudio silently builds torch modules when "tcnn" is asked for without tinycudann:
        # record what is really built, since that decides the parameter layout.
        requested = pick_backend(config.backend)
        self.backend: Backend = "tcnn" if requested == "tcnn" and TCNN_EXISTS else "torch"
        self.colour_encoding_kind = config.colour_encoding
        if config.colour_encoding == "hash":
            self.position_encoding: nn.Module = OneGatherHashEncoding(
                num_levels=config.hash_levels,
                min_res=16,
                max_res=config.hash_max_res,
                log2_hashmap_size=config.hash_log2_size,
                features_per_level=2,
                implementation=self.backend,
            )
        else:
            self.position_encoding = DenseFeatureGrid(self.aabb, config.dense_resolution, config.dense_features)
        self.direction_encoding = SHEncoding(levels=4, implementation=self.backend)
        self.colour_mlp = MLP(
            in_dim=self.position_encoding.get_out_dim() + self.direction_encoding.get_out_dim(),
            num_layers=2,
            layer_width=config.hidden_dim_colour,
            out_dim=3,
            activation=nn.ReLU(),
            out_activation=nn.Sigmoid(),
            implementation=self.backend,
        )

    def cell_edge(self, resolution: int) -> float:
        """Edge of a grid cell (world units) with `resolution` nodes per axis over the box (the shortest axis's)."""
        return float(((self.aabb[1] - self.aabb[0]) / (int(resolution) - 1)).min())

    # -- smoothing: the one place σ and s are written, and converted from voxels ----------
    def set_smoothing_voxels(self, sigma_voxels: float, sharpness_voxels: float) -> None:
        """Set σ (re-smooths the grid when it changes) and s, both given in voxels."""
        self.geometry.sigma = sigma_voxels * self.voxel
        self.sharpness = sharpness_voxels * self.voxel

    def smoothing_voxels(self) -> Tuple[float, float]:
        """The current (σ, s) in voxels."""
        return self.geometry.sigma / self.voxel, self.sharpness / self.voxel

    def regrid(self, resolution: Union[int, Sequence[int]], aabb: Optional[Tensor] = None) -> None:
        """Resample the geometry onto `resolution` nodes per axis over `aabb` (default: the grid's box; see
        CertifiedSDFGrid.regrid). σ and s keep their values *in voxels*, so in world units they follow
        the new voxel. The colour field keeps the scene box."""
        sigma_voxels, sharpness_voxels = self.smoothing_voxels()
        self.geometry.regrid(resolution, aabb)
        self.voxel = float(self.geometry.voxel_size.min())
        self.set_smoothing_voxels(sigma_voxels, sharpness_voxels)

    # -- checkpoint guard ----------------------------------------------------------
    def get_extra_state(self) -> Dict[str, str]:
        """Saved as `field._extra_state`: the backend that laid out the colour parameters."""
        return {"backend": self.backend}

    def set_extra_state(self, state: Dict[str, str]) -> None:
        """Refuse a checkpoint of the other backend: its colour parameters have other names and
        shapes, and nerfstudio's pipeline would retry with strict=False and keep random weights."""
        saved = state.get("backend") if isinstance(state, dict) else None
        if saved is not None and saved != self.backend:
            with exit_cleanly():
                raise CertSDFInputError(backend_message(saved, self.backend))

    # -- geometry ------------------------------------------------------------------
    def density_from_sdf(self, sdf: Tensor) -> Tensor:
        return sdf_to_density(sdf, self.sharpness, self.density_scale, self.density_eps)

    def sdf_at(self, x: Float[Tensor, "N 3"], sdf_grid: Optional[Tensor] = None) -> Float[Tensor, "N"]:
        return self.geometry.sdf(x, sdf_grid)

    def density_at(self, x: Float[Tensor, "*bs 3"], sdf_grid: Optional[Tensor] = None) -> Float[Tensor, "*bs 1"]:
        sdf = self.sdf_at(x.reshape(-1, 3), sdf_grid)
        return self.density_from_sdf(sdf).reshape(*x.shape[:-1], 1)

    def forward_geonetwork(self, x: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs 1"]:
        """What nerfstudio's SDF exporters call: SDF in column 0 (no autograd graph kept)."""
        with torch.no_grad():
            return self.sdf_at(x.reshape(-1, 3).to(self.aabb.device)).reshape(*x.shape[:-1], 1)

    # -- colour --------------------------------------------------------------------
    def colour_at(self, x: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        if self.colour_encoding_kind == "hash":
            unit = ((x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])).clamp(0.0, 1.0)
            features = self.position_encoding(unit)
        else:
            features = self.position_encoding(x)
        dirs = self.direction_encoding((directions + 1.0) / 2.0)
        return self.colour_mlp(torch.cat([features.float(), dirs.float()], dim=-1)).float()

    # -- nerfstudio Field interface -----------------------------------------------------
    def get_density(self, ray_samples: RaySamples) -> Tuple[Tensor, None]:
        return self.density_at(ray_samples.frustums.get_positions()), None

    def get_outputs(
        self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None
    ) -> Dict[FieldHeadNames, Tensor]:
        positions = ray_samples.frustums.get_positions()
        flat = positions.reshape(-1, 3)
        dirs = ray_samples.frustums.directions.reshape(-1, 3)
        rgb = self.colour_at(flat, dirs).reshape(*positions.shape[:-1], 3)
        return {FieldHeadNames.RGB: rgb, FieldHeadNames.NORMALS: self.geometry.normals(flat).reshape(positions.shape)}
