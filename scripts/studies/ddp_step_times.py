"""Per-step wall and CPU time of certsdf training in one process or in N gloo processes (DDP), CPU only.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/studies/ddp_step_times.py DATA CKPT --procs 1 --rays 2048
    OMP_NUM_THREADS=1 taskset -c 0,1 python scripts/studies/ddp_step_times.py DATA CKPT --procs 2 --rays 1024

Builds the `ns-train certsdf` pipeline on DATA in each process (`--procs N`: N processes, one thread each,
a gloo group, the model in DDP as under `ns-train --machine.num-devices N`), loads CKPT (a trained grid; `none`:
the untrained fog from step 0) and times `--steps` training steps (data, forward, losses, backward with the
gradient all-reduce, fused Adam). `--rays` is per process. `--whole-grid`: every process smooths the whole grid (`--pipeline.shard-grid False`); `--unmap-freed`: glibc's
allocator left as it is (the trainer's `--keep-freed-buffers False`). Prints each rank's median CPU and wall time per step
and rank 0's rays/s. On a shared machine compare CPU times: DDP waits for the slowest rank at every step, so
other jobs slow N processes far more than one (docs/scale-out.md).
"""
import argparse
import copy
import os
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, args: argparse.Namespace, port: int) -> None:
    from certsdf_ns.method_config import certsdf_trainer_config
    from certsdf_ns.training import heap

    torch.set_num_threads(1)
    if not args.unmap_freed:
        heap.keep_freed_buffers()  # as the trainer does on CPU
    world = args.procs
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank, timeout=timedelta(minutes=5)
        )
    torch.manual_seed(42 + rank)  # ns-train's seed per rank: each rank draws its own rays
    cfg = copy.deepcopy(certsdf_trainer_config)
    cfg.pipeline.datamanager.data = args.data
    cfg.pipeline.datamanager.train_num_rays_per_batch = args.rays
    cfg.pipeline.shard_grid = not args.whole_grid
    for option in args.options:
        name, value = option.split("=")
        setattr(cfg.pipeline.model, name, type(getattr(cfg.pipeline.model, name))(value))
    pipeline = cfg.pipeline.setup(device="cpu", test_mode="val", world_size=world, local_rank=rank)
    model, start = pipeline.model, 0
    if str(args.checkpoint) != "none":
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        pipeline.load_pipeline(state["pipeline"], state["step"])
        start = state["step"] + 1
    lrs = {name: opt["optimizer"].lr for name, opt in cfg.optimizers.items()}
    optimizer = torch.optim.Adam(
        [{"params": p, "lr": lrs[n]} for n, p in model.get_param_groups().items()], eps=1e-15, fused=True
    )
    wall, cpu = [], []
    for step in range(start, start + args.steps):
        pipeline.train()
        model.set_schedule_step(step)
        w0, c0 = time.perf_counter(), time.process_time()
        _, losses, _ = pipeline.get_train_loss_dict(step=step)  # through DDP when world > 1
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    kept = slice(min(5, args.steps - 1), None)  # the first steps carry one-off costs
    w, c = statistics.median(wall[kept]), statistics.median(cpu[kept])
    print(f"rank {rank}: CPU {1000 * c:.0f} ms, wall {1000 * w:.0f} ms per step", flush=True)
    if rank == 0:
        print(
            f"{world} process(es) x {args.rays} rays: {world * args.rays / w:.0f} rays/s by wall clock "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--rays", type=int, default=2048, help="training rays per step and process")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--whole-grid", action="store_true", help="every process smooths the whole grid (no grid shards)")
    parser.add_argument("--unmap-freed", action="store_true", help="leave glibc's allocator as it is (the trainer's keep_freed_buffers False)")
    parser.add_argument("options", nargs="*", help="model options, name=value (e.g. grid_resolution=64)")
    args = parser.parse_intermixed_args()
    if args.procs == 1:
        run(0, args, 0)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args, port), nprocs=args.procs)


if __name__ == "__main__":
    main()
