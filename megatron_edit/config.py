"""``LocalSGDConfig``: every local-SGD setting, validated once (SPEC sections 2 and 3).

Each field maps one to one onto a ``--flag`` (``FLAG_OF`` names it, so every error names the flag the user
typed). Fields whose default depends on the method are ``None`` until ``__post_init__`` resolves them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_edit.fault_injection import FaultSpec

METHODS = ("diloco", "edit", "a-edit", "streaming")
PENALTY_METHODS = ("edit", "a-edit")
OUTER_OPTIMIZERS = ("nesterov", "sgd", "average")
WEIGHTINGS = ("uniform", "norm")
DEFAULT_PEER_RATIO = 4.0  # edit/a-edit: chosen from tools/bench_convergence.py (README "Choosing H ...")
DEFAULT_LOSS_RATIO = 1.1  # edit/a-edit: healthy workers' interval losses agree to ~2% (loss_outliers)
DEFAULT_MOMENT_RATIO = 4.0  # edit/a-edit: a gradient burst raises Adam's second-moment RMS ~30x (frozen_outliers)
STREAMING_PATTERNS = ("strided", "sequential")
OUTER_GRAD_DTYPES = ("fp32", "bf16", "fp8-e4m3", "fp8-e5m2", "fp4-e3m0", "fp4-e2m1", "int8", "int4")
# quantized_collectives.ALGORITHMS (kept literal here: config imports no torch)
OUTER_GRAD_REDUCTIONS = ("reduce-scatter", "all-gather")


class ConfigError(ValueError):
    """A bad flag value or combination; the message is one line that names the flag and the rule."""


def flag(name: str) -> str:
    return "--" + FLAG_OF.get(name, name.replace("_", "-"))


@dataclass
class LocalSGDConfig:
    method: str = "diloco"
    workers: Optional[int] = None  # None: one worker per data-parallel rank
    sync_interval: int = 128  # H (tau in EDiT), inner iterations between syncs (per fragment: streaming)
    sync_time: float = 600.0  # tau_time, a-edit only
    warmup_iters: int = 0  # K synchronous iterations before local SGD
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.8  # EDiT paper default (DiLoCo used 0.7, Streaming DiLoCo 0.4)
    outer_momentum: float = 0.85
    pseudo_grad_clip: Optional[float] = None  # phi; 10 for edit/a-edit
    anomaly_threshold: Optional[float] = None  # delta (z-score); 3 for edit/a-edit; 0 disables
    ewma_alpha: float = 0.02
    ewma_warmup: int = 3
    weighting: str = "uniform"  # "norm": the EDiT paper's softmax(-G/T) (see pseudo_grad_penalty.py: why not default)
    peer_ratio: Optional[float] = None  # R of the two-sided cross-worker test (peer_outliers): 4 for edit/a-edit
    loss_ratio: Optional[float] = None  # Q of the cross-worker loss test (loss_outliers): 1.1 for edit/a-edit
    moment_ratio: Optional[float] = None  # M of the inner second-moment test (frozen_outliers): 4 for edit/a-edit
    repair_inner_state: Optional[bool] = None  # inner_state_repair.py: on for edit/a-edit
    step_weighted: bool = False  # a-edit: weight pseudo-gradients by inner steps since the last sync
    layerwise: Optional[bool] = None  # on for edit/a-edit
    offload_outer_state: bool = False
    streaming_fragments: Optional[int] = None
    streaming_pattern: str = "strided"
    streaming_overlap_steps: int = 1
    streaming_mix_alpha: float = 0.5
    outer_grad_dtype: Optional[str] = None  # fp32 (streaming: fp4-e3m0)
    outer_grad_block_size: int = 128
    outer_grad_error_feedback: bool = False
    outer_grad_stochastic_rounding: bool = False
    # quantized wire: reduce-scatter (2 quantizations, ~2x one vector sent) or all-gather (1, (W-1)x)
    outer_grad_reduction: str = "reduce-scatter"
    sync_chunk_size: int = 1 << 26  # elements per collective of an all-at-once sync (bounds its buffer)
    final_sync: bool = True  # the run's last iteration syncs every unit, so all workers end on the anchor
    sync_check_interval: Optional[int] = None  # a-edit: steps between "time elapsed?" votes; None: derived
    debug_slow_worker: Optional[tuple[int, float]] = None
    debug_corrupt_worker: Optional[tuple[int, float, float]] = None
    debug_fault: Optional[FaultSpec] = None  # fault_injection.py: W:KIND:START[:LENGTH]
    # Elastic workers on torchft (fault_tolerance.py): each worker is its own job.
    fault_tolerance: bool = False
    torchft_lighthouse: Optional[str] = None  # default: $TORCHFT_LIGHTHOUSE
    replica_group_id: Optional[int] = None  # this worker's index; default: $REPLICA_GROUP_ID
    torchft_min_replicas: int = 1
    torchft_timeout: float = 60.0  # seconds: a collective, a commit vote, a recovery transfer
    torchft_quorum_timeout: float = 1800.0  # seconds: waiting for the others' next sync (longer than H steps)
    explicit: frozenset = field(default_factory=frozenset, repr=False)  # fields the user set on the CLI

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _check_choice("streaming_pattern", self.streaming_pattern, STREAMING_PATTERNS)
        has_penalty = self.method in PENALTY_METHODS
        for name in ("pseudo_grad_clip", "anomaly_threshold", "weighting", "peer_ratio", "loss_ratio", "moment_ratio",
                     "repair_inner_state"):
            if name in self.explicit and not has_penalty:
                typed = "--no-" + FLAG_OF[name] if getattr(self, name) is False else flag(name)
                raise ConfigError(
                    f"{typed} needs a method with a pseudo-gradient penalty "
                    f"(--local-sgd edit or a-edit), not --local-sgd {self.method}"
                )
        for name in ("torchft_lighthouse", "replica_group_id", "torchft_min_replicas", "torchft_timeout",
                     "torchft_quorum_timeout"):
            if name in self.explicit and not self.fault_tolerance:
                raise ConfigError(f"{flag(name)} needs {flag('fault_tolerance')}")
        if self.pseudo_grad_clip is None and has_penalty:
            self.pseudo_grad_clip = 10.0
        if self.anomaly_threshold is None:
            self.anomaly_threshold = 3.0 if has_penalty else 0.0
        if self.peer_ratio is None:
            self.peer_ratio = DEFAULT_PEER_RATIO if has_penalty else 0.0
        if self.loss_ratio is None:
            self.loss_ratio = DEFAULT_LOSS_RATIO if has_penalty else 0.0
        if self.moment_ratio is None:
            self.moment_ratio = DEFAULT_MOMENT_RATIO if has_penalty else 0.0
        if self.repair_inner_state is None:
            self.repair_inner_state = has_penalty
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        if self.fault_tolerance:
            self._check_fault_tolerance()
        if self.layerwise is None:
            self.layerwise = has_penalty and not self.fault_tolerance
        if self.outer_grad_dtype is None:
            self.outer_grad_dtype = "fp4-e3m0" if self.method == "streaming" and not self.fault_tolerance else "fp32"
        if self.fault_tolerance and "streaming_overlap_steps" not in self.explicit:
            self.streaming_overlap_steps = 0
        _check_choice("outer_grad_dtype", self.outer_grad_dtype, OUTER_GRAD_DTYPES)
        _check_choice("outer_grad_reduction", self.outer_grad_reduction, OUTER_GRAD_REDUCTIONS)

        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"{flag('workers')} {self.workers} must be >= 1")
        if self.sync_interval < 1:
            raise ConfigError(f"{flag('sync_interval')} {self.sync_interval} must be >= 1")
        if not self.sync_time > 0:
            raise ConfigError(f"{flag('sync_time')} {self.sync_time} must be > 0 seconds")
        if "sync_time" in self.explicit and self.method != "a-edit":
            raise ConfigError(f"{flag('sync_time')} applies to --local-sgd a-edit only")
        if "final_sync" in self.explicit and self.method == "a-edit":
            raise ConfigError(f"{flag('final_sync') if self.final_sync else '--no-' + FLAG_OF['final_sync']} "
                              "does not apply to --local-sgd a-edit: its run always ends at a sync")
        if "step_weighted" in self.explicit and self.method != "a-edit":
            raise ConfigError(f"{flag('step_weighted')} applies to --local-sgd a-edit only")
        if self.warmup_iters < 0:
            raise ConfigError(f"{flag('warmup_iters')} {self.warmup_iters} must be >= 0")
        if not self.outer_lr > 0:
            raise ConfigError(f"{flag('outer_lr')} {self.outer_lr} must be > 0")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"{flag('outer_momentum')} {self.outer_momentum} must be in [0, 1)")
        if self.pseudo_grad_clip is not None and not self.pseudo_grad_clip > 0:
            raise ConfigError(f"{flag('pseudo_grad_clip')} {self.pseudo_grad_clip} must be > 0")
        if not self.anomaly_threshold >= 0:  # also rejects NaN
            raise ConfigError(f"{flag('anomaly_threshold')} {self.anomaly_threshold} must be >= 0 (0 disables)")
        for name in ("peer_ratio", "loss_ratio", "moment_ratio"):
            value = getattr(self, name)
            if value != 0 and not 1 < value < float("inf"):  # also rejects NaN
                raise ConfigError(f"{flag(name)} {value} must be > 1 (0 disables)")
        if not 0 < self.ewma_alpha <= 1:
            raise ConfigError(f"{flag('ewma_alpha')} {self.ewma_alpha} must be in (0, 1]")
        if self.ewma_warmup < 0:
            raise ConfigError(f"{flag('ewma_warmup')} {self.ewma_warmup} must be >= 0")
        if self.layerwise and self.method in ("diloco", "streaming") and "layerwise" in self.explicit:
            raise ConfigError(f"--local-sgd-layerwise applies to --local-sgd edit or a-edit, not {self.method}")
        streaming_only = ("streaming_fragments", "streaming_overlap_steps", "streaming_mix_alpha", "streaming_pattern")
        for name in streaming_only:
            if name in self.explicit and self.method != "streaming":
                raise ConfigError(f"{flag(name)} applies to --local-sgd streaming only")
        if self.streaming_fragments is not None and self.streaming_fragments < 1:
            raise ConfigError(f"{flag('streaming_fragments')} {self.streaming_fragments} must be >= 1")
        if self.streaming_overlap_steps < 0:
            raise ConfigError(f"{flag('streaming_overlap_steps')} {self.streaming_overlap_steps} must be >= 0")
        if self.method == "streaming" and self.streaming_overlap_steps >= self.sync_interval:
            raise ConfigError(
                f"{flag('streaming_overlap_steps')} {self.streaming_overlap_steps} must be < "
                f"{flag('sync_interval')} {self.sync_interval}"
            )
        if not 0 <= self.streaming_mix_alpha <= 1:
            raise ConfigError(f"{flag('streaming_mix_alpha')} {self.streaming_mix_alpha} must be in [0, 1]")
        if self.outer_grad_block_size < 1:
            raise ConfigError(f"{flag('outer_grad_block_size')} {self.outer_grad_block_size} must be >= 1")
        if self.sync_chunk_size < 1:
            raise ConfigError(f"{flag('sync_chunk_size')} {self.sync_chunk_size} must be >= 1")
        if self.outer_grad_stochastic_rounding and self.outer_grad_dtype == "fp32":
            raise ConfigError(f"{flag('outer_grad_stochastic_rounding')} needs a quantized "
                              f"{flag('outer_grad_dtype')} (not fp32: nothing is rounded)")
        if "outer_grad_reduction" in self.explicit and self.outer_grad_dtype == "fp32":
            raise ConfigError(f"{flag('outer_grad_reduction')} {self.outer_grad_reduction} needs a quantized "
                              f"{flag('outer_grad_dtype')}: fp32 is always one exact all-reduce")
        if "sync_check_interval" in self.explicit and self.method != "a-edit":
            raise ConfigError(f"{flag('sync_check_interval')} applies to --local-sgd a-edit only")
        if self.sync_check_interval is not None and self.sync_check_interval < 1:
            raise ConfigError(f"{flag('sync_check_interval')} {self.sync_check_interval} must be >= 1")
        if self.debug_slow_worker is not None and not self.debug_slow_worker[1] >= 1:
            raise ConfigError(f"{flag('debug_slow_worker')} factor {self.debug_slow_worker[1]} must be >= 1")
        if self.debug_corrupt_worker is not None:
            _, scale, prob = self.debug_corrupt_worker
            if not (scale >= 0 and 0 <= prob <= 1):
                raise ConfigError(f"{flag('debug_corrupt_worker')} needs SCALE >= 0 and 0 <= PROB <= 1")

    def _check_fault_tolerance(self) -> None:
        """What torchft's quorum / all-reduce / commit protocol can carry (fault_tolerance.py). Defaults
        that cannot (layer-wise, streaming overlap, a quantized wire) switch off; asking for them fails."""
        ft = flag("fault_tolerance")
        if not self.torchft_lighthouse:
            raise ConfigError(f"{ft} needs {flag('torchft_lighthouse')} HOST:PORT (or $TORCHFT_LIGHTHOUSE): "
                              "the address of a running torchft lighthouse")
        if self.workers is None:
            raise ConfigError(f"{ft} needs {flag('workers')} W: how many worker jobs the run has")
        if self.replica_group_id is None or not 0 <= self.replica_group_id < self.workers:
            raise ConfigError(f"{ft} needs {flag('replica_group_id')} in [0, {self.workers}) (or "
                              f"$REPLICA_GROUP_ID): this worker's index, got {self.replica_group_id}")
        if not 1 <= self.torchft_min_replicas <= self.workers:
            raise ConfigError(f"{flag('torchft_min_replicas')} {self.torchft_min_replicas} must be in "
                              f"[1, {self.workers}]")
        for name in ("torchft_timeout", "torchft_quorum_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} must be > 0 seconds")
        if self.method == "a-edit":
            raise ConfigError(f"--local-sgd a-edit cannot run with {ft}: its time-triggered syncs vote every "
                              "few steps across workers, outside torchft's per-sync quorum (not built)")
        if self.layerwise:
            raise ConfigError(f"--local-sgd-layerwise cannot run with {ft}: a layer-wise sync applies each "
                              "layer's outer step in the next forward, before a commit over all layers")
        if self.method == "streaming" and self.streaming_overlap_steps > 0 and "streaming_overlap_steps" in self.explicit:
            raise ConfigError(f"{flag('streaming_overlap_steps')} {self.streaming_overlap_steps} cannot run with "
                              f"{ft}: a fragment in flight would be applied after its quorum may have changed; use 0")
        if self.outer_grad_dtype not in (None, "fp32"):
            raise ConfigError(f"{flag('outer_grad_dtype')} {self.outer_grad_dtype} cannot run with {ft}: torchft "
                              "makes only an fp32 all-reduce fault tolerant; use fp32")
        if self.outer_grad_error_feedback:
            raise ConfigError(f"{flag('outer_grad_error_feedback')} needs a quantized wire, which {ft} cannot use")
        if self.offload_outer_state:
            raise ConfigError(f"{flag('offload_outer_state')} cannot run with {ft} (not built: the staging of a "
                              "sync attempt that does not commit is not undone)")
        if self.warmup_iters > 0:
            raise ConfigError(f"{flag('warmup_iters')} {self.warmup_iters} cannot run with {ft}: the synchronous "
                              "warmup all-reduces gradients across workers every step, outside a quorum; use 0")

    @property
    def has_penalty(self) -> bool:
        return self.method in PENALTY_METHODS

    def check_topology(self, data_parallel_size: int, num_layers: int) -> None:
        """Rules that need the launch shape; called before any process group is built."""
        workers = self.workers if self.workers is not None else data_parallel_size
        if data_parallel_size % workers != 0 and not self.fault_tolerance:  # elastic: one job per worker
            raise ConfigError(
                f"{flag('workers')} {workers} does not divide the data-parallel size {data_parallel_size}"
            )
        for rank_field in ("debug_slow_worker", "debug_corrupt_worker", "debug_fault"):
            value = getattr(self, rank_field)
            if value is None:
                continue
            worker = value.worker if isinstance(value, FaultSpec) else value[0]
            if not 0 <= worker < workers:
                raise ConfigError(f"{flag(rank_field)} worker {worker} is not in [0, {workers})")
        if self.method == "streaming" and self.streaming_fragments is not None:
            if self.streaming_fragments > num_layers:
                raise ConfigError(
                    f"{flag('streaming_fragments')} {self.streaming_fragments} exceeds --num-layers {num_layers}"
                )

    def num_workers(self, data_parallel_size: int) -> int:
        return self.workers if self.workers is not None else data_parallel_size

    @classmethod
    def from_args(cls, args, explicit: set[str]) -> Optional["LocalSGDConfig"]:
        """Build from an argparse namespace (None when --local-sgd is absent); ``explicit`` holds the
        dests the user typed, so method-dependent defaults and "flag needs method" rules can tell."""
        if args.local_sgd is None:
            ours = {dest for dest in explicit if dest in _DEST_TO_FIELD}
            if ours:
                dest = sorted(ours)[0]
                raise ConfigError(f"--{dest.replace('_', '-')} needs --local-sgd {{{','.join(METHODS)}}}")
            return None
        values = {}
        for dest, name in _DEST_TO_FIELD.items():
            values[name] = getattr(args, dest)
        values["method"] = args.local_sgd
        values["explicit"] = frozenset(_DEST_TO_FIELD[d] for d in explicit if d in _DEST_TO_FIELD)
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "explicit"}


# field name -> flag name (without "--"); argparse dests are the flag names with "_".
FLAG_OF = {
    "method": "local-sgd",
    "workers": "local-sgd-workers",
    "sync_interval": "local-sgd-sync-interval",
    "sync_time": "local-sgd-sync-time",
    "warmup_iters": "local-sgd-warmup-iters",
    "outer_optimizer": "outer-optimizer",
    "outer_lr": "outer-lr",
    "outer_momentum": "outer-momentum",
    "pseudo_grad_clip": "pseudo-grad-clip",
    "anomaly_threshold": "pseudo-grad-anomaly-threshold",
    "ewma_alpha": "pseudo-grad-ewma-alpha",
    "ewma_warmup": "pseudo-grad-ewma-warmup",
    "weighting": "pseudo-grad-weighting",
    "peer_ratio": "pseudo-grad-peer-ratio",
    "loss_ratio": "pseudo-grad-loss-ratio",
    "moment_ratio": "pseudo-grad-moment-ratio",
    "repair_inner_state": "pseudo-grad-repair-inner-state",
    "step_weighted": "pseudo-grad-step-weighted",
    "layerwise": "local-sgd-layerwise",
    "offload_outer_state": "local-sgd-offload-outer-state",
    "streaming_fragments": "streaming-fragments",
    "streaming_pattern": "streaming-pattern",
    "streaming_overlap_steps": "streaming-overlap-steps",
    "streaming_mix_alpha": "streaming-mix-alpha",
    "outer_grad_dtype": "outer-grad-dtype",
    "outer_grad_block_size": "outer-grad-block-size",
    "outer_grad_error_feedback": "outer-grad-error-feedback",
    "outer_grad_stochastic_rounding": "outer-grad-stochastic-rounding",
    "outer_grad_reduction": "outer-grad-reduction",
    "sync_chunk_size": "local-sgd-sync-chunk-size",
    "final_sync": "local-sgd-final-sync",
    "sync_check_interval": "local-sgd-sync-check-interval",
    "debug_slow_worker": "local-sgd-debug-slow-worker",
    "debug_corrupt_worker": "local-sgd-debug-corrupt-worker",
    "debug_fault": "local-sgd-debug-fault",
    "fault_tolerance": "local-sgd-fault-tolerance",
    "torchft_lighthouse": "torchft-lighthouse",
    "replica_group_id": "replica-group-id",
    "torchft_min_replicas": "torchft-min-replicas",
    "torchft_timeout": "torchft-timeout",
    "torchft_quorum_timeout": "torchft-quorum-timeout",
}
_DEST_TO_FIELD = {f.replace("-", "_"): name for name, f in FLAG_OF.items() if name != "method"}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{flag(name)} {value!r} is not one of {', '.join(choices)}")
