"""Checkpoint size and save / load time: synchronous DP vs DiLoCo / EDiT / streaming, side by side in one
invocation (same model, ranks and iterations; ratios against synchronous DP).

A local-SGD checkpoint keeps every worker's params and Adam moments (bit-exact resume) plus the outer
state (anchor, momentum; streaming: reduced pseudo-gradients in flight), so it is expected near
W x (model + Adam) + 2 x model in fp32. Save time is the second save of the run (the first one also
starts megatron-core's writer processes, reported separately); load time is a fresh run's --load.

Usage: python tools/bench_checkpoint.py [--ranks 4] [--workers 2] [--iters 8]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from megatron_edit.training.launch import redirect_fds, spawn_training  # noqa: E402


def model_flags(iters: int) -> list[str]:
    return [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1023", "--num-layers", "6",
        "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "16", "--train-iters", str(iters), "--lr", "1e-3", "--disable-bias-linear",
        "--log-interval", "100000", "--eval-interval", "100000", "--eval-iters", "0",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "300000",
    ]


def methods(workers: int, iters: int) -> list[tuple[str, list[str]]]:
    common = ["--local-sgd-workers", str(workers), "--local-sgd-sync-interval", str(max(2, iters // 2))]
    return [("sync-dp", []), ("diloco", ["--local-sgd", "diloco"] + common),
            ("edit", ["--local-sgd", "edit"] + common),
            ("streaming", ["--local-sgd", "streaming", "--streaming-fragments", "2"] + common)]


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/bench_checkpoint")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    log = os.path.join(args.output_dir, "ranks.log")
    half = args.iters // 2
    lines = [f"Checkpoints, {args.ranks} ranks, W={args.workers}, 6 layers x 256 hidden, save at {half} and "
             f"{args.iters}", "",
             "| method | checkpoint bytes | vs sync DP | first save ms | save ms | load ms |", "|---|---|---|---|---|---|"]
    base = None
    for name, flags in methods(args.workers, args.iters):
        root = tempfile.mkdtemp(prefix=f"ckpt-{name}-", dir=args.output_dir)
        argv = model_flags(args.iters) + flags
        open(log, "w").close()
        with redirect_fds(log):
            results = spawn_training(argv + ["--save", root, "--save-interval", str(half)], args.ranks,
                                     keep_params=False)
            spawn_training(argv + ["--load", root], args.ranks, keep_params=False)
        text = open(log).read()
        saves = [float(ms) for ms in re.findall(r"saved checkpoint \S+ in ([\d.]+) ms", text)]
        loads = [float(ms) for ms in re.findall(r"loaded checkpoint .* in ([\d.]+) ms", text)]
        size = _du(os.path.join(root, f"iter_{args.iters:07d}"))
        base = base or size
        assert results and len(saves) >= 2 and loads, text[-2000:]
        lines.append(f"| {name} | {size} | {size / base:.2f}x | {saves[0]:.0f} | {saves[1]:.0f} | {loads[0]:.0f} |")
        print(lines[-1], flush=True)
        shutil.rmtree(root)
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.output_dir, "bench_checkpoint.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
