"""Run the real training entry on N gloo ranks (torch.multiprocessing) and collect what tests compare.

Each rank records: the loss history (last pipeline stage), per iteration a digest of its fp32 main-param
shards (sum and sum of squares in float64; equal digests <=> equal shards for our purposes), its
coordinates (worker, TP, PP, intra-worker rank), and at the end its full (gathered) local parameters by
global name.
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Sequence

import torch
import torch.multiprocessing as mp

TINY_MODEL = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
    "--make-vocab-size-divisible-by", "128",
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0", "--seed", "1234",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(trainer) -> tuple[float, float]:
    from megatron_edit import mcore_adapter

    total = torch.zeros(2, dtype=torch.float64)
    for _, main, _ in mcore_adapter.main_param_pairs(trainer.optimizer):
        m = main.detach().double()
        total[0] += m.sum()
        total[1] += m.pow(2).sum()
    return float(total[0]), float(total[1])


def _rank_main(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from megatron_edit.training.model import global_param_name, unwrap
    from megatron_edit.training.pretrain_gpt import build_trainer, shutdown

    trainer = build_trainer(argv)
    digests = []
    history = trainer.train(on_step=lambda t: digests.append(_digest(t)))
    params = {}
    for chunk in trainer.model:
        inner = unwrap(chunk)
        for name, p in inner.named_parameters():
            params[global_param_name(inner, name)] = p.detach().float().clone()
    topo = trainer.topology
    result = dict(
        losses=history, digests=digests, params=params, worker=topo.worker_index,
        tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
        intra=topo.intra_dp_group.rank(), last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        sync_bytes=trainer.local_sgd.bytes_sent_total if trainer.local_sgd else 0,
    )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()


def run_training(argv: Sequence[str], world_size: int) -> list[dict]:
    """Train on `world_size` gloo ranks; returns each rank's result dict (index = global rank)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world_size, _free_port(), list(argv), out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def losses(results: list[dict]) -> list[float]:
    """The loss history printed by the run (identical on every last-stage rank)."""
    return next(r["losses"] for r in results if r["last_stage"])
