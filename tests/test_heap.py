"""The trainer's allocator setting on CPU: a freed large buffer stays in the process for the next step."""

import subprocess
import sys
import textwrap

import pytest

# A "step" makes a 64 MB tensor (above glibc's largest mmap threshold, 32 MB) and frees it. What the
# setting decides is whether the freed memory goes back to the OS (resident memory drops by 64 MB, and
# the next step faults it in again) or stays in the process for the next step (it drops by ~0). Resident
# pages are read from /proc/self/statm: page-fault counts would also count the kernel's own page
# migrations on a busy machine.
STEP = textwrap.dedent(
    """
    import sys, torch
    from certsdf_ns.training import heap
    print(heap.keep_freed_buffers() if sys.argv[1] == "keep" else "untouched")
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1])
    def step():
        t = torch.ones(16 << 20)  # 64 MB, every page written
        before = resident()
        del t
        return before - resident()
    step()
    print(step())
    """
)


def pages_given_back(mode: str, env_extra=None) -> tuple:
    """("True"/"False"/"untouched", resident pages the second step's free gave back to the OS)."""
    import os

    env = {**os.environ, **(env_extra or {})}
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        if env_extra is None or name not in env_extra:
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, env=env, check=True)
    done, pages = out.stdout.split()
    return done, int(pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_freed_large_buffer_stays_in_the_process():
    pages = (64 << 20) // 4096
    done, untouched = pages_given_back("untouched")
    assert untouched > pages // 2, "without the setting, glibc unmaps the freed 64 MB buffer"
    done, kept = pages_given_back("keep")
    assert done == "True" and kept < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_users_own_allocator_setting_is_kept():
    done, given_back = pages_given_back("keep", {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert done == "False" and given_back > (64 << 20) // 4096 // 2
