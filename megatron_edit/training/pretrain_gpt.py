"""Megatron-style GPT pretraining on megatron-core, composing the pieces of megatron_edit.

Flow: parse + validate flags (no process group yet) -> CPU layer if CUDA is absent -> process groups
with W distributed-optimizer instances -> GPTModel chunks -> DDP over the worker -> optimizer ->
datasets -> train loop (megatron-core's forward_backward_func) with the local-SGD hooks around the
optimizer step -> Megatron-LM log lines.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_edit.arguments import FlagError, parse_and_validate
from megatron_edit.training.log_lines import TensorBoard, iteration_line, sync_line, validation_line

_QUIET = ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated",
          "is deprecated. Please use", "The .grad attribute of a Tensor that is not a leaf")


def _quiet_known_warnings() -> None:
    for text in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def print_rank_last(msg: str) -> None:
    """Megatron-LM prints iteration lines from the last rank (it holds the last pipeline stage)."""
    if dist.get_rank() == dist.get_world_size() - 1:
        print(msg, flush=True)


def print_rank_0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean loss of one microbatch; megatron-core's schedule divides by the microbatch count."""
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1.0)
    # clone: megatron-core divides the returned loss in place by the microbatch count (schedules.py).
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _mean_loss_over_data_parallel(loss_dicts: list, group) -> Optional[float]:
    """Mean of the microbatch losses of this rank, then over all data-parallel ranks (all workers), so
    the printed loss is comparable with data parallel. Only the last pipeline stage has losses."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    values = torch.stack([d["lm loss"] for d in loss_dicts]).mean().reshape(1).float()
    dist.all_reduce(values, group=group)
    return float(values[0]) / group.size()


class Trainer:
    """Holds the built pieces and runs train / evaluate; the local-SGD engine hooks the optimizer step."""

    def __init__(self, args, local_sgd_cfg):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from megatron_edit.data.tokenizer import build_tokenizer
        from megatron_edit.topology import build_worker_topology, initialize_parallel_state
        from megatron_edit.training import model as model_lib
        from megatron_edit.training.data import build_datasets

        self.args = args
        num_workers = local_sgd_cfg.num_workers(args.data_parallel_size) if local_sgd_cfg else 1
        elastic = local_sgd_cfg is not None and local_sgd_cfg.fault_tolerance
        # Elastic workers: this job is one worker; megatron-core's groups stay inside it.
        initialize_parallel_state(args, 1 if elastic else num_workers)
        self.topology = build_worker_topology(1 if elastic else num_workers)
        if elastic:
            from megatron_edit.topology import as_elastic_worker

            self.topology = as_elastic_worker(self.topology, num_workers, local_sgd_cfg.replica_group_id)
        torch.manual_seed(args.seed)
        model_parallel_cuda_manual_seed(args.seed)

        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        vocab = model_lib.padded_vocab_size(
            self.tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        self.config = model_lib.build_transformer_config(args)
        chunks = model_lib.build_gpt_chunks(args, self.config, vocab)
        if not args.megatron_init:
            model_lib.layout_invariant_init_(chunks, self.config, args.seed)
        self.model, pgc = model_lib.wrap_ddp(args, self.config, chunks, self.topology,
                                             layerwise=bool(local_sgd_cfg and local_sgd_cfg.layerwise))
        self.optimizer, _ = model_lib.build_optimizer(args, self.model, pgc, self.topology)
        self.scheduler = model_lib.build_scheduler(args, self.optimizer)

        # megatron-core schedule hooks (what Megatron-LM's training.py wires up).
        cfg = self.config
        cfg.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        cfg.grad_sync_func = (
            [m.start_grad_sync for m in self.model] if len(self.model) > 1 else self.model[0].start_grad_sync
        )
        if args.overlap_param_gather and len(self.model) > 1:
            cfg.param_sync_func = [m.start_param_sync for m in self.model]
        cfg.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * self.topology.data_parallel_size)

        train, valid, _ = build_datasets(args, self.tokenizer, vocab)
        self.train_dataset = train
        self.restart_data(0)
        self.valid_dataset = valid
        self.iteration = 0
        self.consumed_samples = 0
        self.validation_history: list[tuple[int, float]] = []
        self.last_sync_report = None
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)

        self.local_sgd = None
        self.elastic = None
        if elastic:
            from megatron_edit.fault_tolerance import ElasticWorker

            self.elastic = ElasticWorker(args, local_sgd_cfg, self)
        if local_sgd_cfg is not None:
            from megatron_edit.local_sgd import LocalSGD

            self.local_sgd = LocalSGD(local_sgd_cfg, self.topology, self.model, self.optimizer, self.config,
                                      seed=args.seed, global_batch_size=args.global_batch_size,
                                      budget_samples=args.train_iters * args.global_batch_size,
                                      transport=self.elastic.transport if self.elastic is not None else None)
        # A-EDiT: workers step at their own pace, so per-step collectives stay inside the worker.
        self.asynchronous = local_sgd_cfg is not None and local_sgd_cfg.method == "a-edit"
        self.loss_group = self.topology.intra_dp_group if self.asynchronous else self.dp_group
        self.last_saved_iteration: Optional[int] = None
        if args.load is not None:
            from megatron_edit.checkpoint.save_load import load_checkpoint

            self.last_saved_iteration = load_checkpoint(self)
            if self.local_sgd is not None and self.local_sgd.faults is not None:
                self.local_sgd.faults.start_iteration(self.iteration)
        if self.elastic is not None:
            self.elastic.join()  # a restarted worker heals from a live peer here
        self.last_eval_step = self.last_saved_iteration or 0
        self.tensorboard = TensorBoard(args.tensorboard_dir if dist.get_rank() == dist.get_world_size() - 1 else None)
        print_rank_0(
            f" > megatron_edit: world {dist.get_world_size()} = TP {args.tensor_model_parallel_size} x PP "
            f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}; workers {num_workers}; "
            f"parameters on rank 0: {model_lib.count_parameters(self.model)}; method "
            f"{local_sgd_cfg.method if local_sgd_cfg else 'synchronous'}"
        )

    def after_heal(self, in_sync: bool = True) -> None:
        """This worker took a live peer's state, inside the peers' current sync or at a startup (a
        whole-run restart whose checkpoints differ in age) (fault_tolerance.py)."""
        where = "joined the sync" if in_sync else "starts"
        print_rank_0(f" > elastic: worker {self.topology.worker_index} healed from a live peer and {where} at "
                     f"iteration {self.iteration} (consumed samples {self.consumed_samples})")

    def restart_data(self, batch: int) -> None:
        """Training data from global batch ``batch`` on (the data position is the iteration)."""
        from megatron_edit.training.data import MicroBatches

        dp_rank, dp_size = self.topology.data_parallel_rank, self.topology.data_parallel_size
        self.train_data = self._iterators(lambda: MicroBatches(
            self.train_dataset, self.args.micro_batch_size, self.num_microbatches, dp_rank, dp_size,
            start_batch=batch))

    def _iterators(self, make_batches):
        """One iterator per virtual-pipeline chunk: each chunk must read the same microbatch sequence
        (the first chunk uses the tokens, the last the labels)."""
        if len(self.model) == 1:
            return make_batches()
        return [make_batches() for _ in self.model]

    def train_step(self):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_dicts = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=self.train_data,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=False,
        )
        if self.local_sgd is not None:
            self.local_sgd.before_optimizer_step(self.iteration + 1)
        ok, grad_norm, _ = self.optimizer.step()
        self.iteration += 1
        self.consumed_samples += self.args.global_batch_size
        self.scheduler.step(increment=self.args.global_batch_size)
        report = self.local_sgd.after_optimizer_step(self.iteration) if self.local_sgd is not None else None
        self.last_sync_report = report
        if self.asynchronous and self.iteration > self.local_sgd.cfg.warmup_iters:
            ctl = self.local_sgd.async_ctl
            self.consumed_samples = ctl.estimated_samples
            if report is not None:  # the schedule follows the samples all workers agreed on
                self.scheduler.num_steps = ctl.agreed_samples
                self.scheduler.step(increment=0)
        loss = _mean_loss_over_data_parallel(loss_dicts, self.loss_group)
        return loss, grad_norm, ok, report

    def finished(self) -> bool:
        if self.asynchronous and self.iteration > self.local_sgd.cfg.warmup_iters:
            return self.local_sgd.async_ctl.stop_requested
        return self.iteration >= self.args.train_iters

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        from megatron_edit.training.data import MicroBatches

        self.sync_params_for_reading()
        for chunk in self.model:
            chunk.eval()
        valid = self._iterators(lambda: MicroBatches(
            self.valid_dataset, self.args.micro_batch_size, self.num_microbatches,
            self.topology.data_parallel_rank, self.topology.data_parallel_size))
        losses = []
        for _ in range(self.args.eval_iters):
            loss_dicts = self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=valid,
                model=self.model,
                num_microbatches=self.num_microbatches,
                seq_length=self.args.seq_length,
                micro_batch_size=self.args.micro_batch_size,
                forward_only=True,
            )
            loss = _mean_loss_over_data_parallel(loss_dicts, self.dp_group)
            if loss is not None:
                losses.append(loss)
        for chunk in self.model:
            chunk.train()
        self.resume_param_hooks()
        return sum(losses) / len(losses) if losses else None

    def resume_param_hooks(self) -> None:
        """Undo sync_params_for_reading: the forward pre-hooks gather params again."""
        if self.args.overlap_param_gather:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def eval_due(self, report) -> bool:
        """Every --eval-interval iterations. A-EDiT validates at the first sync at or after each interval
        (in agreed steps): evaluation is a collective over all workers, and only at a sync are they all at
        the same point (holding the same parameters)."""
        if self.args.eval_iters == 0 or self.finished():
            return False
        interval = self.args.eval_interval
        if self.asynchronous and self.iteration > self.local_sgd.cfg.warmup_iters:
            from megatron_edit.checkpoint.save_load import checkpoint_iteration

            return report is not None and checkpoint_iteration(self) // interval > self.last_eval_step // interval
        return self.iteration % interval == 0

    def save_due(self, report) -> bool:
        """Megatron-LM's --save-interval. A-EDiT saves at the first sync at or after each interval
        (in agreed steps): only at a sync are all workers at the same point."""
        if self.args.save is None or not self.args.save_interval:
            return False
        from megatron_edit.checkpoint.save_load import checkpoint_iteration

        if self.asynchronous and self.iteration > self.local_sgd.cfg.warmup_iters and report is None:
            return False
        interval = self.args.save_interval
        return checkpoint_iteration(self) // interval > (self.last_saved_iteration or 0) // interval

    def sync_params_for_reading(self) -> None:
        """Make every rank's full params current (pending layer-wise outer updates included): with
        overlap_param_gather this is Megatron-LM's disable_forward_pre_hook(param_sync=True), which goes
        through each bucket group's start_param_sync; re-enable the hooks before training again."""
        if self.args.overlap_param_gather:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)
        elif self.local_sgd is not None:
            self.local_sgd.flush_pending()

    def log_validation(self) -> None:
        if self.args.eval_iters == 0:
            return
        loss = self.evaluate()
        if loss is not None:
            from megatron.core import parallel_state as ps

            from megatron_edit.checkpoint.save_load import checkpoint_iteration

            step = self.last_eval_step = checkpoint_iteration(self)  # A-EDiT: the agreed step count
            self.validation_history.append((step, loss))
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                print_rank_last(validation_line(step, {"lm loss": loss}))
                self.tensorboard.scalars({"lm loss validation": loss}, step)

    def train(self, on_step=None) -> list[float]:
        """Run to --train-iters; ``on_step(trainer)`` is called after every iteration (tests use it)."""
        args = self.args
        history: list[float] = []
        window_losses: list[float] = []
        window_start = time.perf_counter()
        skipped = nan_iters = 0
        if self.local_sgd is not None and self.local_sgd.slow is not None:
            self.local_sgd.slow.after_sync()  # a straggler's clock starts at its first step, not at start-up
        while not self.finished():
            loss, grad_norm, ok, report = self.train_step()
            if not ok:
                skipped += 1
            if loss is not None:
                history.append(loss)
                window_losses.append(loss)
                if loss != loss:
                    nan_iters += 1
            if on_step is not None:
                on_step(self)
            if report is not None:
                print_rank_last(sync_line(**report.as_log_fields()))
                if self.elastic is not None and (self.elastic.left or self.elastic.joined):
                    print_rank_last(f" > elastic: at iteration {self.iteration} workers "
                                    f"{self.elastic.left or 'none'} left, {self.elastic.joined or 'none'} joined; "
                                    f"members {self.elastic.members} (sync attempts {report.attempts})")
                self.tensorboard.scalars(report.scalars(), self.iteration)
            if self.iteration % args.log_interval == 0:
                elapsed = (time.perf_counter() - window_start) * 1000.0 / args.log_interval
                lr = self.optimizer.param_groups[0]["lr"]
                mean_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                if window_losses:
                    print_rank_last(iteration_line(
                        self.iteration, args.train_iters, self.consumed_samples, elapsed, lr,
                        args.global_batch_size, {"lm loss": mean_loss}, 1.0, grad_norm, skipped, nan_iters,
                    ))
                    self.tensorboard.scalars(
                        {"lm loss": mean_loss, "learning-rate": lr, "grad-norm": grad_norm}, self.iteration
                    )
                window_losses = []
                skipped = nan_iters = 0
                window_start = time.perf_counter()
            if self.eval_due(report):
                self.log_validation()
            if self.save_due(report):
                self.save()
        self.log_validation()
        if args.save is not None:
            from megatron_edit.checkpoint.save_load import checkpoint_iteration

            if self.last_saved_iteration != checkpoint_iteration(self):
                self.save()
        self.sync_params_for_reading()
        self.tensorboard.close()
        if self.elastic is not None:
            self.elastic.shutdown()
        return history


    def save(self) -> None:
        from megatron_edit.checkpoint.save_load import save_checkpoint

        start = time.perf_counter()
        path = save_checkpoint(self)
        print_rank_0(f" > saved checkpoint {path} in {(time.perf_counter() - start) * 1000.0:.1f} ms")


def init_distributed(args) -> None:
    backend = args.distributed_backend or ("nccl" if torch.cuda.is_available() and not args.force_cpu else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)


def build_trainer(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Validate flags (before any process group), switch on the CPU layer if needed, build everything."""
    _quiet_known_warnings()
    try:
        args, local_sgd_cfg = parse_and_validate(argv)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    from megatron_edit import cpu_compat
    from megatron_edit.checkpoint.files import CheckpointError
    from megatron_edit.data.errors import DataError
    from megatron_edit.fault_tolerance import ElasticError

    cpu_compat.activate(True if args.force_cpu else None)
    init_distributed(args)
    try:
        return Trainer(args, local_sgd_cfg)
    except (DataError, CheckpointError, ElasticError) as e:  # raised identically on every rank
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    from megatron_edit.fault_tolerance import ElasticError

    trainer = build_trainer(argv)
    try:
        history = trainer.train()
    except ElasticError as e:  # a worker that must leave a running elastic run (fault_tolerance.py)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    shutdown()
    return history


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
