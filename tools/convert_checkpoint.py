#!/usr/bin/env python3
"""Convert a megatron_edit checkpoint (local SGD or not) into other formats.

  --to mcore  a plain megatron-core GPT checkpoint (model only, no outer state, no optimizer) that a run
              without --local-sgd loads with --load (optionally declared for another TP / PP layout)
  --to torch  one file: {'model': {global name: tensor}, 'args', 'iteration', 'source'}
  --to hf     Hugging Face safetensors + config.json (GPT-2 or Llama style), then loaded back with
              transformers and checked: logits must match megatron-core's within --logits-atol

Global params (--params): the anchor (default; the last outer-synced model), the mean of the workers'
params (average), or one worker's (worker --worker N). Runs in one CPU process, any saved layout.

  python tools/convert_checkpoint.py --load runs/edit --to hf --output runs/edit-hf
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_edit.checkpoint import convert, files  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (with the latest marker) or iter_N directory")
    p.add_argument("--ckpt-step", type=int, default=None)
    p.add_argument("--to", choices=("mcore", "torch", "hf"), required=True)
    p.add_argument("--output", required=True, help="directory (mcore, hf) or file (torch)")
    p.add_argument("--params", choices=convert.SOURCES, default="anchor")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="torch / hf tensors")
    p.add_argument("--hf-architecture", choices=("gpt2", "llama"), default=None, help="default: inferred")
    p.add_argument("--logits-atol", type=float, default=1e-4)
    p.add_argument("--no-logits-check", action="store_true")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def check_hf_logits(model, output: str, vocab: int, atol: float) -> float:
    """Load the export with transformers and compare its logits with megatron-core's on random tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    tokens = torch.randint(0, vocab, (2, min(16, hf.config.max_position_embeddings)),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
    ours = convert.model_logits(model, tokens)
    diff = float((theirs - ours).abs().max())
    if not diff <= atol:
        raise SystemExit(f"error: {output}: Hugging Face logits differ from megatron-core's by {diff:.3e} "
                         f"(> --logits-atol {atol})")
    return diff


def main(argv=None) -> int:
    a = parse(argv)
    try:
        directory, iteration = convert.resolve(a.load, a.ckpt_step)
        files.verify_checkpoint(directory) if files.read_manifest(directory) is not None else None
        common = convert.read_common(directory)
        meta = common.get("megatron_edit", {})
        convert.init_single_process()
        args = convert.single_rank_args(common["args"])
        vocab = convert.saved_vocab_size(directory)
        model = convert.build_model(args, vocab)
        state, source = convert.global_params(model, directory, meta, a.params, a.worker)
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        if a.to == "mcore":
            out = convert.write_mcore(model, state, common, convert.read_progress(directory, meta), a.output,
                                      iteration, a.target_tensor_parallel_size, a.target_pipeline_parallel_size)
        elif a.to == "torch":
            convert.write_torch(state, a.output, common["args"], iteration, source, dtype)
            out = a.output
        else:
            from safetensors.torch import save_file

            from megatron_edit.checkpoint.hf_export import ModelShape, choose_architecture, export

            shape = ModelShape.from_args(common["args"], vocab)
            arch = choose_architecture(shape, a.hf_architecture)
            tensors, config = export(state, shape, arch)
            os.makedirs(a.output, exist_ok=True)
            save_file({k: v.to(dtype) for k, v in tensors.items()}, os.path.join(a.output, "model.safetensors"),
                      metadata={"format": "pt"})
            config["torch_dtype"] = "bfloat16" if a.dtype == "bf16" else "float32"
            with open(os.path.join(a.output, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            out = a.output
            if not a.no_logits_check:
                convert.set_params(model, state)
                diff = check_hf_logits(model, a.output, min(vocab, common["args"].vocab_size or vocab),
                                       a.logits_atol if a.dtype == "fp32" else max(a.logits_atol, 5e-2))
                print(f"logits check ({arch}): max |hf - megatron| = {diff:.3e}")
    except (files.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.to}; params: {source}; iteration {iteration})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
