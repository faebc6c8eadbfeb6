"""The suite's console-script runs, forked from a server that has nerfstudio imported already.

Every `ns-train` spends ~10 s of CPU importing nerfstudio (all of its methods, before any plugin) and
the suite starts about a hundred of them. :func:`run_forked` runs a console script of this
environment (``ns-train``, ``ns-export``, ``certsdf-export``, …) in a process forked from a
`multiprocessing` forkserver that imported ``nerfstudio.scripts.train`` and certsdf's method once:
a new process each time, with the script's own entry point, argv, working folder, environment,
stdout/stderr and exit status, so a test sees what the console script does, minus the import.

What the fork cannot reproduce is left to a real subprocess (:func:`forkable` says which):
- a PYTHONWARNINGS other than "ignore" (Python reads it at start-up: the warnings tests);
- any other environment change (start-up hooks, fault injection, thread counts read at import);
- launches of several processes (``--machine.num-devices``), and scripts that are not this
  environment's console scripts.

``CERTSDF_TEST_SUBPROCESS=1`` runs everything as real subprocesses.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

PRELOAD = ["nerfstudio.scripts.train", "certsdf_ns.method_config"]
"""What the server imports once: ns-train's module, which imports every nerfstudio method, and certsdf's."""

_context = None
_lock = threading.Lock()


def _entry_points() -> Dict[str, str]:
    """Console script name -> "module:function", for the scripts installed beside this interpreter."""
    bin_dir = Path(sys.executable).parent
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if (bin_dir / ep.name).exists()
    }


_ENTRY_POINTS: Optional[Dict[str, str]] = None


def forkable(args: Sequence[str], env: Dict[str, str]) -> Optional[str]:
    """The entry point ("module:function") to run `args` with in a forked process, or None when only a
    real subprocess reproduces the run (see the module docstring)."""
    global _ENTRY_POINTS
    if os.environ.get("CERTSDF_TEST_SUBPROCESS", "0") not in ("", "0"):
        return None
    if env.get("PYTHONWARNINGS") != "ignore" or {k: v for k, v in env.items() if k != "PYTHONWARNINGS"} != {
        k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"
    }:
        return None
    if any(str(a).startswith("--machine.num-devices") for a in args):
        return None
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = _entry_points()
    script = Path(args[0])
    if script.parent != Path(sys.executable).parent:
        return None
    return _ENTRY_POINTS.get(script.name)


def _run_entry_point(
    target: str, args: Sequence[str], cwd: Optional[str], env: Dict[str, str], out: str, err: str, new_session: bool = False
) -> None:
    """In the forked process: become the console script (argv, folder, environment, streams), run it.
    ``new_session``: lead a session of its own, as `subprocess.Popen(start_new_session=True)`."""
    if new_session:
        os.setsid()
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # One open file for both streams when they share a path (as stderr=STDOUT): one offset, no overwrites.
    opened = {path: os.open(path, os.O_WRONLY | os.O_TRUNC) for path in dict.fromkeys((out, err))}
    os.dup2(opened[out], 1)
    os.dup2(opened[err], 2)
    for descriptor in opened.values():
        os.close(descriptor)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    warnings.resetwarnings()
    warnings.simplefilter("ignore")  # PYTHONWARNINGS=ignore, as the subprocess would have it
    sys.argv = [str(a) for a in args]
    module, function = target.split(":")
    # As pip's console-script wrapper: sys.exit(function()), so a returned status is the exit status.
    sys.exit(getattr(importlib.import_module(module), function)())


def _server():
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
    return _context


class ForkedProcess:
    """A console script running in a forked process, started at once; what `subprocess.Popen` with
    stdout/stderr pipes and text=True offers the suite: `args`, `communicate(timeout)`, `returncode`."""

    def __init__(
        self, target: str, args: Sequence, cwd: Optional[Path], env: Dict[str, str],
        log: Optional[Path] = None, new_session: bool = False,
    ) -> None:  # fmt: skip
        """``log``: stdout and stderr both go to that file (as `Popen(stdout=f, stderr=STDOUT)`);
        ``new_session``: the process leads its own session, so a kill of its group reaches only it and
        what it starts."""
        self.args = [str(a) for a in args]
        self.returncode: Optional[int] = None
        self._tmp = tempfile.TemporaryDirectory(prefix="forked-cli-")
        if log is None:
            self._out, self._err = os.path.join(self._tmp.name, "stdout"), os.path.join(self._tmp.name, "stderr")
        else:
            self._out = self._err = str(log)
        for path in (self._out, self._err):
            open(path, "w").close()
        self._process = _server().Process(
            target=_run_entry_point,
            args=(target, self.args, str(cwd) if cwd else None, env, self._out, self._err, new_session),
        )
        self._process.start()

    @property
    def pid(self) -> int:
        return self._process.pid  # type: ignore[return-value]

    def poll(self) -> Optional[int]:
        """The exit status once the process has ended, else None (as `Popen.poll`)."""
        if self._process.is_alive():
            return None
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the exit (as `Popen.wait`, TimeoutExpired after `timeout` s)."""
        self._process.join(timeout)
        if self._process.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        self._tmp.cleanup()
        return self.poll()

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        """Wait for the exit (TimeoutExpired after `timeout` s, the process killed); (stdout, stderr)."""
        self._process.join(timeout)
        timed_out = self._process.is_alive()
        if timed_out:
            self._process.kill()
            self._process.join()
        out, err = (Path(p).read_text(encoding="utf-8", errors="backslashreplace") for p in (self._out, self._err))
        self._tmp.cleanup()
        if timed_out:
            raise subprocess.TimeoutExpired(self.args, timeout, out, err)
        self.returncode = self._process.exitcode
        return out, err


def run_forked(
    target: str, args: Sequence, timeout: float, cwd: Optional[Path], env: Dict[str, str]
) -> subprocess.CompletedProcess:
    """Run console script `args[0]` (entry point `target`) in a forked process; as `subprocess.run`
    with capture_output=True, text=True."""
    process = ForkedProcess(target, args, cwd, env)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
