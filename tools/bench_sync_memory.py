"""Transient memory of one outer sync, per method, as a ratio to the largest unit in flight (issue 12).

A sync must not need much memory beyond the outer state (anchor, momentum): on a memory-tight run an
extra shard-sized buffer or two is what makes the first sync run out of memory. This drives the engine
of the real entry (GPTModel, DDP over the worker, distributed optimizer) on 2 gloo ranks = 2 workers and
records, with torch's profiler (``profile_memory``), every allocation and free on rank 0 during one sync:

  diloco            all-at-once at the optimizer step (one unit: the whole stage)
  edit-all-at-once  the same with EDiT's penalty and clip
  edit              layer-wise: launched at the step, each unit finished inside the next forward pass
                    (driven here by flush_pending(), which finishes them in the same order)
  streaming-fp4     one fragment: launched at its sync iteration, merged tau steps later (fp4 wire)
  diloco-fp4        all-at-once with an fp4 wire

The number is the peak of live bytes allocated inside the sync minus those freed (the median of three
syncs), over the fp32 bytes of the largest unit (a DDP bucket group, a fragment, or the whole stage) and
over the stage's fp32 main shard. Side by side in one run:

    python tools/bench_sync_memory.py                       # ~2 minutes
    python tools/bench_sync_memory.py --hidden-size 512 --num-layers 4
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = {
    "diloco": ["--local-sgd", "diloco"],
    "edit-all-at-once": ["--local-sgd", "edit", "--no-local-sgd-layerwise"],
    "edit": ["--local-sgd", "edit"],
    "streaming-fp4": ["--local-sgd", "streaming", "--streaming-fragments", "2", "--outer-grad-dtype", "fp4-e3m0"],
    "diloco-fp4": ["--local-sgd", "diloco", "--outer-grad-dtype", "fp4-e3m0"],
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--extra-args", default="", help="more training flags for every run (one string)")
    return p.parse_args(argv)


def _argv(a: argparse.Namespace, method: str) -> list[str]:
    import shlex

    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size), "--num-attention-heads", "4",
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "100",
            "--lr", "1e-3", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--log-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0",
            "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--local-sgd-workers", "2", "--local-sgd-sync-interval", "50",
            *METHODS[method], *shlex.split(a.extra_args)]


def peak_live_bytes(prof) -> int:
    """Peak of (bytes allocated - bytes freed) over the profiled region, in time order: each op's own
    allocations (``self_cpu_memory_usage``, so nested ops are not counted twice) and the frees the
    profiler records as ``[memory]`` events."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _rank(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_edit.training.launch import keep_transformers_out, set_rank_environment

    set_rank_environment(rank, world, port)
    torch.set_num_threads(1)
    keep_transformers_out()
    from megatron_edit.training.pretrain_gpt import build_trainer, shutdown

    trainer = build_trainer(argv)
    ls = trainer.local_sgd
    largest = max(range(len(ls.units)), key=lambda i: ls.units[i].numel)
    peaks = []
    for _ in range(3):  # three syncs; gloo frees buffers from its own threads, so single peaks vary
        for _ in range(2):  # params move away from the anchor
            trainer.train_step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            if ls.streaming:
                ls.sync(trainer.iteration, [largest])
                ls._finish_unit(largest)
            else:
                ls.sync(trainer.iteration)
                ls.flush_pending()
        peaks.append(peak_live_bytes(prof))
    result = dict(peak=sorted(peaks)[1], largest_unit=ls.units[largest].numel * 4,
                  stage=sum(s.main.numel() for s in ls.shards) * 4, units=len(ls.units))
    if rank == 0:
        torch.save(result, out)
    shutdown()


def main(argv: Optional[Sequence[str]] = None) -> None:
    import tempfile

    import torch

    from megatron_edit.training.launch import redirect_fds, rendezvous_store, run_processes

    a = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods.split(","):
            out = os.path.join(tmp, f"{method}.pt")
            with redirect_fds(os.path.join(tmp, f"{method}.log")), rendezvous_store() as port:
                run_processes(_rank, (2, port, _argv(a, method), out), 2, timeout=900)
            r = torch.load(out)
            rows.append((method, r))
    print("| method | units | largest unit (MiB) | stage shard (MiB) | extra peak (MiB) | / largest unit | / stage |")
    print("|---|---|---|---|---|---|---|")
    for method, r in rows:
        mib = 1024.0 ** 2
        print(f"| {method} | {r['units']} | {r['largest_unit'] / mib:.2f} | {r['stage'] / mib:.2f} | "
              f"{r['peak'] / mib:.2f} | {r['peak'] / r['largest_unit']:.2f}x | {r['peak'] / r['stage']:.2f}x |")


if __name__ == "__main__":
    main()
