"""Bytes that cross worker boundaries: synchronous DP vs DiLoCo vs EDiT vs Streaming DiLoCo (fp32, bf16,
fp8, fp4), measured side by side in one invocation, next to the theoretical counts.

Measured: every rank's local-SGD engine counts the bytes it hands to other workers (payload + block
scales, plus EDiT's per-layer norm all-gather), and the per-sync counts give the peak of one sync event.
Synchronous DP sends nothing "local-SGD" — its cross-worker traffic is the gradient all-reduce every step;
we report the theoretical count for the most favourable (hierarchical) layout, megatron-core's partial
distributed optimizer: each rank all-reduces its fp32 gradient shard over the W workers each step,
2 (W-1)/W x 4 bytes x shard elements.

Usage: python tools/bench_comm.py [--workers 2] [--iters 32] [--interval 8] [--fragments 2]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from megatron_edit.quantized_collectives import predicted_bytes_sent  # noqa: E402
from megatron_edit.training.launch import spawn_training  # noqa: E402


def model_flags(args) -> list[str]:
    return [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1023", "--num-layers", "6",
        "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "16", "--train-iters", str(args.iters), "--lr", "1e-3", "--disable-bias-linear",
        "--log-interval", "100000", "--eval-interval", "100000", "--eval-iters", "0",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--ddp-bucket-size", "60000",
    ]


def methods(args) -> list[tuple[str, str, list[str]]]:
    common = ["--local-sgd-workers", str(args.workers), "--local-sgd-sync-interval", str(args.interval)]
    rows = [("sync-dp", "fp32", []), ("diloco", "fp32", ["--local-sgd", "diloco"] + common),
            ("edit", "fp32", ["--local-sgd", "edit"] + common)]
    for fmt in ("fp32", "bf16", "fp8-e4m3", "fp4-e3m0"):
        rows.append(("streaming", fmt, ["--local-sgd", "streaming", "--streaming-fragments", str(args.fragments),
                                        "--streaming-overlap-steps", "1", "--outer-grad-dtype", fmt] + common))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=32)
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--fragments", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/bench_comm")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    W, seq = args.workers, 64
    lines = [f"Cross-worker traffic, {args.ranks} ranks, W={W}, H={args.interval}, {args.iters} iterations "
             f"(streaming: P={args.fragments}, tau=1)", "",
             "| method | wire | bytes/token measured | bytes/token theoretical | peak bytes of one sync event "
             "(max over ranks) | vs sync DP |", "|---|---|---|---|---|---|"]
    dp_bytes_per_token = None
    for name, fmt, flags in methods(args):
        results = spawn_training(model_flags(args) + flags, args.ranks, keep_params=False)
        tokens = results[0]["consumed_samples"] * seq
        shard = [r["main_shard_bytes"] // 4 for r in results]  # fp32 elements of each rank's shard
        if name == "sync-dp":
            # The DP run shards over all D ranks; in the hierarchical layout each of the W instances
            # shards over S = D / W ranks, so a rank's shard there is W times larger.
            shard = [n * W for n in shard]
            theoretical = sum(args.iters * 2 * (W - 1) * 4 * n // W for n in shard)
            measured_text, peak = "-", max(2 * (W - 1) * 4 * n // W for n in shard)
            dp_bytes_per_token = theoretical / tokens
        else:
            measured = sum(r["sync_bytes"] for r in results)
            syncs = sum(1 for b in results[0]["sync_event_bytes"] if b > 0)
            num_layer_keys = 6 + 3
            if name == "streaming":
                # each sync moves one fragment: the whole model crosses once per H steps in total
                per_pass = [predicted_bytes_sent(n, W, results[i]["worker"], fmt) for i, n in enumerate(shard)]
                full_passes = syncs / args.fragments
                theoretical = sum(full_passes * b for b in per_pass) + syncs * len(results) * (W - 1) * num_layer_keys * 4
            else:
                per_sync = [predicted_bytes_sent(n, W, results[i]["worker"], fmt) + (W - 1) * num_layer_keys * 4
                            for i, n in enumerate(shard)]
                theoretical = syncs * sum(per_sync)
            measured_text = f"{measured / tokens:.2f}"
            peak = max(max(r["sync_event_bytes"]) for r in results)
        ratio = "1.00" if name == "sync-dp" else f"{dp_bytes_per_token / (theoretical / tokens):.1f}x fewer"
        lines.append(f"| {name} | {fmt} | {measured_text} | {theoretical / tokens:.2f} | {peak} | {ratio} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.output_dir, "bench_comm.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
