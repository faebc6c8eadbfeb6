"""certsdf under nerfstudio's distributed launcher (`ns-train certsdf --machine.num-devices N`).

nerfstudio's `ns-train` spawns one process per device (`nerfstudio.scripts.train.launch`); each
joins a process group (nccl on CUDA, gloo otherwise), wraps the model in torch's
DistributedDataParallel and runs `train_loop`. Each process samples its own rays (the seed is
`machine.seed + rank`), DDP averages the gradients, and every process applies the same optimizer
step, so the parameters stay equal. What certsdf adds:

- **CPU.** nerfstudio 1.1.5's worker starts with `assert torch.cuda.is_available()` and wraps the
  model with `device_ids=[rank]`, which DDP accepts only for CUDA modules. For a CPU run over
  several processes :func:`prepare_launch` hands nerfstudio's `launch` :func:`cpu_worker` (the
  process-group set-up of nerfstudio's worker, on gloo), and the pipeline wraps the model itself
  (:func:`wrap_model`). On CUDA nerfstudio's own worker runs.
- **Checks before spawning** (:func:`check_machine`): settings nerfstudio would meet with a bare
  assertion inside every process (no CUDA, too few GPUs, `dist_url auto` across machines) end in
  one message, exit status 2.
- **One decision, every rank.** Whatever one process decides alone (the time budget's stop step
  and schedule plan, the viewer's σ/s on rank 0) goes to the others with :func:`from_rank_zero`:
  DDP's all-reduce hangs unless every process runs the same steps.
- **Grid shards.** Each process smooths and regularises its slab of the grid's x-rows; :func:`gather_rows`
  exchanges the slabs of the node SDF (all-gather forward, reduce-scatter backward), so the gradient is
  the whole grid's while the smoothing's cost is divided (``--pipeline.shard-grid``, on by default).
- **Failures.** When a process fails, nerfstudio's `launch` raises torch's ProcessException in
  the parent after stopping the others; :func:`prepare_launch` wraps `launch` so that this ends in
  one message naming the process and the checkpoints left (exit 2 when the process stopped on bad
  input, 1 otherwise).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException
from torch.nn.parallel import DistributedDataParallel as DDP

from nerfstudio.utils import comms

from certsdf_ns.errors import ERROR_CONSOLE, CertSDFInputError
from certsdf_ns.training.run_folder import checkpoints_in


def world_size_of(machine: Any) -> int:
    """Processes a MachineConfig asks for: devices per machine × machines."""
    return int(machine.num_devices) * int(machine.num_machines)


def check_machine(machine: Any) -> None:
    """Refuse (CertSDFInputError) the `--machine.*` settings of a multi-process run that cannot work."""
    n, machines = int(machine.num_devices), int(machine.num_machines)
    if n < 1 or machines < 1:
        raise CertSDFInputError(
            f"--machine.num-devices {n} and --machine.num-machines {machines} must both be at least 1."
        )
    if not 0 <= int(machine.machine_rank) < machines:
        raise CertSDFInputError(
            f"--machine.machine-rank {machine.machine_rank} must lie in 0..{machines - 1} "
            f"(--machine.num-machines {machines})."
        )
    if n * machines == 1:
        return
    if machine.device_type == "mps":
        raise CertSDFInputError(
            "--machine.device-type mps cannot train in several processes: nerfstudio's launcher runs them "
            "on CUDA (nccl) or on the CPU (gloo). Pass --machine.device-type cpu, or --machine.num-devices 1."
        )
    if machine.device_type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise CertSDFInputError(
                f"--machine.num-devices {n} with --machine.device-type cuda, but this machine has no CUDA device. "
                "Pass --machine.device-type cpu to train in processes on the CPU."
            )
        if n > have:
            raise CertSDFInputError(
                f"--machine.num-devices {n}, but this machine has {have} CUDA device(s): one process per device."
            )
    if machines > 1 and machine.dist_url == "auto":
        raise CertSDFInputError(
            f"--machine.num-machines {machines} needs --machine.dist-url tcp://HOST:PORT: the address of machine 0 "
            "(rank 0 listens there), the same on every machine ('auto' picks a local port, for one machine only)."
        )


def prepare_launch(config: Any) -> None:
    """Called by ns-train (through the trainer config's ``save_config``) just before it launches the
    training processes: check the machine settings, and for a multi-process run, install certsdf's
    CPU worker and failure report into nerfstudio's launcher. Nothing to do for one process."""
    check_machine(config.machine)
    if world_size_of(config.machine) == 1:
        return
    train = sys.modules.get("nerfstudio.scripts.train")
    if train is None or not hasattr(train, "launch"):  # not ns-train: the caller launches the processes
        return
    if config.machine.device_type == "cpu" and train._distributed_worker is not cpu_worker:
        train._distributed_worker = cpu_worker  # pickled by reference: the spawned processes import it from here
    if not getattr(train.launch, "_certsdf_reports_failures", False):
        train.launch = _reporting_failures(train.launch)


def cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_devices_per_machine: int,
    machine_rank: int,
    dist_url: str,
    config: Any,
    timeout: Any,
    device_type: str = "cpu",
) -> Any:
    """nerfstudio's ``_distributed_worker`` without its CUDA assertions: a gloo process group, the
    per-machine group nerfstudio's ``comms`` expects, then ``main_func`` (``train_loop``).

    Each process gets an equal share of the CPU cores this one may use (torch would otherwise run
    every process's ops on all of them, and N processes fight over the same cores)."""
    global_rank = machine_rank * num_devices_per_machine + local_rank
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // num_devices_per_machine)))
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    for i in range(world_size // num_devices_per_machine):
        group = dist.new_group(list(range(i * num_devices_per_machine, (i + 1) * num_devices_per_machine)))
        if i == machine_rank:
            comms.LOCAL_PROCESS_GROUP = group
    output = main_func(local_rank, world_size, config, global_rank)
    comms.synchronize()
    dist.destroy_process_group()
    return output


def _reporting_failures(launch: Callable) -> Callable:
    """nerfstudio's ``launch``; when a training process fails, one message and exit status 2 (the
    process stopped on bad input and said why) or 1, instead of torch's ProcessException traceback."""

    @functools.wraps(launch)
    def launch_reporting_failures(*args, **kwargs):
        try:
            return launch(*args, **kwargs)
        except ProcessException as err:
            config = inspect.signature(launch).bind(*args, **kwargs).arguments["config"]
            sys.exit(report_failed_process(err, config))

    launch_reporting_failures._certsdf_reports_failures = True  # type: ignore[attr-defined]
    return launch_reporting_failures


def report_failed_process(err: ProcessException, config: Any) -> int:
    """Print what happened to the failed process and what is left; the exit status to end with."""
    machine = config.machine
    world = world_size_of(machine)
    rank = int(machine.machine_rank) * int(machine.num_devices) + int(err.error_index)
    who = f"training process {rank + 1} of {world} (rank {rank})"
    status = 1
    if isinstance(err, ProcessExitedException) and err.exit_code == 2:
        what, status = f"{who} stopped on the error above", 2
    elif isinstance(err, ProcessExitedException) and err.signal_name:
        what = f"{who} was killed by {err.signal_name}" + (" (out of memory?)" if err.signal_name == "SIGKILL" else "")
    elif isinstance(err, ProcessExitedException):
        what = f"{who} exited with status {err.exit_code}"
    else:
        # ProcessRaisedException: its message is the process's own traceback, which nobody has seen yet.
        trace = str(err).split("terminated with the following error:", 1)[-1].strip()
        ERROR_CONSOLE.print(trace, markup=False, highlight=False, soft_wrap=True)
        last = trace.splitlines()[-1] if trace else type(err).__name__
        what = f"{who} failed: {last}"
    folder = config.get_checkpoint_dir()
    saved = checkpoints_in(folder)
    left = (
        f"The newest checkpoint, {saved[-1].name}, is complete (checkpoints are written whole); continue with "
        f"--load-dir {folder}."
        if saved
        else "No checkpoint was saved."
    )
    ERROR_CONSOLE.print(
        f"[bold red]certsdf error:[/bold red] {what}; the other processes were stopped. {left}",
        soft_wrap=True,
        highlight=False,
    )
    return status


# --------------------------------------------------------------------------- inside the processes


def is_distributed() -> bool:
    return comms.get_world_size() > 1


def rank() -> int:
    """This process's rank among all processes (0 in one process)."""
    return comms.get_rank()


def wrap_model(model: nn.Module, device: str, local_rank: int) -> DDP:
    """The model in DistributedDataParallel, on CUDA or CPU (nerfstudio's own wrap passes
    `device_ids`, which DDP refuses for a CPU module). Unused parameters are allowed, as in
    nerfstudio: a step whose rays give no sample enough weight runs no colour network.

    Buffers are not re-broadcast before every forward (DDP's default): certsdf's are constants of
    the config and the data (boxes, a corner table, and on real captures the region's R³ support
    mask, 28 MB at 192³, which DDP would otherwise send at every step)."""
    on_cuda = torch.device(device).type == "cuda"
    # torch ≥ 2.12 deprecates broadcast_buffers for forward_sync_buffers (which still syncs once at
    # init: harmless here, every rank builds the same buffers).
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers": False}
    ddp = DDP(model, device_ids=[local_rank] if on_cuda else None, find_unused_parameters=True, **no_sync)
    comms.synchronize()
    return ddp


# torch ≥ 2.14 renames these two collectives (the old names warn); older versions have the old names only.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """Every rank's slab of x-rows, concatenated in rank order; backward: each rank's slab of the
    gradient summed over the ranks (every rank's rays reach every slab). One all-gather forward, one
    reduce-scatter backward, on gloo and nccl alike. Slabs are padded to the largest one."""

    @staticmethod
    def forward(ctx, slab: Tensor, slabs: Tuple[Tuple[int, int], ...], part: int) -> Tensor:  # type: ignore[override]
        size = max(b - a for a, b in slabs)
        ctx.slabs, ctx.part, ctx.size = slabs, part, size
        every = slab.new_empty(len(slabs) * size, *slab.shape[1:])
        if slab.shape[0] == size:
            _ALL_GATHER(every, slab.contiguous())
        else:
            padded = slab.new_zeros(size, *slab.shape[1:])
            padded[: slab.shape[0]] = slab
            _ALL_GATHER(every, padded)
        if all(b - a == size for a, b in slabs):  # equal slabs (X divisible by the processes): no copy
            return every
        return torch.cat([every[i * size : i * size + (b - a)] for i, (a, b) in enumerate(slabs)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        slabs, size = ctx.slabs, ctx.size
        if all(b - a == size for a, b in slabs):
            padded = grad.contiguous()
        else:
            padded = grad.new_zeros(len(slabs) * size, *grad.shape[1:])
            for i, (a, b) in enumerate(slabs):
                padded[i * size : i * size + (b - a)] = grad[a:b]
        mine = grad.new_empty(size, *grad.shape[1:])
        _REDUCE_SCATTER(mine, padded)
        a, b = slabs[ctx.part]
        return mine[: b - a], None, None


def gather_rows(slab: Tensor, slabs: Sequence[Tuple[int, int]]) -> Tensor:
    """The whole grid from every rank's ``slab`` (x-rows ``slabs[rank]``), with autograd: the
    gradient that reaches each rank's slab is the sum of every rank's. A collective."""
    return _GatherRows.apply(slab, tuple(tuple(s) for s in slabs), comms.get_rank())


def from_rank_zero(values: Sequence[Optional[float]], device: Any) -> List[Optional[float]]:
    """Rank 0's ``values`` on every rank (None travels as NaN); the values themselves in one process.
    A collective: every rank must call it at the same point."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return [None if v != v else v for v in tensor.tolist()]  # v != v: NaN


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process). A collective."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * comms.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fingerprint(tensors: Sequence[torch.Tensor]) -> List[float]:
    """One float64 sum per tensor: equal on every rank while the tensors are."""
    with torch.no_grad():
        return [float(t.detach().double().sum()) for t in tensors]


def same_fingerprint(a: Sequence[float], b: Sequence[float]) -> bool:
    """Equal up to the summation order of another GPU model (equal bits on identical hardware)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))
