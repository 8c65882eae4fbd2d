"""Convergence benchmark: synchronous DP vs DiLoCo vs EDiT (and both with one corrupted worker), side by side.

Every run trains the same GPT (same seed, model, LR schedule, global batch, DDP/optimizer settings, number
of iterations, hence the same number of tokens) on the default corpus with 4 ranks = DP 4 = 4 workers, one
after another in this one invocation, through ``megatron_edit.training.launch.spawn_training`` (the real
training entry on local gloo ranks). Runs:

  sync            synchronous data parallel (no --local-sgd)
  diloco          --local-sgd diloco (all-at-once outer Nesterov step)
  edit            --local-sgd edit (layer-wise sync + pseudo-gradient penalty)
  diloco-corrupt  diloco with --local-sgd-debug-corrupt-worker SPEC
  edit-corrupt    edit   with --local-sgd-debug-corrupt-worker SPEC

Fault injection and the inner optimizer: ``--local-sgd-debug-corrupt-worker W:SCALE:PROB`` adds N(0, SCALE^2)
noise to worker W's gradients with probability PROB per iteration. The inner optimizer is Adam with gradient
clipping, and both normalise gradient noise: with --clip-grad 1.0 a corrupted gradient is scaled to the norm
of a normal one, and even without clipping Adam's per-element normalisation bounds a hit's effect to a
random-sign step of about lr per element, carried by Adam's momentum for ~10 more steps (~5 lr per element in
total); afterwards the hit worker's inflated second moment leaves it nearly frozen for the rest of a short
run. So every run here uses --clip-grad 0 (same for all methods), and the default spec is 1:1.0:0.05: worker
1, noise std 1.0 (~1000x the per-element size of a clean gradient of this model, ~1e-3), probability 0.05.
With seed 1234 the hits are at iterations 35, 68, 136, 138, 139, 175, 183, all after the 16 synchronous
warmup iterations (a hit during warmup is averaged into every worker; the tool prints the schedule for the
seed in use and warns). Measured on this machine (192 iterations): DiLoCo's validation loss is 0.02-0.06
worse at every evaluation, a small but consistent damage; EDiT loses more, because its softmax(-G/T)
weighting gives the *frozen* worker (smallest pseudo-gradient norm) the largest weight after the hit.
A larger SCALE does not help (Adam caps the step; a SCALE whose square overflows fp32 freezes the worker at
once). SCALE=inf makes the worker's parameters NaN: the fp32 cross-worker all-reduce replaces non-finite
entries by 0, so DiLoCo then just loses that worker's share of the step and EDiT flags the worker as
anomalous (try --corrupt-spec 1:inf:0.05).

Validation: evaluation runs on every rank's current parameters and averages over all workers, so between
two syncs it measures the workers' unsynchronised models (and a NaN worker makes it NaN). The defaults put
every validation on a sync iteration (--local-sgd-warmup-iters 16, H 16, --eval-interval 48, --train-iters
192: syncs at 32, 48, ..., 192), where every worker holds the agreed (anchor) parameters.

Output: a Markdown table (printed and written to OUTPUT_DIR/convergence.md), loss_curves.png (training loss
per iteration, validation points as markers), one log per run (the ranks' stdout/stderr) and results.json.

    python tools/bench_convergence.py                       # defaults: 192 iterations, H=16, ~10 min
    python tools/bench_convergence.py --train-iters 1024 --sync-interval 64 --warmup-iters 64 --eval-interval 128
    python tools/bench_convergence.py --methods sync,edit --hidden-size 256 --extra-args="--adam-beta2 0.95"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = ("sync", "diloco", "edit", "diloco-corrupt", "edit-corrupt", "streaming")
DEFAULT_METHODS = ("sync", "diloco", "edit", "diloco-corrupt", "edit-corrupt")
VOCAB = 1024


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("runs", "bench_convergence"))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (streaming: P=2, tau=1, fp4-e3m0 wire)")
    p.add_argument("--nproc", type=int, default=4, help="ranks (= DP size = workers)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--train-iters", type=int, default=192)
    p.add_argument("--sync-interval", type=int, default=16)
    p.add_argument("--warmup-iters", type=int, default=16,
                   help="--local-sgd-warmup-iters (synchronous steps; the anchor is taken at their end). Fault "
                        "injection during warmup reaches every worker (gradients are averaged then)")
    p.add_argument("--eval-interval", type=int, default=48,
                   help="keep it (and --train-iters) on sync iterations: a validation between syncs measures "
                        "the mean loss of the workers' unsynchronised models, not the agreed model")
    p.add_argument("--eval-iters", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=20)
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="inner gradient clipping for ALL runs (0 = off, so the fault injection is not "
                        "normalised away by clipping; see the module docstring)")
    p.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="default: 16 x hidden^2, about one transformer layer (one DDP bucket per layer: what "
                        "EDiT's layer-wise sync works on, and few gloo collectives per step)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--corrupt-spec", default="1:1.0:0.05",
                   help="W:SCALE:PROB for the *-corrupt runs (see the module docstring)")
    p.add_argument("--extra-args", default="", help="more training flags for every run (one string)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- helpers
def ensure_data(data_dir: str) -> tuple[str, str]:
    """The default corpus, prepared the way examples/shakespeare_edit.sh does it (only what is missing)."""
    data_dir = os.path.abspath(data_dir)
    prefix = os.path.join(data_dir, f"shakespeare_sp{VOCAB}")
    jsonl = os.path.join(data_dir, "shakespeare.jsonl")
    py = sys.executable
    steps = [
        (jsonl, [py, "tools/prepare_sample_corpus.py", "--output-dir", data_dir]),
        (prefix + ".model", [py, "tools/train_tokenizer.py", "--input", jsonl, "--vocab-size", str(VOCAB),
                             "--model-prefix", prefix]),
        (prefix + ".idx", [py, "tools/preprocess_data.py", "--input", jsonl, "--output-prefix", prefix,
                           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", prefix + ".model",
                           "--workers", "2", "--append-eod"]),
    ]
    for path, cmd in steps:
        if not os.path.isfile(path):
            print(f"[bench] {path} missing: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
    return prefix, prefix + ".model"


_SYNC_RE = re.compile(r"local-sgd sync \| iteration\s+(\d+) \|.*?pseudo-grad norm: (\S+) \| anomalous workers: ([^|]*)\|")


def parse_sync_lines(log_path: str) -> list[tuple[int, float, str]]:
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _SYNC_RE.search(line)
            if m:
                out.append((int(m.group(1)), float(m.group(2)), m.group(3).strip()))
    return out


def corruption_hits(seed: int, prob: float, iters: int) -> list[int]:
    """Iterations whose gradients get noise: mirrors LocalSGD._maybe_corrupt (one draw per iteration from
    a generator seeded with seed + 7919). Informative only; the training code decides."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    return [i for i in range(1, iters + 1) if torch.rand(1, generator=gen).item() < prob]


def compact(xs: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts) if parts else "none"


def common_args(a: argparse.Namespace, prefix: str, tokenizer: str) -> list[str]:
    args = [
        "--data-path", prefix, "--split", "969,30,1",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer,
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
        "--max-position-embeddings", str(a.seq_length), "--normalization", "RMSNorm", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear", "--hidden-dropout", "0",
        "--attention-dropout", "0",
        "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
        "--train-iters", str(a.train_iters),
        "--lr", str(a.lr), "--min-lr", str(a.min_lr), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(a.lr_warmup_iters), "--weight-decay", "0.1", "--clip-grad", str(a.clip_grad),
        # The same DDP / distributed-optimizer configuration for every run (edit's layer-wise sync needs it).
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--ddp-bucket-size", str(a.ddp_bucket_size or 16 * a.hidden_size * a.hidden_size),
        "--log-interval", "10", "--eval-interval", str(a.eval_interval), "--eval-iters", str(a.eval_iters),
        "--seed", str(a.seed),
    ]
    return args + shlex.split(a.extra_args)


def method_args(method: str, a: argparse.Namespace) -> list[str]:
    if method == "sync":
        return []
    base, _, corrupt = method.partition("-")
    args = ["--local-sgd", base, "--local-sgd-workers", str(a.nproc),
            "--local-sgd-sync-interval", str(a.sync_interval), "--local-sgd-warmup-iters", str(a.warmup_iters)]
    if corrupt:
        args += ["--local-sgd-debug-corrupt-worker", a.corrupt_spec]
    if base == "streaming":
        args += ["--streaming-fragments", "2", "--streaming-overlap-steps", "1", "--outer-grad-dtype", "fp4-e3m0"]
    return args


def summarize(results: list[dict], seq_length: int) -> dict:
    from megatron_edit.training.launch import loss_curve, validation_curve

    losses = loss_curve(results)
    validation = validation_curve(results)
    vals = [v for _, v in validation]
    finite = [v for v in vals if math.isfinite(v)]
    consumed = results[0]["consumed_samples"]
    return dict(
        losses=losses, validation=validation,
        final_val=vals[-1] if vals else float("nan"),
        best_val=min(finite) if finite else float("nan"),
        tokens=consumed * seq_length,
        wall_time=max(r["wall_time"] for r in results),
        sync_bytes=[r["sync_bytes"] for r in results],
        sync_bytes_measured=[r.get("sync_bytes_measured", r["sync_bytes"]) for r in results],
        syncs=sum(1 for _, _, s in results[0]["step_times"] if s),
        num_params_fp32_bytes_per_rank=[r["main_shard_bytes"] for r in results],
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def fmt_loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def plot_curves(summaries: dict, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: loss_curves.png skipped"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (method, s) in enumerate(summaries.items()):
        color = f"C{i}"
        its = list(range(1, len(s["losses"]) + 1))
        ax.plot(its, s["losses"], color=color, lw=0.9, alpha=0.8, label=f"{method} (train)")
        if s["validation"]:
            vi, vv = zip(*s["validation"])
            ax.plot(vi, vv, color=color, marker="o", ls="--", lw=1.2, ms=6, label=f"{method} (validation)")
    finite = [v for s in summaries.values() for v in s["losses"] if math.isfinite(v)]
    finite_val = [v for s in summaries.values() for _, v in s["validation"] if math.isfinite(v)]
    if finite:  # keep the interesting range visible even if a run blew up
        lo = min(finite + finite_val)
        hi = max(finite + finite_val)
        hi = min(hi, max(finite_val + [lo + 1.0]) + 1.0)
        ax.set_ylim(lo - 0.1, max(hi, lo + 0.5) + 0.05)
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    os.makedirs(a.output_dir, exist_ok=True)
    tool_start = time.perf_counter()
    prefix, tokenizer = ensure_data(a.data_dir)

    from megatron_edit.training.launch import redirect_fds, spawn_training

    base = common_args(a, prefix, tokenizer)
    worker, scale, prob = a.corrupt_spec.split(":")
    hits = corruption_hits(a.seed, float(prob), a.train_iters)
    summaries: dict[str, dict] = {}
    failures: dict[str, str] = {}
    sync_logs: dict[str, list] = {}
    for method in methods:
        argv_run = base + method_args(method, a)
        log = os.path.join(a.output_dir, f"{method}.log")
        if os.path.exists(log):
            os.remove(log)
        print(f"[bench] {method}: {a.nproc} ranks, {a.train_iters} iterations (log: {log})", flush=True)
        t0 = time.perf_counter()
        try:
            with redirect_fds(log):
                print("argv: " + " ".join(shlex.quote(x) for x in argv_run), flush=True)
                results = spawn_training(argv_run, a.nproc, keep_params=False)
        except Exception as e:  # one failed run must not hide the others
            failures[method] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            print(f"[bench] {method} FAILED after {time.perf_counter() - t0:.0f} s: {failures[method]}", flush=True)
            continue
        summaries[method] = summarize(results, a.seq_length)
        sync_logs[method] = parse_sync_lines(log)
        s = summaries[method]
        print(f"[bench] {method}: final val {fmt_loss(s['final_val'])}, {time.perf_counter() - t0:.0f} s "
              f"(training {s['wall_time']:.0f} s)", flush=True)

    # ---- table
    ref_wall = summaries["sync"]["wall_time"] if "sync" in summaries else None
    ref_val = summaries["sync"]["final_val"] if "sync" in summaries else None
    lines = [
        "| method | final validation loss | best validation loss | tokens | wall time (s) | "
        "outer bytes sent per rank | final val loss vs sync DP | wall time vs sync DP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        if method in failures:
            lines.append(f"| {method} | failed: {failures[method]} | | | | | | |")
            continue
        s = summaries[method]
        sb = s["sync_bytes"]
        sent = fmt_bytes(max(sb)) + ("" if min(sb) == max(sb) else f" (min {fmt_bytes(min(sb))})")
        if fmt_bytes(max(s["sync_bytes_measured"])) != fmt_bytes(max(sb)):
            sent += f" (measured {fmt_bytes(max(s['sync_bytes_measured']))})"
        sent += f" ({s['syncs']} syncs)" if method != "sync" else ""
        rv = f"{s['final_val'] / ref_val:.3f}" if ref_val else "-"
        rw = f"{s['wall_time'] / ref_wall:.2f}" if ref_wall else "-"
        lines.append(f"| {method} | {fmt_loss(s['final_val'])} | {fmt_loss(s['best_val'])} | {s['tokens']} | "
                     f"{s['wall_time']:.1f} | {sent} | {rv} | {rw} |")
    table = "\n".join(lines)

    notes = [
        f"Setup: {a.nproc} ranks (DP {a.nproc}; local SGD: {a.nproc} workers of 1 rank), "
        f"{a.num_layers} layers x hidden {a.hidden_size}, seq {a.seq_length}, global batch {a.global_batch_size} "
        f"(micro {a.micro_batch_size}), {a.train_iters} iterations, lr {a.lr} cosine to {a.min_lr} "
        f"(warmup {a.lr_warmup_iters}), --clip-grad {a.clip_grad}, seed {a.seed}, distributed optimizer with overlapped "
        f"grad reduce / param gather, DDP bucket size {a.ddp_bucket_size or 16 * a.hidden_size * a.hidden_size}; "
        f"local SGD: H={a.sync_interval}, "
        f"{a.warmup_iters} synchronous warmup iterations, outer Nesterov defaults; validation every "
        f"{a.eval_interval} iterations on {a.eval_iters} batches (the same batches every time, for every run).",
        f"Corruption ({a.corrupt_spec} = worker {worker}, noise std {scale}, probability {prob}): "
        f"gradient noise at iterations {compact(hits)} ({len(hits)} of {a.train_iters}, for this seed)"
        + (f"; WARNING: hits during the synchronous warmup (1..{a.warmup_iters}) reach every worker"
           if any(h <= a.warmup_iters for h in hits) else "") + ".",
        "tokens = consumed_samples x seq_length; wall time = training loop only (max over ranks, excludes "
        "process start-up and model build); outer bytes = what one rank sends in the cross-worker pseudo-gradient "
        "all-reduces (fp32 ring estimate, plus the norm all-gather), from the engine's counter. It does not count "
        "the per-step gradient traffic of synchronous DP or of the local-SGD warmup iterations.",
        "Timings are noisy (2 shared cores; other jobs were running): compare ratios of runs made side by side.",
    ]
    evals = list(range(a.eval_interval, a.train_iters, a.eval_interval)) + [a.train_iters]
    off = [e for e in evals if e > a.warmup_iters and (e - a.warmup_iters) % a.sync_interval != 0]
    if off:
        notes.append(f"WARNING: validations at iterations {compact(off)} are not on sync iterations: for local SGD "
                     "they average the workers' unsynchronised models.")
    for method in methods:
        if method in sync_logs and sync_logs[method]:
            flagged = [(it, an) for it, _, an in sync_logs[method] if an != "none"]
            notes.append(f"{method}: {len(sync_logs[method])} syncs; anomalous workers flagged: "
                         + (", ".join(f"it {it}: {an}" for it, an in flagged) if flagged else "none"))
    md = ["# Convergence benchmark", "", table, "", *[f"- {n}" for n in notes]]

    plot_msg = None
    if summaries:
        plot_msg = plot_curves(summaries, os.path.join(a.output_dir, "loss_curves.png"),
                               f"{a.nproc} ranks, {a.train_iters} iterations, H={a.sync_interval}")
    md += ["", plot_msg or "Loss curves: loss_curves.png"]
    total = time.perf_counter() - tool_start
    md += ["", f"Tool wall time: {total:.0f} s"]
    text = "\n".join(md) + "\n"
    print()
    print(text)
    with open(os.path.join(a.output_dir, "convergence.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(a), "corruption_hits": hits, "failures": failures,
                   "sync_lines": sync_logs,
                   "runs": {m: {k: v for k, v in s.items()} for m, s in summaries.items()}}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
