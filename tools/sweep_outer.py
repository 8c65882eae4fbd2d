"""Sweep local-SGD hyper-parameters (outer lr, outer momentum, H, warmup, fragments, alpha, ...) side by side.

Every point of the grid is one run of the same GPT on the same data as ``tools/bench_convergence.py`` (its
model, data preparation, LR schedule and DDP settings; its METHOD[+FAULT] run names), with the swept flags
appended (the last occurrence of a flag wins), once per seed. Synchronous DP is run once per seed as the
reference. Output: a Markdown table sorted by the mean final validation loss (with the ratio to synchronous
DP), ``sweep.png`` (the final validation loss against each swept flag, one line per value of the others),
one log per run and ``sweep.json``.

Validations should stay on sync iterations for every H in the grid: choose --eval-interval, --train-iters and
--warmup-iters so that (iteration - warmup) is a multiple of every swept H (the tool warns otherwise).

    python tools/sweep_outer.py --method diloco --grid outer-lr=0.4,0.7,1.0 --grid outer-momentum=0.8,0.9
    python tools/sweep_outer.py --method diloco --grid local-sgd-sync-interval=16,32,64 --train-iters 768 \\
        --eval-interval 192 --warmup-iters 64 --seeds 1,2,3
    python tools/sweep_outer.py --method streaming --grid streaming-fragments=1,2,4 --grid streaming-mix-alpha=0,0.5
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import bench_convergence as bench  # noqa: E402  (tools/: the same model, data and run names)


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['outer-lr=0.4,0.7'] -> [('--outer-lr', ['0.4', '0.7'])]; a one-line error otherwise."""
    grid = []
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not choices:
            raise SystemExit(f"--grid: expected FLAG=V1,V2,..., got {item!r}")
        if any(name == flag for flag, _ in grid):
            raise SystemExit(f"--grid: --{name} is given twice")
        grid.append((name, choices))
    return grid


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(sweep options, bench_convergence options for everything else)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--method", default="diloco", help="a bench_convergence run name, METHOD[+FAULT]")
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="a training flag and its values (repeatable: the grid is the product)")
    p.add_argument("--no-sync-reference", action="store_true", help="skip the synchronous DP reference runs")
    ours, rest = p.parse_known_args(argv)
    if not ours.grid:
        p.error("give at least one --grid FLAG=V1,V2,...")
    bench.split_run(ours.method)
    a = bench.parse_args(rest)
    if not any(x.startswith("--output-dir") for x in rest):
        a.output_dir = os.path.join("runs", "sweep_outer")
    return ours, a


def _label(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def plot(results: list[dict], grid: list[tuple[str, list[str]]], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: sweep.png skipped"
    fig, axes = plt.subplots(1, len(grid), figsize=(5 * len(grid), 4), squeeze=False)
    for ax, (flag, values) in zip(axes[0], grid):
        others = [f for f, _ in grid if f != flag]
        groups: dict[tuple, list] = {}
        for r in results:
            groups.setdefault(tuple(r["point"][o] for o in others), []).append(r)
        for key, rows in groups.items():
            xs, ys = [], []
            for v in values:
                row = next((r for r in rows if r["point"][flag] == v), None)
                if row is not None and math.isfinite(row["mean"]):
                    xs.append(float(v))
                    ys.append(row["mean"])
            label = " ".join(f"{o}={k}" for o, k in zip(others, key)) or "final validation loss"
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(f"--{flag}")
        ax.set_ylabel("final validation loss (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ours, a = parse_args(argv)
    grid = parse_grid(ours.grid)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    os.makedirs(a.output_dir, exist_ok=True)
    start = time.perf_counter()
    prefix, tokenizer = bench.ensure_data(a.data_dir, a.corpus)

    hs = [int(v) for f, vs in grid if f == "local-sgd-sync-interval" for v in vs] or [a.sync_interval]
    warmups = [int(v) for f, vs in grid if f == "local-sgd-warmup-iters" for v in vs] or [a.warmup_iters]
    off = sorted({(h, w) for h in hs for w in warmups for e in bench.eval_iterations(a) if e > w and (e - w) % h})
    points = [dict(zip([f for f, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    runs = ([("sync", {})] if not ours.no_sync_reference else []) + [(ours.method, p) for p in points]
    finals: dict[str, dict[int, float]] = {}
    failures: dict[str, str] = {}
    for seed in seeds:
        base = bench.common_args(a, prefix, tokenizer, seed)
        for name, point in runs:
            label = name if not point else f"{name} {_label(point)}"
            argv_run = base + bench.method_args(name, a) + [x for f, v in point.items() for x in (f"--{f}", v)]
            tag = f"{name}.{'_'.join(f'{k}{v}' for k, v in point.items())}.seed{seed}".replace("/", "_")
            t0 = time.perf_counter()
            results = bench.run_logged(tag, argv_run, a, failures, label="sweep")
            if results is None:
                continue
            final = bench.summarize(results, a.seq_length)["final_val"]
            finals.setdefault(label, {})[seed] = final
            print(f"[sweep] {label} seed {seed}: final val {bench.fmt_loss(final)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    reference = bench.mean_std(list(finals.get("sync", {}).values()))[0] if "sync" in finals else None
    rows = []
    for name, point in runs:
        label = name if not point else f"{name} {_label(point)}"
        values = [finals.get(label, {}).get(s) for s in seeds]
        values = [v for v in values if v is not None]
        mean = bench.mean_std(values)[0] if values else float("nan")
        rows.append(dict(label=label, point=point, values=values, mean=mean))
    swept = [r for r in rows if r["point"]]
    swept.sort(key=lambda r: r["mean"] if math.isfinite(r["mean"]) else math.inf)
    lines = [f"| {' | '.join('--' + f for f, _ in grid)} | final validation loss ({len(seeds)} seed"
             f"{'s' if len(seeds) > 1 else ''}) | vs sync DP |",
             "|" + "---|" * (len(grid) + 2)]
    for r in swept:
        ratio = f"{r['mean'] / reference:.4f}" if reference and math.isfinite(r["mean"]) else "-"
        lines.append(f"| {' | '.join(r['point'][f] for f, _ in grid)} | "
                     f"{bench.fmt_mean_std(r['values']) if r['values'] else 'failed'} | {ratio} |")
    notes = [f"{ours.method}, {a.nproc} workers, {a.train_iters} iterations, seeds {','.join(map(str, seeds))}; "
             f"other settings as tools/bench_convergence.py (H {a.sync_interval}, warmup {a.warmup_iters} unless "
             f"swept).",
             f"synchronous DP: {bench.fmt_mean_std(rows[0]['values'])}" if not ours.no_sync_reference and rows[0]['values']
             else "no synchronous reference"]
    if off:
        notes.append(f"WARNING: some validations are not on sync iterations for (H, warmup) in {off}")
    notes += [f"FAILED {k}: {v}" for k, v in failures.items()]
    plot_msg = plot(swept, grid, os.path.join(a.output_dir, "sweep.png"))
    text = "\n".join(["# Sweep", "", *lines, "", *[f"- {n}" for n in notes], "",
                      plot_msg or "Plot: sweep.png", "", f"Tool wall time: {time.perf_counter() - start:.0f} s"]) + "\n"
    print()
    print(text)
    with open(os.path.join(a.output_dir, "sweep.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.output_dir, "sweep.json"), "w") as f:
        json.dump({"grid": grid, "method": ours.method, "seeds": seeds, "rows": rows, "failures": failures,
                   "args": vars(a)}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
