"""Every test reaps what it starts (issue 12: an orphaned rank once outlived the suite by 20 minutes).

The pytest process becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so processes whose parent
died (a rank's dist_checkpointing writer, a rank of a torchrun that was killed) are re-parented to it
rather than to init; after each test, every process still below pytest is killed and reaped, except
multiprocessing's own resource tracker and fork server (the ranks it forked are killed). Zombies are reaped
too: an orphan re-parented to pytest that exited has nobody else to wait for it. The runners kill
their process trees themselves on failure and timeout (megatron_edit.training.launch.run_processes,
tests/megatron_lm_harness.py); this is the net under them.
"""
import os
import sys

import psutil
import pytest

from megatron_edit.training.launch import become_subreaper, is_multiprocessing_server


def pytest_configure(config):
    become_subreaper()


def leftovers():
    """Every process below pytest, zombies included, but multiprocessing's servers."""
    me = psutil.Process(os.getpid())
    out = []
    for proc in me.children(recursive=True):
        try:
            if is_multiprocessing_server(proc):
                continue
            out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(autouse=True)
def reap_processes():
    yield
    found = leftovers()
    if not found:
        return
    running = []
    for proc in found:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc.pid)
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=10)  # also reaps orphans that exited on their own
    if running:
        print(f"\nconftest: killed {len(running)} process(es) a test left running: {running}", file=sys.stderr)
