"""The trainer's allocator setting on CPU: a freed large buffer is reused by the next step, not faulted in again."""

import subprocess
import sys
import textwrap

import pytest

# A "step" makes a 64 MB tensor (above glibc's largest mmap threshold, 32 MB) and frees it; the second
# step's page faults say whether its memory came back from the OS (16k pages) or from the heap (~0).
STEP_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from certsdf_ns.training import heap
    print(heap.keep_freed_buffers() if sys.argv[1] == "keep" else "untouched")
    def step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 << 20)  # 64 MB, every page written
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    step()
    print(step())
    """
)


def second_step_faults(mode: str, env_extra=None) -> tuple:
    import os

    env = {**os.environ, **(env_extra or {})}
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        if env_extra is None or name not in env_extra:
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, env=env, check=True)
    done, faults = out.stdout.split()
    return done, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    done, untouched = second_step_faults("untouched")
    assert untouched > pages // 2, "without the setting, glibc unmaps the 64 MB buffer and the next step faults it in"
    done, kept = second_step_faults("keep")
    assert done == "True" and kept < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_users_own_allocator_setting_is_kept():
    done, faults = second_step_faults("keep", {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert done == "False" and faults > (64 << 20) // 4096 // 2
