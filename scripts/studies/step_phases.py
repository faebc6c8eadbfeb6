"""Where a certsdf training step goes: data, forward, losses, backward, optimizer (wall-clock, ms).

    OMP_NUM_THREADS=1 taskset -c 1 python scripts/studies/step_phases.py DATA [--scale 0.25] \
        [--checkpoint CKPT --start-step N] [--rays 4096] [--warmup 5] [--steps 5] [--profile] [--unmap-freed] [model_option=value ...]

Builds the `ns-train certsdf` pipeline on DATA (camera-res-scale-factor --scale), optionally loads a
checkpoint (so the grid is a trained one, not fog), runs `--warmup` untimed steps and then times
`--steps` steps with the trainer's optimizer (fused Adam, the method config's learning rates). With
the certified sampler it also reports the fraction of rays that reach the band, the band's mean length
against the box chord, and the march's SDF lookups per ray (mean, p95). Model options are given as
`name=value` (e.g. `sampler=uniform`).
"""

import argparse
import contextlib
import copy
import os
import time
from pathlib import Path

import torch

from certsdf_ns.method_config import certsdf_trainer_config
from certsdf_ns.training import heap

PHASES = ("data", "forward", "losses", "backward", "optimizer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--start-step", type=int, default=0)
    parser.add_argument("--rays", type=int, default=4096, help="training rays per batch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of the timed steps")
    parser.add_argument("--unmap-freed", action="store_true", help="leave glibc's allocator as it is (the trainer's keep_freed_buffers False)")
    parser.add_argument("options", nargs="*")
    return parser.parse_intermixed_args()


def build_pipeline(args: argparse.Namespace):
    """The `ns-train certsdf` pipeline on args.data with the given model options (and checkpoint), and its config."""
    cfg = copy.deepcopy(certsdf_trainer_config)
    if not args.unmap_freed:
        heap.keep_freed_buffers()  # as the trainer does on CPU
    cfg.pipeline.datamanager.data = args.data
    cfg.pipeline.datamanager.dataparser.data = args.data
    cfg.pipeline.datamanager.camera_res_scale_factor = args.scale
    cfg.pipeline.datamanager.train_num_rays_per_batch = args.rays
    for option in args.options:
        name, value = option.split("=")
        current = getattr(cfg.pipeline.model, name)
        setattr(cfg.pipeline.model, name, (value == "True") if isinstance(current, bool) else type(current)(value))
    pipeline = cfg.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        pipeline.load_pipeline(state["pipeline"], state["step"])
    return cfg, pipeline


def step(pipeline, optimizer, i: int, totals: dict | None) -> None:
    """One training step; with `totals`, add each phase's wall-clock seconds to it."""
    model = pipeline.model
    model.train()
    model.set_schedule_step(i)
    marks = [time.perf_counter()]
    ray_bundle, batch = pipeline.datamanager.next_train(i)
    marks.append(time.perf_counter())
    outputs = model(ray_bundle)
    marks.append(time.perf_counter())
    loss = sum(model.get_loss_dict(outputs, batch).values())
    marks.append(time.perf_counter())
    optimizer.zero_grad()
    loss.backward()
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    if totals is not None:
        for name, a, b in zip(PHASES, marks, marks[1:]):
            totals[name] = totals.get(name, 0.0) + b - a


def report_band(pipeline) -> None:
    """The certified sampler's reach on one training batch: rays reaching the band, its length, march lookups."""
    model = pipeline.model
    ray_bundle, _ = pipeline.datamanager.next_train(0)
    ray_bundle = model.box_collider(ray_bundle)
    with torch.no_grad():
        t_in, t_out, _, lookups = model.band_intervals(ray_bundle, model.field.geometry.sdf_grid())
    reach = t_in < t_out
    chord = (ray_bundle.fars - ray_bundle.nears)[..., 0]
    print(
        f"rays reaching the band {reach.float().mean():.2f}; band length {(t_out - t_in)[reach].mean():.2f} of a "
        f"{chord.mean():.2f} chord; march lookups per ray mean {lookups.mean():.1f}, p95 {lookups.quantile(0.95):.0f}"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cfg, pipeline = build_pipeline(args)
    model = pipeline.model
    lrs = {name: opt["optimizer"].lr for name, opt in cfg.optimizers.items()}
    optimizer = torch.optim.Adam(
        [{"params": params, "lr": lrs[name]} for name, params in model.get_param_groups().items()], eps=1e-15, fused=True
    )
    totals: dict = {}
    for i in range(args.start_step, args.start_step + args.warmup):
        step(pipeline, optimizer, i, None)
    with torch.profiler.profile() if args.profile else contextlib.nullcontext() as profile:
        for i in range(args.start_step + args.warmup, args.start_step + args.warmup + args.steps):
            step(pipeline, optimizer, i, totals)
    if args.profile:
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(totals.values()) / args.steps
    print(f"{args.rays} rays: {args.rays / total:.0f} rays/s; step {total * 1000:.0f} ms (load {os.getloadavg()[0]:.1f}): " + ", ".join(f"{k} {v / args.steps * 1000:.0f} ms" for k, v in totals.items()))
    if model.config.sampler == "certified":
        report_band(pipeline)


if __name__ == "__main__":
    main()
