"""Convergence benchmark: synchronous DP vs the local-SGD methods, clean and with injected faults, over seeds.

Every run trains the same GPT (per seed the same initialisation; the same model, LR schedule, global batch,
DDP/optimizer settings and number of iterations, hence the same number of tokens) on the default corpus with 4 ranks = DP 4 = 4 workers, one
after another in this one invocation, through ``megatron_edit.training.launch.spawn_training`` (the real
training entry on local gloo ranks). Runs are named METHOD or METHOD+FAULT:

  sync            synchronous data parallel (no --local-sgd)
  diloco          --local-sgd diloco (all-at-once outer Nesterov step)
  edit            --local-sgd edit with its defaults (layer-wise sync; penalty: anomaly elimination by the EWMA
                  z-test, the two-sided peer test, the loss test and the second-moment test, uniform weights
                  over the healthy workers, clipping; a flagged worker's inner Adam moments repaired from the
                  healthy ones)
  edit-paper      edit with the EDiT paper's penalty: softmax(-G/T) weights, no peer, loss or second-moment
                  test, no repair (--pseudo-grad-weighting norm --pseudo-grad-peer-ratio 0
                  --pseudo-grad-loss-ratio 0 --pseudo-grad-moment-ratio 0 --no-pseudo-grad-repair-inner-state)
  streaming       --local-sgd streaming, 2 fragments, tau 1, fp4-e3m0 wire (and the final sync of every fragment)
  streaming-ag    streaming with --outer-grad-reduction all-gather: the fp4 wire quantizes once, not twice
  +noise          --local-sgd-debug-corrupt-worker SPEC (gradient noise; old names: diloco-corrupt, edit-corrupt)
  +random-tokens, +repeated-tokens, +loss-spike, +bit-flip
                  --local-sgd-debug-fault on worker 1 (megatron_edit/fault_injection.py), from --fault-start

With ``--seeds a,b,c`` every run is repeated per seed (seed-major order) and the table reports the mean +-
standard deviation and the range of the final validation loss, the ratio of means to synchronous DP and, for
a fault run, its excess over the same method's clean run with the same seed; the plot shows the mean
training curve of each run with a min..max band over the seeds.

Fault injection and the inner optimizer: ``--local-sgd-debug-corrupt-worker W:SCALE:PROB`` adds N(0, SCALE^2)
noise to worker W's gradients with probability PROB per iteration. The inner optimizer is Adam with gradient
clipping, and both normalise gradient noise: with --clip-grad 1.0 a corrupted gradient is scaled to the norm
of a normal one, and even without clipping Adam's per-element normalisation bounds a hit's effect to a
random-sign step of about lr per element, carried by Adam's momentum for ~10 more steps (~5 lr per element in
total); afterwards the hit worker's inflated second moment leaves it nearly frozen for the rest of a short
run. So every run here uses --clip-grad 0 (same for all methods), and the default spec is 1:1.0:0.05: worker
1, noise std 1.0 (~1000x the per-element size of a clean gradient of this model, ~1e-3), probability 0.05.
With seed 1234 the hits are at iterations 35, 68, 136, 138, 139, 175, 183. None is applied in the
synchronous warmup (gradients are averaged over the workers then, so a hit would reach every worker);
the tool prints the schedule for the seed in use. Measured on this machine (192 iterations, seed 1234):
DiLoCo's validation loss is 0.02-0.06 worse at every evaluation; EDiT with the paper's softmax(-G/T)
weighting lost more, because that gives the *frozen* worker (smallest pseudo-gradient norm) the largest
weight after the hit. EDiT's defaults flag it at the next sync by its second moments, leave it out and
repair its inner state (README tables).
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
    python tools/bench_convergence.py --seeds 1,2,3 --methods sync,diloco,edit,edit-peer,diloco+loss-spike,edit-peer+loss-spike
    python tools/bench_convergence.py --train-iters 1024 --sync-interval 64 --warmup-iters 64 --eval-interval 128
    python tools/bench_convergence.py --methods sync,edit --hidden-size 256 --extra-args="--adam-beta2 0.95"
    python tools/bench_convergence.py --seeds 1,2,3 --local-sgd-args="--outer-lr 0.6 --outer-momentum 0.7"
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

METHODS = ("sync", "diloco", "edit", "edit-paper", "streaming", "streaming-ag")
FAULTS = ("noise", "random-tokens", "repeated-tokens", "loss-spike", "bit-flip")
ALIASES = {"diloco-corrupt": "diloco+noise", "edit-corrupt": "edit+noise", "edit-peer": "edit"}
DEFAULT_RUNS = ("sync", "diloco", "edit", "diloco+noise", "edit+noise")
VOCAB = 1024


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("runs", "bench_convergence"))
    p.add_argument("--methods", default=",".join(DEFAULT_RUNS),
                   help=f"comma-separated runs METHOD or METHOD+FAULT; METHOD in {','.join(METHODS)} (edit-paper: "
                        "edit with the paper's penalty, see the module docstring; streaming: P=2, tau=1, "
                        f"fp4-e3m0 wire), FAULT in {','.join(FAULTS)} (on worker 1; see the module docstring)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: every run once per seed, reported as mean +- std (default: --seed)")
    p.add_argument("--nproc", type=int, default=4, help="ranks (= DP size = workers)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--corpus", choices=sorted(CORPORA), default="shakespeare",
                   help="tools/prepare_sample_corpus.py --corpus, prepared into --data-dir if missing")
    p.add_argument("--train-iters", type=int, default=192)
    p.add_argument("--sync-interval", type=int, default=16)
    p.add_argument("--warmup-iters", type=int, default=16,
                   help="--local-sgd-warmup-iters (synchronous steps; the anchor is taken at their end); gradient "
                        "noise is not injected in it (it would reach every worker)")
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
    p.add_argument("--fault-start", type=int, default=None,
                   help="first iteration of the --local-sgd-debug-fault runs (default: warmup + 2 H + 3, mid-interval)")
    p.add_argument("--fault-length", type=int, default=16,
                   help="iterations of the data faults (random-tokens, repeated-tokens); the others hit once")
    p.add_argument("--extra-args", default="", help="more training flags for every run (one string)")
    p.add_argument("--reuse-results", default="",
                   help="comma-separated results.json of earlier invocations with the same setup: the runs "
                        "(name and seed) found there are reported without running them again")
    p.add_argument("--local-sgd-args", default="",
                   help="more flags for the local-SGD runs only, e.g. \"--outer-lr 0.6 --outer-momentum 0.7\"")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- helpers
CORPORA = {"shakespeare": "shakespeare", "norvig-big": "norvig_big"}  # --corpus -> file stem


def ensure_data(data_dir: str, corpus: str = "shakespeare") -> tuple[str, str]:
    """A sample corpus (tools/prepare_sample_corpus.py) with its own SentencePiece tokenizer, prepared the
    way examples/shakespeare_edit.sh does it (only what is missing)."""
    data_dir = os.path.abspath(data_dir)
    stem = CORPORA[corpus]
    prefix = os.path.join(data_dir, f"{stem}_sp{VOCAB}")
    jsonl = os.path.join(data_dir, f"{stem}.jsonl")
    py = sys.executable
    steps = [
        (jsonl, [py, "tools/prepare_sample_corpus.py", "--output-dir", data_dir, "--corpus", corpus]),
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


def corruption_hits(seed: int, prob: float, iters: int, warmup: int) -> list[int]:
    """Iterations whose gradients get noise: mirrors LocalSGD._maybe_corrupt (one draw per iteration from
    a generator seeded with seed + 7919, none applied in the synchronous warmup). Informative only; the
    training code decides."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    return [i for i in range(1, iters + 1) if torch.rand(1, generator=gen).item() < prob and i > warmup]


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


def common_args(a: argparse.Namespace, prefix: str, tokenizer: str, seed: int) -> list[str]:
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
        "--seed", str(seed),
    ]
    return args + shlex.split(a.extra_args)


def eval_iterations(a: argparse.Namespace) -> list[int]:
    """The iterations a run validates at (every --eval-interval, and the last one)."""
    return list(range(a.eval_interval, a.train_iters, a.eval_interval)) + [a.train_iters]


def split_run(name: str) -> tuple[str, Optional[str]]:
    """'edit+loss-spike' -> ('edit', 'loss-spike'); old names diloco-corrupt / edit-corrupt are +noise."""
    method, _, fault = ALIASES.get(name, name).partition("+")
    if method not in METHODS or (fault and fault not in FAULTS):
        raise SystemExit(f"--methods: {name!r} is not METHOD[+FAULT] with METHOD in {', '.join(METHODS)} "
                         f"and FAULT in {', '.join(FAULTS)}")
    if method == "sync" and fault:
        raise SystemExit(f"--methods: {name!r}: faults are injected into local-SGD workers only")
    return method, fault or None


def fault_start(a: argparse.Namespace) -> int:
    return a.fault_start if a.fault_start is not None else a.warmup_iters + 2 * a.sync_interval + 3


def method_args(name: str, a: argparse.Namespace) -> list[str]:
    method, fault = split_run(name)
    if method == "sync":
        return []
    base = {"edit-paper": "edit", "streaming-ag": "streaming"}.get(method, method)
    args = ["--local-sgd", base, "--local-sgd-workers", str(a.nproc),
            "--local-sgd-sync-interval", str(a.sync_interval), "--local-sgd-warmup-iters", str(a.warmup_iters)]
    if method == "edit-paper":
        args += ["--pseudo-grad-weighting", "norm", "--pseudo-grad-peer-ratio", "0", "--pseudo-grad-loss-ratio", "0",
                 "--pseudo-grad-moment-ratio", "0", "--no-pseudo-grad-repair-inner-state"]
    if fault == "noise":
        args += ["--local-sgd-debug-corrupt-worker", a.corrupt_spec]
    elif fault is not None:
        length = f":{a.fault_length}" if fault in ("random-tokens", "repeated-tokens") else ""
        args += ["--local-sgd-debug-fault", f"1:{fault}:{fault_start(a)}{length}"]
    if base == "streaming":
        args += ["--streaming-fragments", "2", "--streaming-overlap-steps", "1", "--outer-grad-dtype", "fp4-e3m0"]
    if method == "streaming-ag":
        args += ["--outer-grad-reduction", "all-gather"]
    return args + shlex.split(a.local_sgd_args)


REUSE_IGNORED = ("output_dir", "methods", "seeds", "seed", "reuse_results")


def load_reused(paths: str, a: argparse.Namespace) -> tuple[dict, dict]:
    """({name: {seed: summary}}, {name: {seed: sync lines}}) from earlier results.json files, refusing
    (one line) a file whose setup differs from this invocation's in anything but the runs and seeds."""
    runs: dict = {}
    syncs: dict = {}
    for path in [x for x in paths.split(",") if x]:
        with open(path) as f:
            data = json.load(f)
        mine = {k: v for k, v in vars(a).items() if k not in REUSE_IGNORED}
        theirs = {k: v for k, v in data["args"].items() if k not in REUSE_IGNORED}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise SystemExit(f"--reuse-results {path}: its setup differs in {', '.join('--' + k.replace('_', '-') for k in differ)}")
        for name, per_seed in data["runs"].items():
            runs.setdefault(name, {}).update({int(seed): v for seed, v in per_seed.items()})
        for name, per_seed in data.get("sync_lines", {}).items():
            syncs.setdefault(name, {}).update({int(seed): v for seed, v in per_seed.items()})
    return runs, syncs


def run_logged(tag: str, argv: list[str], a: argparse.Namespace, failures: dict[str, str],
               label: str = "bench") -> Optional[list[dict]]:
    """One run on a.nproc local ranks, logged to OUTPUT_DIR/TAG.log; None (and failures[tag] = its last
    error line) if it failed: one failed run must not hide the others."""
    from megatron_edit.training.launch import last_line, spawn_training_logged

    log = os.path.join(a.output_dir, f"{tag}.log")
    if os.path.exists(log):
        os.remove(log)
    print(f"[{label}] {tag}: {a.nproc} ranks, {a.train_iters} iterations (log: {log})", flush=True)
    try:
        return spawn_training_logged(argv, a.nproc, log, keep_params=False)
    except Exception as e:
        failures[tag] = last_line(e)
        print(f"[{label}] {tag} FAILED: {failures[tag]}", flush=True)
        return None


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) != len(values) or not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def fmt_mean_std(values: list[float]) -> str:
    mean, std = mean_std(values)
    if not math.isfinite(mean):
        return ", ".join(fmt_loss(v) for v in values)
    return f"{mean:.4f}" + (f" +- {std:.4f}" if len(values) > 1 else "")


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


def plot_curves(runs: dict, path: str, title: str) -> Optional[str]:
    """Per run: the mean training loss over seeds with a min..max band, validation means as markers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: loss_curves.png skipped"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    all_train, all_val = [], []
    for i, (name, per_seed) in enumerate(runs.items()):
        color = f"C{i % 10}"
        curves = [s["losses"] for s in per_seed.values()]
        n = min(len(c) for c in curves)
        its = list(range(1, n + 1))
        mean = [sum(c[t] for c in curves) / len(curves) for t in range(n)]
        ax.plot(its, mean, color=color, lw=0.9, alpha=0.85, label=f"{name} (train, {len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(its, [min(c[t] for c in curves) for t in range(n)],
                            [max(c[t] for c in curves) for t in range(n)], color=color, alpha=0.15, lw=0)
        validations = [dict(s["validation"]) for s in per_seed.values()]
        points = sorted(set.intersection(*(set(v) for v in validations))) if validations else []
        if points:
            vmean = [sum(v[p] for v in validations) / len(validations) for p in points]
            ax.plot(points, vmean, color=color, marker="o", ls="--", lw=1.2, ms=6, label=f"{name} (validation)")
            all_val += vmean
        all_train += mean
    finite = [v for v in all_train if math.isfinite(v)]
    finite_val = [v for v in all_val if math.isfinite(v)]
    if finite:  # keep the interesting range visible even if a run blew up
        lo = min(finite + finite_val)
        hi = max(finite + finite_val)
        hi = min(hi, max(finite_val + [lo + 1.0]) + 1.0)
        ax.set_ylim(lo - 0.1, max(hi, lo + 0.5) + 0.05)
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    names = [ALIASES.get(m.strip(), m.strip()) for m in a.methods.split(",") if m.strip()]
    for name in names:
        split_run(name)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    os.makedirs(a.output_dir, exist_ok=True)
    tool_start = time.perf_counter()
    prefix, tokenizer = ensure_data(a.data_dir, a.corpus)

    worker, scale, prob = a.corrupt_spec.split(":")
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}  # name -> seed -> summary
    failures: dict[str, str] = {}
    sync_logs: dict[str, dict[int, list]] = {name: {} for name in names}
    reused, reused_syncs = load_reused(a.reuse_results, a)
    for seed in seeds:  # seed-major: an interrupted benchmark still has every run for the first seeds
        base = common_args(a, prefix, tokenizer, seed)
        for name in names:
            tag = f"{name}.seed{seed}"
            if seed in reused.get(name, {}):
                runs[name][seed] = reused[name][seed]
                sync_logs[name][seed] = reused_syncs.get(name, {}).get(seed, [])
                print(f"[bench] {tag}: reused, final val {fmt_loss(runs[name][seed]['final_val'])}", flush=True)
                continue
            t0 = time.perf_counter()
            results = run_logged(tag, base + method_args(name, a), a, failures)
            if results is None:
                continue
            runs[name][seed] = summarize(results, a.seq_length)
            sync_logs[name][seed] = parse_sync_lines(os.path.join(a.output_dir, f"{tag}.log"))
            s = runs[name][seed]
            print(f"[bench] {tag}: final val {fmt_loss(s['final_val'])}, {time.perf_counter() - t0:.0f} s "
                  f"(training {s['wall_time']:.0f} s)", flush=True)

    # ---- table: mean +- std over seeds; ratios of means; a fault's excess over the same method's clean run
    def finals(name: str) -> list[float]:
        return [runs[name][seed]["final_val"] for seed in seeds if seed in runs[name]]

    ref = mean_std(finals("sync"))[0] if "sync" in runs and finals("sync") else None
    ref_wall = (sum(runs["sync"][x]["wall_time"] for x in runs["sync"]) / len(runs["sync"])
                if "sync" in runs and runs["sync"] else None)
    lines = [
        f"| run | final validation loss (mean +- std, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}) | min .. max | "
        "vs sync DP | excess over its clean run | tokens | wall time (s) | outer bytes sent per rank | "
        "wall time vs sync DP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        done = [seed for seed in seeds if seed in runs[name]]
        if not done:
            lines.append(f"| {name} | failed | | | | | | | |")
            continue
        values = finals(name)
        mean, _ = mean_std(values)
        method, fault = split_run(name)
        excess = "-"
        if fault is not None and method in runs:
            pairs = [runs[name][x]["final_val"] - runs[method][x]["final_val"] for x in done if x in runs[method]]
            if pairs:
                excess = fmt_mean_std(pairs)
        first = runs[name][done[0]]
        sb = first["sync_bytes"]
        sent = fmt_bytes(max(sb)) + (f" ({first['syncs']} syncs)" if method != "sync" else "")
        wall = sum(runs[name][x]["wall_time"] for x in done) / len(done)
        lines.append(
            f"| {name} | {fmt_mean_std(values)} | {fmt_loss(min(values))} .. {fmt_loss(max(values))} | "
            f"{(f'{mean / ref:.4f}' if ref and math.isfinite(mean) else '-')} | {excess} | {first['tokens']} | "
            f"{wall:.1f} | {sent} | {(f'{wall / ref_wall:.2f}' if ref_wall else '-')} |")
    for tag, why in failures.items():
        lines.append(f"| {tag} | failed: {why} | | | | | | | |")
    table = "\n".join(lines)

    hits = {seed: corruption_hits(seed, float(prob), a.train_iters, a.warmup_iters) for seed in seeds}
    notes = [
        f"Setup: corpus {a.corpus}, {a.nproc} ranks (DP {a.nproc}; local SGD: {a.nproc} workers of 1 rank), "
        f"{a.num_layers} layers x hidden {a.hidden_size}, seq {a.seq_length}, global batch {a.global_batch_size} "
        f"(micro {a.micro_batch_size}), {a.train_iters} iterations, lr {a.lr} cosine to {a.min_lr} "
        f"(warmup {a.lr_warmup_iters}), --clip-grad {a.clip_grad}, seeds {','.join(map(str, seeds))}, distributed "
        f"optimizer with overlapped grad reduce / param gather, DDP bucket size "
        f"{a.ddp_bucket_size or 16 * a.hidden_size * a.hidden_size}; local SGD: H={a.sync_interval}, "
        f"{a.warmup_iters} synchronous warmup iterations, outer step: {a.local_sgd_args or 'Nesterov defaults'}; validation every "
        f"{a.eval_interval} iterations on {a.eval_iters} batches (the same batches every time, for every run).",
        f"Faults on worker 1: noise = --local-sgd-debug-corrupt-worker {a.corrupt_spec} (noise std {scale}, "
        f"probability {prob}; hits " + "; ".join(f"seed {x}: {compact(h)}" for x, h in hits.items()) + "); "
        f"random-tokens / repeated-tokens from iteration {fault_start(a)} for {a.fault_length} iterations; "
        f"loss-spike and bit-flip at iteration {fault_start(a)} (megatron_edit/fault_injection.py).",
        "excess over its clean run = final validation loss of METHOD+FAULT minus METHOD's, per seed, then mean "
        "+- std. tokens = consumed_samples x seq_length; wall time = training loop only (mean over seeds of the "
        "max over ranks); outer bytes = what one rank sends in the cross-worker pseudo-gradient reductions.",
        "Timings are noisy (2 shared cores): compare ratios of runs made side by side.",
    ]
    off = [e for e in eval_iterations(a) if e > a.warmup_iters and (e - a.warmup_iters) % a.sync_interval != 0]
    if off:
        notes.append(f"WARNING: validations at iterations {compact(off)} are not on sync iterations: for local SGD "
                     "they average the workers' unsynchronised models.")
    for name in names:
        for seed, lines_ in sync_logs[name].items():
            flagged = [(it, an) for it, _, an in lines_ if an != "none"]
            if lines_ and (flagged or split_run(name)[0].startswith("edit")):
                notes.append(f"{name} seed {seed}: {len(lines_)} syncs; anomalous workers flagged: "
                             + (", ".join(f"it {it}: {an}" for it, an in flagged) if flagged else "none"))
    md = ["# Convergence benchmark", "", table, "", *[f"- {n}" for n in notes]]

    plot_msg = None
    if any(runs.values()):
        plot_msg = plot_curves({n: r for n, r in runs.items() if r}, os.path.join(a.output_dir, "loss_curves.png"),
                               f"{a.nproc} ranks, {a.train_iters} iterations, H={a.sync_interval}, "
                               f"{len(seeds)} seed(s): mean and min..max")
    md += ["", plot_msg or "Loss curves: loss_curves.png"]
    total = time.perf_counter() - tool_start
    md += ["", f"Tool wall time: {total:.0f} s"]
    text = "\n".join(md) + "\n"
    print()
    print(text)
    with open(os.path.join(a.output_dir, "convergence.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(a), "corruption_hits": hits, "failures": failures, "sync_lines": sync_logs,
                   "runs": runs}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
