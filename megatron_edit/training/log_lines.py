"""Megatron-LM's log line formats (SPEC section 4), so existing parsers and dashboards keep working,
plus our ` local-sgd sync |` line. TensorBoard gets the same scalars when a writer is given."""
from __future__ import annotations

import datetime
import math
from typing import Optional, Sequence


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def iteration_line(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    learning_rate: float,
    global_batch_size: int,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: Optional[float],
    skipped: int,
    nan: int,
) -> str:
    s = f" [{_now()}] iteration {iteration:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed_samples:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {learning_rate:.6E} |"
    s += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        s += f" {key}: {value:.6E} |"
    s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    return s


def validation_line(iteration: int, losses: dict[str, float]) -> str:
    s = f" validation loss at iteration {iteration} |"
    for key, value in losses.items():
        ppl = math.exp(min(20.0, value))
        s += f" {key} value: {value:.6E} | {key} PPL: {ppl:.3E} |"
    return s


def layerwise_units_line(pipeline_stage: int, units: int) -> str:
    """Printed once at start-up by the first rank of each pipeline stage: how many layer-wise sync units
    (DDP bucket groups, all virtual chunks of the stage together) the stage's outer update is split into."""
    return f" local-sgd layer-wise | pipeline stage {pipeline_stage} | units: {units} |"


def sync_line(
    iteration: int,
    workers: int,
    fragment: str,
    pseudo_grad_norm: float,
    anomalous: Sequence[str],
    bytes_sent: int,
    bytes_sent_total: int,
    wire_format: str,
    sync_ms: float,
    inner_steps: Optional[Sequence[int]] = None,
    repaired: Optional[Sequence[str]] = None,
) -> str:
    s = f" local-sgd sync | iteration {iteration:8d} | workers: {workers} | fragment: {fragment} |"
    s += f" pseudo-grad norm: {pseudo_grad_norm:.6E} |"
    s += f" anomalous workers: {','.join(anomalous) if anomalous else 'none'} |"
    if repaired:  # only at a sync that replaced a flagged worker's inner moments (inner_state_repair.py)
        s += f" inner state repaired: {','.join(repaired)} |"
    s += f" outer bytes sent ({wire_format}): {bytes_sent} | outer bytes sent total: {bytes_sent_total} |"
    if inner_steps is not None:
        s += f" inner steps per worker: {','.join(str(n) for n in inner_steps)} |"
    s += f" sync time (ms): {sync_ms:.1f} |"
    return s


class TensorBoard:
    """Thin optional SummaryWriter (tensorboard is an optional dependency)."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # pragma: no cover
                raise RuntimeError(f"--tensorboard-dir needs the tensorboard package: {e}") from None
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
