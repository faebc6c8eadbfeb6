"""How much PSNR can geometry still add? certsdf with its occupancy frozen at the ground truth (issue 30).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 python scripts/studies/frozen_geometry.py SCENE SECONDS \
        [--mode frozen-gt|learned] [--grid-resolution 192] [--sigma-voxels 2.0] [--n-test-views 5] \
        [--output-dir bench_results/frozen_geometry] [--max-steps N] [--rays-per-batch 4096] [--logit 12] \
        [--geometry CKPT] [--scale 0.25] [--model-option NAME=VALUE ...]

For `frozen-gt`, SCENE is a generated scene with SCENE/gt_mesh.ply; the bench's bunny (what `certsdf-bench` renders as
`bunny` into `--scenes.scene-dir`/bunny_200px) is

    certsdf-make-scene bench_results/scenes/bunny_200px --mesh /work/shared/data/meshes/bunny.obj \
        --image-size 200 --n-train 100 --n-val 4 --n-test 10

The run is `ns-train certsdf --data SCENE`: the method's TrainerConfig and certsdf's trainer, with a
wall-clock budget of SECONDS (the trainer's `--max-train-minutes`, so the schedules are fitted to the
steps that fit, as in a real run) and certsdf-bench's settings (CPU, fp32, tensorboard only, 4096 rays
per batch, no evaluation or checkpoint during training); `--pipeline.model.grid-resolution` and σ at
the start and end of training (`sigma-start-voxels`, `sigma-voxels`) set from the options.

- `frozen-gt`: once the trainer is set up, the ground-truth mesh (moved into the dataparser's frame) is
  voxelized onto the grid's nodes as `voxelized_gt_offset.py` does (a node is inside when the mesh
  contains it) and the occupancy logits become +L inside, −L outside, with requires_grad off. No loss
  then has a gradient for them and nerfstudio's optimizers skip a group without gradients, so only the
  colour field trains; the node SDF is derived from the new logits (its cache is keyed on the logits'
  version). The script checks at the end that the logits are bitwise unchanged. Two things only save
  time, with the same gradients: the grid's occupancy (sigmoid of the logits, read by the losses every
  step) is computed once, and the binary and TV losses, constants of the logits, are off (at 384³ the
  full-grid passes cost ~1 s of a step and would give the finer grids fewer steps).
- `frozen-ckpt`: the occupancy logits of a trained run's checkpoint (`--geometry CKPT`, same scene and
  grid; lego too, which has no ground-truth mesh) are loaded and frozen the same way, and a fresh colour
  field trains on them: colour capacity at a fixed geometry, e.g. with `--model-option hash_log2_size=21`
  or `--model-option colour_encoding=dense` against the defaults.
- `learned`: the same run with nothing frozen (the baseline).

Frozen logits also make a step cheaper (no smoothing backward), so at equal seconds `frozen-gt` takes
more steps; `--max-steps N` caps both modes at N steps for a comparison at equal steps.

The true occupancy is not the best grid for a σ > 0: smoothing moves its zero set inside (−0.15 voxel
median and −7% area on bunny at 192³, σ = 2 voxels: docs/bench/issue13/voxelized_gt_bunny.txt) and
drops parts thinner than ~σ, while a learned grid thickens to compensate. So `frozen-gt` measures what
the true shape renders with, not a strict ceiling: on a coarse grid the learned run can beat it (a
48-pixel bunny at 64³ after 60 s: 24.4 dB learned, 16.3 dB frozen-gt, its ears and feet gone).

At the end the bench's evaluation (`certsdf_ns.bench.evaluate`: PSNR/SSIM of the first N test views)
runs on the trained pipeline; the result is printed as one JSON line and written to
RUN/frozen_geometry.json (RUN: the run folder, which also holds config.yml and the final checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from certsdf_ns.bench.evaluate import render_metrics, test_views
from certsdf_ns.method_config import certsdf_trainer_config

NEVER = 1_000_000_000
"""A cadence that never comes (certsdf-bench's: evaluation must not take training time)."""
CONTAINS_CHUNK = 1_000_000
"""Nodes per `contains` query (keeps the ray-test buffers small at 384³)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scene", type=Path, help="scene folder (frozen-gt: a generated scene holding gt_mesh.ply)")
    parser.add_argument("seconds", type=float, help="training budget (seconds of training time)")
    parser.add_argument("--mode", choices=("frozen-gt", "frozen-ckpt", "learned"), default="frozen-gt")
    parser.add_argument("--geometry", type=Path, help="frozen-ckpt: the checkpoint whose occupancy logits are frozen")
    parser.add_argument("--scale", type=float, default=1.0, help="camera-res-scale-factor (lego at 200x200: 0.25)")
    parser.add_argument("--model-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a model config field, e.g. hash_log2_size=21 or colour_encoding=dense (repeatable)")
    parser.add_argument("--grid-resolution", type=int, default=192)
    parser.add_argument("--sigma-voxels", type=float, default=2.0)
    parser.add_argument("--n-test-views", type=int, default=5)
    parser.add_argument("--output-dir", type=Path, default=Path("bench_results/frozen_geometry"))
    parser.add_argument("--max-steps", type=int, default=None, help="also stop at this many steps (default: the method's)")
    parser.add_argument("--rays-per-batch", type=int, default=4096)
    parser.add_argument("--logit", type=float, default=12.0, help="L: frozen logits are +L inside, -L outside")
    return parser.parse_args()


def trainer_config(args: argparse.Namespace):
    """`ns-train certsdf --data SCENE` with the budget, grid and σ of the options and the bench's settings."""
    cfg = copy.deepcopy(certsdf_trainer_config)
    scene = args.scene.resolve()
    cfg.data = scene  # ns-train's --data alias
    cfg.pipeline.datamanager.data = scene
    cfg.output_dir = args.output_dir
    options = "".join(f"-{o}" for o in args.model_option)
    cfg.experiment_name = f"{scene.name}-{args.mode}-{args.grid_resolution}-s{args.sigma_voxels:g}{options}"
    cfg.vis = "tensorboard"
    cfg.machine.device_type = "cpu"
    cfg.mixed_precision = False
    cfg.max_train_minutes = args.seconds / 60.0
    if args.max_steps is not None:
        cfg.max_num_iterations = args.max_steps
    for name in ("steps_per_eval_batch", "steps_per_eval_image", "steps_per_eval_all_images", "steps_per_save"):
        setattr(cfg, name, NEVER)
    cfg.eval_at_end = False  # evaluated below, with the bench's evaluation
    cfg.pipeline.datamanager.train_num_rays_per_batch = args.rays_per_batch
    cfg.pipeline.datamanager.camera_res_scale_factor = args.scale
    model = cfg.pipeline.model
    for option in args.model_option:
        name, _, value = option.partition("=")
        current = getattr(model, name)  # AttributeError names an unknown field
        setattr(model, name, type(current)(value) if not isinstance(current, bool) else value == "True")
    model.grid_resolution = args.grid_resolution
    model.sigma_voxels = model.sigma_start_voxels = args.sigma_voxels
    if args.mode != "learned":  # constants once the logits are frozen: no gradient, only time
        model.binary_loss_mult = model.tv_loss_mult = 0.0
    return cfg


def gt_in_dataparser_frame(scene: Path, outputs) -> trimesh.Trimesh:
    """SCENE/gt_mesh.ply moved as the dataparser moved the cameras: x' = scale·(T·[x; 1])."""
    gt = trimesh.load(scene / "gt_mesh.ply", force="mesh")
    transform = np.eye(4)
    transform[:3, :] = outputs.dataparser_transform.numpy()
    transform[:3, :] *= float(outputs.dataparser_scale)
    return gt.apply_transform(transform)


def inside_nodes(gt: trimesh.Trimesh, points: np.ndarray, margin: float) -> np.ndarray:
    """Whether each point lies inside `gt` (only points in its bounds, grown by `margin`, are tested)."""
    box = np.all((points >= gt.bounds[0] - margin) & (points <= gt.bounds[1] + margin), axis=1)
    candidates = np.flatnonzero(box)
    inside = np.zeros(len(points), bool)
    for start in range(0, len(candidates), CONTAINS_CHUNK):
        idx = candidates[start : start + CONTAINS_CHUNK]
        inside[idx] = gt.contains(points[idx])
    return inside


def freeze_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Set the occupancy logits and freeze them; the grid's occupancy is computed once. Returns it."""
    geometry = model.field.geometry
    with torch.no_grad():
        geometry.logits.copy_(logits.to(geometry.logits))  # bumps the version: the SDF cache recomputes
    geometry.logits.requires_grad_(False)
    occupancy = geometry.occupancy().detach()
    geometry.occupancy = lambda: occupancy  # the same values, without a full-grid sigmoid per call
    return occupancy


def freeze_at_ground_truth(model, gt: trimesh.Trimesh, logit: float) -> dict:
    """Occupancy logits +logit inside `gt`, −logit outside, frozen. Returns what was done."""
    geometry = model.field.geometry
    t0 = time.perf_counter()
    points = geometry.grid_points().reshape(-1, 3).cpu().numpy()
    inside = inside_nodes(gt, points, 2.0 * model.voxel)
    inside_t = torch.from_numpy(inside.reshape(geometry.resolution)).to(geometry.logits.device)
    freeze_logits(model, torch.where(inside_t, logit, -logit))
    seconds = time.perf_counter() - t0
    print(f"voxelized gt_mesh.ply on {len(points)} nodes: {int(inside.sum())} inside ({seconds:.1f} s); logits frozen at ±{logit:g}", flush=True)
    return {"inside_nodes": int(inside.sum()), "voxelize_s": seconds, "watertight": bool(gt.is_watertight)}


def freeze_at_checkpoint(model, checkpoint: Path) -> dict:
    """Occupancy logits of a trained run's checkpoint (same grid and scene), frozen; the colour field
    stays freshly initialised. Returns what was done."""
    geometry = model.field.geometry
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = saved["pipeline"]
    (key,) = [k for k in state if k.endswith("field.geometry.logits")]
    logits = state[key]
    if tuple(logits.shape) != tuple(geometry.logits.shape):
        raise SystemExit(f"{checkpoint}: grid {tuple(logits.shape)}, this run's is {tuple(geometry.logits.shape)} (--grid-resolution)")
    occupancy = freeze_logits(model, logits)
    print(f"occupancy logits of {checkpoint} (step {saved.get('step', '?')}) loaded and frozen", flush=True)
    return {"geometry_checkpoint": str(checkpoint), "inside_nodes": int((occupancy > 0.5).sum())}


def seed_like_ns_train(seed: int) -> None:
    """What ns-train's train_loop does before building the trainer (nerfstudio's _set_random_seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    args = parse_args()
    if args.mode == "frozen-ckpt" and args.geometry is None:
        raise SystemExit("--mode frozen-ckpt needs --geometry CKPT")
    if args.mode == "frozen-gt" and not (args.scene / "gt_mesh.ply").is_file():
        raise SystemExit(f"{args.scene} has no gt_mesh.ply (make it with certsdf-make-scene)")
    cfg = trainer_config(args)
    cfg.set_timestamp()
    cfg.save_config()  # as ns-train: claims the run folder (config.yml is written by the trainer's setup)
    seed_like_ns_train(cfg.machine.seed)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    geometry = model.field.geometry

    record: dict = {"mode": args.mode, "scene": str(args.scene.resolve()), "grid_resolution": args.grid_resolution,
                    "sigma_voxels": args.sigma_voxels, "budget_s": args.seconds, "max_steps": cfg.max_num_iterations,
                    "rays_per_batch": args.rays_per_batch, "binary_loss_mult": cfg.pipeline.model.binary_loss_mult,
                    "tv_loss_mult": cfg.pipeline.model.tv_loss_mult, "scale": args.scale,
                    "model_options": args.model_option}  # fmt: skip
    if args.mode == "frozen-gt":
        gt = gt_in_dataparser_frame(args.scene, pipeline.datamanager.train_dataparser_outputs)
        record.update(freeze_at_ground_truth(model, gt, args.logit), logit=args.logit)
    elif args.mode == "frozen-ckpt":
        record.update(freeze_at_checkpoint(model, args.geometry))
    logits_before = geometry.logits.detach().clone()
    colour_before = {n: p.detach().clone() for n, p in model.field.named_parameters() if not n.startswith("geometry.")}

    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0

    stopped = trainer._stopped_at is not None
    record.update(
        steps=trainer.step + 1,
        train_s=trainer._stop_seconds if stopped else trainer.train_seconds(),
        train_wall_s=wall,
        stopped_by_budget=stopped,
        schedule_plan=None if trainer._plan is None else trainer._plan.as_dict(),
    )
    record["logits_unchanged"] = bool(torch.equal(geometry.logits.detach(), logits_before))
    record["geometry_optimizer_state_empty"] = len(trainer.optimizers.optimizers["geometry"].state) == 0
    record["colour_max_abs_change"] = max(
        float((p.detach() - colour_before[n]).abs().max()) for n, p in model.field.named_parameters() if n in colour_before
    )

    scale = float(cfg.pipeline.datamanager.camera_res_scale_factor)
    cameras, images = test_views(args.scene, scale, args.n_test_views)
    metrics = render_metrics(pipeline, cameras, images, trainer.step)
    record.update(psnr=metrics.psnr, ssim=metrics.ssim, n_test_views=metrics.n_views, psnr_per_view=metrics.psnr_per_view,
                  render_s=metrics.render_s, load_avg_1min=os.getloadavg()[0], run=str(trainer.base_dir))  # fmt: skip
    out = trainer.base_dir / "frozen_geometry.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    print(f"written to {out}")
    if args.mode != "learned" and not (record["logits_unchanged"] and record["geometry_optimizer_state_empty"]):
        raise SystemExit(f"{args.mode}: the occupancy logits changed during training")


if __name__ == "__main__":
    main()
