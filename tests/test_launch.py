"""The test runner (megatron_edit.training.launch): a native crash of a rank is retried once; ranks forked
from the fork server run in the launcher's environment and write to its stdout/stderr."""
import os
import threading
import time

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


def _report(rank: int, path: str) -> None:
    # One write per line: both ranks write to the same file at once.
    os.write(1, f"rank {rank} out {os.environ.get('LAUNCH_TEST_VALUE')}\n".encode())
    os.write(2, f"rank {rank} err {os.getcwd()}\n".encode())
    with open(path + str(rank), "w") as f:
        f.write(str(os.getppid()))


def test_ranks_see_the_launchers_current_environment_and_output(tmp_path, monkeypatch):
    """Two launches from one process: the fork server started by the first one is reused by the second,
    whose ranks must still see what the launcher set and redirected in between (its environment, its
    fds 1 and 2, its working directory)."""
    marks = str(tmp_path / "parent")
    for value in ("first", "second"):
        monkeypatch.setenv("LAUNCH_TEST_VALUE", value)
        monkeypatch.chdir(tmp_path)
        log = str(tmp_path / f"{value}.log")
        with launch.redirect_fds(log):
            launch.run_processes(_report, (marks,), 2, timeout=120)
        lines = sorted(line for line in open(log).read().splitlines() if line.startswith("rank "))
        assert lines == [f"rank 0 err {tmp_path}", f"rank 0 out {value}", f"rank 1 err {tmp_path}",
                         f"rank 1 out {value}"], lines
    if "forkserver" in mp.get_all_start_methods():  # forked by a server, not spawned by us
        assert int(open(marks + "0").read()) != os.getpid()


def _wait_for(rank: int, path: str) -> None:
    with open(f"{path}.pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(f"{path}.go"):
        time.sleep(0.05)


def test_a_forked_rank_is_not_taken_for_the_fork_server(tmp_path):
    """The reapers (run_processes, tests/conftest.py) spare multiprocessing's fork server, and a rank it
    forked carries the server's command line: a rank left running must still be found and killed."""
    import psutil

    base = str(tmp_path / "rank")
    runner = threading.Thread(target=launch.run_processes, args=(_wait_for, (base,), 1, 120))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(base + ".pid0") and time.monotonic() < deadline:
            time.sleep(0.05)
        rank = psutil.Process(int(open(base + ".pid0").read()))
        assert not launch.is_multiprocessing_server(rank)
        assert rank.pid in {p.pid for p in psutil.Process().children(recursive=True)}
        if "forkserver" in mp.get_all_start_methods():
            assert launch.is_multiprocessing_server(rank.parent())
    finally:
        open(base + ".go", "w").close()
        runner.join()


def test_an_exited_orphan_is_found_for_reaping_and_is_no_server():
    """An orphan re-parented to pytest (a child subreaper) that has exited stays a zombie until pytest
    waits for it: the suite's reaper must find it (it once skipped zombies: 73 piled up during the elastic
    tests), and run_processes must leave it alone (it may be a caller's own Popen child)."""
    import subprocess

    import psutil
    from conftest import leftovers

    # The shell exits at once; its background child is re-parented to pytest and exits 0.3 s later.
    out = subprocess.run(["sh", "-c", "sleep 0.3 & echo $!"], capture_output=True, text=True, check=True)
    orphan = psutil.Process(int(out.stdout))
    deadline = time.monotonic() + 30
    while orphan.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orphan.status() == psutil.STATUS_ZOMBIE and orphan.ppid() == os.getpid()
    assert not launch.is_multiprocessing_server(orphan)
    assert orphan.pid in {p.pid for p in leftovers()}
    assert orphan.pid not in launch._descendants()
    psutil.wait_procs([orphan], timeout=10)
    assert not psutil.pid_exists(orphan.pid)
