"""The certsdf model: how rays become pixels, and what training optimises.

Sampling is explicit and cheap: the certified SDF lives on a voxel grid, so the density
along a ray costs one trilinear lookup per sample. A uniform pass over the scene box gives
coarse weights, nerfstudio's PDF sampler concentrates samples where those weights are, and
the colour network runs only on samples whose rendering weight is not negligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.model_components.ray_samplers import PDFSampler, UniformSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, NormalsRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import AABBBoxCollider
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from nerfstudio.utils.colors import get_color

from certsdf_ns import ns_export_compat
from certsdf_ns.certified import sample_grid, unbiased_alphas
from certsdf_ns.certsdf_field import CertSDFField, pick_backend
from certsdf_ns.console import log
from certsdf_ns.sdf_views import ray_sdf_outputs
from certsdf_ns.validation import BACKGROUND_KEY
from certsdf_ns.viewer_controls import CertSDFViewerControls


# ns-export imports this module when it loads a certsdf config.yml: make its marching cubes run
# without CUDA (see certsdf_ns/ns_export_compat.py). A no-op outside ns-export.
ns_export_compat.patch_loaded_exporter()


def annealed(start: float, end: float, step: int, steps: int) -> float:
    """Log-linear interpolation from start to end over `steps` (constant afterwards).

    A pure function of the step, so a resumed run follows exactly the same schedule.
    """
    if steps <= 0 or start == end:
        return float(end)
    t = min(max(step / steps, 0.0), 1.0)
    return float(math.exp((1.0 - t) * math.log(start) + t * math.log(end)))


@dataclass
class CertSDFModelConfig(ModelConfig):
    """Configuration of the certified-SDF model."""

    _target: Type = field(default_factory=lambda: CertSDFModel)
    enable_collider: bool = False
    """Rays are clipped to the scene box by the model's own AABB collider instead."""
    grid_resolution: int = 192
    """Occupancy grid nodes per axis over the scene box."""
    sigma_voxels: float = 2.0
    """Randomized-smoothing σ at the end of training, in voxels of the occupancy grid."""
    sigma_start_voxels: float = 2.0
    """σ at step 0; annealed log-linearly to `sigma_voxels` over `anneal_steps`."""
    sharpness_voxels: float = 0.25
    """Density sharpness s (G = sigmoid(−sdf/s)) at the end of training, in voxels."""
    sharpness_start_voxels: float = 0.25
    """s at step 0; annealed log-linearly to `sharpness_voxels` over `anneal_steps`."""
    anneal_steps: int = 1000
    """Length of the σ and s schedules."""
    eps: float = 1e-5
    """p̂ is clamped to [eps, 1−eps]: the SDF is bounded by ±σ·Φ⁻¹(1−eps)."""
    density_map: Literal["unbiased", "paper"] = "unbiased"
    """How the certified SDF becomes opacity along a ray. 'paper': density −density_scale·ln(1 +
    density_eps − sigmoid(−sdf/s)) at the sample midpoints (Pérez S. et al.). 'unbiased': NeuS's
    discrete opacity from the SDF at the sample-interval end points
    (`certsdf_ns.certified.unbiased_alphas`): transmittance is ½ exactly where sdf = 0, on head-on
    and grazing (silhouette) rays alike, so the images place the zero set on the object's surface.
    Costs one extra SDF lookup per ray."""
    unbiased_warmup_steps: int = 20
    """With density_map 'unbiased': steps rendered with the paper map first. The unbiased opacity
    depends only on SDF differences along a ray, and the initial grid has a constant SDF (no surface),
    so on its own it gets almost no gradient; the paper map forms a first surface."""
    unbiased_blend_steps: int = 20
    """Then steps over which the opacity is blended linearly from the paper map to the unbiased one."""
    density_scale: float = 30.0
    """The paper's density map: density = −density_scale·ln(1 + density_eps − G)."""
    density_eps: float = 1e-6
    """ε inside the density logarithm (caps the density inside at density_scale·ln(1/ε))."""
    init_logit: float = -2.0
    """Initial occupancy logit of every voxel (sigmoid(−2) ≈ 0.12: almost empty, but visible to gradients)."""
    colour_encoding: Literal["hash", "dense"] = "hash"
    """Colour features: Instant-NGP hash grid, or a dense feature volume (faster on CPU at 128³)."""
    hash_levels: int = 16
    """Hash grid levels."""
    hash_max_res: int = 1024
    """Finest hash grid resolution."""
    hash_log2_size: int = 19
    """log2 of the hash table size per level."""
    dense_resolution: int = 128
    """Dense colour feature volume resolution (colour_encoding='dense')."""
    dense_features: int = 8
    """Channels of the dense colour feature volume."""
    hidden_dim_colour: int = 64
    """Width of the colour MLP."""
    backend: Literal["auto", "tcnn", "torch"] = "auto"
    """Hash grid / MLP implementation. 'auto': tinycudann on CUDA when importable, torch otherwise.
    Resolved at construction and written into the saved config, so a checkpoint is never loaded
    into the other backend."""
    num_coarse_samples: int = 64
    """Uniform samples per ray inside the scene box (density only: trilinear lookups)."""
    num_fine_samples: int = 32
    """PDF samples per ray, drawn from the coarse weights and merged with the coarse samples."""
    include_coarse_samples: bool = True
    """Render with the coarse samples merged into the PDF samples (more robust, ~2x the lookups)."""
    colour_weight_threshold: float = 1e-4
    """The colour network runs only on samples whose rendering weight exceeds this..."""
    colour_samples_per_ray: int = 8
    """...and on at most this many samples per ray (the heaviest ones)."""
    background_color: Literal["random", "white", "black"] = "random"
    """Training background. 'random' composites RGBA targets on random colours, so
    semi-transparent fog in front of a plain background is no longer free."""
    eval_background_color: Literal["white", "black"] = "white"
    """Background for rendering and metrics outside training (NeRF-synthetic is evaluated on white)."""
    fill_loss_mult: float = 0.03
    """Weight of the occluded-space prior: occupancy at a sample is pulled towards 1 − T (its
    probability of being behind the first surface). Fills object interiors, which the
    photometric loss never sees, so the zero level set bounds a solid; free space is pulled to 0.
    0.03 since the unbiased density map: that map gives interiors no photometric gradient at all
    (opacity comes from SDF differences, and T ≈ 0 behind the surface), and at 0.01 bunny kept 20
    interior cavities after 100 steps (Chamfer-L1 0.0185; 0.0086 at 0.03). Larger weights push the
    zero set outward (median offset +0.07 voxel at 0.03, +0.12 at 0.1; README, "Where the zero set
    sits")."""
    fill_ray_fraction: float = 0.25
    """Fraction of the batch's rays on which the occluded-space prior is evaluated."""
    binary_loss_mult: float = 1e-3
    """Weight of mean o·(1−o) over the grid: the smoothed classifier should smooth a classifier."""
    tv_loss_mult: float = 1e-4
    """Weight of total variation of the occupancy grid (suppresses isolated floaters)."""
    alpha_loss_mult: float = 0.1
    """Weight of a binary cross-entropy between each ray's accumulation and its pixel's alpha, on
    RGBA data only (NeRF-synthetic); 0 turns it off. Random backgrounds penalise a haze of opacity
    a only through its colour error, ~a², whose gradient vanishes as a → 0: on lego a ~5% haze
    over most of the background survives 10 minutes of training. The BCE's gradient does not."""

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
        aabb = self.scene_box.aabb.float()
        self.voxel = float(((aabb[1] - aabb[0]) / (cfg.grid_resolution - 1)).min())
        self.schedule_step: Optional[int] = None  # the training step the σ/s schedule was last set to
        backend = pick_backend(cfg.backend)
        cfg.backend = backend  # record the resolved backend in the saved config
        self.field = CertSDFField(
            aabb,
            grid_resolution=cfg.grid_resolution,
            sigma=cfg.sigma_start_voxels * self.voxel,
            sharpness=cfg.sharpness_start_voxels * self.voxel,
            eps=cfg.eps,
            init_logit=cfg.init_logit,
            density_scale=cfg.density_scale,
            density_eps=cfg.density_eps,
            colour_encoding=cfg.colour_encoding,
            hash_levels=cfg.hash_levels,
            hash_max_res=cfg.hash_max_res,
            hash_log2_size=cfg.hash_log2_size,
            dense_resolution=cfg.dense_resolution,
            dense_features=cfg.dense_features,
            hidden_dim_colour=cfg.hidden_dim_colour,
            backend=backend,
        )
        cfg.backend = self.field.backend  # what was built: "tcnn" without tinycudann silently becomes torch
        self.box_collider = AABBBoxCollider(self.scene_box)
        self.uniform_sampler = UniformSampler(num_samples=cfg.num_coarse_samples)
        self.pdf_sampler = PDFSampler(num_samples=cfg.num_fine_samples, include_original=cfg.include_coarse_samples)
        self.renderer_rgb = RGBRenderer(background_color=cfg.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer(method="expected")
        self.renderer_normals = NormalsRenderer()
        self.eval_background = get_color(cfg.eval_background_color)
        fixed_background = self.kwargs.get("metadata", {}).get(BACKGROUND_KEY)
        if fixed_background is not None:
            # Images without alpha: random backgrounds would make the model paint the images'
            # background into geometry; train and evaluate on that background instead.
            self.renderer_rgb = RGBRenderer(background_color=fixed_background.float())
            self.eval_background = fixed_background.float()
        # The viewer's certsdf panel (σ/s sliders, SDF slice, mesh); inert without a viewer.
        self.viewer_controls = CertSDFViewerControls(self)

        from torchmetrics.functional import structural_similarity_index_measure
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        self._lpips: Optional[torch.nn.Module] = None
        self._lpips_checked = False

    # -- schedules -------------------------------------------------------------------
    def set_schedule_step(self, step: int) -> None:
        cfg = self.config
        sigma = annealed(cfg.sigma_start_voxels, cfg.sigma_voxels, step, cfg.anneal_steps)
        sharpness = annealed(cfg.sharpness_start_voxels, cfg.sharpness_voxels, step, cfg.anneal_steps)
        # A viewer slider may override the schedule until the user resets it.
        sigma, sharpness = self.viewer_controls.on_schedule_step(step, sigma, sharpness)
        self.field.geometry.sigma = sigma * self.voxel
        self.field.sharpness = sharpness * self.voxel
        self.schedule_step = step

    def update_to_step(self, step: int) -> None:
        """Called by the pipeline when a checkpoint is loaded: σ and s are not parameters,
        they are recomputed from the step, so eval/export see the σ the grid was trained with."""
        self.set_schedule_step(step)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        return [
            TrainingCallback(
                where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                update_every_num_iters=1,
                func=self.set_schedule_step,
            )
        ]

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        geometry = [self.field.geometry.logits]
        colour = [p for n, p in self.field.named_parameters() if not n.startswith("geometry.")]
        return {"geometry": geometry, "fields": colour}

    # -- rendering ---------------------------------------------------------------------
    def forward(self, ray_bundle):  # type: ignore[override]
        return self.get_outputs(self.box_collider(ray_bundle))

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        field_ = self.field
        sdf_grid = field_.geometry.sdf_grid()  # once per batch; differentiable while training
        # The configured budget, or a smaller one for the viewer's preview while the camera moves.
        n_coarse, n_fine, n_colour = self.viewer_controls.sample_budget(
            self.config.num_coarse_samples, self.config.num_fine_samples, self.config.colour_samples_per_ray
        )
        coarse = self.uniform_sampler(ray_bundle, num_samples=n_coarse)
        with torch.no_grad():
            coarse_weights, _ = self.render_weights(coarse, sdf_grid.detach())
        samples = self.pdf_sampler(ray_bundle, coarse, coarse_weights, num_samples=n_fine)
        positions = samples.frustums.get_positions()
        weights, transmittance = self.render_weights(samples, sdf_grid)

        # Colour only where it can change the pixel: the few heaviest samples of each ray
        # (early in training, fog gives every sample some weight; the cap bounds the cost).
        w = weights[..., 0].detach()
        top = torch.topk(w, k=min(n_colour, w.shape[-1]), dim=-1).indices
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
        if not self.training and self._random_background():
            # Outside training, composite the evaluation background (the "random" renderer returns black).
            rgb = rgb + self.eval_background.to(rgb) * (1.0 - accumulation)
        depth = self.renderer_depth(weights=weights, ray_samples=samples)
        outputs: Dict[str, Tensor] = {"rgb": rgb, "accumulation": accumulation, "depth": depth}

        if self.training:
            # The prior needs no dense coverage: a subset of the (randomly drawn) rays is enough
            # and keeps the grid_sample backward, the costliest op on CPU, small.
            n = max(1, int(positions.shape[0] * self.config.fill_ray_fraction))
            occupancy = sample_grid(torch.sigmoid(field_.geometry.logits), positions[:n].reshape(-1, 3), field_.aabb)
            behind = (1.0 - transmittance[:n, :-1, 0]).detach().reshape(-1)  # T before each sample
            outputs["fill_loss"] = F.binary_cross_entropy(occupancy.clamp(1e-6, 1 - 1e-6), behind.clamp(0.0, 1.0))
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

    def unbiased_fraction(self) -> float:
        """Weight of the unbiased opacity in the blend (0 during the paper warm-up, then 1)."""
        cfg = self.config
        if cfg.density_map == "paper":
            return 0.0
        step = self.schedule_step
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
        metrics = {"psnr": self.psnr(pred.detach(), gt), "sigma": torch.tensor(self.field.geometry.sigma)}
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        image = batch["image"].to(self.device)
        pred_rgb, gt_rgb = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"], gt_image=image
        )
        loss = {"rgb_loss": F.mse_loss(pred_rgb, gt_rgb)}
        if self.training:
            cfg = self.config
            occ = torch.sigmoid(self.field.geometry.logits)
            loss["fill_loss"] = cfg.fill_loss_mult * outputs["fill_loss"]
            if cfg.binary_loss_mult > 0:
                loss["binary_loss"] = cfg.binary_loss_mult * (occ * (1.0 - occ)).mean()
            if cfg.tv_loss_mult > 0:
                tv = sum((occ.diff(dim=d) ** 2).mean() for d in range(3))
                loss["tv_loss"] = cfg.tv_loss_mult * tv
            if cfg.alpha_loss_mult > 0 and image.shape[-1] == 4:
                accumulation = outputs["accumulation"].clamp(1e-5, 1.0 - 1e-5)
                loss["alpha_loss"] = cfg.alpha_loss_mult * F.binary_cross_entropy(accumulation, image[..., 3:4])
        return loss

    def get_rgba_image(self, outputs: Dict[str, Tensor], output_name: str = "rgb") -> Tensor:
        """Colour *not* composited on any background, with alpha = accumulation.

        nerfstudio's exporters (texturing, point clouds) and ns-render read colours through this.
        The base class divides `rgb` by the accumulation, assuming it was composited on black; but
        outside training certsdf composites the evaluation background (white by default), which
        turned every partly transparent pixel white (e.g. all of ns-export's mesh textures, whose
        rays are only two mesh edges long). Undo that composite first.
        """
        rgb = outputs[output_name]
        accumulation = outputs[output_name.replace("rgb", "accumulation")]
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
