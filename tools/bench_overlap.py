"""Exposed (waited) cross-worker communication per sync, fp32 vs quantized wires (issue 12).

The engine adds up the host time it spends on the critical path in cross-worker reductions
(``handle.wait`` / ``advance``: ``LocalSGD.exposed_comm_seconds``) and, within it, the time blocked in the
collectives themselves (``waited_network_seconds``); the rest is a quantized wire's decode / fp32 sum /
encode, which runs on the host here and would be kernels queued on a GPU stream. Launches are
asynchronous and not counted. Layer-wise EDiT keeps two
units moving ahead of the one it finishes (the next one in its second phase, the one after launched), and
streaming starts a fragment's second phase in the forward of step t + floor(tau/2) + 1, so with a
quantized wire neither phase should be waited for on the critical path. Runs side by side in one
invocation, 4 gloo ranks = 2 workers x 2 ranks:

    python tools/bench_overlap.py                        # ~4 minutes
    python tools/bench_overlap.py --hidden-size 512 --train-iters 48

On 2 CPU cores the collectives share the cores with compute, so the numbers say where the engine waits,
not what a GPU cluster would hide; read them as ratios between rows.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from typing import Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RUNS = {
    "edit-fp32": ["--local-sgd", "edit", "--outer-grad-dtype", "fp32"],
    "edit-fp4": ["--local-sgd", "edit", "--outer-grad-dtype", "fp4-e3m0"],
    "streaming-fp32-tau1": ["--local-sgd", "streaming", "--outer-grad-dtype", "fp32", "--streaming-overlap-steps", "1"],
    "streaming-fp4-tau1": ["--local-sgd", "streaming", "--outer-grad-dtype", "fp4-e3m0",
                           "--streaming-overlap-steps", "1"],
    "streaming-fp4-tau2": ["--local-sgd", "streaming", "--outer-grad-dtype", "fp4-e3m0",
                           "--streaming-overlap-steps", "2"],
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=32)
    p.add_argument("--sync-interval", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="rounds over all runs (interleaved)")
    p.add_argument("--extra-args", default="")
    return p.parse_args(argv)


def _argv(a: argparse.Namespace, run: str) -> list[str]:
    hidden = a.hidden_size
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--num-layers", str(a.num_layers), "--hidden-size", str(hidden), "--num-attention-heads", "4",
            "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "16",
            "--train-iters", str(a.train_iters), "--lr", "1e-3", "--disable-bias-linear", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--log-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0",
            "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--local-sgd-workers", "2", "--local-sgd-sync-interval", str(a.sync_interval),
            *RUNS[run], *shlex.split(a.extra_args)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    import tempfile

    from megatron_edit.training.launch import redirect_fds, spawn_training

    a = parse_args(argv)
    runs = a.runs.split(",")
    samples: dict[str, list[float]] = {r: [] for r in runs}
    steps: dict[str, list[float]] = {r: [] for r in runs}
    waited: dict[str, list[float]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for run in runs:
                with redirect_fds(os.path.join(tmp, f"{run}.log")):
                    results = spawn_training(_argv(a, run), 4, keep_params=False)
                syncs = max(sum(1 for b in r["sync_event_bytes"] if b > 0) for r in results)
                exposed = max(r["exposed_comm_seconds"] for r in results)
                network = max(r["waited_network_seconds"] for r in results)
                samples[run].append(exposed * 1000.0 / max(syncs, 1))
                waited[run].append(network * 1000.0 / max(syncs, 1))
                times = sorted(t for _, t, _ in results[0]["step_times"][2:])
                steps[run].append(statistics.median(times) * 1000.0)
    print("| run | blocked on the network, ms per sync | + codec work on the host, ms per sync | median step ms |")
    print("|---|---|---|---|")
    for run in runs:
        exposed, network = statistics.median(samples[run]), statistics.median(waited[run])
        print(f"| {run} | {network:.1f} | {exposed:.1f} | {statistics.median(steps[run]):.1f} |")


if __name__ == "__main__":
    main()
