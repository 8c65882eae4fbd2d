"""Run the training entry on N local gloo ranks (torch.multiprocessing) and collect measurements.

For tests and benchmarks on one machine: every rank records its loss history, validation losses,
per-iteration wall time (and whether it synced), a digest of its fp32 main shards, peak resident memory
and local-SGD byte counts; optionally its full (gathered) parameters by global name.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shlex
import sys
import tempfile
import time
from typing import Sequence

import torch
import torch.multiprocessing as mp


@contextlib.contextmanager
def rendezvous_store():
    """The ranks' rendezvous store, hosted by this launcher on a port the kernel picks and held until the
    ranks are done; every rank connects as a client (``TORCHELASTIC_USE_AGENT_STORE``, set by
    :func:`set_rank_environment`), as under torchrun's agent. Yields the port. Picking a free port and closing it for
    rank 0 to bind later left it free through rank 0's imports (seconds), long enough for another
    process's bind(0) to take it on a busy machine (torchft servers and gloo pairs of other local jobs)."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield store.port
    finally:
        del store


def set_rank_environment(rank: int, world: int, port: int) -> None:
    """torch.distributed's env:// variables for a spawned rank whose store a launcher holds
    (:func:`rendezvous_store`)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")


def main_shard_digest(trainer) -> tuple[float, float]:
    """(sum, sum of squares) in float64 of this rank's fp32 main shards."""
    from megatron_edit import mcore_adapter

    total = torch.zeros(2, dtype=torch.float64)
    for _, main, _ in mcore_adapter.main_param_pairs(trainer.optimizer):
        m = main.detach().double()
        total[0] += m.sum()
        total[1] += m.pow(2).sum()
    return float(total[0]), float(total[1])


def keep_transformers_out() -> None:
    """Spawned ranks of tests and benchmarks never import Hugging Face transformers. megatron-core
    imports it whenever it is installed (its tokenizer and chat-template modules; it is installed with
    the test extra for the Hugging Face export check), which costs about 0.75 s and 100+ modules per
    rank, and runs with it coincided with rare native aborts ("malloc(): unaligned tcache chunk
    detected") in gloo runs that were never seen without it. megatron-core's imports are guarded, so it
    falls back as when transformers is absent; our tokenizers do not use it."""
    sys.modules.setdefault("transformers", None)


def _rank_main(rank: int, world: int, port: int, argv: list[str], out_dir: str, keep_params: bool,
               keep_snapshots: bool) -> None:
    set_rank_environment(rank, world, port)
    torch.set_num_threads(1)
    keep_transformers_out()
    from megatron.core import parallel_state as ps

    from megatron_edit import mcore_adapter
    from megatron_edit.training.model import global_param_name, unwrap
    from megatron_edit.checkpoint.save_load import checkpoint_iteration
    from megatron_edit.training.pretrain_gpt import build_trainer, shutdown

    trainer = build_trainer(argv)
    initial_digest = main_shard_digest(trainer)  # after a --load: what the run continues from
    digests, step_times = [], []
    last = [time.perf_counter()]

    snapshots, sync_events, sync_anomalous, sync_steps, sync_repaired, sync_moments = [], [], [], [], [], []

    def on_step(t) -> None:
        now = time.perf_counter()
        step_times.append((t.iteration, now - last[0], t.last_sync_report is not None))
        sync_events.append(t.last_sync_report.bytes_sent if t.last_sync_report is not None else 0)
        if t.last_sync_report is not None:
            sync_anomalous.append((t.iteration, list(t.last_sync_report.anomalous)))
            sync_steps.append(checkpoint_iteration(t))  # A-EDiT: the agreed step count at the sync
            sync_repaired.append((t.iteration, list(t.last_sync_report.repaired)))
            if keep_snapshots:  # the inner moments right after the sync (inner_state_repair.py)
                moments = mcore_adapter.inner_moments(t.optimizer, [s.main for s in t.local_sgd.shards])
                sync_moments.append((t.iteration, [[m.detach().clone() for m in ms] for ms in moments]))
        digests.append(main_shard_digest(t))
        if keep_snapshots:
            snapshots.append([s.main.detach().float().clone() for s in t.local_sgd.shards])
        last[0] = time.perf_counter()

    validation_seconds = []  # seconds since the start of training at each validation (benchmarks)
    log_validation = trainer.log_validation

    def timed_validation() -> None:
        done = len(trainer.validation_history)
        log_validation()
        if len(trainer.validation_history) > done:
            validation_seconds.append(time.perf_counter() - start)

    trainer.log_validation = timed_validation
    start = time.perf_counter()
    history = trainer.train(on_step=on_step)
    wall = time.perf_counter() - start
    params = {}
    if keep_params:
        for chunk in trainer.model:
            inner = unwrap(chunk)
            for name, p in inner.named_parameters():
                params[global_param_name(inner, name)] = p.detach().float().clone()
    topo = trainer.topology
    local_sgd = trainer.local_sgd
    result = dict(
        losses=history, validation=trainer.validation_history, validation_seconds=validation_seconds,
        digests=digests, step_times=step_times,
        initial_digest=initial_digest,
        final_shards=[s.main.detach().float().clone() for s in local_sgd.shards] if keep_snapshots else [],
        exposed_comm_seconds=local_sgd.exposed_comm_seconds if local_sgd else 0.0,
        waited_network_seconds=local_sgd.waited_network_seconds if local_sgd else 0.0,
        wall_time=wall, params=params, worker=topo.worker_index, tp=ps.get_tensor_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_rank(), intra=topo.intra_dp_group.rank(),
        last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        consumed_samples=trainer.consumed_samples,
        sync_bytes=local_sgd.bytes_sent_total if local_sgd else 0,
        sync_bytes_measured=local_sgd.bytes_sent_measured if local_sgd else 0,
        snapshots=snapshots,
        sync_event_bytes=sync_events,
        sync_anomalous=sync_anomalous,
        sync_steps=sync_steps,
        sync_repaired=sync_repaired,
        sync_moments=sync_moments,
        penalty_stats={k: v.clone() for k, v in vars(local_sgd.stats).items()} if local_sgd else {},
        faults_injected=local_sgd.faults.injected if local_sgd is not None and local_sgd.faults is not None else 0,
        shard_keys=[s.key for s in local_sgd.shards] if local_sgd else [],
        sync_units=len(local_sgd.units) if local_sgd else 0,
        fragment_of_key=local_sgd._fragment_of_key() if local_sgd is not None and local_sgd.streaming else None,
        outer_state_bytes=local_sgd.outer_state_bytes() if local_sgd else 0,
        main_shard_bytes=sum(m.numel() * 4 for _, m, _ in mcore_adapter.main_param_pairs(trainer.optimizer)),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()


def kill_process_tree(pids: Sequence[int]) -> None:
    """SIGKILL these processes and everything they started (e.g. dist_checkpointing's writer processes),
    then reap them. SIGTERM is not enough: a rank blocked in a gloo collective whose peer died can outlive
    the test that started it."""
    import psutil

    victims = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            victims += proc.children(recursive=True) + [proc]
        except psutil.NoSuchProcess:
            pass
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def become_subreaper() -> None:
    """Orphans of our children are re-parented to this process, not to init (Linux
    ``PR_SET_CHILD_SUBREAPER``), so they can be found and reaped: a rank that dies without its exit
    handlers (killed, ``os._exit``) leaves e.g. dist_checkpointing's ``multiprocessing.Manager`` server
    running forever."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


_FORK_SERVER = "multiprocessing.forkserver"  # in the fork server's command line (and its forked ranks')


def is_multiprocessing_server(proc) -> bool:
    """multiprocessing's own long-lived helpers, shared by every run of this process: the resource
    tracker and this process's fork server. Not the ranks the server forked: they carry its command line,
    so the server is known by its pid (``multiprocessing.forkserver._forkserver._forkserver_pid``,
    checked on Python 3.11). A zombie is none of them: it has exited and waits to be reaped."""
    from multiprocessing import forkserver

    import psutil

    if proc.pid == getattr(forkserver._forkserver, "_forkserver_pid", None):
        return True
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except psutil.ZombieProcess:
        return False


def rank_pids(launcher_pid: int) -> list[int]:
    """The ranks a launcher process (``python -m megatron_edit.training.launch``) runs, in start order:
    the children of its fork server (or, where ranks are spawned, its own children that run the spawn
    entry); not the helpers the ranks start."""
    import psutil

    ranks = []
    for child in psutil.Process(launcher_pid).children():
        try:
            command = " ".join(child.cmdline())
            if _FORK_SERVER in command:
                started = child.children()
            elif "spawn_main" in command:
                started = [child]
            else:
                continue
            ranks += [(p.create_time(), p.pid) for p in started]
        except psutil.NoSuchProcess:
            pass
    return [pid for _, pid in sorted(ranks)]


def _descendants() -> set[int]:
    """This process's live descendants but multiprocessing's servers. Zombies are left to whoever waits
    for them: one may be a caller's own ``subprocess.Popen`` child, whose exit code reaping would lose."""
    import psutil

    out = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and not is_multiprocessing_server(proc):
                out.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return out


class _InheritedFd:
    """One of the launcher's file descriptors, passed to a rank as multiprocessing passes its own pipes
    (``reduction.DupFd``: the rank gets a duplicate of the same open file, offset shared)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _detach_fd, (reduction.DupFd(self.fd),)


def _detach_fd(dup) -> int:
    return dup.detach()


def _in_launcher_context(rank: int, fn, environ: dict, stdio: tuple, args: tuple) -> None:
    """Run ``fn(rank, *args)`` with the launcher's environment and stdout/stderr at the time it started
    the ranks (a forked rank inherits the fork server's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), stdio):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def run_processes(fn, args: tuple, nprocs: int, timeout: float):
    """torch.multiprocessing, joined with a deadline; whatever happens (a rank fails, the deadline passes,
    the caller is interrupted) no rank or process started by a rank is left running.

    Ranks fork from multiprocessing's fork server, which imported torch and megatron-core once
    (:mod:`megatron_edit.training.rank_imports`; spawn made every rank import them again, ~7 CPU-s each).
    A forked rank would otherwise see the fork server's environment and stdout/stderr, fixed when that
    server started; each rank is handed this process's current ones (:func:`_in_launcher_context`), so it
    runs as a spawned rank did. Where there is no fork server, ranks are spawned."""
    become_subreaper()
    before = _descendants()
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.get_context(method).set_forkserver_preload(["megatron_edit.training.rank_imports"])
    stdio = (_InheritedFd(1), _InheritedFd(2))
    context = mp.start_processes(_in_launcher_context, args=(fn, dict(os.environ), stdio, args), nprocs=nprocs,
                                 join=False, start_method=method)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} ranks did not finish within {timeout:.0f} s")
    finally:
        kill_process_tree([p.pid for p in context.processes if p.is_alive()])
        kill_process_tree(sorted(_descendants() - before))


def spawn_training(argv: Sequence[str], world_size: int, keep_params: bool = True,
                   keep_snapshots: bool = False, timeout: float = 900.0) -> list[dict]:
    """Train on `world_size` local gloo ranks; returns each rank's result dict (index = global rank).
    ``keep_snapshots``: every iteration, a copy of each fp32 main shard of the local-SGD engine (and at
    every sync, of its inner moments).
    ``timeout``: seconds before every rank is killed and TimeoutError raised."""
    stateless = not {"--save", "--load"} & set(argv)
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                with rendezvous_store() as port:
                    run_processes(_rank_main, (world_size, port, list(argv), out_dir, keep_params, keep_snapshots),
                                  world_size, timeout)
            except mp.ProcessExitedException as e:
                if attempt == 2 or not stateless or e.signal_name not in NATIVE_CRASHES:
                    raise
                print(f"spawn_training: a rank died of {e.signal_name} (native code); running once more",
                      file=sys.stderr, flush=True)
                continue
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# A rank killed by one of these died in native code (seen once in CI: SIGSEGV of rank 0 in a 4-rank
# interleaved-pipeline run on megatron-core 0.19.2, which passed in every run before and in 3 reruns); a
# run that writes no checkpoint is repeated once. Wrong results, Python errors and a second crash fail.
NATIVE_CRASHES = ("SIGSEGV", "SIGBUS", "SIGABRT")


def loss_curve(results: list[dict]) -> list[float]:
    """The loss history the run printed (identical on every last-stage rank)."""
    return next(r["losses"] for r in results if r["last_stage"])


def validation_curve(results: list[dict]) -> list[tuple[int, float]]:
    return next(r["validation"] for r in results if r["last_stage"])


def spawn_training_logged(argv: Sequence[str], world_size: int, log_path: str, **kwargs) -> list[dict]:
    """spawn_training with every rank's output (after the argv line) appended to ``log_path``
    (benchmarks: one log per run)."""
    with redirect_fds(log_path):
        print("argv: " + " ".join(shlex.quote(x) for x in argv), flush=True)
        return spawn_training(argv, world_size, **kwargs)


def last_line(error: BaseException) -> str:
    """``Type: last line of the message`` (a failed run in a benchmark table)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


@contextlib.contextmanager
def redirect_fds(path: str):
    """Send this process's fd 1/2 (inherited by the spawned ranks) to a log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megatron_edit.training.launch --nproc N --out DIR -- TRAINING FLAGS``: one job of N local
    gloo ranks whose results land in DIR/rank{r}.pt (elastic-worker tests run one such job per worker)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_edit.training.launch")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--no-params", action="store_true")
    parser.add_argument("flags", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    os.makedirs(args.out, exist_ok=True)
    with rendezvous_store() as port:
        run_processes(_rank_main, (args.nproc, port, list(flags), args.out, not args.no_params, False),
                      args.nproc, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
