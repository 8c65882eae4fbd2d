"""Elastic-worker runs on one machine: a torchft lighthouse and one job per worker, all subprocesses.

Every worker is ``python -m megatron_edit.training.launch --nproc N --out DIR -- FLAGS`` in its own
session (so a whole worker can be killed), logging to DIR/log. ``ElasticRun`` kills everything it
started when it exits, whatever happened.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import torch

from megatron_edit.training import launch
from mp_harness import TINY_MODEL

LIGHTHOUSE = """
import sys, time
from torchft.coordination import LighthouseServer
server = LighthouseServer(bind="[::]:0", min_replicas=int(sys.argv[1]), join_timeout_ms=int(sys.argv[2]),
                          quorum_tick_ms=50, heartbeat_timeout_ms=int(sys.argv[3]))
print(server.address(), flush=True)
while True:
    time.sleep(60)
"""

ELASTIC = TINY_MODEL + ["--global-batch-size", "12", "--lr", "3e-3", "--local-sgd-workers", "3",
                        "--local-sgd-fault-tolerance", "--torchft-timeout", "20",
                        "--torchft-quorum-timeout", "120"]


class ElasticRun:
    def __init__(self, tmp_path, min_replicas: int, join_timeout_ms: int = 60000, heartbeat_timeout_ms: int = 2000):
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.lighthouse = subprocess.Popen(
            [sys.executable, "-c", LIGHTHOUSE, str(min_replicas), str(join_timeout_ms), str(heartbeat_timeout_ms)],
            stdout=subprocess.PIPE, stderr=open(tmp_path / "lighthouse.log", "wb"), start_new_session=True)
        self.procs.append(self.lighthouse)
        address = self.lighthouse.stdout.readline().decode().strip()
        assert address.startswith("http"), address
        self.address = "http://localhost:" + address.rsplit(":", 1)[1]  # it names the host; all is local here

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)

    def start(self, worker: int, flags: list[str], name: str | None = None, nproc: int = 1,
              lighthouse: str | None = None) -> subprocess.Popen:
        out = self.tmp / (name or f"worker{worker}")
        out.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "megatron_edit.training.launch", "--nproc", str(nproc), "--out", str(out),
                "--timeout", "600", "--", *flags, "--replica-group-id", str(worker),
                "--torchft-lighthouse", lighthouse or self.address]
        env = dict(os.environ, TORCHFT_MANAGER_HOSTNAME="localhost", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, stdout=open(out / "log", "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        proc.out_dir = out
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait(proc: subprocess.Popen, timeout: float = 600) -> int:
        return proc.wait(timeout=timeout)

    def wait_all_succeed(self, procs: list[subprocess.Popen], timeout: float = 600) -> None:
        """Wait for every worker; if any failed, fail naming each one's exit code with the tail of every
        log, the lighthouse's included: a worker stuck in a quorum is explained by a peer that died."""
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
        if any(code != 0 for code in codes):
            tails = [f"--- {p.out_dir.name}: exit {code}\n{self.log(p)[-2500:]}" for p, code in zip(procs, codes)]
            lighthouse = (self.tmp / "lighthouse.log").read_text(errors="replace")[-1500:]
            raise AssertionError("\n".join(tails + [f"--- lighthouse\n{lighthouse}"]))

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        return (proc.out_dir / "log").read_text(errors="replace")

    @staticmethod
    def results(proc: subprocess.Popen) -> list[dict]:
        files = sorted(proc.out_dir.glob("rank*.pt"))
        return [torch.load(f, weights_only=False) for f in files]

    def wait_for_line(self, proc: subprocess.Popen, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log(proc)):
                return
            if proc.poll() is not None:
                raise AssertionError(f"worker exited ({proc.returncode}) before {pattern!r}:\n{self.log(proc)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"no {pattern!r} within {timeout} s")


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """The training ranks of a worker job, in start order."""
    return launch.rank_pids(proc.pid)


def sync_lines(log: str) -> list[tuple[int, int]]:
    """(iteration, workers) of every local-sgd sync line."""
    return [(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r"local-sgd sync \| iteration\s+(\d+) \| workers: (\d+)", log)]


def iteration_losses(log: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", log)}
