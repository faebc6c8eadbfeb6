"""certsdf's pipeline: nerfstudio's VanillaPipeline, plus what hangs on the model.

- The viewer panel. nerfstudio's viewer finds GUI elements by walking the *pipeline*
  (``parse_object(pipeline, …)``), so the panel lives here, beside the model rather than inside
  it: the model renders and trains, the panel drives it through the model's narrow interface
  (``set_smoothing``, ``reset_smoothing``, ``set_sample_budget_hook``), and the pipeline adds the
  panel's training callback to the model's.
- ``ns-export marching-cubes`` without CUDA. Every nerfstudio command that loads a run builds
  this pipeline; when that command is ns-export, nerfstudio's CUDA-only multires marching cubes
  is replaced by a CPU drop-in (:mod:`certsdf_ns.export.ns_export_compat`; a no-op otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Type

import torch
from torch.cuda.amp.grad_scaler import GradScaler

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from certsdf_ns.export import ns_export_compat
from certsdf_ns.viewer.controls import CertSDFViewerControls, ViewerControlsConfig


@dataclass
class CertSDFPipelineConfig(VanillaPipelineConfig):
    """nerfstudio's VanillaPipelineConfig, building a :class:`CertSDFPipeline`."""

    _target: Type = field(default_factory=lambda: CertSDFPipeline)
    viewer_panel: ViewerControlsConfig = field(default_factory=ViewerControlsConfig)
    """The certsdf panel in the viewer (σ/s sliders, SDF slice, mesh, preview budget)."""


class CertSDFPipeline(VanillaPipeline):
    """The model, its data, and the viewer panel (inert when no viewer attaches)."""

    config: CertSDFPipelineConfig

    def __init__(
        self,
        config: CertSDFPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Optional[GradScaler] = None,
    ) -> None:
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        ns_export_compat.patch_loaded_exporter()
        self.viewer_controls = CertSDFViewerControls(self.model, config.viewer_panel)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        return super().get_training_callbacks(training_callback_attributes) + self.viewer_controls.training_callbacks()

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        """nerfstudio's, without an autograd graph: the eval batch's losses are only logged (and
        nerfstudio's float() of a tensor that requires grad makes torch warn)."""
        return super().get_eval_loss_dict(step)
