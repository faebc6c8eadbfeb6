"""`python -m certsdf_ns.bench.peer_train <ns-train arguments>`: nerfstudio's own `ns-train`, offline-safe.

What it adds before calling `nerfstudio.scripts.train:entrypoint` (the function behind `ns-train`):

1. the offline preparations of :mod:`certsdf_ns.bench.offline`: the LPIPS stub (nerfacto,
   tensorf, ... construct LPIPS in `populate_modules` and would otherwise try to download
   AlexNet and crash offline) and numpy scalars allow-listed for torch's weights-only loader;
2. when `CERTSDF_BENCH_TIMING=<file.jsonl>` is set, timing records: one line when the first
   training iteration starts, one when it ends, and one per checkpoint (step, iterations
   done, start/end wall-clock of the write). The
   benchmark needs each checkpoint's *training* time, and tensorboard flushes too rarely
   (every 120 s) to be read while the run is going;
3. when that variable is set, a graceful stop on SIGINT: the trainer finishes its current
   iteration, leaves the loop and saves a final checkpoint (nerfstudio's own Ctrl-C raises
   KeyboardInterrupt anywhere, possibly in the middle of writing a checkpoint). A second
   SIGINT interrupts immediately.

Tensorboard writers are flushed and closed on the way out, so scalars logged in the last
two minutes are not lost. Nothing else about training changes: the model, the data and the
optimisers are exactly those ns-train builds from the same arguments.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from certsdf_ns.bench.offline import prepare_offline_peers

TIMING_ENV = "CERTSDF_BENCH_TIMING"


class _TimingHooks:
    """Wraps the trainer's train_iteration and save_checkpoint to log wall-clock times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start: Optional[float] = None
        self.iterations = 0
        self.stop_requested = False
        self.trainer = None

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002
        if self.start is None or self.stop_requested:
            # Not training yet, or asked twice: behave like nerfstudio (KeyboardInterrupt).
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.trainer is not None:
            self.trainer.stop_training = True  # checked at the top of every iteration

    def attach(self, trainer) -> None:
        """Wrap this trainer's own train_iteration/save_checkpoint (whatever class it is:
        certsdf's trainer overrides save_checkpoint, so patching nerfstudio's class is not enough)."""
        hooks = self
        self.trainer = trainer
        train_iteration, save_checkpoint = trainer.train_iteration, trainer.save_checkpoint

        def timed_train_iteration(step: int):
            if hooks.start is None:
                hooks.start = time.time()
                hooks._write({"event": "start", "time": hooks.start, "step": step, "pid": os.getpid()})
            out = train_iteration(step)
            hooks.iterations += 1
            if hooks.iterations == 1:
                hooks._write({"event": "warm", "time": time.time()})
            return out

        def timed_save_checkpoint(step: int) -> None:
            t0 = time.time()
            save_checkpoint(step)
            t1 = time.time()
            path = trainer.checkpoint_dir / f"step-{step:09d}.ckpt"
            # nerfstudio labels its final checkpoint with the step it did *not* run; the count is exact.
            record = {"event": "checkpoint", "step": step, "iterations": hooks.iterations}
            hooks._write({**record, "save_start": t0, "save_end": t1, "path": str(path)})

        trainer.train_iteration = timed_train_iteration
        trainer.save_checkpoint = timed_save_checkpoint

    def install(self) -> None:
        """Replace ns-train's `train_loop` by the same three steps plus :meth:`attach`."""
        import nerfstudio.scripts.train as ns_train

        hooks = self

        def train_loop(local_rank: int, world_size: int, config, global_rank: int = 0) -> None:
            ns_train._set_random_seed(config.machine.seed + global_rank)
            trainer = config.setup(local_rank=local_rank, world_size=world_size)
            trainer.setup()
            hooks.attach(trainer)
            trainer.train()

        ns_train.train_loop = train_loop  # main() looks it up at call time
        signal.signal(signal.SIGINT, self._on_sigint)


def _close_writers() -> None:
    """Flush and close tensorboard writers (SummaryWriter flushes only every 120 s by itself)."""
    from nerfstudio.utils import writer

    for w in writer.EVENT_WRITERS:
        tb = getattr(w, "tb_writer", None)
        if tb is not None:
            tb.flush()
            tb.close()


def main(argv: Optional[List[str]] = None) -> None:
    prepare_offline_peers()
    timing = os.environ.get(TIMING_ENV)
    hooks = _TimingHooks(Path(timing)) if timing else None
    if hooks is not None:
        hooks.install()
    from nerfstudio.scripts.train import entrypoint

    sys.argv = ["ns-train", *(sys.argv[1:] if argv is None else argv)]
    try:
        entrypoint()
    finally:
        _close_writers()
        if hooks is not None:
            hooks._write({"event": "exit", "time": time.time(), "stopped_by_signal": hooks.stop_requested})


if __name__ == "__main__":
    main()
