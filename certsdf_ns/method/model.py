"""The certsdf model: how rays become pixels, and what training optimises.

Sampling is explicit and cheap: the certified SDF lives on a voxel grid, so the density
along a ray costs one trilinear lookup per sample. The certified sampler first marches each
ray with steps the certificate proves safe to the band where density can matter
(`certsdf_ns.certified.band_interval`); a uniform pass over that interval gives coarse weights,
nerfstudio's PDF sampler concentrates samples where those weights are, and the colour network
runs only on samples whose rendering weight is not negligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.nn import Parameter
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.model_components.ray_samplers import LinearDisparitySampler, PDFSampler, UniformSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, NormalsRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import AABBBoxCollider, SphereCollider
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from nerfstudio.utils.colors import get_color

from certsdf_ns.certified import (
    TRILINEAR_LIPSCHITZ,
    annealed,
    band_brick_distance,
    band_distance,
    band_interval,
    row_slabs,
    sample_grid,
    unbiased_alphas,
)
from certsdf_ns.console import log
from certsdf_ns.data.validation import BACKGROUND_KEY, FOREGROUND_MASKS_KEY, MASK_BATCH_KEY, REAL_CAPTURE_KEY, REGION_KEY
from certsdf_ns.errors import CertSDFInputError, exit_cleanly
from certsdf_ns.method.background import background_start, build_background_field
from certsdf_ns.method.checkpoint_fit import fit_message, fit_problems
from certsdf_ns.method.crop import COLLECT_STEPS, SeenSurface, lattice_for_box
from certsdf_ns.method.field import CertSDFField, CertSDFFieldConfig
from certsdf_ns.method.grid_losses import occupancy_regularisers
from certsdf_ns.method.sdf_outputs import ray_sdf_outputs


REAL_FILL_ONLY_STEPS = 150
"""Steps during which the occluded-space prior only fills, without alpha or masks (docs/options.md)."""

REAL_FILL_DEPTH_RADII = 0.5
"""Reach of the occluded-space prior behind the first surface on a real capture (with or without masks), in region radii."""


@dataclass(frozen=True)
class SampleBudget:
    """Samples per ray for one render."""

    coarse: int
    """Uniform samples (density only)."""
    fine: int
    """PDF samples drawn from the coarse weights."""
    colour: int
    """At most this many samples per ray go through the colour network."""


# -- object masks (certsdf_ns.data.datamanager delivers them as batch[MASK_BATCH_KEY]) -------------
def foreground_target(batch: Dict[str, Tensor], image: Float[Tensor, "*bs C"]) -> Optional[Float[Tensor, "*bs 1"]]:
    """What the foreground's accumulation should be: the object mask when the data has one,
    else the alpha of RGBA images, else nothing (RGB only)."""
    if MASK_BATCH_KEY in batch:
        return batch[MASK_BATCH_KEY].to(image.device)
    return image[..., 3:4] if image.shape[-1] == 4 else None


def psnr_inside(pred: Float[Tensor, "H W 3"], gt: Float[Tensor, "H W 3"], mask: Float[Tensor, "H W 1"]) -> float:
    """PSNR over the pixels whose mask is above one half (the object); NaN for an empty mask."""
    inside = mask[..., 0] > 0.5
    if not inside.any():
        return float("nan")
    mse = ((pred[inside] - gt[inside]) ** 2).mean().clamp_min(1e-10)
    return float(-10.0 * torch.log10(mse))


@dataclass(frozen=True)
class GridShards:
    """How several training processes share the grid's whole-grid work (``ns-train --machine.num-devices N``).

    Process ``part`` of ``parts`` smooths the x-rows ``certified.row_slabs(X, parts)[part]`` of the grid
    and regularises them; ``gather`` hands every process the whole node SDF from every process's rows
    (a collective, differentiable: its backward sums each slab's gradient over the processes)."""

    part: int
    parts: int
    gather: Callable[[Tensor, List[Tuple[int, int]]], Tensor]


@dataclass
class CertSDFModelConfig(ModelConfig, CertSDFFieldConfig):
    """Configuration of the certified-SDF model: how rays become pixels, what training optimises,
    and (inherited from :class:`CertSDFFieldConfig`) what the field holds."""

    _target: Type = field(default_factory=lambda: CertSDFModel)
    enable_collider: bool = False
    """nerfstudio's near/far collider; off: the model clips rays to the scene box with its own AABB collider."""
    sigma_voxels: float = 2.0
    """Randomized-smoothing σ at the end of training, in voxels of the occupancy grid."""
    sigma_start_voxels: float = 2.0
    """σ at step 0; annealed log-linearly to `sigma_voxels` over `anneal_steps`."""
    sharpness_voxels: float = 0.25
    """Density sharpness s (G = sigmoid(−sdf/s)) at the end of training, in voxels."""
    sharpness_start_voxels: float = 0.25
    """s at step 0; annealed log-linearly to `sharpness_voxels` over `anneal_steps`."""
    anneal_steps: int = 1000
    """Length of the σ and s schedules, in steps."""
    grid_growth_step: int = 10_000
    """Step at which the grid grows from grid_start_resolution to grid_resolution, and is cropped with grid_crop (stretched like the anneal)."""
    grid_crop: bool = False
    """At grid_growth_step, shrink the grid's box to the surface the training rays met, keeping about grid_resolution³ nodes."""
    grid_crop_margin: float = 0.04
    """Margin kept around that surface when the grid is cropped, as a fraction of the scene box's longest side."""
    density_map: Literal["unbiased", "paper"] = "paper"
    """How the SDF becomes opacity: 'paper' (Pérez S. et al.'s density) or 'unbiased' (NeuS's, T = ½ on the zero set)."""
    unbiased_warmup_steps: Optional[int] = None
    """With density_map 'unbiased': steps on the paper map first, to form a surface. None: 20, or 100 with a background model."""
    unbiased_blend_steps: int = 20
    """Steps after the warm-up over which the opacity blends linearly from the paper map to the unbiased one."""
    anneal_start_step: int = 0
    """Step at which the σ/s anneal starts (set by the trainer: a budgeted run holds it through its warm-up)."""
    anneal_stretch: float = 1.0
    """The anneal lasts anneal_steps × this (set by the trainer: a budgeted run fits it to its planned length)."""
    sampler: Literal["certified", "uniform"] = "certified"
    """'certified': samples only where the certificate allows density; 'uniform': samples over the whole scene box."""
    band_opacity: float = 1e-3
    """τ of the certified sampler: the most opacity a skipped stretch of a ray can hold (a pixel moves by at most τ)."""
    trace_iterations: int = 24
    """Certified-sampler march steps per direction (a ray still marching then samples from where it stopped)."""
    trace_brick_voxels: int = 8
    """Brick edge (voxels) of the map that lets the march jump further than the SDF's clamp in empty space."""
    trace_min_step_voxels: float = 0.25
    """A march step shorter than this (voxels) means the band is that close: the ray's samples start there."""
    miss_samples: int = 16
    """Training only: uniform samples over the box on rays that miss the band, so missing geometry gets gradient."""
    num_coarse_samples: int = 64
    """Uniform samples per ray over its sampled interval (the band with the certified sampler, else the box)."""
    num_fine_samples: int = 32
    """PDF samples per ray, drawn from the coarse weights and merged with the coarse samples."""
    include_coarse_samples: bool = True
    """Render with the coarse samples merged into the PDF samples (more robust, twice the lookups)."""
    colour_weight_threshold: float = 1e-4
    """Samples whose rendering weight is at most this get no colour-network evaluation."""
    colour_samples_per_ray: int = 8
    """At most this many samples per ray (the heaviest) go through the colour network."""
    background_color: Literal["random", "white", "black"] = "random"
    """Training background; 'random' composites RGBA targets on random colours, so semi-transparent fog is not free."""
    eval_background_color: Literal["white", "black"] = "white"
    """Background for rendering and metrics outside training (NeRF-synthetic is evaluated on white)."""
    fill_loss_mult: float = 0.01
    """Weight of the occluded-space prior: occupancy is pulled towards 1 − T, which fills object interiors."""
    fill_carve_start_step: Optional[int] = None
    """Step from which the occluded-space prior also empties space before the first surface. None: 0, or 150 without alpha or masks."""
    fill_depth: Optional[float] = None
    """Reach of the occluded-space prior behind the first surface (region radii). None: unlimited on synthetic data, 0.5 on real captures."""
    fill_ray_fraction: float = 0.25
    """Fraction of the batch's rays on which the occluded-space prior is evaluated (0 to 1)."""
    binary_loss_mult: float = 1e-3
    """Weight of mean o·(1−o) over the grid: the smoothed classifier should smooth a classifier."""
    tv_loss_mult: float = 1e-4
    """Weight of total variation of the occupancy grid (suppresses isolated floaters)."""
    alpha_loss_mult: float = 0.1
    """Weight of the cross-entropy of each ray's accumulation against its alpha or object mask; 0 turns it off."""

    background_model: Literal["auto", "none", "grid", "nerfacto"] = "auto"
    """What renders the world outside the region. 'auto': none on synthetic scenes, else nerfacto with tinycudann, else grid."""
    num_background_samples: int = 16
    """Background samples per ray, linear in disparity from the region's exit to the far plane."""
    background_start_radii: float = 1.0
    """The background begins where a ray leaves the ball of this many region radii around the region's centre."""
    background_far_radii: float = 1000.0
    """Far plane of the background along each ray, in region radii."""
    background_grid_resolution: int = 96
    """background-model grid: nodes per axis of the feature volume over the contracted space."""
    background_grid_features: int = 8
    """background-model grid: colour feature channels (plus one for density)."""
    background_view_dependent: bool = True
    """background-model grid: colour depends on the view direction (spherical harmonics into the colour MLP)."""

    @property
    def sdf_field(self) -> bool:
        """Not a setting: `ns-export marching-cubes` only checks that this attribute exists. It
        then calls `field.forward_geonetwork(x)[:, 0]`, which is the certified SDF (positive outside)."""
        return True


class CertSDFModel(Model):
    """Volume rendering of a certified weak SDF (Pérez S. et al., arXiv 2408.13135)."""

    config: CertSDFModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        cfg = self.config
        self._step: Optional[int] = None  # None: no schedule ran yet (a model built outside training)
        self._smoothing_override: Tuple[Optional[float], Optional[float]] = (None, None)  # voxels
        self._budget_hook: Optional[Callable[[SampleBudget], SampleBudget]] = None
        self._shards: Optional[GridShards] = None
        self._optimizers: Optional[Optimizers] = None  # the trainer's, once training callbacks are asked for
        self.grown_at: Optional[int] = None
        """The step at which this process grew the grid (coarse-to-fine schedule), if it did."""
        self._grows = cfg.grid_start_resolution > 0 and cfg.grid_start_resolution != cfg.grid_resolution
        self._crops = bool(cfg.grid_crop)
        if (self._grows or self._crops) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DistributedDataParallel sizes its gradient buckets once, at wrap time.
            log("a run of several processes trains the grid at its final resolution over the scene box (no growth, no crop).")
            self._grows = self._crops = False
        self._seen = SeenSurface()
        metadata = self.kwargs.get("metadata", {})
        self.region = self._region(metadata)
        self.field = CertSDFField(
            self.scene_box.aabb.float(), cfg, cfg.sigma_start_voxels, cfg.sharpness_start_voxels, region=self.region,
            resolution=cfg.grid_start_resolution if self._grows else cfg.grid_resolution,
        )  # fmt: skip
        cfg.backend = self.field.backend  # record what was built in the saved config
        self.box_collider = AABBBoxCollider(self.scene_box)
        self.region_collider = None if self.region is None else SphereCollider(*self.region)
        self.uniform_sampler = UniformSampler(num_samples=cfg.num_coarse_samples)
        self.pdf_sampler = PDFSampler(num_samples=cfg.num_fine_samples, include_original=cfg.include_coarse_samples)
        self.renderer_rgb = RGBRenderer(background_color=cfg.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer(method="expected")
        self.renderer_normals = NormalsRenderer()
        self.eval_background = get_color(cfg.eval_background_color)
        fixed_background = metadata.get(BACKGROUND_KEY)
        self.background_field: Optional[torch.nn.Module] = None
        kind = self._background_kind(metadata)
        cfg.background_model = kind  # what was built, in the saved config (as the backend)
        if cfg.unbiased_warmup_steps is None:
            cfg.unbiased_warmup_steps = 20 if kind == "none" else 100
        # Alpha or object masks say where space is free; a real capture without them does not (resolved once,
        # into the saved config).
        alpha_or_masks = kind == "none" or bool(metadata.get(FOREGROUND_MASKS_KEY))
        if cfg.fill_carve_start_step is None:
            cfg.fill_carve_start_step = 0 if alpha_or_masks else REAL_FILL_ONLY_STEPS
        if cfg.fill_depth is None:
            cfg.fill_depth = math.inf if kind == "none" else REAL_FILL_DEPTH_RADII
        if kind != "none":
            assert self.region is not None
            self.background_field = build_background_field(
                kind, *self.region, self.num_train_data, cfg.background_grid_resolution,
                cfg.background_grid_features, cfg.hidden_dim_colour, self.field.backend, cfg.background_view_dependent,
            )  # fmt: skip
            self.background_sampler = LinearDisparitySampler(num_samples=cfg.num_background_samples)
            # The foreground is composited on black and the background behind it (get_outputs).
            black = torch.zeros(3)
            self.renderer_rgb = RGBRenderer(background_color=black)
            self.renderer_background = RGBRenderer(background_color=black)
            self.eval_background = black
        elif fixed_background is not None:
            # Images without alpha: random backgrounds would make the model paint the images'
            # background into geometry; train and evaluate on that background instead.
            self.renderer_rgb = RGBRenderer(background_color=fixed_background.float())
            self.eval_background = fixed_background.float()

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        self._lpips: Optional[torch.nn.Module] = None
        self._lpips_checked = False

    def _region(self, metadata: Dict) -> Optional[Tuple[Tensor, float]]:
        """(centre, radius) of the object's region: the dataparser's (real captures), else the ball
        inscribed in the scene box when a background model is asked for, else None (the whole box)."""
        region = metadata.get(REGION_KEY)
        if region is not None:
            return region[:3].float().clone(), float(region[3])
        if self.config.background_model in ("grid", "nerfacto"):
            aabb = self.scene_box.aabb.float()
            return aabb.mean(0), float((aabb[1] - aabb[0]).min()) / 2.0
        return None

    def _background_kind(self, metadata: Dict) -> Literal["none", "grid", "nerfacto"]:
        kind = self.config.background_model
        if kind != "auto":
            return kind
        if self.region is None or not metadata.get(REAL_CAPTURE_KEY):
            return "none"
        return "nerfacto" if self.field.backend == "tcnn" else "grid"

    @property
    def voxel(self) -> float:
        """Edge of a grid cell in world units (the field's unit for σ and s)."""
        return self.field.voxel

    # -- σ and s: the schedule, and an override that the schedule respects until reset ------
    def scheduled_smoothing(self, step: int) -> Tuple[float, float]:
        """(σ, s) in voxels that the schedule gives at ``step``: a pure function of the step, so a
        resumed run follows exactly the same schedule."""
        cfg = self.config
        plan = (cfg.anneal_steps, cfg.anneal_start_step, cfg.anneal_stretch)
        return (
            annealed(cfg.sigma_start_voxels, cfg.sigma_voxels, step, *plan),
            annealed(cfg.sharpness_start_voxels, cfg.sharpness_voxels, step, *plan),
        )

    def set_smoothing(self, sigma_voxels: Optional[float] = None, sharpness_voxels: Optional[float] = None) -> None:
        """Override σ and/or s (voxels; None keeps the current choice for that one). Training goes on
        with the override until :meth:`reset_smoothing`."""
        sigma, sharpness = self._smoothing_override
        self._smoothing_override = (
            sigma if sigma_voxels is None else float(sigma_voxels),
            sharpness if sharpness_voxels is None else float(sharpness_voxels),
        )
        self._apply_smoothing()

    def reset_smoothing(self) -> None:
        """Hand σ and s back to the schedule."""
        self._smoothing_override = (None, None)
        self._apply_smoothing()

    @property
    def smoothing_overridden(self) -> bool:
        return self._smoothing_override != (None, None)

    @property
    def smoothing_override(self) -> Tuple[Optional[float], Optional[float]]:
        """(σ, s) in voxels set by :meth:`set_smoothing`; None where the schedule decides."""
        return self._smoothing_override

    @property
    def step(self) -> Optional[int]:
        """The training step σ and s were last scheduled for (None before any schedule ran)."""
        return self._step

    def set_schedule_step(self, step: int) -> None:
        """Move σ and s to the schedule's values at ``step`` (overrides still win)."""
        self._step = int(step)
        self._apply_smoothing()

    def _apply_smoothing(self) -> None:
        scheduled = self.scheduled_smoothing(self._step or 0)
        sigma, sharpness = (s if o is None else o for o, s in zip(self._smoothing_override, scheduled))
        self.field.set_smoothing_voxels(sigma, sharpness)

    def regrid_step(self) -> int:
        """The step of the coarse-to-fine schedule's one regrid (growth and/or crop), stretched like the anneal."""
        cfg = self.config
        return cfg.anneal_start_step + round(cfg.grid_growth_step * cfg.anneal_stretch)

    def scheduled_resolution(self, step: int) -> int:
        """Grid nodes per axis the coarse-to-fine schedule gives at ``step`` before any crop (a pure function of the step)."""
        cfg = self.config
        if not self._grows:
            return cfg.grid_resolution
        return cfg.grid_resolution if step >= self.regrid_step() else cfg.grid_start_resolution

    def on_start_lattice(self) -> bool:
        """Whether the grid is still on the lattice training starts with (not yet grown or cropped)."""
        geometry, cfg = self.field.geometry, self.config
        start = cfg.grid_start_resolution if self._grows else cfg.grid_resolution
        return geometry.resolution == (start,) * 3 and torch.equal(geometry.aabb, self.scene_box.aabb.to(geometry.aabb))

    def before_training_step(self, step: int) -> None:
        """The schedules at ``step``: σ and s, and the grid's one regrid (which only ever happens once: a
        re-fitted plan may move its step, never undo it)."""
        self.set_schedule_step(step)
        if (self._grows or self._crops) and step >= self.regrid_step() and self.on_start_lattice():
            if self.grow_grid():
                self.grown_at = int(step)

    def collects_seen_surface(self) -> bool:
        """Whether this training step records where its rays meet a surface (the crop's box)."""
        step = self._step or 0
        return self._crops and step >= self.regrid_step() - COLLECT_STEPS and self.on_start_lattice()

    def grow_grid(self) -> bool:
        """Resample the grid to its final lattice and restart the optimizer's moments for it: grid_resolution³
        nodes over the scene box, or with grid_crop about as many over the box of the surface seen so far.
        A crop waits (False) while too few rays have met a surface, for at most COLLECT_STEPS steps."""
        cfg, geometry = self.config, self.field.geometry
        logits, before = geometry.logits, geometry.resolution
        box = None
        if self._crops:
            margin = cfg.grid_crop_margin * float((self.scene_box.aabb[1] - self.scene_box.aabb[0]).max())
            box = self._seen.box(margin, self.scene_box.aabb.to(geometry.aabb))
            if box is None and (self._step or 0) < self.regrid_step() + COLLECT_STEPS:
                return False
            if box is None:
                log(f"grid not cropped at step {self._step}: too few training rays met a surface.")
        resolution = (cfg.grid_resolution,) * 3 if box is None else lattice_for_box(box, cfg.grid_resolution**3)
        self.field.regrid(resolution, box)  # σ and s keep their values in voxels
        self._seen.clear()
        if self._optimizers is not None:
            for optimizer in self._optimizers.optimizers.values():
                optimizer.state.pop(logits, None)  # Adam's moments had the old shape; they restart
        shape = lambda r: "x".join(str(n) for n in r) if len(set(r)) > 1 else f"{r[0]}³"  # noqa: E731
        where = "" if box is None else " over the box " + " to ".join(
            "(" + ", ".join(f"{v:.3g}" for v in corner) + ")" for corner in box.tolist()
        )
        verb = "grown" if box is None else "cropped"
        log(f"grid {verb} from {shape(before)} to {shape(geometry.resolution)} nodes{where} at step {self._step}.")
        return True

    def update_to_step(self, step: int) -> None:
        """Called by the pipeline when a checkpoint is loaded: σ and s are not parameters,
        they are recomputed from the step, so eval/export see the σ the grid was trained with."""
        self.set_schedule_step(step)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Every load (ns-train --load-dir, ns-eval, ns-viewer, exports) first checks that the
        checkpoint fits this config, naming the differing setting instead of a size-mismatch traceback."""
        saved = state_dict.get("field.geometry.logits")
        saved_box = state_dict.get("field.geometry.aabb")
        geometry = self.field.geometry
        if (self._grows or self._crops) and saved is not None and saved.dim() == 3:
            # A checkpoint of either stage of the coarse-to-fine schedule loads (e.g. resumed before the growth).
            shape = tuple(int(n) for n in saved.shape)
            box = geometry.aabb if saved_box is None or saved_box.shape != (2, 3) else saved_box.to(geometry.aabb)
            stages = {(self.config.grid_start_resolution,) * 3, (self.config.grid_resolution,) * 3}
            if (self._crops or shape in stages) and (shape != geometry.resolution or not torch.equal(box, geometry.aabb)):
                self.field.regrid(shape, box)
        problems = fit_problems(state_dict, self.state_dict())
        if problems:
            with exit_cleanly():
                raise CertSDFInputError(fit_message(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        self._optimizers = training_callback_attributes.optimizers
        return [
            TrainingCallback(
                where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                update_every_num_iters=1,
                func=self.before_training_step,
            )
        ]

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        geometry = [self.field.geometry.logits]
        colour = [p for n, p in self.field.named_parameters() if not n.startswith("geometry.")]
        if self.background_field is not None:
            colour += list(self.background_field.parameters())
        return {"geometry": geometry, "fields": colour}

    # -- samples per ray ----------------------------------------------------------------------
    def set_sample_budget_hook(self, hook: Optional[Callable[[SampleBudget], SampleBudget]]) -> None:
        """``hook(configured) -> budget`` is asked before each render (e.g. the viewer lowers it while
        the camera moves); None renders with the configured budget."""
        self._budget_hook = hook

    def set_grid_shards(self, shards: Optional[GridShards]) -> None:
        """Share the grid's smoothing and regularisers in training among processes (see GridShards);
        None: this process does the whole grid."""
        self._shards = shards

    def training_rows(self) -> Optional[Tuple[int, int]]:
        """The x-rows of the grid this process smooths and regularises in a training step; None: all."""
        if self._shards is None or not (self.training and torch.is_grad_enabled()):
            return None
        return row_slabs(self.field.geometry.resolution[0], self._shards.parts)[self._shards.part]

    def node_sdf(self) -> Float[Tensor, "X Y Z"]:
        """The certified SDF at every node, for this batch (differentiable while training)."""
        geometry, rows = self.field.geometry, self.training_rows()
        if rows is None:
            return geometry.sdf_grid()
        assert self._shards is not None
        return self._shards.gather(geometry.sdf_rows(rows), row_slabs(geometry.resolution[0], self._shards.parts))

    def sample_budget(self) -> SampleBudget:
        cfg = self.config
        configured = SampleBudget(cfg.num_coarse_samples, cfg.num_fine_samples, cfg.colour_samples_per_ray)
        return configured if self._budget_hook is None else self._budget_hook(configured)

    # -- rendering ---------------------------------------------------------------------
    def forward(self, ray_bundle):  # type: ignore[override]
        return self.get_outputs(self.clip(ray_bundle))

    def clip(self, ray_bundle: RayBundle) -> RayBundle:
        """Nears and fars of the rays' stretch inside the scene box (and the object's region)."""
        ray_bundle = self.box_collider(ray_bundle)
        if self.region_collider is not None:
            ray_bundle = self.region_collider(ray_bundle)  # the region's ball lies inside the box
        return ray_bundle

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        sdf_grid = self.node_sdf()  # once per batch; differentiable while training
        budget = self.sample_budget()
        if self.config.sampler == "uniform":
            outputs = self.render_rays(ray_bundle, sdf_grid, budget)
        else:
            outputs = self.render_band(ray_bundle, sdf_grid, budget)
        if self.background_field is not None:
            background = self.render_background(ray_bundle)
            outputs["rgb_foreground"], outputs["rgb_background"] = outputs["rgb"], background
            outputs["rgb"] = outputs["rgb"] + (1.0 - outputs["accumulation"]) * background
        if not self.training and self._random_background():
            # Outside training, composite the evaluation background (the "random" renderer returns black).
            outputs["rgb"] = outputs["rgb"] + self.eval_background.to(outputs["rgb"]) * (1.0 - outputs["accumulation"])
        if self.training:
            outputs["fill_loss"] = outputs.pop("fill_sum") / outputs.pop("fill_count").clamp_min(1.0)
            if self.collects_seen_surface():
                self._seen.add(ray_bundle.origins, ray_bundle.directions, outputs["depth"], outputs["accumulation"])
        return outputs

    # -- the background (real captures) -----------------------------------------------
    def render_background(self, ray_bundle: RayBundle) -> Float[Tensor, "N 3"]:
        """Colour of what each ray meets beyond the object's region (on black where nothing is)."""
        assert self.background_field is not None and self.region is not None
        centre, radius = self.region
        start = background_start(
            ray_bundle.origins, ray_bundle.directions, centre.to(ray_bundle.origins),
            self.config.background_start_radii * radius, 1e-3 * radius,
        )  # fmt: skip
        far = torch.maximum(torch.full_like(start, self.config.background_far_radii * radius), start + radius)
        outside = RayBundle(
            origins=ray_bundle.origins, directions=ray_bundle.directions, pixel_area=ray_bundle.pixel_area,
            camera_indices=ray_bundle.camera_indices, nears=start, fars=far,
        )  # fmt: skip
        samples = self.background_sampler(outside)
        density, rgb = self.background_field(samples)
        weights = samples.get_weights(density)
        return self.renderer_background(rgb=rgb, weights=weights)

    # -- the certified sampler ---------------------------------------------------------
    def band(self) -> float:
        """d_τ (world units): where sdf ≥ d_τ a skipped stretch of ray holds opacity ≤ `band_opacity`.

        The unbiased map bounds each interval's opacity by sigmoid(−d/s) (`certified.band_distance`).
        The paper map, used in the warm-up, is a density: ≈ density_scale·G per unit length, so the
        band widens until a whole box diagonal at that density stays within τ."""
        cfg, field_ = self.config, self.field
        if self.unbiased_fraction() >= 1.0:
            return band_distance(field_.sharpness, cfg.band_opacity)
        diagonal = float((field_.aabb[1] - field_.aabb[0]).norm())
        return band_distance(field_.sharpness, cfg.band_opacity / (cfg.density_scale * diagonal))

    def band_bricks(self, sdf_nodes: Tensor, band: float) -> Tuple[Tensor, int]:
        """The brick distance map of `certified.band_brick_distance` for the geometry's current node SDF
        (``sdf_nodes``) and this band; reused while neither changes (every frame of a paused viewer,
        every chunk of an eval image), recomputed after every optimizer step."""
        brick = max(1, min(self.config.trace_brick_voxels, min(sdf_nodes.shape) - 1))
        distances = self.field.geometry.derived(
            "band_bricks", lambda: band_brick_distance(sdf_nodes, band, brick), extra_key=(band, brick)
        )
        return distances, brick

    @torch.no_grad()
    def band_intervals(self, ray_bundle: RayBundle, sdf_nodes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(t_in, t_out, lowest SDF seen, SDF lookups spent) per ray: outside [t_in, t_out] the ray is certified to stay
        out of the band (`certified.band_interval`); t_in > t_out: it never reaches it."""
        cfg, field_ = self.config, self.field
        band = self.band()
        return band_interval(
            sdf_nodes,
            field_.geometry.aabb,
            ray_bundle.origins,
            ray_bundle.directions,
            ray_bundle.nears[..., 0],
            ray_bundle.fars[..., 0],
            band,
            self.band_bricks(sdf_nodes, band),
            lipschitz=TRILINEAR_LIPSCHITZ,
            iterations=cfg.trace_iterations,
            min_step=cfg.trace_min_step_voxels * self.voxel,
        )

    def render_band(self, ray_bundle: RayBundle, sdf_grid: Tensor, budget: SampleBudget) -> Dict[str, Tensor]:
        """Render with the samples inside each ray's band interval; rays that miss the band are
        background (in training they get `miss_samples` uniform samples instead)."""
        t_in, t_out, lowest, trace_lookups = self.band_intervals(ray_bundle, sdf_grid.detach())
        reaches = t_in < t_out
        # Training gives rays that miss the band a few samples anyway (`miss_samples`), but not rays
        # outside the object's region altogether: nothing there can become the object.
        in_region = (ray_bundle.fars > ray_bundle.nears + 1e-6)[:, 0]
        retry = ~reaches & in_region if self.training else torch.zeros_like(reaches)
        hit_idx, retry_idx = torch.nonzero(reaches)[:, 0], torch.nonzero(retry)[:, 0]
        miss_idx = torch.nonzero(~reaches & ~retry)[:, 0]
        groups: List[Tuple[Tensor, Dict[str, Tensor]]] = []
        if hit_idx.numel():
            inside = ray_bundle[hit_idx]
            inside.nears, inside.fars = t_in[hit_idx, None], t_out[hit_idx, None]
            groups.append((hit_idx, self.render_rays(inside, sdf_grid, budget)))
        if retry_idx.numel():
            groups.append((retry_idx, self.render_rays(ray_bundle[retry_idx], sdf_grid, budget, coarse_only=self.config.miss_samples)))
        if miss_idx.numel():
            groups.append((miss_idx, self.background_outputs(ray_bundle[miss_idx], lowest[miss_idx])))
        n = len(ray_bundle)
        outputs: Dict[str, Tensor] = {}
        for key in groups[0][1]:
            parts = [(idx, out[key]) for idx, out in groups if key in out]
            if parts[0][1].dim() == 0:  # batch sums (the fill prior), from the groups that sampled
                outputs[key] = sum(p for _, p in parts)
                continue
            assert len(parts) == len(groups), f"output {key!r} missing from a ray group"
            merged = parts[0][1].new_zeros(n, *parts[0][1].shape[1:])
            for idx, value in parts:
                merged = merged.index_put((idx,), value)
            outputs[key] = merged
        if not self.training:
            outputs["sdf_lookups"] = outputs["sdf_lookups"] + trace_lookups[:, None]
        return outputs

    def background_outputs(self, ray_bundle: RayBundle, lowest: Tensor) -> Dict[str, Tensor]:
        """What rays certified to miss the band render as (outside training): the background, with
        the SDF outputs from the smallest SDF the march saw."""
        n, device = len(ray_bundle), ray_bundle.origins.device
        zeros = torch.zeros(n, 1, device=device)
        rgb = self.renderer_rgb(rgb=torch.zeros(n, 1, 3, device=device), weights=torch.zeros(n, 1, 1, device=device))
        outputs = {"rgb": rgb, "accumulation": zeros, "depth": ray_bundle.fars.clone()}
        if self.training:
            return outputs
        outputs["normals"] = torch.full((n, 3), 0.5, device=device)
        outputs["sdf"] = zeros.clone()
        outputs["num_colour_samples"] = zeros.clone()
        outputs["sdf_lookups"] = zeros.clone()
        lowest = torch.where(torch.isfinite(lowest), lowest, torch.full_like(lowest, self.field.geometry.max_distance))
        outputs.update(ray_sdf_outputs(lowest[:, None, None], self.field.geometry.max_distance, band=0.5 * self.voxel))
        return outputs

    # -- samples to pixels ----------------------------------------------------------------
    def render_rays(
        self, ray_bundle: RayBundle, sdf_grid: Tensor, budget: SampleBudget, coarse_only: int = 0
    ) -> Dict[str, Tensor]:
        """Uniform samples over [nears, fars], then PDF samples from their weights (or `coarse_only`
        uniform samples and nothing else), rendered. In training also the fill prior's batch sum."""
        samples = self.place_samples(ray_bundle, sdf_grid, budget, coarse_only)
        outputs = self.render_samples(samples, sdf_grid, budget)
        if not self.training:
            # Density lookups per ray: the interval edges of each rendered pass (the bench's
            # samples-per-ray distribution; the certified sampler adds its march).
            passes = samples.shape[-1] + 1 + (0 if coarse_only else budget.coarse + 1)
            outputs["sdf_lookups"] = torch.full_like(outputs["accumulation"], float(passes))
        return outputs

    def place_samples(
        self, ray_bundle: RayBundle, sdf_grid: Tensor, budget: SampleBudget, coarse_only: int = 0
    ) -> RaySamples:
        """Contiguous samples over [nears, fars]: `budget.coarse` uniform ones, merged with
        `budget.fine` drawn by nerfstudio's PDF sampler from their weights; or `coarse_only`
        uniform samples alone."""
        if coarse_only:
            return self.uniform_sampler(ray_bundle, num_samples=coarse_only)
        coarse = self.uniform_sampler(ray_bundle, num_samples=budget.coarse)
        with torch.no_grad():
            coarse_weights, _ = self.render_weights(coarse, sdf_grid.detach())
        return self.pdf_sampler(ray_bundle, coarse, coarse_weights, num_samples=budget.fine)

    def render_samples(self, samples: RaySamples, sdf_grid: Tensor, budget: SampleBudget) -> Dict[str, Tensor]:
        """Pixels from contiguous samples: weights from the density map, colour on the heaviest
        `budget.colour` samples of each ray. In training also the fill prior's batch sum; outside
        training normals, SDF and certified-SDF outputs."""
        field_ = self.field
        positions = samples.frustums.get_positions()
        weights, transmittance = self.render_weights(samples, sdf_grid)

        # Colour only where it can change the pixel: the few heaviest samples of each ray
        # (early in training, fog gives every sample some weight; the cap bounds the cost).
        w = weights[..., 0].detach()
        top = torch.topk(w, k=min(budget.colour, w.shape[-1]), dim=-1).indices
        active = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, top, True) & (w > self.config.colour_weight_threshold)
        rgb_samples = positions.new_zeros(*positions.shape[:-1], 3)
        if active.any():
            rgb_samples[active] = field_.colour_at(positions[active], samples.frustums.directions[active])
            # Uncoloured samples take the weighted mean colour of the coloured ones, in training and
            # evaluation alike. Left black, they would darken every pixel whose weight is spread
            # over more than `colour_samples_per_ray` samples: a crossing of the density map spans
            # ~2 voxels, i.e. many PDF samples, so top-8 carried only ~45% of it (lego, step 150)
            # and the colour field could not reach the images' brightness.
            coloured = weights * active[..., None]
            mean = (coloured * rgb_samples).sum(-2, keepdim=True) / coloured.sum(-2, keepdim=True).clamp_min(1e-10)
            rgb_samples = torch.where(active[..., None], rgb_samples, mean)
        accumulation = self.renderer_accumulation(weights=weights)
        rgb = self.renderer_rgb(rgb=rgb_samples, weights=weights)
        depth = self.renderer_depth(weights=weights, ray_samples=samples)
        outputs: Dict[str, Tensor] = {"rgb": rgb, "accumulation": accumulation, "depth": depth}

        if self.training:
            # The prior needs no dense coverage: a subset of the (randomly drawn) rays is enough
            # and keeps the grid_sample backward, the costliest op on CPU, small.
            n = max(1, int(positions.shape[0] * self.config.fill_ray_fraction))
            points = positions[:n].reshape(-1, 3)
            occupancy = sample_grid(field_.geometry.occupancy(), points, field_.geometry.aabb)
            behind = (1.0 - transmittance[:n, :-1, 0]).detach().reshape(-1)  # T before each sample
            if (self._step or 0) < self.config.fill_carve_start_step:
                # Fill only: where the occupancy is already above 1 − T the target equals it, so no gradient.
                behind = torch.maximum(behind, occupancy.detach())
            weight = self._fill_reach(samples, transmittance, n)
            if self._crops:  # outside a cropped grid's box the occupancy is zero, not a parameter
                box = field_.geometry.aabb
                inside = ((points >= box[0]) & (points <= box[1])).all(dim=-1).float()
                weight = inside if weight is None else weight * inside
            bce = F.binary_cross_entropy(
                occupancy.clamp(1e-6, 1 - 1e-6), behind.clamp(0.0, 1.0), weight=weight, reduction="sum"
            )
            outputs["fill_sum"], outputs["fill_count"] = bce, torch.tensor(float(behind.numel()), device=bce.device)
        else:
            with torch.no_grad():
                flat = positions.reshape(-1, 3)
                # Normals only where colour is computed: the other samples carry ~no weight.
                normals = torch.zeros_like(positions)
                if active.any():
                    normals[active] = field_.geometry.normals(positions[active])
                outputs["normals"] = (self.renderer_normals(normals=normals, weights=weights) + 1.0) / 2.0
                sdf = field_.sdf_at(flat, sdf_grid).reshape(*positions.shape[:-1], 1)
                outputs["sdf"] = (weights * sdf).sum(dim=-2) / accumulation.clamp_min(1e-6)
                outputs["num_colour_samples"] = active.sum(dim=-1, keepdim=True).float()
                outputs.update(ray_sdf_outputs(sdf, field_.geometry.max_distance, band=0.5 * self.voxel))
        return outputs

    def _fill_reach(self, samples: RaySamples, transmittance: Tensor, n: int) -> Optional[Tensor]:
        """Weight of each of the first n rays' samples in the occluded-space prior: the transmittance
        `fill_depth` region radii in front of the sample (at the last interval edge there or before), i.e.
        the probability that the ray had not yet met a surface that far before. None: no limit."""
        depth = self.config.fill_depth  # resolved in populate_modules
        if math.isinf(depth) or self.region is None:  # no limit, or no region to measure it in
            return None
        starts = samples.frustums.starts[:n, :, 0]
        edges = torch.cat([starts, samples.frustums.ends[:n, -1:, 0]], dim=1)  # contiguous intervals
        last = torch.searchsorted(edges.contiguous(), (starts - depth * self.region[1]).contiguous(), right=True) - 1
        reach = transmittance[:n, :, 0].gather(1, last.clamp_min(0))
        return torch.where(last >= 0, reach, torch.ones_like(reach)).detach().reshape(-1)

    def unbiased_fraction(self) -> float:
        """Weight of the unbiased opacity in the blend (0 during the paper warm-up, then 1)."""
        cfg = self.config
        if cfg.density_map == "paper":
            return 0.0
        step = self._step
        if step is None:  # no schedule ran (a module built outside training): the converged map
            return 1.0
        if cfg.unbiased_blend_steps <= 0:
            return float(step >= cfg.unbiased_warmup_steps)
        return min(max((step - cfg.unbiased_warmup_steps) / cfg.unbiased_blend_steps, 0.0), 1.0)

    def render_weights(self, samples: RaySamples, sdf_grid: Tensor) -> Tuple[Tensor, Tensor]:
        """(weights [R, N, 1], transmittance [R, N+1, 1]) of contiguous samples, with `density_map`."""
        field_ = self.field
        blend = self.unbiased_fraction()
        if blend == 0.0:
            density = field_.density_at(samples.frustums.get_positions(), sdf_grid)
            alphas = 1.0 - torch.exp(-samples.deltas * density)
            return samples.get_weights_and_transmittance_from_alphas(alphas)
        # The samplers' intervals are contiguous (bins), so N intervals have N + 1 edges.
        frustums = samples.frustums
        t_edges = torch.cat([frustums.starts, frustums.ends[:, -1:]], dim=1)  # [R, N+1, 1]
        edges = frustums.origins[:, :1] + frustums.directions[:, :1] * t_edges
        sdf_edges = field_.sdf_at(edges.reshape(-1, 3), sdf_grid).reshape(t_edges.shape[:2])
        alphas = unbiased_alphas(sdf_edges, field_.sharpness)[..., None]
        if blend < 1.0:
            # Warm-up blend: the paper's opacity at the interval midpoints (edge mean: the SDF is
            # trilinear, so this is its midpoint value up to the curvature within one interval).
            mid = 0.5 * (sdf_edges[:, 1:] + sdf_edges[:, :-1])
            paper = 1.0 - torch.exp(-samples.deltas * field_.density_from_sdf(mid)[..., None])
            alphas = blend * alphas + (1.0 - blend) * paper
        return samples.get_weights_and_transmittance_from_alphas(alphas)

    # -- losses and metrics -----------------------------------------------------------------
    def _random_background(self) -> bool:
        """Whether the renderer leaves the background out (as on black): only for "random";
        a fixed colour is already composited by the renderer and must not be added twice."""
        background = self.renderer_rgb.background_color
        return isinstance(background, str) and background == "random"

    def _gt_on_eval_background(self, image: Tensor) -> Tensor:
        return self.renderer_rgb.blend_background(image, background_color=self.eval_background.to(image))

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        gt = self._gt_on_eval_background(batch["image"].to(self.device))
        pred = outputs["rgb"]
        if self.training and self._random_background():
            pred = pred + self.eval_background.to(pred) * (1.0 - outputs["accumulation"])
        sigma_voxels, sharpness_voxels = self.field.smoothing_voxels()
        metrics = {
            "psnr": self.psnr(pred.detach(), gt),
            "sigma_voxels": torch.tensor(sigma_voxels),
            "sharpness_voxels": torch.tensor(sharpness_voxels),
        }
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        image = batch["image"].to(self.device)
        pred_rgb, gt_rgb = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"], gt_image=image
        )
        loss = {"rgb_loss": F.mse_loss(pred_rgb, gt_rgb)}
        if self.training:
            cfg = self.config
            loss["fill_loss"] = cfg.fill_loss_mult * outputs["fill_loss"]
            if cfg.binary_loss_mult > 0 or cfg.tv_loss_mult > 0:
                binary, tv = self.grid_regularisers()
                if cfg.binary_loss_mult > 0:
                    loss["binary_loss"] = cfg.binary_loss_mult * binary
                if cfg.tv_loss_mult > 0:
                    loss["tv_loss"] = cfg.tv_loss_mult * tv
            target = foreground_target(batch, image)
            if cfg.alpha_loss_mult > 0 and target is not None:
                accumulation = outputs["accumulation"].clamp(1e-5, 1.0 - 1e-5)
                loss["alpha_loss"] = cfg.alpha_loss_mult * F.binary_cross_entropy(accumulation, target.to(accumulation))
        return loss

    def grid_regularisers(self) -> Tuple[Tensor, Tensor]:
        """(binarisation, total variation) of the occupancy grid; with grid shards, this process's
        slab's share times the number of processes (the gradient average over the processes then
        gives the whole grid's gradient, and the value estimates the whole grid's)."""
        geometry, rows = self.field.geometry, self.training_rows()
        if rows is None:
            return occupancy_regularisers(geometry.occupancy())
        assert self._shards is not None
        a, b = rows
        block = geometry.occupancy_rows((a, min(b + 1, geometry.resolution[0])))
        binary, tv = occupancy_regularisers(block, own=b - a, shape=geometry.resolution)
        return binary * self._shards.parts, tv * self._shards.parts

    def get_rgba_image(self, outputs: Dict[str, Tensor], output_name: str = "rgb") -> Tensor:
        """Colour *not* composited on any background, with alpha = accumulation.

        nerfstudio's exporters (texturing, point clouds) and ns-render read colours through this.
        The base class divides `rgb` by the accumulation, assuming it was composited on black; but
        outside training certsdf composites the evaluation background (white by default), which
        turned every partly transparent pixel white (e.g. all of ns-export's mesh textures, whose
        rays are only two mesh edges long). Undo that composite first.
        """
        if output_name == "rgb" and "rgb_foreground" in outputs:
            output_name = "rgb_foreground"  # the object alone, on black (real captures)
        rgb = outputs[output_name]
        accumulation = outputs[output_name.replace("rgb_foreground", "rgb").replace("rgb", "accumulation")]
        if not self.training:
            rgb = rgb - self.eval_background.to(rgb) * (1.0 - accumulation)
        colour = (rgb / accumulation.clamp_min(1e-6)).clamp(0.0, 1.0)
        return torch.cat([colour, accumulation], dim=-1)

    def _lpips_module(self) -> Optional[torch.nn.Module]:
        """LPIPS only when its AlexNet weights are already cached: offline they cannot be fetched."""
        if not self._lpips_checked:
            self._lpips_checked = True
            weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
            if weights.exists():
                # Imported only here: torchmetrics' LPIPS module pulls in torchvision's model zoo.
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips = LearnedPerceptualImagePatchSimilarity(normalize=True).to(self.device)
            else:
                log(f"LPIPS skipped: backbone weights not found at {weights} (offline).")
        return self._lpips

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        gt = self._gt_on_eval_background(batch["image"].to(self.device))
        pred = outputs["rgb"]
        gt_b, pred_b = torch.moveaxis(gt, -1, 0)[None], torch.moveaxis(pred, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(gt_b, pred_b).item()), "ssim": float(self.ssim(gt_b, pred_b))}
        if MASK_BATCH_KEY in batch:
            metrics["psnr_masked"] = psnr_inside(pred, gt, batch[MASK_BATCH_KEY].to(pred))
        lpips = self._lpips_module()
        if lpips is not None:
            metrics["lpips"] = float(lpips(gt_b, pred_b))
        images = {
            "img": torch.cat([gt, pred], dim=1),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
            "normals": outputs["normals"],
        }
        return metrics, images
