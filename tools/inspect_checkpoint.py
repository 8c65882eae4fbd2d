#!/usr/bin/env python3
"""Show what a checkpoint holds: iteration, the local-SGD metadata, every tensor with its global shape
and dtype (grouped: model, inner optimizer, per-worker copies, outer state), and whether the files
match the manifest (--verify). Reads metadata only; no process group, no model.

  python tools/inspect_checkpoint.py runs/edit            # the latest iteration
  python tools/inspect_checkpoint.py runs/edit --ckpt-step 200 --verify --tensors
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_edit.checkpoint import convert, files  # noqa: E402


def group_of(key: str) -> str:
    match = re.match(r"local_sgd\.worker(\d+)\.", key)
    if match:
        return f"worker {match.group(1)}" + (" optimizer" if ".optimizer." in key else
                                             " error feedback" if ".error_feedback." in key else " model")
    for prefix, name in (("local_sgd.anchor.", "outer: anchor"), ("local_sgd.momentum.", "outer: momentum"),
                         ("local_sgd.inflight.", "outer: in-flight pseudo-gradients"),
                         ("local_sgd.error_feedback.", "worker 0 error feedback"),
                         ("optimizer.", "worker 0 optimizer")):
        if key.startswith(prefix):
            return name
    return "worker 0 model"


def describe(directory: str, iteration: int, show_tensors: bool) -> list[str]:
    from megatron.core import dist_checkpointing

    common = convert.read_common(directory)
    meta = common.get("megatron_edit", {})
    args = common.get("args")
    lines = [f"checkpoint: {directory}", f"iteration: {common.get('iteration', iteration)}"]
    if args is not None:
        lines.append(f"model: {args.num_layers} layers x {args.hidden_size} hidden, {args.num_attention_heads} heads, "
                     f"saved with TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
                     f"DP {getattr(args, 'data_parallel_size', '?')}")
    if meta:
        lines.append(f"local SGD: method {meta.get('method') or 'none (synchronous)'}; workers {meta.get('num_workers')}; "
                     f"outer state {'yes' if meta.get('outer_state') else 'no'}"
                     f"{' (+ momentum)' if meta.get('momentum') else ''}; inner optimizer "
                     f"{'yes' if meta.get('optimizer') else 'no'}")
        if meta.get("inflight"):
            lines.append("streaming fragments in flight: " + ", ".join(
                f"{u['name']}{' (advanced)' if u.get('advanced') else ''}" for u in meta["inflight"]))
        stats = meta.get("penalty_stats")
        if stats is not None and int(stats["count"].max()) > 0:
            lines.append(f"penalty statistics: {int(stats['count'].max())} syncs; EWMA mean of per-layer norms "
                         f"{float(stats['mean'].mean()):.4g}")
        probation = meta.get("loss_probation")
        if probation is not None and bool(probation.any()):
            lines.append("loss test probation (flagged at the last sync): " + ", ".join(
                f"w{w}" for w in probation.nonzero().flatten().tolist()))
        if meta.get("agreed_samples") is not None:
            lines.append(f"a-edit agreed samples: {meta['agreed_samples']}")
        if meta.get("schedule"):
            lines.append(f"schedule: {meta['schedule']}")
    else:
        lines.append("local SGD: no megatron_edit metadata (not written by megatron_edit)")
    tensors = dist_checkpointing.load_tensors_metadata(directory)
    groups = defaultdict(list)
    for key, sh in sorted(tensors.items()):
        groups[group_of(key)].append((key, tuple(sh.global_shape), str(sh.dtype).replace("torch.", "")))
    lines.append(f"tensors: {len(tensors)}")
    for name in sorted(groups):
        numel = 0
        for _, shape, _ in groups[name]:
            n = 1
            for d in shape:
                n *= d
            numel += n
        lines.append(f"  {name}: {len(groups[name])} tensors, {numel} elements")
        if show_tensors:
            for key, shape, dtype in groups[name]:
                lines.append(f"    {key}  {list(shape)}  {dtype}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint root (latest marker) or iter_N directory")
    p.add_argument("--ckpt-step", type=int, default=None)
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--verify", action="store_true", help="check every file's size and CRC-32")
    a = p.parse_args(argv)
    try:
        directory, iteration = convert.resolve(a.checkpoint, a.ckpt_step)
        if a.verify:
            count = files.verify_checkpoint(directory)
        lines = describe(directory, iteration, a.tensors)
    except files.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.verify:
        lines.append(f"verified: {count} files match {files.MANIFEST}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
