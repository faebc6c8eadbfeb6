"""certsdf's pipeline: nerfstudio's VanillaPipeline, plus what hangs on the model.

- The viewer panel. nerfstudio's viewer finds GUI elements by walking the *pipeline*
  (``parse_object(pipeline, …)``), so the panel lives here, beside the model rather than inside
  it: the model renders and trains, the panel drives it through the model's narrow interface
  (``set_smoothing``, ``reset_smoothing``, ``set_sample_budget_hook``), and the pipeline adds the
  panel's training callback to the model's.
- Several processes (``ns-train --machine.num-devices N``, see :mod:`certsdf_ns.training.distributed`).
  nerfstudio wraps the model in DistributedDataParallel with ``device_ids=[rank]``, which DDP refuses
  for a CPU model; here the wrap works on CUDA and CPU alike. The viewer runs in rank 0 only, so a
  σ/s set in its panel is handed to every rank before each step (else the ranks would train with
  different SDFs, their gradients averaged into neither).
- ``ns-export marching-cubes`` without CUDA. Every nerfstudio command that loads a run builds
  this pipeline; when that command is ns-export, nerfstudio's CUDA-only multires marching cubes
  is replaced by a CPU drop-in (:mod:`certsdf_ns.export.ns_export_compat`; a no-op otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Type

import torch
from torch.cuda.amp.grad_scaler import GradScaler

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from certsdf_ns.export import ns_export_compat
from certsdf_ns.method.model import GridShards
from certsdf_ns.training import distributed
from certsdf_ns.viewer.controls import CertSDFViewerControls, ViewerControlsConfig


@dataclass
class CertSDFPipelineConfig(VanillaPipelineConfig):
    """nerfstudio's VanillaPipelineConfig, building a :class:`CertSDFPipeline`."""

    _target: Type = field(default_factory=lambda: CertSDFPipeline)
    viewer_panel: ViewerControlsConfig = field(default_factory=ViewerControlsConfig)
    """The certsdf panel in the viewer (σ/s sliders, SDF slice, mesh, preview budget)."""
    shard_grid: bool = True
    """With several processes, each smooths and regularises its slab of the grid and they exchange the SDF (False: each does the whole grid)."""


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
        # One process to nerfstudio (its DDP wrap is CUDA-only), the wrap below for several. The data
        # manager uses the number only for its loader threads.
        super().__init__(config, device, test_mode, 1, local_rank, grad_scaler)
        self.world_size = world_size
        if world_size > 1:
            if config.shard_grid:
                self.model.set_grid_shards(GridShards(distributed.rank(), world_size, distributed.gather_rows))
            self._model = distributed.wrap_model(self._model, device, local_rank)
        ns_export_compat.patch_loaded_exporter()
        self.viewer_controls = CertSDFViewerControls(self.model, config.viewer_panel)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes) + self.viewer_controls.training_callbacks()
        if self.world_size > 1:  # after the model's own, which schedules σ and s for the step
            where = [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION]
            callbacks.append(TrainingCallback(where, self.share_smoothing_override, update_every_num_iters=1))
        return callbacks

    def share_smoothing_override(self, step: int) -> None:
        """Give every rank rank 0's σ/s override (the viewer's panel, which runs in rank 0 only)."""
        override = tuple(distributed.from_rank_zero(self.model.smoothing_override, self.device))
        if override != self.model.smoothing_override:
            self.model.reset_smoothing()
            self.model.set_smoothing(*override)

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        """nerfstudio's, without an autograd graph: the eval batch's losses are only logged (and
        nerfstudio's float() of a tensor that requires grad makes torch warn)."""
        return super().get_eval_loss_dict(step)
