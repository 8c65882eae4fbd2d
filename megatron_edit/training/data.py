"""Datasets and per-rank batch iterators on megatron-core's GPTDataset / BlendedMegatronDatasetBuilder.

Sampling follows Megatron-LM's pretraining sampler: global batch b holds samples
[b*GBS, (b+1)*GBS); within it, microbatch m of data-parallel rank r is the slice starting at
b*GBS + m*MBS*D + r*MBS. The global batch is therefore the same whatever the TP/PP/DP layout, and
local-SGD workers (which keep their global DP rank) read different data. Every rank of a TP/PP slice
reads the same indices, so no broadcast is needed.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def parse_blend(data_path: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's --data-path: ``PREFIX`` ... or ``WEIGHT PREFIX WEIGHT PREFIX``."""
    if len(data_path) == 1:
        return data_path, None
    try:
        weights = [float(w) for w in data_path[0::2]]
        return list(data_path[1::2]), weights
    except ValueError:
        return list(data_path), None


def build_datasets(args, tokenizer, vocab_size: int):
    """Train / valid / test datasets sized for the whole run (Megatron-LM's train_valid_test sizes)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    gbs = args.global_batch_size
    eval_runs = args.train_iters // args.eval_interval + 1
    sizes = [args.train_iters * gbs, eval_runs * args.eval_iters * gbs, args.eval_iters * gbs]
    blend = None
    if not args.mock_data:
        from megatron_edit.data.indexed import validate_indexed_prefix

        prefixes, weights = parse_blend(args.data_path)
        for prefix in prefixes:
            validate_indexed_prefix(prefix)
        blend = (prefixes, weights)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # causal masking is done inside attention
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train, valid, test


class MicroBatches:
    """Iterator over this rank's microbatches, one global batch after another (resumable by position)."""

    def __init__(self, dataset, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int,
                 start_batch: int = 0):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batch = start_batch
        self._micro = 0

    @property
    def global_batch_size(self) -> int:
        return self.mbs * self.num_microbatches * self.dp_size

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        # Each data-parallel rank reads a contiguous block of the global batch, so a worker (a contiguous
        # block of data-parallel ranks) reads the same samples whatever its TP / PP / intra-worker layout.
        start = (self.batch * self.global_batch_size + self.dp_rank * self.mbs * self.num_microbatches
                 + self._micro * self.mbs)
        idx = [(start + i) % len(self.dataset) for i in range(self.mbs)]
        samples = [self.dataset[i] for i in idx]
        self._micro += 1
        if self._micro == self.num_microbatches:
            self._micro = 0
            self.batch += 1
        return {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
