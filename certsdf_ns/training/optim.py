"""Optimizer and scheduler configs that keep checkpoints loadable with torch.load's defaults.

Since torch 2.6, `torch.load` defaults to `weights_only=True`. nerfstudio's exponential
decay scheduler computes learning rates with numpy, so its state (and the optimizer's
param_group "lr") hold numpy scalars, and `ns-eval`, `ns-export`, `ns-viewer` and resuming
then refuse the checkpoint (nerfstudio issue 3683). Here the same schedule returns plain
Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type


import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig

from certsdf_ns.training.budget import SchedulePlan, planned_exponential_decay


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with torch's fused kernel (one pass over each parameter; fastest on CPU too)."""

    fused: bool = True
    """Use the fused implementation."""

    def setup(self, params) -> Optimizer:
        optimizer = super().setup(params)
        optimizer.register_step_post_hook(_mark_parameters_changed)
        return optimizer


def _mark_parameters_changed(optimizer: Optimizer, args, kwargs) -> None:
    """Bump each parameter's version counter after a step, as every in-place update does.

    The fused kernel writes the parameters without bumping it, and the certified grid keys its
    caches (node SDF, the sampler's brick distance map) on that counter: without this they would
    keep the values of the last σ or band change for the rest of training."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            torch.autograd.graph.increment_version(param)


class PlainFloatExponentialDecayScheduler(ExponentialDecayScheduler):
    """nerfstudio's exponential decay, with learning rates as Python floats."""

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> LRScheduler:
        scheduler = super().get_scheduler(optimizer, lr_init)
        lambdas = scheduler.lr_lambdas  # type: ignore[attr-defined]
        scheduler.lr_lambdas = [lambda step, f=f: float(f(step)) for f in lambdas]  # type: ignore[attr-defined]
        # The constructor already took one step with the numpy lambdas: redo its effect.
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):  # type: ignore[attr-defined]
            group["lr"] = float(base) * fn(scheduler.last_epoch)
        scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]  # type: ignore[attr-defined]
        return scheduler


@dataclass
class PlainFloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    _target: Type = field(default_factory=lambda: PlainFloatExponentialDecayScheduler)





def fit_scheduler_to_plan(
    scheduler: LRScheduler, config: ExponentialDecaySchedulerConfig, plan: SchedulePlan, reference_steps: int
) -> bool:
    """Make an exponential-decay scheduler follow ``plan`` (held, then compressed to the planned
    length; see budget.py), keeping its step count. False (scheduler untouched) for a schedule
    this cannot compress: another type, or one with a warm-up ramp."""
    if not isinstance(config, ExponentialDecaySchedulerConfig) or config.warmup_steps:
        return False
    lambdas = scheduler.lr_lambdas  # type: ignore[attr-defined]
    factors = []
    for base in scheduler.base_lrs:
        lr_final = config.lr_final if config.lr_final is not None else base
        factors.append(planned_exponential_decay(base, lr_final, config.max_steps, plan, reference_steps))
    lambdas[:] = factors
    # Apply the new factor to the current step now, as LambdaLR's constructor does.
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = float(base) * fn(scheduler.last_epoch)
    scheduler._last_lr = [float(g["lr"]) for g in scheduler.optimizer.param_groups]  # type: ignore[attr-defined]
    return True
