"""Straggler benchmark: wall time to a fixed validation loss with one worker FACTOR times slower.

Every run trains the GPT of ``tools/bench_convergence.py`` (its model, corpus, LR schedule, DDP settings) on
4 ranks = 4 workers for the same token budget (--train-iters x global batch), with
``--local-sgd-debug-slow-worker 1:FACTOR`` (worker 1's ranks sleep FACTOR - 1 times their own step time
after each step; megatron_edit/fault_injection.py). Runs:

  sync           synchronous DP: every iteration a synchronous local-SGD warmup iteration
                 (--local-sgd-warmup-iters = --train-iters: gradients averaged over all workers every step,
                 the same reduction as DP), so the slow worker can be simulated; everybody waits for it
  edit           EDiT, a sync every H iterations: everybody waits for the slow worker at each sync
  a-edit         A-EDiT, a sync every --sync-time seconds: fast workers take more inner steps meanwhile
  a-edit-steps   A-EDiT with --pseudo-grad-step-weighted (pseudo-gradients weighted by inner steps)

Validation runs every --eval-interval iterations (default here 16 = H, on sync iterations; A-EDiT: at the first sync after each interval of agreed
steps, when all workers hold the same parameters), timed from the start of training. The target loss is
--target-loss, or by default the worst final validation loss over all runs (so every run reaches it); a run's
time to target interpolates linearly between the two validations around the first crossing. Over --seeds
the table reports means and spread; the plot shows validation loss against wall time.

The default --sync-time (4 s) gives the fast workers about H = 16 steps between syncs on this machine
(~0.25 s per step with 4 ranks on 2 cores); the tool prints the measured steps per sync. On 2 shared cores
the sleeping worker frees a core for the others, so the fast workers run a little faster than they would
alone: compare ratios between runs of one invocation.

    python tools/bench_straggler.py                                    # 192 iterations, factor 2, ~6 min
    python tools/bench_straggler.py --seeds 1,2,3 --slow-factor 2 --sync-time 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Optional, Sequence

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import bench_convergence as bench  # noqa: E402  (tools/: the same model and data)

RUNS = ("sync", "edit", "a-edit", "a-edit-steps")


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(straggler options, bench_convergence options for everything else)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--slow-factor", type=float, default=2.0, help="worker 1 is this many times slower")
    p.add_argument("--sync-time", type=float, default=4.0, help="A-EDiT's --local-sgd-sync-time (seconds)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="validation loss to reach (default: the worst final validation loss of all runs)")
    ours, rest = p.parse_known_args(argv)
    runs = [r.strip() for r in ours.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: {','.join(bad) or 'empty'} not in {','.join(RUNS)}")
    if not ours.slow_factor >= 1:
        p.error(f"--slow-factor {ours.slow_factor} must be >= 1")
    ours.runs = runs
    defaults = {"--output-dir": os.path.join("runs", "bench_straggler"), "--eval-interval": "16"}
    a = bench.parse_args(rest + [x for flag, value in defaults.items() if flag not in rest for x in (flag, value)])
    return ours, a


def run_args(name: str, ours: argparse.Namespace, a: argparse.Namespace) -> list[str]:
    slow = ["--local-sgd-debug-slow-worker", f"1:{ours.slow_factor:g}", *shlex.split(a.local_sgd_args)]
    workers = ["--local-sgd-workers", str(a.nproc)]
    if name == "sync":
        return ["--local-sgd", "diloco", *workers, "--local-sgd-warmup-iters", str(a.train_iters), *slow]
    local = ["--local-sgd-warmup-iters", str(a.warmup_iters), *workers, *slow]
    if name == "edit":
        return ["--local-sgd", "edit", "--local-sgd-sync-interval", str(a.sync_interval), *local]
    steps = ["--pseudo-grad-step-weighted"] if name == "a-edit-steps" else []
    return ["--local-sgd", "a-edit", "--local-sgd-sync-time", f"{ours.sync_time:g}", *local, *steps]


def fmt_seconds(values: list[float]) -> str:
    mean, std = bench.mean_std(values)
    if not math.isfinite(mean):
        return ", ".join(f"{v:.1f}" for v in values)
    return f"{mean:.1f}" + (f" +- {std:.1f}" if len(values) > 1 else "")


def time_to(target: float, curve: list[tuple[float, float]]) -> float:
    """First time the validation loss is <= target, linear between validations (from the first point's
    loss at time 0 up: the first validation is after training started); inf if never reached."""
    prev: Optional[tuple[float, float]] = None
    for t, loss in curve:
        if math.isfinite(loss) and loss <= target:
            if prev is None or not prev[1] > loss:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (t, loss)
    return math.inf


def summarize(results: list[dict]) -> dict:
    first = next(r for r in results if r["last_stage"])
    curve = [(t, loss) for t, (_, loss) in zip(first["validation_seconds"], first["validation"])]
    steps_by_worker: dict[int, int] = {}
    for r in results:
        steps_by_worker[r["worker"]] = max(steps_by_worker.get(r["worker"], 0), len(r["step_times"]))
    syncs = sum(1 for _, _, s in first["step_times"] if s)
    return dict(curve=curve, final_val=curve[-1][1] if curve else float("nan"),
                wall_time=max(r["wall_time"] for r in results), steps_by_worker=steps_by_worker, syncs=syncs,
                consumed=first["consumed_samples"])


def plot(runs: dict, target: float, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: straggler.png skipped"
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, per_seed) in enumerate(runs.items()):
        for j, s in enumerate(per_seed.values()):
            ts, ls = zip(*s["curve"]) if s["curve"] else ((), ())
            ax.plot(ts, ls, color=f"C{i}", marker="o", ms=3, lw=1, alpha=0.8, label=name if j == 0 else None)
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:.4f}")
    ax.set_xlabel("wall time since the start of training (s)")
    ax.set_ylabel("validation lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ours, a = parse_args(argv)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    os.makedirs(a.output_dir, exist_ok=True)
    start = time.perf_counter()
    prefix, tokenizer = bench.ensure_data(a.data_dir, a.corpus)
    runs: dict[str, dict[int, dict]] = {name: {} for name in ours.runs}
    failures: dict[str, str] = {}
    for seed in seeds:
        base = bench.common_args(a, prefix, tokenizer, seed)
        for name in ours.runs:
            tag = f"{name}.seed{seed}"
            t0 = time.perf_counter()
            results = bench.run_logged(tag, base + run_args(name, ours, a), a, failures, label="straggler")
            if results is None:
                continue
            s = runs[name][seed] = summarize(results)
            print(f"[straggler] {tag}: final val {bench.fmt_loss(s['final_val'])}, training {s['wall_time']:.0f} s, "
                  f"steps per worker {s['steps_by_worker']}, {s['syncs']} syncs ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    done = {n: r for n, r in runs.items() if r}
    finals = [s["final_val"] for r in done.values() for s in r.values() if math.isfinite(s["final_val"])]
    target = ours.target_loss if ours.target_loss is not None else (max(finals) if finals else float("nan"))
    ref = None
    if "edit" in done:
        ref = sum(time_to(target, s["curve"]) for s in done["edit"].values()) / len(done["edit"])
    lines = [f"| run | time to validation loss {target:.4f} (s) | vs EDiT | final validation loss | training "
             "wall time (s) | inner steps per worker (fast, slow) | syncs |", "|---|---|---|---|---|---|---|"]
    for name, per_seed in done.items():
        times = [time_to(target, s["curve"]) for s in per_seed.values()]
        t_mean = sum(times) / len(times)
        walls = [s["wall_time"] for s in per_seed.values()]
        first = next(iter(per_seed.values()))
        steps = first["steps_by_worker"]
        lines.append(
            f"| {name} | {fmt_seconds(times)} | {(f'{t_mean / ref:.2f}' if ref and math.isfinite(t_mean) else '-')}"
            f" | {bench.fmt_mean_std([s['final_val'] for s in per_seed.values()])} | {fmt_seconds(walls)} | "
            f"{steps.get(0)}, {steps.get(1)} | {first['syncs']} |")
    for tag, why in failures.items():
        lines.append(f"| {tag} | failed: {why} | | | | | |")
    notes = [
        f"Setup: corpus {a.corpus}, {a.nproc} workers of 1 rank, worker 1 {ours.slow_factor:g}x slower, "
        f"{a.train_iters} iterations' tokens (global batch {a.global_batch_size}), H={a.sync_interval} (edit), "
        f"sync time {ours.sync_time:g} s (a-edit), {a.warmup_iters} synchronous warmup iterations, validation every "
        f"{a.eval_interval} (agreed) iterations, seeds {','.join(map(str, seeds))}.",
        "time to validation loss: from the start of training, linear between validations; mean +- std over seeds.",
    ]
    md = ["# Straggler benchmark", "", *lines, "", *[f"- {n}" for n in notes]]
    msg = plot(done, target, os.path.join(a.output_dir, "straggler.png"),
               f"worker 1 {ours.slow_factor:g}x slower: validation loss over wall time") if done else None
    md += ["", msg or "Plot: straggler.png", "", f"Tool wall time: {time.perf_counter() - start:.0f} s"]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    with open(os.path.join(a.output_dir, "straggler.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.output_dir, "straggler.json"), "w") as f:
        json.dump({"args": vars(a), "slow_factor": ours.slow_factor, "sync_time": ours.sync_time, "target": target,
                   "runs": runs, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
