"""`ns-train certsdf`: the method registered with nerfstudio through an entry point.

The defaults are chosen for the machines people have, which may have no GPU:
- the device is CUDA when present and CPU otherwise (nerfstudio's default is "cuda");
- mixed precision (and its grad scaler) only on CUDA;
- the live viewer plus tensorboard for eval logging (nerfstudio's default is wandb);
- no profiling summary at exit (`--logging.profiler basic` brings it back), so a run's last line is
  its result (certsdf's trainer prints it);
- the viewer binds to 127.0.0.1: nerfstudio's 0.0.0.0 exposes an unauthenticated control
  surface to the whole network (use `--viewer.websocket-host 0.0.0.0` to opt in);
- certsdf's trainer (`certsdf_ns/training/trainer.py`): config and memory checks before anything is
  allocated, atomic checkpoints, and bitwise-exact resume on CPU.
"""

from __future__ import annotations

import torch

from nerfstudio.configs.base_config import LoggingConfig, MachineConfig, ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from certsdf_ns.console import silence_known_noise
from certsdf_ns.method.model import CertSDFModelConfig
from certsdf_ns.pipeline import CertSDFPipelineConfig
from certsdf_ns.data.datamanager import CertSDFDataManagerConfig
from certsdf_ns.data.dataparser import CertSDFDataParserConfig
from certsdf_ns.training.optim import FusedAdamOptimizerConfig, PlainFloatExponentialDecaySchedulerConfig
from certsdf_ns.training.trainer import CertSDFTrainerConfig

HAS_CUDA = torch.cuda.is_available()
silence_known_noise()  # the plugin's boundary: nerfstudio loads this module when it discovers methods

certsdf_trainer_config = CertSDFTrainerConfig(
    method_name="certsdf",
    steps_per_eval_batch=100,
    steps_per_eval_image=500,
    steps_per_eval_all_images=1_000_000,
    steps_per_save=500,
    max_num_iterations=30_000,
    mixed_precision=HAS_CUDA,
    machine=MachineConfig(device_type="cuda" if HAS_CUDA else "cpu"),
    logging=LoggingConfig(profiler="none"),
    pipeline=CertSDFPipelineConfig(
        datamanager=CertSDFDataManagerConfig(
            dataparser=CertSDFDataParserConfig(),
            train_num_rays_per_batch=4096,
            eval_num_rays_per_batch=4096,
        ),
        model=CertSDFModelConfig(eval_num_rays_per_chunk=8192),
    ),
    optimizers={
        "geometry": {
            "optimizer": FusedAdamOptimizerConfig(lr=0.1, eps=1e-15),
            "scheduler": PlainFloatExponentialDecaySchedulerConfig(lr_final=0.01, max_steps=30_000),
        },
        "fields": {
            "optimizer": FusedAdamOptimizerConfig(lr=1e-2, eps=1e-15),
            "scheduler": PlainFloatExponentialDecaySchedulerConfig(lr_final=1e-3, max_steps=30_000),
        },
    },
    viewer=ViewerConfig(num_rays_per_chunk=8192, websocket_host="127.0.0.1"),
    vis="viewer+tensorboard",
)

certsdf = MethodSpecification(
    config=certsdf_trainer_config,
    description="Certified weak SDF from randomized smoothing of an occupancy grid (Pérez S. et al. 2024).",
)
