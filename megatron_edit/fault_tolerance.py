"""Elastic workers on torchft (``--local-sgd-fault-tolerance``, SPEC section 10).

Each worker is its own job (its own torchrun of TP x PP x S ranks; megatron-core's groups live inside it).
Every rank of it holds a torchft ``Manager`` whose reconfigurable process group links the ranks of the
same position in the other workers: torchft's "replica group" is our worker, its group rank our rank in
the worker. The lighthouse forms a quorum at every sync of whoever is alive; the engine reduces over that
quorum through ``TorchftTransport`` and applies the outer step only if ``should_commit`` says every rank of
every member got through. A failed attempt leaves theta, the anchor, the momentum and the penalty
statistics as they were and is retried with a new quorum (without the dead worker), so the sync completes
with the workers present and their weights renormalised over them.

Joining. A worker starts with a quorum (startup, before its first step). If it is behind (torchft's
committed step is lower than the quorum's highest), torchft heals it from a live peer before the quorum
returns: ``_load`` gets the peer's anchor, outer momentum, penalty statistics, iteration, consumed samples,
LR schedule and inner optimizer state, and sets theta = anchor. The peer is then inside a sync, so the
joiner takes part in that same sync as a member that only receives (its pseudo-gradient is zero and its row
says absent): after the commit every member sets theta = the new anchor, bitwise the same.

Inner optimizer state: the joiner takes the peer's Adam moments and step. A fresh Adam at the peak LR moves
every coordinate by about lr on its first steps (m / sqrt(v) = +-1 after bias correction), far more than a
trained optimizer does, and its first interval would be an outlier the penalty throws away; the peer's
moments describe the same loss surface at the same anchor. Cost: two more fp32 copies of the worker's
shard in the recovery transfer, once per rejoin.

Identity. After every quorum the members exchange (worker index, flag fingerprint, start time) in one
all-reduce. A worker whose fingerprint (model shape, parallel layout, method, H, outer optimizer, wire)
differs from that of the longest-running member, or that claims an index a longer-running member holds,
exits with one line; the others' attempt fails on its departure and is retried without it, so nothing of
it reaches their state.

Cost at scale: one quorum RPC to the lighthouse per sync (milliseconds against an interval of minutes),
two small all-reduces (identity: 4 floats per member; norms: L + 3 floats per member, as a SUM of rows),
the pseudo-gradient all-reduce in fp32 (torchft makes no other collective fault tolerant), and one extra
fp32 buffer of the worker's shard per rank (the reduced pseudo-gradient must not overwrite theta before the
commit). A recovery moves anchor, momentum and Adam state (4 x the shard) from one peer rank per rank.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_edit import mcore_adapter
from megatron_edit.inter_worker_transport import TorchftTransport


class ElasticError(RuntimeError):
    """A worker that must not join (bad flags, a taken index, no lighthouse): one line, exit code 2."""


# Flags that must agree across workers (the fingerprint); the others (paths, intervals of logging,
# --replica-group-id itself, debug faults) may differ.
_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "seq_length", "vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "num_layers_per_virtual_pipeline_stage", "global_batch_size", "micro_batch_size",
                "use_distributed_optimizer", "train_iters", "seed", "bf16")
_ENGINE_FIELDS = ("method", "workers", "sync_interval", "outer_optimizer", "outer_lr", "outer_momentum",
                  "outer_grad_dtype", "layerwise", "streaming_fragments", "streaming_pattern",
                  "streaming_overlap_steps", "streaming_mix_alpha", "pseudo_grad_clip", "anomaly_threshold",
                  "weighting", "peer_ratio", "loss_ratio", "moment_ratio", "repair_inner_state",
                  "final_sync")


def flag_fingerprint(args, cfg) -> tuple[str, int, int]:
    """(readable text, two 48-bit halves of its SHA-256): exact in float64 through an all-reduce."""
    parts = [f"{k}={getattr(args, k, None)}" for k in _SHAPE_FLAGS]
    parts += [f"{k}={getattr(cfg, k, None)}" for k in _ENGINE_FIELDS]
    parts.append(f"world={dist.get_world_size()}")
    text = " ".join(parts)
    digest = hashlib.sha256(text.encode()).digest()
    return text, int.from_bytes(digest[:6], "big"), int.from_bytes(digest[6:12], "big")


def describe_difference(mine: str, theirs: str) -> str:
    a = dict(p.split("=", 1) for p in mine.split(" "))
    b = dict(p.split("=", 1) for p in theirs.split(" "))
    diff = [f"{k} {a.get(k)} (running workers: {b.get(k)})" for k in a if a.get(k) != b.get(k)]
    return ", ".join(diff) or "same flags, different fingerprint"


class ElasticWorker:
    """This rank's torchft Manager, the recovery state it serves and loads, and the identity check."""

    def __init__(self, args, cfg, trainer):
        try:
            from torchft import Manager
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL
        except ImportError as e:
            raise ElasticError(f"--local-sgd-fault-tolerance needs torchft (pip install torchft==0.2.0): {e}")
        self.args, self.cfg, self.trainer = args, cfg, trainer
        self.worker_index = cfg.replica_group_id
        self.fingerprint_text, *self.fingerprint = flag_fingerprint(args, cfg)
        self.start_time = self._agreed_start_time()
        timeout = timedelta(seconds=cfg.torchft_timeout)
        use_nccl = torch.cuda.is_available() and not getattr(args, "force_cpu", False)
        pg = ProcessGroupNCCL(timeout=timeout) if use_nccl else ProcessGroupGloo(timeout=timeout)
        self._check_lighthouse(cfg.torchft_lighthouse, cfg.torchft_timeout)
        self.manager = Manager(
            pg=pg, load_state_dict=None, state_dict=None, min_replica_size=cfg.torchft_min_replicas,
            use_async_quorum=False, timeout=timeout, quorum_timeout=timedelta(seconds=cfg.torchft_quorum_timeout),
            connect_timeout=timeout, rank=dist.get_rank(), world_size=dist.get_world_size(),
            lighthouse_addr=cfg.torchft_lighthouse, replica_id=f"megatron_edit_worker_{self.worker_index}",
            hostname=os.environ.get("TORCHFT_MANAGER_HOSTNAME", socket.gethostname()), init_sync=False,
        )
        self.manager.register_state_dict_fn("megatron_edit", self._load, self._save)
        self.transport = TorchftTransport(self.manager, cfg.workers, self.worker_index)
        self.transport.after_quorum = self.check_members
        self.healed_at: Optional[int] = None  # the iteration this worker took from a peer
        self.peer_phase: Optional[str] = None
        self.phase = "sync"  # "startup" inside join(): what a peer healing from this rank must do next
        self.members: list[int] = []
        self.oldest_start = self.start_time
        self.deadline_passed = False
        self.left: list[int] = []  # workers of the last quorum that are not in this one
        self.joined: list[int] = []

    @staticmethod
    def _agreed_start_time() -> float:
        """Rank 0's clock, so every rank of the worker reports the same start time."""
        t = torch.tensor([time.time()], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t[0])

    @staticmethod
    def _check_lighthouse(address: str, timeout: float) -> None:
        """One clear line instead of torchft's retry loop when nothing listens at the address."""
        from urllib.parse import urlparse

        url = urlparse(address if "://" in address else f"http://{address}")
        try:
            with socket.create_connection((url.hostname, url.port or 29510), timeout=min(timeout, 10.0)):
                pass
        except (OSError, ValueError) as e:
            raise ElasticError(f"cannot reach the torchft lighthouse at {address} ({e}); start it first "
                               "(README: Elastic workers) or fix --torchft-lighthouse")

    # ------------------------------------------------------------------ joining
    def join(self) -> None:
        """The startup quorum. Healed: take part in the peers' current sync as a receiving member.
        Otherwise (a fresh run, everybody at torchft step 0): wait for all W workers, at most
        --torchft-quorum-timeout after the first of them started (then go with whoever is there), and
        commit the startup step. The members decide from the quorum's shared table (everyone present, or
        anyone's clock past the deadline), so they decide alike: a member that went on alone would wait
        in its first sync for one still waiting here."""
        self.phase = "startup"
        try:
            self._join()
        finally:
            self.phase = "sync"

    def _join(self) -> None:
        while True:
            self.transport.begin_sync()
            if self.healed_at is not None and self.peer_phase == "sync":
                self.phase = "sync"
                self.trainer.local_sgd.sync(self.healed_at, quorum_ready=True)
                self.trainer.after_heal()
                return
            if self.healed_at is not None:
                self.trainer.after_heal(in_sync=False)
                self.healed_at = None
            if len(self.members) < self.cfg.workers and not self.deadline_passed:
                time.sleep(0.5)  # the lighthouse forms the next quorum once the others heartbeat and join
                continue
            if self.transport.commit():
                return

    def check_members(self) -> None:
        """After each quorum: who is in it; refuse this worker if its identity clashes (module doc)."""
        manager = self.manager
        slot, members = manager.participating_rank(), manager.num_participants()
        late = time.time() - self.oldest_start >= self.cfg.torchft_quorum_timeout  # the startup vote (join)
        row = torch.tensor([float(self.worker_index), float(self.fingerprint[0]), float(self.fingerprint[1]),
                            self.start_time, float(late)], dtype=torch.float64)
        rows = self.transport.gather_slots(row, slot if slot is not None else 0, max(members, 1))
        if manager.errored() is not None:
            return  # the attempt fails at its commit anyway
        table = [(int(r[0]), (int(r[1]), int(r[2])), float(r[3])) for r in rows.tolist()]
        oldest = min(range(len(table)), key=lambda i: (table[i][2], table[i][0]))
        self.oldest_start = table[oldest][2]
        self.deadline_passed = bool(rows[:, 4].max() > 0)
        if table[oldest][1] != tuple(self.fingerprint) and (self.start_time, self.worker_index) != (
                table[oldest][2], table[oldest][0]):
            raise ElasticError(
                f"worker {self.worker_index} was started with flags that differ from the running workers' "
                f"(fingerprint {self.fingerprint[0]:x} vs {table[oldest][1][0]:x}); it leaves without joining")
        same = [t for t in table if t[0] == self.worker_index and t[2] < self.start_time]
        if same:
            raise ElasticError(
                f"worker index {self.worker_index} (--replica-group-id) is held by a worker running since "
                f"{time.strftime('%H:%M:%S', time.localtime(same[0][2]))}; give each worker its own index")
        present = sorted({t[0] for t in table})
        if self.members and present != self.members:
            self.left = [w for w in self.members if w not in present]
            self.joined = [w for w in present if w not in self.members]
        else:
            self.left, self.joined = [], []
        self.members = present

    # ------------------------------------------------------------------ recovery state (torchft callbacks)
    def _save(self) -> dict:
        """What a joiner takes from this rank: copies (the transfer may outlive this sync)."""
        trainer, engine = self.trainer, self.trainer.local_sgd
        return {
            "fingerprint": self.fingerprint_text,
            "phase": self.phase,  # the joiner follows the same protocol: startup or sync
            "iteration": trainer.iteration,
            "consumed_samples": trainer.consumed_samples,
            "scheduler": trainer.scheduler.state_dict(),
            "outer": engine.outer_state_for_recovery(),
            "inner_optimizer": mcore_adapter.inner_optimizer_state(trainer.optimizer),
        }

    def _load(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint_text:
            raise ElasticError(
                f"worker {self.worker_index} was started with flags that differ from the running workers': "
                f"{describe_difference(self.fingerprint_text, state['fingerprint'])}; it leaves without joining")
        trainer = self.trainer
        trainer.iteration = int(state["iteration"])
        trainer.consumed_samples = int(state["consumed_samples"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        mcore_adapter.load_inner_optimizer_state(trainer.optimizer, state["inner_optimizer"])
        trainer.local_sgd.load_outer_state_for_recovery(state["outer"])
        trainer.restart_data(trainer.iteration)
        self.peer_phase = state["phase"]
        # Inside the peers' sync it only receives (theta = anchor, delta = 0); at a startup (a whole-run
        # restart from checkpoints of different ages) it trains from the anchor like any member.
        self.transport.contributing = self.peer_phase != "sync"
        self.healed_at = trainer.iteration
        # Its saves continue at the peers' next --save-interval boundary, not at once (a save now would
        # make it miss the peers' next sync).
        trainer.last_saved_iteration = trainer.iteration
        if self.phase == "sync":  # it fell behind (missed a sync) and healed inside a later one
            trainer.after_heal(in_sync=True)

    def state_dict(self) -> dict:
        """torchft's committed step, for checkpoints (torchft #277: a restart must resume it)."""
        return self.manager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.manager.load_state_dict(state)

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
