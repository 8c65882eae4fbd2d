"""Step-time and memory benchmark: synchronous DP vs DiLoCo vs EDiT layer-wise vs EDiT all-at-once, side by side.

Every run trains the same GPT on mock data (NullTokenizer) with 4 ranks = DP 4 = 4 workers, one after
another in this one invocation, through ``megatron_edit.training.launch.spawn_training``. Runs:

  sync              synchronous data parallel (no --local-sgd)
  diloco            --local-sgd diloco (all-at-once outer step at the optimizer step)
  edit              --local-sgd edit (layer-wise: the outer update is applied bucket by bucket inside the
                    next forward pass, just before each bucket's parameter all-gather)
  edit-all-at-once  --local-sgd edit --no-local-sgd-layerwise
  edit-offload      --local-sgd edit --local-sgd-offload-outer-state (layer-wise)

Per iteration the time is the max over ranks (``step_times`` of launch.py: the wall time between two
iteration callbacks); the first --skip-iters iterations are dropped. Iterations are classed as

  sync        the iteration that ends with a sync (``was_sync``)
  after sync  the next one: with the layer-wise sync most of the outer step happens in its forward pass
  non-sync    all others
  sync cost   per sync: t(sync) + t(after sync) - 2 x median(non-sync), then the median over syncs; this
              is the fair layer-wise vs all-at-once comparison since layer-wise moves work into the next step

Memory: peak resident set size (ru_maxrss) per rank, max over ranks. Outer state: anchor + momentum bytes per
rank, which must be exactly 2 x the rank's fp32 main-param shard (``main_shard_bytes``).

Timings on a shared 2-core CPU are noisy: read the ratios between runs made side by side, and use --repeats
to interleave several rounds (samples of all rounds are pooled).

    python tools/bench_step.py                                  # defaults, a few minutes
    python tools/bench_step.py --hidden-size 256 --num-layers 8 --train-iters 256 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = ("sync", "diloco", "edit", "edit-all-at-once", "edit-offload")
MIB = 1024.0 * 1024.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("runs", "bench_step"))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--nproc", type=int, default=4, help="ranks (= DP size = workers)")
    p.add_argument("--train-iters", type=int, default=128)
    p.add_argument("--sync-interval", type=int, default=8)
    p.add_argument("--skip-iters", type=int, default=4, help="warm-up iterations left out of the statistics")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all methods (interleaved)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="default: 16 x hidden^2, about one transformer layer (one bucket = one layer-wise unit)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--extra-args", default="", help="more training flags for every run (one string)")
    return p.parse_args(argv)


def common_args(a: argparse.Namespace) -> list[str]:
    args = [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab_size),
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
        "--max-position-embeddings", str(a.seq_length), "--normalization", "RMSNorm", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear", "--hidden-dropout", "0",
        "--attention-dropout", "0",
        "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
        "--train-iters", str(a.train_iters), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(min(10, a.train_iters)), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--ddp-bucket-size", str(a.ddp_bucket_size or 16 * a.hidden_size * a.hidden_size),
        "--log-interval", str(max(1, a.train_iters // 4)), "--eval-interval", str(10 * a.train_iters + 1),
        "--eval-iters", "0", "--seed", str(a.seed),
    ]
    return args + shlex.split(a.extra_args)


def method_args(method: str, a: argparse.Namespace) -> list[str]:
    if method == "sync":
        return []
    local = ["--local-sgd-workers", str(a.nproc), "--local-sgd-sync-interval", str(a.sync_interval)]
    return {
        "diloco": ["--local-sgd", "diloco"],
        "edit": ["--local-sgd", "edit"],
        "edit-all-at-once": ["--local-sgd", "edit", "--no-local-sgd-layerwise"],
        "edit-offload": ["--local-sgd", "edit", "--local-sgd-offload-outer-state"],
    }[method] + local


def classify(results: list[dict], skip: int) -> dict[str, list[float]]:
    """Per iteration the max over ranks; then split into non-sync / sync / after-sync samples (seconds)."""
    per_iter: dict[int, float] = {}
    synced: dict[int, bool] = {}
    for r in results:
        for it, secs, was_sync in r["step_times"]:
            per_iter[it] = max(per_iter.get(it, 0.0), secs)
            synced[it] = synced.get(it, False) or was_sync
    out = {"non_sync": [], "sync": [], "after_sync": [], "pairs": []}
    for it in sorted(per_iter):
        if it <= skip:
            continue
        if synced[it]:
            out["sync"].append(per_iter[it])
            if it + 1 in per_iter:
                out["pairs"].append(per_iter[it] + per_iter[it + 1])
        elif synced.get(it - 1, False):
            out["after_sync"].append(per_iter[it])
        else:
            out["non_sync"].append(per_iter[it])
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    return "-" if x != x else f"{1000.0 * x:.1f}"


def ratio(x: float, y: float, digits: int = 2) -> str:
    if x != x or y != y or y == 0:
        return "-"
    return f"{x / y:.{digits}f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    os.makedirs(a.output_dir, exist_ok=True)
    tool_start = time.perf_counter()

    from megatron_edit.training.launch import last_line, spawn_training_logged

    base = common_args(a)
    samples = {m: {"non_sync": [], "sync": [], "after_sync": [], "pairs": []} for m in methods}
    info: dict[str, dict] = {}
    losses: dict[str, list[float]] = {}  # first round's loss history (a same-math check between variants)
    failures: dict[str, str] = {}
    for rnd in range(a.repeats):
        for method in methods:
            if method in failures:
                continue
            argv_run = base + method_args(method, a)
            log = os.path.join(a.output_dir, f"{method}.log")
            if rnd == 0 and os.path.exists(log):
                os.remove(log)
            print(f"[bench] round {rnd + 1}/{a.repeats} {method}: {a.nproc} ranks, {a.train_iters} iterations "
                  f"(log: {log})", flush=True)
            t0 = time.perf_counter()
            try:
                results = spawn_training_logged(argv_run, a.nproc, log, keep_params=False)
            except Exception as e:  # one failed run must not hide the others
                failures[method] = last_line(e)
                print(f"[bench] {method} FAILED: {failures[method]}", flush=True)
                continue
            if method not in losses:
                from megatron_edit.training.launch import loss_curve

                losses[method] = loss_curve(results)
            c = classify(results, a.skip_iters)
            for k, v in c.items():
                samples[method][k].extend(v)
            i = info.setdefault(method, {"peak_rss": 0, "outer": [], "shard": [], "wall": []})
            i["peak_rss"] = max(i["peak_rss"], max(r["peak_rss_bytes"] for r in results))
            i["outer"] = [r["outer_state_bytes"] for r in results]
            i["shard"] = [r["main_shard_bytes"] for r in results]
            i["wall"].append(max(r["wall_time"] for r in results))
            print(f"[bench] {method}: non-sync median {ms(med(c['non_sync']))} ms, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    stats = {}
    for m in methods:
        if m in failures:
            continue
        s = samples[m]
        non = med(s["non_sync"])
        stats[m] = dict(non_sync=non, sync=med(s["sync"]), after=med(s["after_sync"]),
                        cost=med([p - 2 * non for p in s["pairs"]]) if s["pairs"] else float("nan"),
                        n_non=len(s["non_sync"]), n_sync=len(s["sync"]))
    ref = stats.get("sync", {}).get("non_sync", float("nan"))
    aao = stats.get("edit-all-at-once", {})

    lines = [
        "| method | non-sync iter (ms) | sync iter (ms) | iter after sync (ms) | sync cost (ms) | "
        "non-sync vs sync DP | sync iter vs all-at-once | sync cost vs all-at-once | peak RSS/rank (MiB) | "
        "outer state/rank (B) | 2 x main shard/rank (B) | outer = 2 x shard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        if m in failures:
            lines.append(f"| {m} | failed: {failures[m]} |" + " |" * 11)
            continue
        st, i = stats[m], info[m]
        is_local = m != "sync"
        outer = max(i["outer"])
        two_shard = [2 * s for s in i["shard"]]
        exact = all(o == t for o, t in zip(i["outer"], two_shard))
        vs_aao_sync = ratio(st["sync"], aao.get("sync", float("nan"))) if m.startswith("edit") else "-"
        vs_aao_cost = ratio(st["cost"], aao.get("cost", float("nan"))) if m.startswith("edit") else "-"
        sync_cell = f"{ms(st['sync'])} (n={st['n_sync']})" if is_local else "-"
        lines.append(
            f"| {m} | {ms(st['non_sync'])} (n={st['n_non']}) | {sync_cell} | "
            f"{ms(st['after']) if is_local else '-'} | {ms(st['cost']) if is_local else '-'} | "
            f"{ratio(st['non_sync'], ref)} | {vs_aao_sync} | {vs_aao_cost} | {i['peak_rss'] / MIB:.0f} | "
            f"{outer if is_local else 0} | {max(two_shard)} | "
            f"{('yes' if exact else 'NO: ' + str(i['outer']) + ' vs ' + str(two_shard)) if is_local else '-'} |"
        )
    table = "\n".join(lines)
    notes = [
        f"Setup: {a.nproc} ranks (DP {a.nproc}; local SGD: {a.nproc} workers of 1 rank), mock data, "
        f"{a.num_layers} layers x hidden {a.hidden_size}, vocab {a.vocab_size}, seq {a.seq_length}, global batch "
        f"{a.global_batch_size} (micro {a.micro_batch_size}), {a.train_iters} iterations x {a.repeats} round(s), "
        f"H={a.sync_interval}, no local-SGD warmup, distributed optimizer with overlapped grad reduce / param "
        f"gather, DDP bucket size {a.ddp_bucket_size or 16 * a.hidden_size * a.hidden_size}; the first "
        f"{a.skip_iters} iterations are skipped.",
        "Times: per iteration the max over ranks, then the median (n = number of iterations). sync cost = "
        "median over syncs of t(sync) + t(after sync) - 2 x median(non-sync). Ratios divide medians of runs made "
        "side by side in this invocation.",
        "peak RSS = ru_maxrss of each rank process (includes the Python / torch / megatron-core import "
        "footprint), max over ranks.",
        "Offload: on this CPU-only machine the 'offloaded' outer state and the regular one both live in host "
        "memory (no pinned memory without CUDA), so edit-offload measures only the extra copies, not a "
        "device-memory saving.",
        "Timings are noisy (2 shared cores; other jobs were running at the same time).",
    ]
    if "edit-all-at-once" in losses:  # SPEC 2.2: layer-wise must equal all-at-once exactly (offload too)
        ref_losses = losses["edit-all-at-once"]
        for m in ("edit", "edit-offload"):
            if m in losses:
                diff = max((abs(x - y) for x, y in zip(losses[m], ref_losses)), default=float("nan"))
                same = losses[m] == ref_losses
                notes.append(f"Same math check: {m} vs edit-all-at-once loss history "
                             + ("bitwise identical" if same else f"DIFFERS (max abs diff {diff:.3g})")
                             + f" over {len(ref_losses)} iterations.")
    total = time.perf_counter() - tool_start
    text = "\n".join(["# Step-time benchmark", "", table, "", *[f"- {n}" for n in notes], "",
                      f"Tool wall time: {total:.0f} s"]) + "\n"
    print()
    print(text)
    with open(os.path.join(a.output_dir, "step.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(a), "failures": failures, "stats": stats, "info": info, "samples": samples,
                   "losses": losses},
                  f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
