"""Command line: Megatron-LM's flag names for what Megatron-LM has, ours for local SGD (SPEC section 3).

``add_local_sgd_args`` is reused by the Megatron-LM adapter (as an ``extra_args_provider``).
``parse_and_validate`` runs before any process group exists: every impossible combination fails here
with one line naming the flag (``FlagError``), so a bad launch costs no cluster time.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

from megatron_edit.config import (
    METHODS,
    OUTER_GRAD_DTYPES,
    OUTER_GRAD_REDUCTIONS,
    OUTER_OPTIMIZERS,
    STREAMING_PATTERNS,
    WEIGHTINGS,
    ConfigError,
    LocalSGDConfig,
)
from megatron_edit.fault_injection import FAULT_KINDS, FaultSpec, parse_fault_spec
from megatron_edit.fp8 import fp8_flag_error

TOKENIZER_TYPES = ("SentencePieceTokenizer", "NullTokenizer")


class FlagError(ValueError):
    """One line naming the flag and the rule it breaks."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad choice, malformed W:FACTOR, missing required flag) become a
    one-line FlagError too, instead of a usage block and SystemExit from inside parse_args."""

    def error(self, message: str):  # type: ignore[override]
        raise FlagError(" ".join(str(message).split()))


def _worker_factor(text: str) -> tuple[int, float]:
    try:
        worker, factor = text.split(":")
        return int(worker), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W:FACTOR, got {text!r}")


def _worker_scale_prob(text: str) -> tuple[int, float, float]:
    try:
        worker, scale, prob = text.split(":")
        return int(worker), float(scale), float(prob)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W:SCALE:PROB, got {text!r}")


def _fault_spec(text: str) -> FaultSpec:
    try:
        return parse_fault_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def add_local_sgd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags (SPEC section 3); defaults of None are resolved per method by LocalSGDConfig."""
    g = parser.add_argument_group("local SGD (megatron_edit)")
    g.add_argument("--local-sgd", choices=METHODS, default=None,
                   help="local-SGD method; absent = plain synchronous training")
    g.add_argument("--local-sgd-workers", type=int, default=None, help="workers W (default: data-parallel size)")
    g.add_argument("--local-sgd-sync-interval", type=int, default=128, help="inner iterations between syncs H")
    g.add_argument("--local-sgd-sync-time", type=float, default=600.0, help="a-edit: seconds between syncs")
    g.add_argument("--local-sgd-warmup-iters", type=int, default=0, help="synchronous iterations first")
    g.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, default="nesterov")
    g.add_argument("--outer-lr", type=float, default=0.8)
    g.add_argument("--outer-momentum", type=float, default=0.85)
    g.add_argument("--pseudo-grad-clip", type=float, default=None, help="phi (edit/a-edit default 10)")
    g.add_argument("--pseudo-grad-anomaly-threshold", type=float, default=None,
                   help="z-score threshold (edit/a-edit default 3; 0 disables)")
    g.add_argument("--pseudo-grad-ewma-alpha", type=float, default=0.02)
    g.add_argument("--pseudo-grad-ewma-warmup", type=int, default=3, help="syncs before anomaly detection")
    g.add_argument("--pseudo-grad-weighting", choices=WEIGHTINGS, default="uniform",
                   help="uniform: healthy workers averaged as in DiLoCo; norm: the EDiT paper's softmax(-G/T)")
    g.add_argument("--pseudo-grad-peer-ratio", type=float, default=None, metavar="R",
                   help="edit/a-edit: a worker whose norm is more than R times above or below the workers' "
                        "median (same sync, same layer) is anomalous (default 4; 0 disables)")
    g.add_argument("--pseudo-grad-loss-ratio", type=float, default=None, metavar="Q",
                   help="edit/a-edit: a worker whose mean training loss since the last sync is more than Q "
                        "times above or below the workers' median is anomalous in every layer, e.g. a bad "
                        "data shard; a worker it flagged at the previous sync is held to 1 + (Q - 1) / 2 "
                        "(default 1.1; 0 disables; needs >= 3 workers)")
    g.add_argument("--pseudo-grad-moment-ratio", type=float, default=None, metavar="M",
                   help="edit/a-edit: a worker whose inner Adam second-moment RMS in a layer is more than M "
                        "times the workers' median is anomalous there: a gradient burst froze it (default 4; "
                        "0 disables; needs >= 3 workers)")
    g.add_argument("--pseudo-grad-repair-inner-state", dest="pseudo_grad_repair_inner_state", action="store_true",
                   default=None, help="a worker flagged in any layer takes the mean inner Adam moments of the "
                                      "workers flagged in none (edit/a-edit default: on; inner_state_repair.py)")
    g.add_argument("--no-pseudo-grad-repair-inner-state", dest="pseudo_grad_repair_inner_state",
                   action="store_false")
    g.add_argument("--pseudo-grad-step-weighted", action="store_true",
                   help="a-edit: weight pseudo-gradients by inner steps since the last sync")
    g.add_argument("--local-sgd-layerwise", dest="local_sgd_layerwise", action="store_true", default=None)
    g.add_argument("--no-local-sgd-layerwise", dest="local_sgd_layerwise", action="store_false")
    g.add_argument("--local-sgd-offload-outer-state", action="store_true")
    g.add_argument("--streaming-fragments", type=int, default=None)
    g.add_argument("--streaming-pattern", choices=STREAMING_PATTERNS, default="strided")
    g.add_argument("--streaming-overlap-steps", type=int, default=1)
    g.add_argument("--streaming-mix-alpha", type=float, default=0.5)
    g.add_argument("--outer-grad-dtype", choices=OUTER_GRAD_DTYPES, default=None)
    g.add_argument("--outer-grad-block-size", type=int, default=128)
    g.add_argument("--outer-grad-error-feedback", action="store_true")
    g.add_argument("--outer-grad-stochastic-rounding", action="store_true",
                   help="round pseudo-gradients stochastically on a quantized wire (unbiased)")
    g.add_argument("--outer-grad-reduction", choices=OUTER_GRAD_REDUCTIONS, default="reduce-scatter",
                   help="quantized wire: reduce-scatter quantizes twice (each contribution, then each reduced "
                        "chunk) and sends ~2x one encoded vector per rank; all-gather quantizes once and sends "
                        "(W-1)x: worth it for few workers (default: reduce-scatter)")
    g.add_argument("--local-sgd-sync-chunk-size", type=int, default=1 << 26, metavar="N",
                   help="elements per collective of an all-at-once sync, i.e. the size of its only buffer")
    g.add_argument("--local-sgd-final-sync", dest="local_sgd_final_sync", action="store_true", default=True,
                   help="diloco/edit/streaming: the iteration that reaches --train-iters syncs whatever the "
                        "schedule says (streaming: every fragment, no overlap, no mixing), so every worker ends "
                        "on the same model; a-edit always ends at a sync (default: on)")
    g.add_argument("--no-local-sgd-final-sync", dest="local_sgd_final_sync", action="store_false")
    g.add_argument("--local-sgd-sync-check-interval", type=int, default=None, metavar="K",
                   help="a-edit: inner steps between the worker's 'sync time elapsed?' votes (default: derived "
                        "from the step time, at most 5%% of --local-sgd-sync-time late)")
    g.add_argument("--local-sgd-debug-slow-worker", type=_worker_factor, default=None, metavar="W:FACTOR")
    g.add_argument("--local-sgd-debug-corrupt-worker", type=_worker_scale_prob, default=None,
                   metavar="W:SCALE:PROB")
    g.add_argument("--local-sgd-debug-fault", type=_fault_spec, default=None, metavar="W:KIND:START[:LENGTH]",
                   help=f"inject a fault into worker W from iteration START: {', '.join(FAULT_KINDS)} "
                        "(megatron_edit/fault_injection.py)")
    ft = parser.add_argument_group("elastic workers (torchft; megatron_edit/fault_tolerance.py)")
    ft.add_argument("--local-sgd-fault-tolerance", action="store_true",
                    help="each worker is its own job; syncs go through a torchft quorum, so a worker that dies "
                         "is left out and one that restarts heals from a live peer")
    ft.add_argument("--torchft-lighthouse", default=os.environ.get("TORCHFT_LIGHTHOUSE"), metavar="HOST:PORT",
                    help="the torchft lighthouse (default: $TORCHFT_LIGHTHOUSE)")
    ft.add_argument("--replica-group-id", type=int, default=_env_int("REPLICA_GROUP_ID"), metavar="I",
                    help="this worker's index in [0, --local-sgd-workers) (default: $REPLICA_GROUP_ID)")
    ft.add_argument("--torchft-min-replicas", type=int, default=1, metavar="N",
                    help="fewest workers a sync may commit with")
    ft.add_argument("--torchft-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="a collective, a commit vote or a recovery transfer that takes longer has failed")
    ft.add_argument("--torchft-quorum-timeout", type=float, default=1800.0, metavar="SECONDS",
                    help="how long a worker waits for the others to reach a sync (must exceed H steps)")
    return parser


def _env_int(name: str):
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        raise FlagError(f"${name} must be an integer, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Megatron-style GPT pretraining on megatron-core, with optional local SGD",
        allow_abbrev=False,
    )
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, required=True)
    m.add_argument("--hidden-size", type=int, required=True)
    m.add_argument("--ffn-hidden-size", type=int, default=None)
    m.add_argument("--num-attention-heads", type=int, required=True)
    m.add_argument("--num-query-groups", type=int, default=None)
    m.add_argument("--seq-length", type=int, required=True)
    m.add_argument("--max-position-embeddings", type=int, default=None)
    m.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    m.add_argument("--rotary-base", type=int, default=10000)
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--disable-bias-linear", action="store_true")
    m.add_argument("--hidden-dropout", type=float, default=0.1)
    m.add_argument("--attention-dropout", type=float, default=0.1)
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    m.add_argument("--megatron-init", action="store_true",
                   help="keep megatron-core's own initialisation (differs across TP/PP layouts); by default "
                        "parameters are re-initialised per global parameter name so every layout starts equal")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, required=True)
    t.add_argument("--global-batch-size", type=int, default=None)
    t.add_argument("--train-iters", type=int, required=True)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                   default="linear")
    t.add_argument("--lr-decay-iters", type=int, default=None)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--sgd-momentum", type=float, default=0.9)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default=None)
    t.add_argument("--fp8-param-gather", action="store_true")
    t.add_argument("--seed", type=int, default=1234)

    d = p.add_argument_group("distributed")
    d.add_argument("--tensor-model-parallel-size", type=int, default=1)
    d.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    d.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    d.add_argument("--context-parallel-size", type=int, default=1)
    d.add_argument("--use-distributed-optimizer", action="store_true")
    d.add_argument("--overlap-grad-reduce", action="store_true")
    d.add_argument("--overlap-param-gather", action="store_true")
    d.add_argument("--ddp-bucket-size", type=int, default=None)
    d.add_argument("--use-tp-pp-dp-mapping", action="store_true")
    d.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with CUDA, gloo without")
    d.add_argument("--force-cpu", action="store_true",
                   help="run on CPU with the compatibility layer even when CUDA is available (debugging)")

    data = p.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", default=None)
    data.add_argument("--split", type=str, default="969,30,1")
    data.add_argument("--mock-data", action="store_true")
    data.add_argument("--tokenizer-type", type=str, default=None)
    data.add_argument("--tokenizer-model", type=str, default=None)
    data.add_argument("--vocab-size", type=int, default=None)
    data.add_argument("--data-cache-path", type=str, default=None)
    data.add_argument("--eod-mask-loss", action="store_true")

    log = p.add_argument_group("logging, evaluation and checkpoints")
    log.add_argument("--log-interval", type=int, default=100)
    log.add_argument("--eval-interval", type=int, default=1000)
    log.add_argument("--eval-iters", type=int, default=100)
    log.add_argument("--tensorboard-dir", type=str, default=None)
    log.add_argument("--save", type=str, default=None)
    log.add_argument("--load", type=str, default=None)
    log.add_argument("--save-interval", type=int, default=None)
    log.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")
    log.add_argument("--ckpt-step", type=int, default=None)
    log.add_argument("--no-load-optim", action="store_true")
    log.add_argument("--no-load-rng", action="store_true")
    log.add_argument("--override-opt-param-scheduler", action="store_true")
    add_local_sgd_args(p)
    return p


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests whose flag appears on the command line (method-dependent defaults need to know)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {
        action.dest
        for action in parser._actions  # argparse has no public list of actions
        if any(s in given for s in action.option_strings)
    }


def _local_sgd_dests() -> frozenset:
    return frozenset(a.dest for a in add_local_sgd_args(argparse.ArgumentParser())._actions if a.dest != "help")


def _fail(msg: str) -> None:
    raise FlagError(msg)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Megatron-side rules; world_size comes from the launcher's environment (no process group yet)."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "log_interval", "eval_interval"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.train_iters < 0:
        _fail(f"--train-iters {args.train_iters} must be >= 0")
    if args.eval_iters < 0:
        _fail(f"--eval-iters {args.eval_iters} must be >= 0")
    if cp != 1:
        _fail(f"--context-parallel-size {cp}: context parallelism is not supported by this entry yet")
    if world_size % (tp * pp * cp) != 0:
        _fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
              f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size < 1:
        _fail(f"--global-batch-size {args.global_batch_size} must be >= 1")
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        _fail(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
              f"{args.micro_batch_size} x data-parallel size {dp}")
    if args.hidden_size % args.num_attention_heads != 0:
        _fail(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    if args.num_attention_heads % tp != 0:
        _fail(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
              f"--tensor-model-parallel-size {tp}")
    if args.num_query_groups is not None and args.num_query_groups % tp != 0:
        _fail(f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    if args.num_layers % pp != 0:
        _fail(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        if args.num_layers_per_virtual_pipeline_stage < 1:
            _fail(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage} "
                  "must be >= 1")
        if pp < 2:
            _fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if per_stage % args.num_layers_per_virtual_pipeline_stage != 0:
            _fail(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage} does "
                  f"not divide the {per_stage} layers of each pipeline stage")
        num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
        if num_microbatches % pp != 0:
            _fail(f"the interleaved schedule needs the number of microbatches ({num_microbatches}) to be a "
                  f"multiple of --pipeline-model-parallel-size {pp}: raise --global-batch-size")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        _fail(f"--max-position-embeddings {args.max_position_embeddings} is smaller than --seq-length "
              f"{args.seq_length}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        _fail("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        _fail("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM: without it DDP uses one "
              "bucket, so parameters are gathered all at once)")
    if args.use_distributed_optimizer and args.optimizer != "adam":
        _fail(f"--optimizer {args.optimizer} cannot be used with --use-distributed-optimizer "
              "(megatron-core's distributed optimizer accepts only Adam/AdamW)")
    if args.fp16:
        _fail("--fp16 is not supported: use --bf16")
    fp8_error = fp8_flag_error(args.fp8_format, args.fp8_param_gather, args.use_distributed_optimizer)
    if fp8_error is not None:
        _fail(fp8_error)
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > max(args.train_iters, 0):
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --train-iters {args.train_iters}]")
    if args.min_lr > args.lr:
        _fail(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.save_interval is not None and args.save is None:
        _fail("--save-interval needs --save")
    if args.save_interval is not None and args.save_interval < 1:
        _fail(f"--save-interval {args.save_interval} must be >= 1")
    if args.load is not None and not os.path.isdir(args.load):
        _fail(f"--load {args.load}: no such directory")
    if args.ckpt_step is not None and args.load is None:
        _fail("--ckpt-step needs --load")
    if args.save is not None and os.path.exists(args.save) and not os.path.isdir(args.save):
        _fail(f"--save {args.save}: exists and is not a directory")
    # Data and tokenizer.
    if args.tokenizer_type is None:
        _fail(f"--tokenizer-type is required (one of {', '.join(TOKENIZER_TYPES)})")
    if args.tokenizer_type not in TOKENIZER_TYPES:
        _fail(f"--tokenizer-type {args.tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        _fail("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.vocab_size is not None and args.vocab_size < 1:
        _fail(f"--vocab-size {args.vocab_size} must be >= 1")
    if args.tokenizer_type == "SentencePieceTokenizer":
        if args.tokenizer_model is None:
            _fail("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
        if not os.path.isfile(args.tokenizer_model):
            _fail(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.mock_data and args.data_path:
        _fail("--mock-data and --data-path are mutually exclusive")
    if not args.mock_data and not args.data_path:
        _fail("no data: give --data-path PREFIX [...] or --mock-data")
    split = args.split.replace("/", ",").split(",")
    try:
        split_values = [float(s) for s in split]
    except ValueError:
        split_values = []
    if (not split_values or len(split_values) > 3 or any(not (math.isfinite(v) and v >= 0) for v in split_values)
            or sum(split_values) <= 0):
        _fail(f"--split {args.split!r} must be up to three non-negative weights like 969,30,1")


def parse_and_validate(
    argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None
) -> tuple[argparse.Namespace, Optional[LocalSGDConfig]]:
    """Parse, validate and build LocalSGDConfig; raises FlagError with one line on any bad input."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    if args.local_sgd is None:
        # Name the flag as typed (e.g. --no-local-sgd-layerwise, not its dest); LocalSGDConfig.from_args
        # enforces the same rule by dest for other callers.
        ours = {s for a in parser._actions if a.dest in _LOCAL_SGD_DESTS and a.dest != "local_sgd"
                for s in a.option_strings}
        for arg in argv:
            name = arg.split("=", 1)[0]
            if name in ours:
                raise FlagError(f"{name} needs --local-sgd {{{','.join(METHODS)}}}")
    try:
        local_sgd = LocalSGDConfig.from_args(args, explicit_dests(parser, argv))
        if local_sgd is not None:
            local_sgd.check_topology(args.data_parallel_size, args.num_layers)
            per_job = args.micro_batch_size * args.data_parallel_size * (local_sgd.workers or 1)
            if local_sgd.fault_tolerance and args.global_batch_size % per_job != 0:
                raise ConfigError(
                    f"--global-batch-size {args.global_batch_size} (over all workers) is not divisible by "
                    f"--micro-batch-size {args.micro_batch_size} x this job's data-parallel size "
                    f"{args.data_parallel_size} x --local-sgd-workers {local_sgd.workers}")
            if local_sgd.layerwise and not (args.use_distributed_optimizer and args.overlap_param_gather):
                raise ConfigError(
                    "--local-sgd-layerwise needs --use-distributed-optimizer and --overlap-param-gather "
                    "(the layer-wise sync rides on the per-bucket parameter all-gather); "
                    "or pass --no-local-sgd-layerwise"
                )
    except ConfigError as e:
        raise FlagError(str(e)) from None
    return args, local_sgd


_LOCAL_SGD_DESTS = _local_sgd_dests()
