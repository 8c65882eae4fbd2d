"""What one worker failure costs: elastic workers (torchft) versus synchronous training restarted from
its last checkpoint. Side by side in one invocation, on this machine.

Both runs train the same GPT on 3 data-parallel ranks (global batch G, sequence S) and save every
--save-interval iterations. At iteration --fail-at one rank dies (SIGKILL):

  elastic  3 worker jobs with --local-sgd-fault-tolerance (EDiT all-at-once, H = --sync-interval) and a
           torchft lighthouse. The dead worker is started again at once with the same command; workers
           0 and 1 never stop. Lost: the dead worker's inner steps since its last sync (discarded: its
           delta never reaches the anchor) plus the iterations it missed until it healed from a live peer
           and rejoined, each G/3 samples.
  sync     one job of 3 ranks, synchronous DP. The job dies with its rank and is restarted at once with
           --load. Lost: every iteration since the last checkpoint (G samples each) plus, while the job
           is down, what the healthy job would have trained in that time.

"Back at full speed" is the wall time from the death to the moment every rank trains again: the restarted
worker's heal (elastic) or the restarted job's first iteration (sync). On this machine a restart costs
~10 s of imports and set-up against ~0.1 s steps; on a cluster both are larger (minutes against
seconds), the ratio is what transfers. The tool prints a table and writes JSON.

    python tools/bench_elastic.py                     # ~3 min
    python tools/bench_elastic.py --fail-at 60 --save-interval 50 --train-iters 240
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LIGHTHOUSE = """
import sys, time
from torchft.coordination import LighthouseServer
server = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=60000, quorum_tick_ms=50,
                          heartbeat_timeout_ms=2000)
print(server.address(), flush=True)
while True:
    time.sleep(60)
"""

ITERATION = re.compile(r"\] iteration\s+(\d+)/")


def model_flags(args) -> list[str]:
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
            "--seq-length", str(args.seq_length), "--micro-batch-size", "2", "--global-batch-size", "12",
            "--lr", "3e-3", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--train-iters", str(args.train_iters), "--log-interval", "1", "--eval-interval", "100000",
            "--eval-iters", "0", "--seed", "1234", "--save-interval", str(args.save_interval)]


class Job:
    """One launcher process (``python -m megatron_edit.training.launch``) in its own session."""

    def __init__(self, out: str, nproc: int, flags: list[str]):
        os.makedirs(out, exist_ok=True)
        self.log_path = os.path.join(out, "log")
        env = dict(os.environ, TORCHFT_MANAGER_HOSTNAME="localhost", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_edit.training.launch", "--nproc", str(nproc), "--out", out,
             "--no-params", "--timeout", "1800", "--", *flags],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def last_iteration(self) -> int:
        found = ITERATION.findall(self.log())
        return int(found[-1]) if found else 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_until(predicate, timeout: float = 900.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("benchmark step did not finish in time")


def rate(samples: list[tuple[float, int]]) -> float:
    """Iterations per second between the first and last (time, iteration) sample."""
    (t0, i0), (t1, i1) = samples[0], samples[-1]
    return (i1 - i0) / max(t1 - t0, 1e-9)


def run_elastic(args, work: str) -> dict:
    tokens_per_worker_iteration = 12 // 3 * args.seq_length
    os.makedirs(work, exist_ok=True)
    lighthouse = subprocess.Popen([sys.executable, "-c", LIGHTHOUSE], stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(work, "lighthouse.log"), "wb"), start_new_session=True)
    jobs = []
    try:
        address = "http://localhost:" + lighthouse.stdout.readline().decode().strip().rsplit(":", 1)[1]
        flags = model_flags(args) + [
            "--local-sgd", "edit", "--no-local-sgd-layerwise", "--local-sgd-sync-interval", str(args.sync_interval),
            "--local-sgd-workers", "3", "--local-sgd-fault-tolerance", "--torchft-lighthouse", address,
            "--save", os.path.join(work, "ckpt"), "--local-sgd-debug-fault", f"2:kill:{args.fail_at}"]
        jobs = [Job(os.path.join(work, f"worker{w}"), 1, flags + ["--replica-group-id", str(w)]) for w in range(3)]
        survivor = jobs[0]
        samples = []
        while jobs[2].proc.poll() is None:
            samples.append((time.monotonic(), survivor.last_iteration()))
            time.sleep(0.05)
        died = time.monotonic()
        at_death = survivor.last_iteration()
        restarted = Job(os.path.join(work, "worker2-again"), 1, flags + ["--replica-group-id", "2"])
        jobs.append(restarted)
        healed = wait_until(lambda: re.search(r"joined the sync at iteration (\d+)", restarted.log()))
        back = time.monotonic()
        rejoin = int(healed.group(1))
        outage_rate = (survivor.last_iteration() - at_death) / max(back - died, 1e-9)
        for job in (jobs[0], jobs[1], restarted):
            if job.proc.wait(timeout=1800) != 0:
                raise RuntimeError(f"elastic worker failed; see {job.log_path}")
        before = [s for s in samples if s[1] > 0]
        last_sync = args.fail_at // args.sync_interval * args.sync_interval
        discarded = (args.fail_at - last_sync) * tokens_per_worker_iteration
        missed = (rejoin - args.fail_at) * tokens_per_worker_iteration
        return dict(run="elastic", fail_at=args.fail_at, resumed_from=last_sync, back_at=rejoin,
                    discarded_tokens=discarded, not_trained_tokens=missed, lost_tokens=discarded + missed,
                    seconds_to_full_speed=back - died, iterations_per_second=rate(before),
                    iterations_per_second_while_down=outage_rate)
    finally:
        for job in jobs:
            job.kill()
        lighthouse.kill()


def run_sync(args, work: str) -> dict:
    from megatron_edit.training.launch import rank_pids

    tokens_per_iteration = 12 * args.seq_length
    ckpt = os.path.join(work, "ckpt")
    flags = model_flags(args) + ["--save", ckpt]
    first = Job(os.path.join(work, "first"), 3, flags)
    second = None
    try:
        samples = []
        while first.last_iteration() < args.fail_at:
            if first.proc.poll() is not None:
                raise RuntimeError(f"sync run ended early; see {first.log_path}")
            samples.append((time.monotonic(), first.last_iteration()))
            time.sleep(0.02)
        ranks = rank_pids(first.proc.pid)
        os.kill(ranks[-1], signal.SIGKILL)
        died = time.monotonic()
        reached = first.last_iteration()
        first.proc.wait(timeout=300)
        reached = max(reached, first.last_iteration())
        saved = max(int(m.group(1)) for m in (re.fullmatch(r"iter_(\d+)", d) for d in os.listdir(ckpt)) if m)
        second = Job(os.path.join(work, "second"), 3, flags + ["--load", ckpt])
        wait_until(lambda: second.last_iteration() > saved)
        back = time.monotonic()
        if second.proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"restarted sync run failed; see {second.log_path}")
        speed = rate([s for s in samples if s[1] > 0])
        discarded = (reached - saved) * tokens_per_iteration
        idle = (back - died) * speed * tokens_per_iteration
        return dict(run="sync restart", fail_at=reached, resumed_from=saved, back_at=saved + 1,
                    discarded_tokens=discarded, not_trained_tokens=int(idle), lost_tokens=int(discarded + idle),
                    seconds_to_full_speed=back - died, iterations_per_second=speed,
                    iterations_per_second_while_down=0.0)
    finally:
        first.kill()
        if second is not None:
            second.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--fail-at", type=int, default=60)
    parser.add_argument("--save-interval", type=int, default=50)
    parser.add_argument("--sync-interval", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--out", default=None, help="keep logs and JSON here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not 0 < args.fail_at < args.train_iters:
        parser.error("--fail-at must be inside the run")
    work = args.out or tempfile.mkdtemp(prefix="bench_elastic_")
    rows = [run_elastic(args, os.path.join(work, "elastic")), run_sync(args, os.path.join(work, "sync"))]
    with open(os.path.join(work, "bench_elastic.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\none failure at iteration {args.fail_at}; checkpoints every {args.save_interval}; "
          f"H = {args.sync_interval}; {args.seq_length * 12} tokens per iteration (all workers)\n")
    print("| run | resumes from | discarded tokens | tokens not trained while down | lost tokens | "
          "seconds to full speed | it/s before | it/s while down |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['resumed_from']} | {r['discarded_tokens']:,} | {r['not_trained_tokens']:,} | "
              f"{r['lost_tokens']:,} | {r['seconds_to_full_speed']:.1f} | {r['iterations_per_second']:.1f} | "
              f"{r['iterations_per_second_while_down']:.1f} |")
    elastic, sync = rows
    print(f"\nelastic / sync: lost tokens {elastic['lost_tokens'] / max(sync['lost_tokens'], 1):.2f}x, "
          f"time to full speed {elastic['seconds_to_full_speed'] / sync['seconds_to_full_speed']:.2f}x "
          f"(logs and JSON in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
