"""The test runner (megatron_edit.training.launch.spawn_training): a native crash of a rank is retried once."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_edit.training import launch


def _runner(crashes: list):
    calls = []

    def fake(fn, args, nprocs, timeout):
        calls.append(args[2])
        if crashes:
            raise mp.ProcessExitedException("rank died", 0, 1, -11, crashes.pop(0))
        torch.save({"ok": len(calls)}, os.path.join(args[3], "rank0.pt"))

    return fake, calls


def test_a_native_crash_is_run_once_more(monkeypatch):
    fake, calls = _runner(["SIGSEGV"])
    monkeypatch.setattr(launch, "run_processes", fake)
    assert launch.spawn_training(["--train-iters", "2"], 1) == [{"ok": 2}]
    assert len(calls) == 2


@pytest.mark.parametrize("crashes,argv", [
    (["SIGSEGV", "SIGSEGV"], []),  # a second crash fails
    (["SIGKILL"], []),  # not a native crash (e.g. the OOM killer, or a test's own kill)
    (["SIGSEGV"], ["--save", "/tmp/x"]),  # a run that writes checkpoints is not repeated
])
def test_other_failures_are_not_retried(monkeypatch, crashes, argv):
    fake, calls = _runner(crashes)
    monkeypatch.setattr(launch, "run_processes", fake)
    with pytest.raises(mp.ProcessExitedException):
        launch.spawn_training(argv, 1)
