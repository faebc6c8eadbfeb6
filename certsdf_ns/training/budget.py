"""A wall-clock training budget, and schedules fitted to the number of steps it allows.

The method's schedules (learning-rate decay, the σ/s anneal) are written in steps for a
reference run length (30,000 steps). A budgeted run does not know its length in steps until it
has timed a few of them, so:

1. during a short warm-up the schedules are **held** at their step-0 values;
2. at the end of the warm-up the run measures seconds per step and plans its length:
   ``total = min(max steps, warm-up end + remaining budget / seconds per step)``;
3. from then on every schedule runs on the fraction of the *planned* steps elapsed after the
   warm-up, i.e. the reference schedule compressed by ``(total − hold) / reference``.

The plan is a pair of integers fixed once and saved in the checkpoint, so the step → schedule
map of a resumed run is the one of the uninterrupted run (bit-exact resume on CPU); only
*where* training stops depends on the clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

HOLD_FOREVER = 10**12
"""hold_steps of the plan used before a budgeted run has planned: schedules stay at step 0."""


@dataclass(frozen=True)
class SchedulePlan:
    """Which steps the schedules run over: held at their start until ``hold_steps``, then spread
    over ``[hold_steps, total_steps)``."""

    hold_steps: int
    """First step at which the schedules advance (the end of the timing warm-up)."""
    total_steps: int
    """The planned end of training (exclusive): the schedules reach their end values here."""

    def stretch(self, reference_steps: int) -> float:
        """Planned schedule steps per reference step: a reference schedule of n steps lasts
        ``n * stretch`` steps of this run."""
        return max(self.total_steps - self.hold_steps, 1) / reference_steps

    def as_dict(self) -> Dict[str, int]:
        """Plain ints, so the checkpoint still loads with ``torch.load(weights_only=True)``."""
        return {"hold_steps": int(self.hold_steps), "total_steps": int(self.total_steps)}

    @staticmethod
    def from_dict(d: Optional[Dict[str, int]]) -> Optional["SchedulePlan"]:
        return None if d is None else SchedulePlan(int(d["hold_steps"]), int(d["total_steps"]))


HOLDING = SchedulePlan(HOLD_FOREVER, HOLD_FOREVER + 1)


def planned_total_steps(
    next_step: int, seconds_spent: float, seconds_per_step: float, budget_seconds: float, max_end_step: int
) -> int:
    """The step at which a run that has spent ``seconds_spent`` and is about to run ``next_step``
    will run out of budget, at ``seconds_per_step``; never beyond ``max_end_step``."""
    left = max(budget_seconds - seconds_spent, 0.0)
    steps = int(left / max(seconds_per_step, 1e-9))
    return max(next_step + 1, min(max_end_step, next_step + steps))


def planned_exponential_decay(
    lr_init: float, lr_final: float, decay_steps: int, plan: SchedulePlan, reference_steps: int
) -> Callable[[int], float]:
    """nerfstudio's exponential decay (lr_init → lr_final over ``decay_steps`` of a reference run),
    as a LambdaLR factor, held until ``plan.hold_steps`` and compressed to the planned length.
    A closure, not an object: LambdaLR's state_dict skips functions, so checkpoints keep their keys."""
    span = max(decay_steps * plan.stretch(reference_steps), 1.0)
    hold = plan.hold_steps

    def factor(step: int) -> float:
        t = min(max((step - hold) / span, 0.0), 1.0)
        return float(math.exp((1.0 - t) * math.log(lr_init) + t * math.log(lr_final)) / lr_init)

    return factor


def planned_anneal_steps(anneal_steps: int, plan: SchedulePlan, reference_steps: int) -> int:
    """Length of the σ/s anneal in this run's steps (at least one)."""
    return max(1, round(anneal_steps * plan.stretch(reference_steps)))


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.3g} min"
