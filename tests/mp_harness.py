"""Shared settings for the multi-process tests; the runner itself is megatron_edit.training.launch."""
from megatron_edit.training.launch import loss_curve as losses  # noqa: F401
from megatron_edit.training.launch import spawn_training as run_training  # noqa: F401

TINY_MODEL = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
    "--make-vocab-size-divisible-by", "128",
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0", "--seed", "1234",
]
