"""The local-SGD engine: DiLoCo's outer step, EDiT's penalty and layer-wise sync (SPEC 2.1, 2.2).

Readable top to bottom:
  before_optimizer_step  - synchronous warmup (grads averaged over workers); fault injection
  after_optimizer_step   - anchor at the end of warmup; every H steps a sync:
      1. per-layer norms G_w of delta_w = anchor - theta_w (one all-reduce in the worker, one
         all-gather across workers: every rank gets G [W, L])
      2. penalty weights (pure function; uniform 1/W without a penalty); a worker the penalty flags
         takes the healthy workers' mean inner Adam moments (inner_state_repair.py)
      3. per unit (all shards at once, or one DDP bucket group in layer-wise mode):
         cross-worker all-reduce of weight_w * delta_w; clip by the per-layer norm of the result
         (reduced over the worker's ranks of this pipeline stage); outer Nesterov step on the anchor;
         theta_w = anchor.
  Layer-wise (EDiT): step 3 is deferred to the next forward pass. Each DDP bucket group's
  ``start_param_sync`` (the moment its parameter all-gather is dispatched inside the worker) first applies
  that bucket's outer update, and launches the next bucket's cross-worker collective (prefetch).

  Streaming DiLoCo: units are fragments of layers; fragment p launches its collective at its own
  staggered iterations, training goes on for tau steps, then the outer step runs and the fragment's
  params are merged: theta = alpha * theta + (1 - alpha) * anchor'.
  Every method sends pseudo-gradients through quantized_collectives (fp32: a plain all-reduce; other
  formats: quantized on the wire, always summed in fp32).

The math lives in outer_optimizer.py and pseudo_grad_penalty.py; this file moves bytes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_edit import mcore_adapter
from megatron_edit.async_trigger import AsyncSyncController
from megatron_edit.config import ConfigError, LocalSGDConfig
from megatron_edit.fault_injection import FaultInjector, SlowWorker, model_vocab_size
from megatron_edit.fp8 import write_back_model_params
from megatron_edit.inner_state_repair import repair_inner_state, repair_plan
from megatron_edit.inter_worker_transport import ProcessGroupTransport
from megatron_edit.outer_optimizer import needs_outer_momentum, outer_step
from megatron_edit.outer_state import (
    OuterShard,
    OuterStateStaging,
    collect_outer_shards,
    init_outer_state,
    layer_key_name,
    num_layer_keys,
    outer_state_bytes,
    param_layer_keys,
)
from megatron_edit.pseudo_grad_penalty import (
    PenaltyConfig,
    PenaltyStats,
    clip_coefficient,
    init_stats,
    loss_outliers,
    median_of_finite,
    penalty_weights,
)
from megatron_edit.sync_schedule import (
    assign_layers_to_fragments,
    default_num_fragments,
    fragment_of_embedding,
    fragment_of_output,
    fragments_merging_at,
    fragments_syncing_at,
    is_anchor_iteration,
    is_sync_iteration,
    is_warmup,
    validate_streaming_schedule,
)
from megatron_edit.wire_codecs import ErrorFeedback, ErrorFeedbackSection
from megatron_edit.topology import WorkerTopology, all_reduce_mean_


MAX_SYNC_ATTEMPTS = 10  # elastic workers: consecutive failed commits before the worker gives up


@dataclass
class SyncReport:
    iteration: int
    workers: int
    pseudo_grad_norm: float
    anomalous: list[str]
    bytes_sent: int
    bytes_sent_total: int
    wire_format: str
    sync_ms: float
    fragment: str = "all"
    inner_steps: Optional[list[int]] = None  # a-edit: per worker, since the previous sync
    attempts: int = 1  # elastic workers: quorums it took (a member lost mid-sync costs one more)
    repaired: list[str] = field(default_factory=list)  # inner_state_repair.py: workers whose moments were replaced

    def as_log_fields(self) -> dict:
        return dict(iteration=self.iteration, workers=self.workers, fragment=self.fragment,
                    pseudo_grad_norm=self.pseudo_grad_norm, anomalous=self.anomalous,
                    bytes_sent=self.bytes_sent, bytes_sent_total=self.bytes_sent_total,
                    wire_format=self.wire_format, sync_ms=self.sync_ms, inner_steps=self.inner_steps,
                    repaired=self.repaired)

    def scalars(self) -> dict:
        return {"local-sgd/pseudo-grad-norm": self.pseudo_grad_norm,
                "local-sgd/anomalous-workers": float(len(self.anomalous)),
                f"local-sgd/outer-bytes-sent-{self.wire_format}": float(self.bytes_sent),
                "local-sgd/outer-bytes-sent-total": float(self.bytes_sent_total),
                "local-sgd/sync-time-ms": self.sync_ms}


@dataclass(eq=False)  # identity: units hold tensors
class _Unit:
    """Shards whose outer update is applied together (one DDP bucket group in layer-wise mode)."""

    shards: list[OuterShard]
    keys: set[int] = field(default_factory=set)
    combined: Optional[torch.Tensor] = None  # flat weighted sum of the workers' deltas
    handle: object = None
    launched: bool = False
    advanced: bool = False
    pending: bool = False
    name: str = "all"
    bucket_group: object = None
    error_feedback: Optional[ErrorFeedback] = None
    skip: Optional[torch.Tensor] = None  # [L] layers whose outer step this sync skips (all-anomalous)
    skip_host: Optional[list] = None  # the same on the host (known at the sync: no host sync per layer)
    staged: Optional[list] = None  # offload: (anchor, momentum) of each shard on the device
    advance_at: Optional[int] = None  # streaming: the iteration whose forward starts phase 2

    @property
    def numel(self) -> int:
        return sum(s.main.numel() for s in self.shards)


class LocalSGD:
    def __init__(self, cfg: LocalSGDConfig, topology: WorkerTopology, model_chunks, optimizer, model_config,
                 seed: int = 1234, global_batch_size: int = 1, budget_samples: int = 0, transport=None):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.topo = topology
        # The one seam to the other workers (inter_worker_transport.py): megatron-core's inter-instance
        # group in-job, a torchft Manager with --local-sgd-fault-tolerance.
        self.transport = transport or ProcessGroupTransport(topology.inter_worker_group, topology.num_workers,
                                                            topology.worker_index)
        self._present = torch.ones(topology.num_workers, dtype=torch.bool)
        self.model = model_chunks
        self.optimizer = optimizer
        self.num_layers = model_config.num_layers
        self.L = num_layer_keys(self.num_layers)
        self.seed = seed
        self.distributed_optimizer = model_chunks[0].ddp_config.use_distributed_optimizer
        self.overlap_param_gather = model_chunks[0].ddp_config.overlap_param_gather
        self.shards = collect_outer_shards(
            model_chunks, optimizer, self.num_layers, ps.get_tensor_model_parallel_rank(),
            topology.intra_dp_group.rank(), self.distributed_optimizer,
        )
        # Collective buffers live where the params live (NCCL needs device tensors; gloo takes CPU ones).
        self.device = self.shards[0].main.device if self.shards else torch.device(
            "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.with_momentum = needs_outer_momentum(cfg.outer_optimizer, cfg.outer_momentum)
        self.penalty_cfg = None
        if cfg.has_penalty:
            self.penalty_cfg = PenaltyConfig(
                anomaly_threshold=cfg.anomaly_threshold, ewma_alpha=cfg.ewma_alpha,
                ewma_warmup=max(1, cfg.ewma_warmup), weighting=cfg.weighting, clip=cfg.pseudo_grad_clip,
                peer_ratio=cfg.peer_ratio, loss_ratio=cfg.loss_ratio, moment_ratio=cfg.moment_ratio,
            )
        self.stats = init_stats(self.L, self.device)
        self._repair_enabled = cfg.repair_inner_state
        why_not = mcore_adapter.check_fp32_inner_moments(optimizer) if cfg.repair_inner_state else None
        if why_not is not None and "repair_inner_state" in cfg.explicit:
            raise ConfigError(f"--pseudo-grad-repair-inner-state averages fp32 inner moments, but {why_not}; "
                              "pass --no-pseudo-grad-repair-inner-state")
        if why_not is not None:  # edit's default, not asked for: off, and said once
            self._repair_enabled = False
            if dist.get_rank() == 0:
                print(f"> local-sgd: the repair of a flagged worker's inner state is off: {why_not}", flush=True)
        self._anomalous: Optional[torch.Tensor] = None  # [W, L] of the last sync (penalty only)
        self._repair_numel = 0  # inner moments the last sync's repair reduced (log line bytes)
        # Loss test: this rank's [sum, count] of per-token training losses since the last sync (the last
        # pipeline stage only; reduced over the worker at the sync, riding on the norms' collectives).
        # It needs 3 workers to decide anything (loss_outliers), so with fewer it costs nothing.
        self.loss_test = (self.penalty_cfg is not None and self.penalty_cfg.loss_ratio > 0
                          and topology.num_workers >= 3)
        # Second-moment test (frozen_outliers): this rank's sum of Adam's v per layer rides along too.
        self.moment_test = (self.penalty_cfg is not None and self.penalty_cfg.moment_ratio > 0
                            and topology.num_workers >= 3)
        self._loss_acc = torch.zeros(2, dtype=torch.float32, device=self.device)
        # The workers the loss test flagged at the last sync (its probation; loss_outliers), all ranks alike.
        self.loss_probation = torch.zeros(topology.num_workers, dtype=torch.bool, device=self.device)
        if self.loss_test and ps.is_pipeline_last_stage(ignore_virtual=True):
            model_chunks[-1].register_forward_hook(self._record_loss)
        self.bytes_sent_total = 0  # predicted at each sync (what the log line reports)
        self.bytes_sent_measured = 0  # what the collectives reported when launched (tests compare)
        self._check_inter_group_order()
        self.streaming = cfg.method == "streaming"
        if self.streaming:
            self.num_fragments = cfg.streaming_fragments or default_num_fragments(self.num_layers)
            validate_streaming_schedule(self.num_layers, self.num_fragments, cfg.streaming_pattern,
                                        cfg.sync_interval, cfg.streaming_overlap_steps, cfg.warmup_iters)
        self.units = self._build_units()
        if cfg.outer_grad_error_feedback:
            for unit in self.units:
                unit.error_feedback = ErrorFeedback()
        self._key_norm_cache: dict[int, torch.Tensor] = {}
        self._weights: Optional[torch.Tensor] = None  # [L] this worker's weight per layer
        self._skip: Optional[torch.Tensor] = None
        self._clip_enabled = self.penalty_cfg is not None and self.penalty_cfg.clip is not None
        self._corrupt_gen = torch.Generator().manual_seed(seed + 7919)
        self.faults = None
        if cfg.debug_fault is not None:
            self.faults = FaultInjector(
                cfg.debug_fault, topology.worker_index, model_chunks, model_vocab_size(model_chunks[0]), seed,
                topology.data_parallel_rank,
                first_shard_rank=(topology.intra_dp_group is None or topology.intra_dp_group.rank() == 0)
                and ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0)
        slow = cfg.debug_slow_worker
        self.slow = SlowWorker(slow[1]) if slow is not None and slow[0] == topology.worker_index else None
        self._sync_iteration = 0
        self._sync_iteration_of_next_forward: Optional[int] = None
        # The iteration that reaches --train-iters (0: unknown, e.g. a sample budget): see _final_sync.
        self.final_iteration = budget_samples // global_batch_size if budget_samples > 0 else 0
        self._mix_alpha = cfg.streaming_mix_alpha  # 0 at the final sync: the merge lands on the anchor
        # Host time on the critical path in cross-worker reductions (advance / wait: blocked on the network
        # plus a quantized wire's decode/sum/encode, which a GPU would queue), and the network part alone.
        self.exposed_comm_seconds = 0.0
        self.waited_network_seconds = 0.0
        self._staging = OuterStateStaging(self.device) if cfg.offload_outer_state else None
        self.async_ctl = None
        if cfg.method == "a-edit":
            self.async_ctl = AsyncSyncController(
                cfg.sync_time, topology.num_workers, topology.worker_index, global_batch_size, budget_samples,
                topology.worker_group, topology.inter_worker_group, self.device, check_interval=cfg.sync_check_interval)
        self._unit_of_bucket_group = {id(u.bucket_group): i for i, u in enumerate(self.units)
                                      if u.bucket_group is not None}
        if cfg.layerwise:
            self._install_layerwise_hooks()
            self._announce_layerwise_units()
        if self.streaming and cfg.streaming_overlap_steps > 0:
            self._install_streaming_advance_hook()
        if is_anchor_iteration(0, cfg.warmup_iters):
            init_outer_state(self.shards, self.with_momentum, cfg.offload_outer_state)
            if self.async_ctl is not None:
                self.async_ctl.start(consumed_samples=0)

    # ------------------------------------------------------------------ set-up
    def _check_inter_group_order(self) -> None:
        """Penalty weights are indexed by worker; the inter group must list workers in order."""
        group = self.topo.inter_worker_group
        if group is None:
            return
        mine = torch.tensor([float(self.topo.worker_index)], device=self.device)
        out = torch.zeros(group.size(), device=self.device)
        dist.all_gather_into_tensor(out, mine, group=group)
        if not torch.equal(out.cpu(), torch.arange(group.size(), dtype=out.dtype)):
            raise RuntimeError(f"inter-worker group lists workers as {out.tolist()}, expected 0..W-1")

    def _build_units(self) -> list[_Unit]:
        key_of = param_layer_keys(self.model, self.num_layers)
        if self.streaming:
            fragment_of_key = self._fragment_of_key()
            units = []
            for p in range(self.num_fragments):
                unit = _Unit([s for s in self.shards if fragment_of_key[s.key] == p])
                unit.keys = {k for k in set(key_of.values()) if fragment_of_key[k] == p}
                unit.name = str(p)
                units.append(unit)
            return units
        if not self.cfg.layerwise:
            unit = _Unit(list(self.shards))
            unit.keys = set(key_of.values())  # the same on every rank of the stage
            return [unit]
        # Forward order: chunks in order; inside a chunk DDP lists bucket groups in backward order.
        units = []
        by_group = {}
        for s in self.shards:
            by_group.setdefault(id(s.bucket_group), []).append(s)
        for chunk in self.model:
            for bg in reversed(mcore_adapter.ddp_bucket_groups(chunk)):
                unit = _Unit(by_group.get(id(bg), []))
                # Keys of the whole bucket group, not of this rank's shards: every rank of the stage
                # must take part in the same per-layer norm reductions.
                unit.keys = {key_of[p] for p in mcore_adapter.bucket_group_params(bg)}
                unit.bucket_group = bg
                units.append(unit)
        return units

    def _fragment_of_key(self) -> list[int]:
        """Streaming fragments over layer keys: transformer layers by --streaming-pattern, the embeddings
        (and the tied output weight) with the first layer's fragment, final norm / output layer with the
        last layer's (sync_schedule.fragment_of_embedding / fragment_of_output)."""
        P, pattern = self.num_fragments, self.cfg.streaming_pattern
        of_layer = assign_layers_to_fragments(self.num_layers, P, pattern)
        embedding = fragment_of_embedding(P, pattern)
        return [embedding, embedding] + of_layer + [fragment_of_output(self.num_layers, P, pattern)]

    def _install_streaming_advance_hook(self) -> None:
        """Streaming: a forward pre-hook on the first model chunk moves in-flight two-phase collectives
        to their second phase at the start of the step chosen at launch (``advance_at``), so that the
        second phase overlaps that step's forward and backward instead of being waited at the merge."""

        def advance(module, args):
            self._next_forward_iteration_started()

        self.model[0].register_forward_pre_hook(advance)

    def _next_forward_iteration_started(self) -> None:
        iteration = self._sync_iteration_of_next_forward
        if iteration is None:
            return
        self._sync_iteration_of_next_forward = None
        for index, unit in enumerate(self.units):
            if unit.advance_at == iteration:
                self._advance_unit(index)

    def _announce_layerwise_units(self) -> None:
        """` local-sgd layer-wise | pipeline stage P | units: N |` from the first rank of each stage."""
        from megatron.core import parallel_state as ps

        from megatron_edit.training.log_lines import layerwise_units_line

        if ps.get_tensor_model_parallel_rank() == 0 and self.topo.data_parallel_rank == 0:
            print(layerwise_units_line(ps.get_pipeline_model_parallel_rank(), len(self.units)), flush=True)

    def _install_layerwise_hooks(self) -> None:
        """Wrap each bucket group's start_param_sync (megatron-core 0.16.1 seam, SPEC section 5)."""
        for index, unit in enumerate(self.units):
            bg = unit.bucket_group
            original = bg.start_param_sync

            def start_param_sync(force_sync: bool = False, _original=original, _index=index):
                if self.units[_index].pending:
                    self._finish_unit(_index)
                return _original(force_sync=force_sync)

            bg.start_param_sync = start_param_sync

    # ------------------------------------------------------------------ hooks around the optimizer step
    def before_optimizer_step(self, iteration: int) -> None:
        """iteration = the number this step will complete as."""
        cfg = self.cfg
        if cfg.debug_corrupt_worker is not None:
            self._maybe_corrupt(iteration)
        if self.faults is not None and self.faults.spikes_at(iteration):
            self.faults.before_optimizer_step(iteration, [
                grad for chunk in self.model
                for grad in mcore_adapter.grad_shards_for_sync(chunk, self.distributed_optimizer)])
        if is_warmup(iteration, cfg.warmup_iters):
            for chunk in self.model:
                for grad in mcore_adapter.grad_shards_for_sync(chunk, self.distributed_optimizer):
                    all_reduce_mean_(grad, self.topo.inter_worker_group)

    def after_optimizer_step(self, iteration: int) -> Optional[SyncReport]:
        if self.slow is not None:
            self.slow.before_sync()
        report = self._after_optimizer_step(iteration)
        if self.slow is not None:
            self.slow.after_sync()
        if self.faults is not None:  # after the sync: a fault between syncs
            self.faults.after_optimizer_step(iteration, [s.main for s in self.shards])
        return report

    def _after_optimizer_step(self, iteration: int) -> Optional[SyncReport]:
        if self._is_final(iteration):
            return self._final_sync(iteration)
        return self._scheduled_step(iteration)

    def _is_final(self, iteration: int) -> bool:
        return (self.cfg.final_sync and self.async_ctl is None and iteration == self.final_iteration
                and iteration > self.cfg.warmup_iters)

    def _final_sync(self, iteration: int) -> Optional[SyncReport]:
        """The last iteration: every worker ends on the same model (the anchor), so the final validation,
        the last checkpoint and a converted model are one agreed model, as after any DiLoCo sync.

        DiLoCo/EDiT: a sync at the last iteration if the schedule has none there (a shorter interval).
        Streaming: fragments are staggered, so some are always mid-interval. A fragment already launched
        (in flight, or merging now) is finished now and lands on its anchor (no mixing): the at most tau
        inner steps since its launch are not kept. Every other fragment syncs now, all in one sync, with
        no overlap and no mixing. So each fragment takes exactly one outer step at this iteration: a
        fragment is never synced twice, which would apply its outer momentum twice.
        Cost: at most one sync of the whole model, once per run (what DiLoCo's last sync costs)."""
        if not self.streaming:
            report = self._scheduled_step(iteration)
            return report if report is not None else self.sync(iteration)
        self._mix_alpha = 0.0
        try:
            self._sync_iteration_of_next_forward = None
            launched = [i for i, unit in enumerate(self.units) if unit.pending]
            for i in launched:
                self._finish_unit(i)
            rest = [i for i in range(len(self.units)) if i not in launched]
            report = self.sync(iteration, rest, immediately=True) if rest else None
            if launched and not rest:
                self._regather_params()
            return report
        finally:
            self._mix_alpha = self.cfg.streaming_mix_alpha

    def _scheduled_step(self, iteration: int) -> Optional[SyncReport]:
        cfg = self.cfg
        if is_anchor_iteration(iteration, cfg.warmup_iters):
            init_outer_state(self.shards, self.with_momentum, cfg.offload_outer_state)
            if self.async_ctl is not None:
                self.async_ctl.start(consumed_samples=iteration * self.async_ctl.global_batch_size)
            return None
        if iteration <= cfg.warmup_iters:
            return None
        if self.streaming:
            self._sync_iteration_of_next_forward = iteration + 1
            return self._streaming_step(iteration)
        if self.async_ctl is not None:
            if not self.async_ctl.after_inner_step():
                return None
            report = self.sync(iteration)
            self.async_ctl.restart_clock()
            return report
        if not is_sync_iteration(iteration, cfg.warmup_iters, cfg.sync_interval):
            return None
        return self.sync(iteration)

    def _streaming_step(self, iteration: int) -> Optional[SyncReport]:
        """Launch the fragments whose turn it is; merge those launched tau steps ago (same iteration when
        tau = 0); move in-flight two-phase collectives on at a point every rank agrees on."""
        cfg = self.cfg
        tau = cfg.streaming_overlap_steps
        merging = fragments_merging_at(iteration, cfg.warmup_iters, cfg.sync_interval, self.num_fragments, tau)
        for p in merging:
            if tau > 0:
                self._finish_unit(p)
        report = None
        starting = fragments_syncing_at(iteration, cfg.warmup_iters, cfg.sync_interval, self.num_fragments)
        if starting:
            report = self.sync(iteration, starting)
            for p in starting:
                # Phase 1 overlaps floor(tau/2) steps, phase 2 the other ceil(tau/2): phase 2 starts in the
                # forward of that step (_install_streaming_advance_hook), at the same point on every rank.
                self.units[p].advance_at = iteration + tau // 2 + 1
        if merging:
            self._regather_params()
        return report

    def _maybe_corrupt(self, iteration: int) -> None:
        """Fault injection: with probability PROB, worker W's gradients get N(0, SCALE^2) noise. The
        decision is the same on every rank; the noise is the same on the ranks of one TP/PP slice. Not
        in the synchronous warmup (the draw is still made, so later hits stay where they were): there the
        gradients are averaged over the workers, so a hit would reach every worker, which is a fault of
        synchronous training that no cross-worker test can see."""
        from megatron.core import parallel_state as ps

        worker, scale, prob = self.cfg.debug_corrupt_worker
        hit = torch.rand(1, generator=self._corrupt_gen).item() < prob
        if not hit or self.topo.worker_index != worker or is_warmup(iteration, self.cfg.warmup_iters):
            return
        gen = torch.Generator().manual_seed(
            self.seed * 131 + iteration * 17 + ps.get_tensor_model_parallel_rank() * 7
            + ps.get_pipeline_model_parallel_rank()
        )
        for chunk in self.model:
            for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                for bucket in buffer.buckets:
                    noise = torch.randn(bucket.grad_data.shape, generator=gen) * scale
                    bucket.grad_data.add_(noise.to(bucket.grad_data.device, bucket.grad_data.dtype))

    def _record_loss(self, module, args, output) -> None:
        """Forward hook of the last model chunk: GPTModel returns the per-token loss [b, s] when given
        labels (training); logits (3-D) and evaluation are ignored. No host synchronisation."""
        if module.training and torch.is_tensor(output) and output.dim() == 2 and output.is_floating_point():
            self._loss_acc[0] += output.detach().float().sum()
            self._loss_acc[1] += output.numel()

    def _sum_in_worker_gather_across(self, local: torch.Tensor) -> torch.Tensor:
        """[W, n] on every rank: ``local`` [n] summed over this worker's ranks (in place), then every
        worker's row gathered (``self._present``: whose rows are real; all in-job). Collective over the
        worker group and the transport."""
        dist.all_reduce(local, group=self.topo.worker_group)
        gathered, self._present = self.transport.gather_rows(local)
        return gathered

    def losses_since_sync(self) -> torch.Tensor:
        """[W, 2]: every worker's (sum, count) of training losses since the last sync, on every rank (a
        worker's TP ranks each count the same tokens, which the mean does not notice). Collective. An
        elastic worker saves on its own (outside a quorum): its row only, over its own ranks."""
        if self.transport.fault_tolerant:
            local = self._loss_acc.clone()
            dist.all_reduce(local, group=self.topo.worker_group)
            rows = torch.zeros(self.topo.num_workers, 2, dtype=local.dtype, device=local.device)
            rows[self.topo.worker_index] = local
            return rows
        return self._sum_in_worker_gather_across(self._loss_acc.clone())

    def restore_losses_since_sync(self, saved: torch.Tensor) -> None:
        """Inverse of losses_since_sync after a load: the worker's totals on its first rank."""
        self._loss_acc.zero_()
        if self.topo.worker_group is None or dist.get_rank(self.topo.worker_group) == 0:
            self._loss_acc.copy_(saved[self.topo.worker_index].to(self.device))

    # ------------------------------------------------------------------ the sync
    def sync(self, iteration: int, unit_indices: Optional[list[int]] = None,
             quorum_ready: bool = False, immediately: bool = False) -> SyncReport:
        """Start a sync of the given units (all by default). All-at-once and streaming with tau = 0
        finish here; layer-wise units finish in the next forward, streaming ones tau steps later (here
        too with ``immediately``: the final sync). Elastic workers: see _sync_fault_tolerant
        (``quorum_ready``: the joiner's quorum is taken)."""
        if self.transport.fault_tolerant:
            return self._sync_fault_tolerant(iteration, unit_indices, quorum_ready)
        start = time.perf_counter()
        self.flush_pending()
        if self._staging is not None:
            self._staging.settle()  # the anchors' host copies are read below
        self._sync_iteration = iteration
        indices = list(range(len(self.units))) if unit_indices is None else unit_indices
        members = {id(s) for i in indices for s in self.units[i].shards}
        # Global shard order, whatever the unit layout: the norms (and so the weights) must be bitwise
        # the same for layer-wise and all-at-once syncs.
        step_weights = self.async_ctl.exchange() if self.async_ctl is not None else None
        member_shards = [s for s in self.shards if id(s) in members]
        norms, anomalous = self._compute_weights(member_shards, step_weights if self.cfg.step_weighted else None)
        repaired, _ = self._repair_inner_state(member_shards, apply=True)
        self._key_norm_cache = {}
        sent = sum(self._predicted_unit_bytes(i) for i in indices) + self._norm_bytes()
        sent += self.transport.predicted_bytes(self._repair_numel, "fp32", self.cfg.outer_grad_block_size)
        self.bytes_sent_total += sent
        skip_host = self._skip.tolist()  # one host sync per sync (the anomaly names above made one already)
        for i in indices:
            self.units[i].pending = True
            self.units[i].skip = self._skip  # per unit: streaming fragments in flight outlive the next sync
            self.units[i].skip_host = skip_host
        if self.cfg.layerwise:
            self._prefetch_after(-1)  # the rest goes out a unit or two ahead, inside the next forward
        elif self.streaming and self.cfg.streaming_overlap_steps > 0 and not immediately:
            for i in indices:
                self._launch_unit(i)
        elif self.streaming:
            for i in indices:
                self._finish_unit(i)
            self._regather_params()
        else:
            for i in indices:
                self._sync_all_at_once(i)
            self._regather_params()
        total_norm = float(norms.pow(2).sum(dim=1).sqrt().mean())
        return SyncReport(
            iteration=iteration, workers=self.topo.num_workers, pseudo_grad_norm=total_norm,
            anomalous=anomalous, bytes_sent=sent, bytes_sent_total=self.bytes_sent_total,
            wire_format=self.cfg.outer_grad_dtype, sync_ms=(time.perf_counter() - start) * 1000.0,
            fragment=",".join(self.units[i].name for i in indices) if self.streaming else "all",
            inner_steps=self.async_ctl.last_steps_per_worker if self.async_ctl is not None else None,
            repaired=repaired,
        )

    def _sync_fault_tolerant(self, iteration: int, unit_indices: Optional[list[int]],
                             quorum_ready: bool) -> SyncReport:
        """An all-at-once sync over a torchft quorum (fault_tolerance.py): quorum, weights, reductions
        into separate buffers (theta untouched), then the commit vote; only a committed attempt applies
        its outer step. A failed one (a member died or left) restores the penalty statistics and the
        loss totals and is retried with a new quorum, so nothing of the lost member's attempt is kept."""
        start = time.perf_counter()
        indices = list(range(len(self.units))) if unit_indices is None else unit_indices
        self._sync_iteration = iteration
        saved_stats = self.stats.clone()
        saved_losses = self._loss_acc.clone()
        saved_probation = self.loss_probation.clone()
        attempts = 0
        while True:
            attempts += 1
            if not quorum_ready:
                self.transport.begin_sync()
            quorum_ready = False
            members = {id(s) for i in indices for s in self.units[i].shards}
            member_shards = [s for s in self.shards if id(s) in members]
            norms, anomalous = self._compute_weights(member_shards)
            repaired, repair_copies = self._repair_inner_state(member_shards, apply=False)
            if self.faults is not None:
                self.faults.in_sync(iteration)
            self._key_norm_cache = {}
            skip_host = self._skip.tolist()
            for i in indices:
                unit = self.units[i]
                unit.pending, unit.skip, unit.skip_host = True, self._skip, skip_host
                self._wait_unit(i)  # launch + wait: the reduced pseudo-gradient in unit.combined
            if self.transport.commit():
                break
            for i in indices:  # discard the attempt: theta, anchor and momentum were not touched
                unit = self.units[i]
                unit.combined, unit.launched, unit.advanced, unit.pending = None, False, False, False
            self.stats = saved_stats.clone()
            self._loss_acc.copy_(saved_losses)
            self.loss_probation.copy_(saved_probation)
            if attempts >= MAX_SYNC_ATTEMPTS:
                raise RuntimeError(f"sync at iteration {iteration} failed {attempts} times in a row "
                                   "(torchft should_commit); see the torchft log lines above")
        for destination, values in repair_copies:
            destination.copy_(values)
        for i in indices:
            self._apply_outer_step(i)
            unit = self.units[i]
            unit.combined, unit.launched, unit.advanced, unit.pending, unit.advance_at = None, False, False, False, None
        self._regather_params()
        self.transport.contributing = True
        sent = sum(self._predicted_unit_bytes(i) for i in indices) + self._norm_bytes()
        sent += self.transport.predicted_bytes(self._repair_numel, "fp32", self.cfg.outer_grad_block_size)
        self.bytes_sent_total += sent
        present = int(self._present.sum())
        return SyncReport(
            iteration=iteration, workers=present,
            pseudo_grad_norm=float(norms[self._present].pow(2).sum(dim=1).sqrt().mean()) if present else 0.0,
            anomalous=anomalous, bytes_sent=sent, bytes_sent_total=self.bytes_sent_total,
            wire_format=self.cfg.outer_grad_dtype, sync_ms=(time.perf_counter() - start) * 1000.0,
            fragment=",".join(self.units[i].name for i in indices) if self.streaming else "all",
            attempts=attempts, repaired=repaired,
        )

    def outer_state_for_recovery(self) -> dict:
        """Copies of what a joining worker needs from this rank (fault_tolerance.py)."""
        self.flush_pending()
        return {
            "anchor": [s.anchor.detach().clone() for s in self.shards],
            "momentum": [s.momentum.detach().clone() if s.momentum is not None else None for s in self.shards],
            "stats": self.stats.clone().state_dict(),
            "loss_probation": self.loss_probation.clone(),
        }

    def load_outer_state_for_recovery(self, state: dict) -> None:
        """A peer's anchor, momentum and penalty statistics; theta := anchor (the joiner's delta is 0)."""
        if len(state["anchor"]) != len(self.shards):
            raise ValueError(f"recovery state has {len(state['anchor'])} shards, this rank {len(self.shards)}")
        with torch.no_grad():
            for s, anchor, momentum in zip(self.shards, state["anchor"], state["momentum"]):
                if s.anchor is None:
                    init_outer_state([s], self.with_momentum, self.cfg.offload_outer_state)
                s.anchor.copy_(anchor)
                if s.momentum is not None and momentum is not None:
                    s.momentum.copy_(momentum)
                s.main.copy_(anchor)
        self.stats = PenaltyStats(**{k: v.to(self.device) for k, v in state["stats"].items()})
        if "loss_probation" in state:
            self.loss_probation.copy_(state["loss_probation"])
        self._loss_acc.zero_()
        for unit in self.units:
            write_back_model_params(unit, self.model, self.optimizer, self.num_layers)
        self._regather_params()

    def _chunked(self, index: int) -> bool:
        """All-at-once DiLoCo / EDiT (nothing in flight across steps): communicated in chunks of
        ``--local-sgd-sync-chunk-size`` elements, with the main shard as the pseudo-gradient's store.
        Not with elastic workers: theta must survive a sync attempt that does not commit."""
        return not self.cfg.layerwise and not self.streaming and not self.transport.fault_tolerant

    def _predicted_unit_bytes(self, index: int) -> int:
        numel = self.units[index].numel
        if not self._chunked(index):
            return self._predicted_bytes(numel)
        size = self.cfg.sync_chunk_size
        return sum(self._predicted_bytes(min(size, numel - lo)) for lo in range(0, numel, size))

    def _predicted_bytes(self, numel: int) -> int:
        return self.transport.predicted_bytes(numel, self.cfg.outer_grad_dtype, self.cfg.outer_grad_block_size,
                                              self.cfg.outer_grad_reduction)

    def _norm_bytes(self) -> int:
        """The all-gather of this worker's per-layer norms (and the loss and moment tests' sums) to the others."""
        riders = (2 if self.loss_test else 0) + (2 * self.L if self.moment_test else 0)
        return self.transport.peers() * (self.L + riders) * 4

    def _compute_weights(self, shards: list[OuterShard], step_weights: Optional[torch.Tensor] = None):
        """G [W, L] on every rank, then this worker's weight per layer (and the skip mask). The squared
        norms are taken chunk by chunk through one scratch buffer (``torch.dot``: no temporary of a
        shard's size), in the engine's global shard order."""
        W, L = self.topo.num_workers, self.L
        extra = 2 if self.loss_test else 0  # the loss test's (sum, count) ride along
        moments = L if self.moment_test else 0  # and the second-moment test's sum(v) and element count
        local = torch.zeros(L + extra + 2 * moments, dtype=torch.float32, device=self.device)
        if extra:
            local[L:L + extra] = self._loss_acc
            self._loss_acc.zero_()
        counted = [s for s in shards if s.count_in_worker_norm]
        if moments:
            second = mcore_adapter.inner_second_moments(self.optimizer, [s.main for s in counted])
            for s, v in zip(counted, second):
                if v is not None:  # one read of v per sync, no temporary
                    local[L + extra + s.key] += v.sum(dtype=torch.float32)
                    local[L + extra + L + s.key] += v.numel()
        size = min(self.cfg.sync_chunk_size, max((s.main.numel() for s in counted), default=0))
        scratch = torch.empty(size, dtype=torch.float32, device=self.device)
        for s in counted:
            anchor, main = s.anchor.view(-1), s.main.detach().view(-1)  # anchor: pinned host memory if offloaded
            for lo in range(0, main.numel(), max(size, 1)):
                hi = min(main.numel(), lo + size)
                delta = scratch[:hi - lo]
                delta.copy_(anchor[lo:hi], non_blocking=True)
                delta.sub_(main[lo:hi])
                local[s.key] += torch.dot(delta, delta)
        del scratch
        gathered = self._sum_in_worker_gather_across(local)
        norms = gathered[:, :L].sqrt()
        losses = rms = None
        if extra:
            count = gathered[:, L + 1]
            losses = torch.where(count > 0, gathered[:, L] / count.clamp_min(1), torch.full_like(count, math.nan))
        if moments:
            total, count = gathered[:, L + extra:L + extra + L], gathered[:, L + extra + L:]
            # A layer with no state yet (or no second moment) on some worker: nobody is compared there.
            rms = (total / count.clamp_min(1)).sqrt()
            rms[:, ~(count > 0).all(dim=0)] = math.nan
        anomalous_names: list[str] = []
        present = self._present
        if self.penalty_cfg is not None and not bool(present.all()):
            # Elastic workers: the penalty sees the members of this sync only (absent rows are zeros).
            rows = present.nonzero().flatten().tolist()
            sub_w, skip, sub_a, self.stats = penalty_weights(
                norms[rows], self.stats, self.penalty_cfg,
                step_weights[rows] if step_weights is not None else None,
                losses[rows] if losses is not None else None, rms[rows] if rms is not None else None,
                self.loss_probation[rows])
            weights = torch.zeros(W, self.L, dtype=sub_w.dtype, device=sub_w.device)
            anomalous = torch.zeros(W, self.L, dtype=torch.bool, device=sub_a.device)
            weights[rows], anomalous[rows] = sub_w, sub_a
            by_loss = [False] * W
            if extra:
                for r, flagged in zip(rows, loss_outliers(losses[rows], self.penalty_cfg.loss_ratio,
                                                          self.loss_probation[rows]).tolist()):
                    by_loss[r] = flagged
        elif self.penalty_cfg is not None:
            weights, skip, anomalous, self.stats = penalty_weights(norms, self.stats, self.penalty_cfg, step_weights,
                                                                   losses, rms, self.loss_probation)
            by_loss = (loss_outliers(losses, self.penalty_cfg.loss_ratio, self.loss_probation).tolist() if extra
                       else [False] * W)
        if self.penalty_cfg is not None:
            self.loss_probation.copy_(torch.tensor(by_loss, dtype=torch.bool))
            for w in range(W):
                layers = anomalous[w].nonzero().flatten().tolist()
                if layers and by_loss[w]:  # excluded in every layer for its loss
                    median = float(median_of_finite(losses)[0])
                    anomalous_names.append(f"w{w}[loss {float(losses[w]):.3f} vs median {median:.3f}]")
                elif layers:
                    anomalous_names.append(f"w{w}[{' '.join(layer_key_name(k, self.num_layers) for k in layers)}]")
        else:
            # No penalty: the plain mean over workers, except that a worker whose delta is NaN/Inf in a
            # layer is left out of that layer's mean (the wire would zero its values and silently shrink
            # the step by 1/W); a layer with no finite worker skips its outer step.
            finite = torch.isfinite(norms) & present.to(norms.device).view(-1, 1)
            count = finite.sum(dim=0)
            weights = finite.float() / count.clamp(min=1).float()
            skip = count == 0
            for w in present.nonzero().flatten().tolist():
                layers = (~finite[w]).nonzero().flatten().tolist()
                if layers:
                    anomalous_names.append(f"w{w}[nonfinite: {' '.join(layer_key_name(k, self.num_layers) for k in layers)}]")
        self._weights = weights[self.topo.worker_index]
        self._skip = skip
        self._anomalous = anomalous if self.penalty_cfg is not None else None
        self._last_norms = norms
        return norms, anomalous_names

    def _repair_inner_state(self, shards: list[OuterShard], apply: bool):
        """inner_state_repair.py: a worker just flagged in any layer takes the healthy workers' mean
        inner moments (the same decision on every rank: the anomaly matrix is everyone's). Returns (log
        names, copies still to make when ``apply`` is False)."""
        self._repair_numel = 0
        if not self._repair_enabled or self._anomalous is None:
            return [], []
        anomalous = self._anomalous.cpu()  # the anomaly names made this host sync already
        donor_weight, repaired = repair_plan(anomalous, self._present)
        if not bool(repaired.any()):
            return [], []
        moments = [m for ms in mcore_adapter.inner_moments(self.optimizer, [s.main for s in shards]) for m in ms]
        self._repair_numel = sum(m.numel() for m in moments)
        w = self.topo.worker_index
        copies = repair_inner_state(moments, float(donor_weight[w]), bool(repaired[w]), self._sum_fp32_across,
                                    self.cfg.sync_chunk_size, apply=apply)
        return [f"w{i}" for i in repaired.nonzero().flatten().tolist()], copies

    def _sum_fp32_across(self, buffer: torch.Tensor) -> torch.Tensor:
        handle = self.transport.launch_sum(buffer, "fp32", self.cfg.outer_grad_block_size)
        self.bytes_sent_measured += handle.bytes_sent
        return handle.wait()

    # ---- outer state where the update runs (offload: pinned host memory, staged a unit ahead)
    def _stage(self, index: int) -> None:
        if self._staging is not None and 0 <= index < len(self.units):
            self._staging.stage(self.units[index])

    def _outer_state(self, unit: _Unit, position: int, shard: OuterShard):
        """(anchor, momentum) of a unit's shard on the device."""
        if self._staging is None:
            return shard.anchor, shard.momentum
        return self._staging.tensors(unit, position)

    # ---- launching, advancing and waiting for a unit's cross-worker reduction
    def _fill_contribution(self, unit: _Unit, buffer: torch.Tensor, lo: int) -> None:
        """buffer := weight_w * (anchor - theta_w) over the unit's flat elements [lo, lo + len(buffer)):
        written in place, no temporary. NaN/Inf entries become 0 in the launch (a worker with a
        non-finite delta has weight 0 and is named in the sync line)."""
        hi, position = lo + buffer.numel(), 0
        for j, s in enumerate(unit.shards):
            n = s.main.numel()
            a, b = max(lo, position), min(hi, position + n)
            if a < b:
                anchor, _ = self._outer_state(unit, j, s)
                out = buffer[a - lo:b - lo]
                torch.sub(anchor.reshape(-1)[a - position:b - position],
                          s.main.detach().reshape(-1)[a - position:b - position], out=out)
                out.mul_(self._weights[s.key])
            position += n

    def _launch(self, index: int, buffer: torch.Tensor, lo: int):
        unit = self.units[index]
        feedback = None
        if unit.error_feedback is not None:
            feedback = ErrorFeedbackSection(unit.error_feedback, lo, unit.numel)
        # Weights are applied before the wire (_fill_contribution), so the reduction is a sum.
        handle = self.transport.launch_sum(
            buffer, self.cfg.outer_grad_dtype, self.cfg.outer_grad_block_size, error_feedback=feedback,
            stochastic=self.cfg.outer_grad_stochastic_rounding, generator=self._rounding_generator(index),
            algorithm=self.cfg.outer_grad_reduction,
        )
        self.bytes_sent_measured += handle.bytes_sent
        return handle

    def _launch_unit(self, index: int) -> None:
        unit = self.units[index]
        if unit.launched or not unit.pending:  # finished units of this sync never go out again
            return
        self._stage(index)
        unit.launched = True
        buffer = torch.empty(unit.numel, dtype=torch.float32, device=self.device)  # the unit's one buffer
        self._fill_contribution(unit, buffer, 0)
        unit.handle = self._launch(index, buffer, 0)

    def _timed(self, fn):
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.exposed_comm_seconds += time.perf_counter() - start

    def _collect_waits(self, handle) -> None:
        self.waited_network_seconds += getattr(handle, "waited_seconds", 0.0)
        handle.waited_seconds = 0.0

    def _advance_unit(self, index: int) -> None:
        unit = self.units[index]
        if unit.launched and not unit.advanced and unit.handle is not None:
            self._timed(unit.handle.advance)
            self._collect_waits(unit.handle)
            unit.advanced = True

    def _rounding_generator(self, index: int) -> Optional[torch.Generator]:
        """Stochastic rounding's random stream, seeded from (seed, sync iteration, unit, rank): every
        sync draws fresh numbers, and a resumed run draws the same ones without saving generator state."""
        if not self.cfg.outer_grad_stochastic_rounding:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1000003 + self._sync_iteration * 8191 + index * 131
                               + dist.get_rank()) % (2 ** 63))
        return generator

    def _wait_unit(self, index: int) -> None:
        self._launch_unit(index)
        unit = self.units[index]
        if unit.handle is not None:
            unit.combined = self._timed(unit.handle.wait)
            self._collect_waits(unit.handle)
            unit.handle = None

    def _prefetch_after(self, index: int) -> None:
        """Layer-wise: two units ahead of the one being finished (in forward order, the order every rank
        of the cross-worker group finishes them in): the next one moves to its second phase (a quantized
        wire's requantize + all-gather), the one after is launched, and, with offload, the one after
        that is staged. So a unit's second phase is in flight while the previous unit is consumed."""
        ahead = [j for j in range(index + 1, len(self.units)) if self.units[j].pending][:3]
        if ahead:
            self._launch_unit(ahead[0])
            self._advance_unit(ahead[0])
        if len(ahead) > 1:
            self._launch_unit(ahead[1])
        if len(ahead) > 2:
            self._stage(ahead[2])

    def _units_with_key(self, key: int) -> list[int]:
        return [i for i, u in enumerate(self.units) if key in u.keys]

    def _pseudo_grad(self, unit: _Unit, offset: int, shard: OuterShard) -> torch.Tensor:
        """A shard's reduced pseudo-gradient: a slice of the unit's buffer, or (chunked all-at-once
        syncs) the main shard itself, which holds it until the outer step."""
        if unit.combined is None:
            return shard.main.detach().reshape(-1)
        return unit.combined[offset:offset + shard.main.numel()]

    def _clip_scales(self, index: int) -> dict[int, torch.Tensor]:
        """Per-layer clip coefficient from the norm of the combined delta, reduced over the worker's ranks
        of this stage. A layer split over several bucket groups waits for all of them. The squares are
        added in the engine's global shard order whatever the units are, so layer-wise and all-at-once
        syncs clip by bitwise the same coefficient."""
        if not self._clip_enabled:
            return {}
        unit = self.units[index]
        missing = sorted(k for k in unit.keys if k not in self._key_norm_cache)
        if missing:
            location = {}  # id(shard) -> (unit, offset of the shard in the unit's combined delta)
            for j in sorted({j for key in missing for j in self._units_with_key(key)}):
                if not self._chunked(j):
                    self._wait_unit(j)
                offset = 0
                for s in self.units[j].shards:
                    location[id(s)] = (j, offset)
                    offset += s.main.numel()
            sumsq = torch.zeros(self.L, dtype=torch.float32, device=self.device)
            wanted = set(missing)
            for s in self.shards:
                if s.key in wanted and s.count_in_stage_norm and id(s) in location:
                    j, offset = location[id(s)]
                    g = self._pseudo_grad(self.units[j], offset, s)
                    sumsq[s.key] += torch.dot(g, g)
            dist.all_reduce(sumsq, group=self.topo.worker_stage_group)
            coefficient = clip_coefficient(sumsq.sqrt(), self.penalty_cfg.clip)
            for key in missing:
                self._key_norm_cache[key] = coefficient[key]
        return {k: self._key_norm_cache[k] for k in unit.keys}

    def _apply_outer_step(self, index: int) -> None:
        """Outer step for one unit's shards, in place (the pseudo-gradient's storage is scratch); then
        theta_w = anchor (streaming: the alpha-merge); model params follow (fp8.write_back_model_params)."""
        unit = self.units[index]
        scales = self._clip_scales(index)
        cfg = self.cfg
        skip = unit.skip_host if unit.skip_host is not None else unit.skip.tolist()
        offset = 0
        for j, s in enumerate(unit.shards):
            pseudo_grad = self._pseudo_grad(unit, offset, s).view_as(s.main)
            offset += s.main.numel()
            anchor, momentum = self._outer_state(unit, j, s)
            if not skip[s.key]:  # an all-anomalous layer keeps its anchor and momentum exactly
                if s.key in scales:
                    pseudo_grad.mul_(scales[s.key])
                outer_step(anchor, momentum, pseudo_grad, cfg.outer_optimizer, cfg.outer_lr, cfg.outer_momentum,
                           pseudo_grad_is_scratch=True)
            with torch.no_grad():
                if self.streaming:
                    # theta = anchor' + alpha * (theta - anchor'): alpha = 0 gives the anchor exactly
                    s.main.sub_(anchor).mul_(self._mix_alpha).add_(anchor)
                else:
                    s.main.copy_(anchor)
        if self._staging is not None:
            self._staging.unstage(unit)
        # Model params from the fp32 main shards: copy, or requantize FP8 params per bucket (fp8.py).
        write_back_model_params(unit, self.model, self.optimizer, self.num_layers)

    def _finish_unit(self, index: int) -> None:
        """Wait for a unit's reduction, then its outer step; layer-wise: keep the next units moving."""
        unit = self.units[index]
        self._wait_unit(index)
        if self.cfg.layerwise:
            self._prefetch_after(index)
        self._apply_outer_step(index)
        unit.combined = None
        unit.launched = False
        unit.advanced = False
        unit.pending = False
        unit.advance_at = None

    def _sync_all_at_once(self, index: int) -> None:
        """A whole unit (a stage's shards) at the optimizer step, in chunks of --local-sgd-sync-chunk-size
        elements through one buffer: each chunk's reduced pseudo-gradient replaces theta in the main shard
        (theta is not needed after its delta was taken, and becomes the new anchor anyway), then the clip
        norms and the outer step read it from there. Extra memory: one chunk (plus the wire bytes),
        whatever the size of the stage."""
        unit = self.units[index]
        self._stage(index)
        size = min(self.cfg.sync_chunk_size, unit.numel)
        buffer = torch.empty(size, dtype=torch.float32, device=self.device)
        for lo in range(0, unit.numel, size):
            piece = buffer[:min(size, unit.numel - lo)]
            self._fill_contribution(unit, piece, lo)
            handle = self._launch(index, piece, lo)
            reduced = self._timed(handle.wait)
            self._collect_waits(handle)
            self._store_in_main(unit, reduced, lo)
        del buffer
        unit.combined = None
        self._apply_outer_step(index)
        unit.pending = False

    @staticmethod
    def _store_in_main(unit: _Unit, values: torch.Tensor, lo: int) -> None:
        hi, position = lo + values.numel(), 0
        with torch.no_grad():
            for s in unit.shards:
                n = s.main.numel()
                a, b = max(lo, position), min(hi, position + n)
                if a < b:
                    s.main.view(-1)[a - position:b - position].copy_(values[a - lo:b - lo])
                position += n

    def _regather_params(self) -> None:
        """All-at-once with the distributed optimizer: each rank updated its shard, so the worker's
        params must be all-gathered again. With overlap_param_gather the next forward does it."""
        if self.distributed_optimizer and not self.overlap_param_gather:
            for chunk in self.model:
                chunk.start_param_sync()

    def flush_pending(self) -> None:
        """Apply every deferred layer-wise update now (before eval, checkpoint, or the next sync).
        Streaming fragments in flight are not deferred updates: they merge at their own iteration."""
        if self.cfg.layerwise:
            for index, unit in enumerate(self.units):
                if unit.pending:
                    self._finish_unit(index)
        if self._staging is not None:
            self._staging.settle(host=True)  # eval, checkpoints and the next sync read the host copies

    def complete_in_flight(self) -> None:
        """Wait for the collectives of streaming fragments in flight (before a checkpoint): their
        reduced pseudo-gradients are then saved; the outer step and merge still happen at their own
        iteration, so the run continues exactly as without the save."""
        for index, unit in enumerate(self.units):
            if unit.launched and unit.handle is not None:
                self._wait_unit(index)
        if self._staging is not None:
            self._staging.settle(host=True)  # the checkpoint reads the outer state's host copies

    def outer_state_bytes(self) -> int:
        return outer_state_bytes(self.shards)

