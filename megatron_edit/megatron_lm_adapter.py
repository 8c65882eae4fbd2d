"""Local SGD inside Megatron-LM's own training loop, without editing Megatron-LM (issues 7, 11).

Megatron-LM (the repository: ``megatron/training``, ``pretrain_gpt.py``; not in the megatron-core wheel)
builds a run in a fixed order, and each step looks a name up in a module namespace at call time:

  <args module>.parse_args(extra_args_provider)   -> our flags are registered here (chained provider)
  <args module>.validate_args(args)               -> our rules; args.num_distributed_optimizer_instances = W,
                                                     so initialize_model_parallel builds the worker groups
  training.initialize_megatron(...)               -> allow_no_cuda on a machine without CUDA (megatron_lm_cpu)
  training.get_model -> training.DDP(...)         -> DDP gets the worker-local groups (one instance); core_v0.19
    models.dist_utils.DistributedDataParallel(...)   builds pretrain_gpt.py's model there, same wrapper
  training.get_megatron_optimizer(...)            -> the worker's groups, instance id = worker index, the
                                                     LocalSGD engine, a hook around optimizer.step(), and the
                                                     local-SGD state in the optimizer's checkpoint state
  train_step: optimizer.step()                    -> before_optimizer_step / step / after_optimizer_step; the
                                                     first one reads args.train_iters (with --train-samples set
                                                     by update_train_iters after the optimizer) for the final sync

<args module> is ``megatron.training.initialize`` in core_v0.16 trees (``initialize_megatron`` parses
the arguments) and ``megatron.training.arguments`` in core_v0.19 trees (``parse_and_validate_args``, called
by ``pretrain_gpt.py`` itself; probed by that name). ``install()`` replaces exactly those names (nothing
else), after checking that this Megatron-LM is one it was written against: a core_v0.16 (>= 0.16.1) or
core_v0.19 tree (read from the checkout's own ``megatron/core/package_info.py``), the imported
``megatron.core`` of the same release series, and every wrapped name present with the parameters we
pass. Without ``--local-sgd`` every wrapper passes through; without CUDA, megatron_lm_cpu switches
Megatron-LM to CPU / gloo first (with or without ``--local-sgd``).

What stays Megatron-LM's own: data loading (global DP rank, so workers read different data), the loss
printed (averaged over the global DP group: the mean over all workers), evaluation and checkpoint saves
(its ``disable_forward_pre_hook`` goes through ``start_param_sync``, so pending layer-wise updates land
first), and the checkpoint files: every worker's model and Adam state and the outer state ride in the
optimizer's sharded state dict (checkpoint/megatron_lm.py), so ``--save`` / ``--load`` resume exactly.
Refused with one line: ``--local-sgd a-edit`` (Megatron-LM's loop runs global collectives every step, so
workers cannot step at their own pace), FSDP, Muon, fp16, checkpoint formats other than ``torch_dist``,
and ``--check-weight-hash-across-dp-replicas-interval`` (SPEC section 5).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_edit import mcore_adapter, megatron_lm_cpu
from megatron_edit.arguments import FlagError, add_local_sgd_args, explicit_dests
from megatron_edit.config import ConfigError, LocalSGDConfig
from megatron_edit.fp8 import fp8_flag_error

# Megatron-LM trees whose seam this adapter was read from and run against: (major, minor) of their
# megatron-core, each used with the megatron-core of its own series.
SUPPORTED_TREES = ((0, 16), (0, 19))
SUPPORTED_MEGATRON_LM_TEXT = (
    "Megatron-LM trees core_v0.16.1 (megatron-core 0.16.x, >= 0.16.1) and core_v0.19.x (megatron-core 0.19.x), "
    "each with the megatron-core of the same series"
)
# name -> parameters our wrapper passes or reads; checked before anything is replaced. "ARGS" is the
# module that parses and validates the arguments (_args_module).
SEAM = {
    "ARGS.parse_args": ("extra_args_provider", "ignore_unknown_args"),
    "ARGS.validate_args": ("args",),
    "megatron.training.training.initialize_megatron": ("allow_no_cuda",),
    "megatron.training.training.get_megatron_optimizer": (
        "config", "model_chunks", "use_gloo_process_groups", "pg_collection"),
    "megatron.training.training.DDP": ("config", "ddp_config", "module", "disable_bucketing", "pg_collection"),
    # core_v0.19: pretrain_gpt.py builds its model from a config container, whose builder wraps the chunks
    # with this name (models/dist_utils._ddp_wrap), not with training.DDP. Optional: absent before.
    "?megatron.training.models.dist_utils.DistributedDataParallel": (
        "config", "ddp_config", "module", "disable_bucketing", "pg_collection"),
    "megatron.training.global_vars.get_args": (),
    "megatron.training.checkpointing.get_load_checkpoint_path_by_args": ("args", "load_arg"),
}


class AdapterError(RuntimeError):
    """This Megatron-LM cannot be adapted; one line saying why."""


# ------------------------------------------------------------------ version check
def megatron_lm_tree_version(training_package_file: str) -> Optional[str]:
    """The megatron-core version of the Megatron-LM tree that holds ``megatron/training`` (its own
    ``megatron/core/package_info.py``), or None when the tree has no megatron/core beside it."""
    info = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(training_package_file))),
                        "core", "package_info.py")
    if not os.path.isfile(info):
        return None
    text = open(info, encoding="utf-8").read()
    parts = {}
    for name in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
        m = re.search(rf"^{name}\s*=\s*['\"]?([^'\"\n]*)['\"]?\s*$", text, re.MULTILINE)
        parts[name] = m.group(1).strip() if m else ""
    if not parts["MAJOR"]:
        return None
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts['PRE_RELEASE']}"


def _args_module_name() -> str:
    """Where Megatron-LM parses and validates its arguments at call time: core_v0.19 moved it out of
    ``initialize_megatron`` into ``arguments.parse_and_validate_args`` (probe: that function)."""
    arguments = sys.modules.get("megatron.training.arguments")
    if arguments is not None and hasattr(arguments, "parse_and_validate_args"):
        return "megatron.training.arguments"
    return "megatron.training.initialize"


def _resolve(dotted: str) -> Any:
    dotted = dotted.replace("ARGS.", _args_module_name() + ".")
    module, name = dotted.rsplit(".", 1)
    return getattr(sys.modules.get(module), name, None)


def _supported_tree(version: str) -> bool:
    major, minor, patch, final = mcore_adapter._version_tuple(version)
    if not final or (major, minor) not in SUPPORTED_TREES:
        return False
    try:
        mcore_adapter.check_megatron_core_version(version)
    except RuntimeError:
        return False
    return True


def check_megatron_lm(core_version: str, tree_version: Optional[str]) -> None:
    """Refuse, with one line, a Megatron-LM whose seam this adapter was not written against.
    Expects the ``megatron.training`` modules of SEAM to be imported (sys.modules)."""
    where = f"(supported: {SUPPORTED_MEGATRON_LM_TEXT})"
    if tree_version is not None:
        if not _supported_tree(tree_version):
            raise AdapterError(f"this Megatron-LM checkout is megatron-core {tree_version} and the imported "
                               f"megatron.core is {core_version} {where}")
        if mcore_adapter._version_tuple(tree_version)[:2] != mcore_adapter._version_tuple(core_version)[:2]:
            raise AdapterError(
                f"this Megatron-LM checkout is megatron-core {tree_version} but the imported megatron.core is "
                f"{core_version}: put the checkout first on PYTHONPATH or install megatron-core of the same "
                f"series {where}")
    if not _supported_tree(core_version):
        raise AdapterError(f"megatron.core {core_version} is not supported by the Megatron-LM adapter {where}")
    for dotted, params in SEAM.items():
        optional = dotted.startswith("?")
        dotted = dotted.lstrip("?")
        if optional and dotted.rsplit(".", 1)[0] not in sys.modules:
            continue
        target = _resolve(dotted)
        shown = dotted.replace("ARGS.", _args_module_name() + ".")
        if not callable(target):
            raise AdapterError(f"Megatron-LM has no {shown} {where}")
        try:
            present = set(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            present = set()
        missing = [p for p in params if p not in present]
        if missing:
            raise AdapterError(f"Megatron-LM's {shown} has no parameter {missing[0]!r} {where}")


# ------------------------------------------------------------------ flags
def chained_extra_args_provider(user_provider: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` for Megatron-LM's parse_args: the script's own provider first, then our
    flags (skipped if already registered, so the patch and the launcher can both be used)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if user_provider is not None:
            parser = user_provider(parser)
        if "--local-sgd" not in parser._option_string_actions:  # argparse has no public lookup
            add_local_sgd_args(parser)
        return parser

    provider.megatron_edit = True
    return provider


def local_sgd_config_from_megatron_args(args: argparse.Namespace, argv) -> Optional[LocalSGDConfig]:
    """Our rules on a validated Megatron-LM namespace (``data_parallel_size`` set); FlagError on misuse."""
    ours = add_local_sgd_args(argparse.ArgumentParser())
    explicit = explicit_dests(ours, argv)
    fp8_error = fp8_flag_error(getattr(args, "fp8", None), getattr(args, "fp8_param_gather", False),
                               getattr(args, "use_distributed_optimizer", False))
    if fp8_error is not None:
        raise FlagError(fp8_error)
    try:
        cfg = LocalSGDConfig.from_args(args, explicit)
        if cfg is None:
            return None
        cfg.check_topology(args.data_parallel_size, args.num_layers)
    except ConfigError as e:
        raise FlagError(str(e)) from None
    workers = cfg.num_workers(args.data_parallel_size)
    rules = [
        (cfg.fault_tolerance, "--local-sgd-fault-tolerance is not supported inside Megatron-LM's training loop "
                              "yet (a worker that heals must take its iteration from a peer); use megatron_edit's "
                              "own entry"),
        (cfg.method == "a-edit", "--local-sgd a-edit is not supported inside Megatron-LM's training loop "
                                 "(it runs global collectives every step); use megatron_edit's own entry"),
        ((args.save is not None or args.load is not None) and getattr(args, "ckpt_format", "torch_dist") != "torch_dist",
         f"--ckpt-format {getattr(args, 'ckpt_format', None)} cannot hold the local-SGD state with --local-sgd; "
         "use --ckpt-format torch_dist"),
        (getattr(args, "fp16", False), "--fp16 is not supported with --local-sgd: use --bf16"),
        ("muon" in str(getattr(args, "optimizer", "")), f"--optimizer {args.optimizer} is not supported with "
                                                        "--local-sgd (Adam/AdamW or SGD)"),
        (getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False),
         "--local-sgd needs megatron-core's DDP, not FSDP"),
        (getattr(args, "check_weight_hash_across_dp_replicas_interval", None) is not None,
         "--check-weight-hash-across-dp-replicas-interval compares workers that legitimately differ between "
         "syncs; drop it with --local-sgd"),
        (getattr(args, "num_distributed_optimizer_instances", 1) not in (1, workers),
         f"--num-distributed-optimizer-instances {getattr(args, 'num_distributed_optimizer_instances', 1)} "
         f"conflicts with --local-sgd-workers {workers} (the workers are the instances); drop it"),
        (cfg.layerwise and not (args.use_distributed_optimizer and args.overlap_param_gather),
         "--local-sgd-layerwise needs --use-distributed-optimizer and --overlap-param-gather; or pass "
         "--no-local-sgd-layerwise"),
        # That option dispatches the parameter all-gathers inside optimizer.step(), before the engine marks
        # the layer-wise units pending, so an outer update would never be gathered.
        (cfg.layerwise and getattr(args, "overlap_param_gather_with_optimizer_step", False),
         "--overlap-param-gather-with-optimizer-step cannot be combined with --local-sgd-layerwise; pass "
         "--no-local-sgd-layerwise or drop it"),
    ]
    for broken, message in rules:
        if broken:
            raise FlagError(message)
    return cfg


# ------------------------------------------------------------------ the wrapped construction
@dataclass
class _Session:
    """What the wrappers share within one process (one run)."""

    cfg: Optional[LocalSGDConfig] = None
    args: Any = None
    topology: Any = None
    pgc: Any = None
    engine: Any = None

    def process_groups(self):
        """Worker topology and the worker-local ProcessGroupCollection, built once (a collective: every
        rank gets here at the same point, the first DDP construction)."""
        if self.pgc is None:
            from megatron_edit.topology import build_worker_topology, worker_process_groups

            self.topology = build_worker_topology(self.cfg.num_workers(self.args.data_parallel_size))
            self.pgc = worker_process_groups(self.topology)
        return self.pgc


_SESSION = _Session()


def wrap_validate_args(original: Callable, session: _Session, argv_fn: Callable = lambda: sys.argv[1:]):
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron-LM's signature
        megatron_lm_cpu.adjust_args(args)
        result = original(args, defaults)
        session.cfg = local_sgd_config_from_megatron_args(args, argv_fn())
        session.args = args
        if session.cfg is not None:
            args.num_distributed_optimizer_instances = session.cfg.num_workers(args.data_parallel_size)
            if args.use_distributed_optimizer:
                # Per-worker checkpoint keys (checkpoint/worker_keys.py) need the model-space optimizer
                # format; the dp_reshardable one is keyed by optimizer instance and bucket.
                args.dist_ckpt_optim_fully_reshardable = True
        return result

    validate_args.megatron_edit = True
    return validate_args


def wrap_parse_args(original: Callable):
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        args = original(chained_extra_args_provider(extra_args_provider), ignore_unknown_args)
        if getattr(args, "yaml_cfg", None) is not None and getattr(args, "local_sgd", None) is not None:
            # Megatron-LM's YAML path skips validate_args, where the workers are set up: the run would
            # silently train without local SGD.
            raise FlagError("--yaml-cfg cannot be combined with --local-sgd (Megatron-LM's YAML path skips the "
                            "argument validation that sets up the workers); pass the flags on the command line")
        return args

    parse_args.megatron_edit = True
    return parse_args


def worker_local_ddp_class(base: type, session: _Session) -> type:
    """Megatron-LM's DDP name, as a subclass (its ``isinstance(m, DDP)`` checks still hold) that hands
    megatron-core's DDP the worker's groups and one instance, so gradients reduce inside the worker."""

    class WorkerLocalDDP(base):
        # **kwargs: what newer trees pass on unchanged (core_v0.19: full_param_layout, computed by
        # Megatron-LM over the intra-instance group, i.e. the worker's shard count).
        def __init__(self, config, ddp_config, module, disable_bucketing=False, pg_collection=None, **kwargs):
            megatron_lm_cpu.adjust_model_config(config)
            if session.cfg is not None:
                ddp_config = copy.copy(ddp_config)
                ddp_config.num_distributed_optimizer_instances = 1  # instances are our workers (topology.py)
                pg_collection = session.process_groups()
                if getattr(session.cfg, "layerwise", False):
                    # Buckets of about one layer on every stage and chunk (mcore_adapter.ddp_arguments),
                    # unless --ddp-bucket-size says otherwise.
                    if getattr(session.args, "ddp_bucket_size", None) is None:
                        ddp_config.bucket_size = mcore_adapter.layer_bucket_size(module) or ddp_config.bucket_size
                    pg_collection, disable_bucketing, extra = mcore_adapter.ddp_arguments(
                        module, ddp_config, pg_collection, disable_bucketing, bucket_every_stage=True)
                    kwargs.update(extra)
            super().__init__(config=config, ddp_config=ddp_config, module=module,
                             disable_bucketing=disable_bucketing, pg_collection=pg_collection, **kwargs)
            mcore_adapter.restore_pipeline_group(self)
            self.megatron_edit_worker_local = session.cfg is not None

    WorkerLocalDDP.__name__ = WorkerLocalDDP.__qualname__ = f"WorkerLocal{base.__name__}"
    WorkerLocalDDP.megatron_edit = True
    return WorkerLocalDDP


def hook_optimizer_step(optimizer, engine, iteration_fn: Callable[[], int],
                        report_fn: Optional[Callable] = None,
                        final_iteration_fn: Optional[Callable[[], Optional[int]]] = None) -> None:
    """optimizer.step() -> engine.before_optimizer_step(i); step; engine.after_optimizer_step(i), where
    i = iteration_fn() is the iteration this step completes (Megatron-LM: args.curr_iteration + 1).
    ``final_iteration_fn`` tells an engine built without a known last iteration what it is, at its first
    step (Megatron-LM derives it from ``--train-samples`` only after the optimizer is built)."""
    original = optimizer.step

    def step(*args, **kwargs):
        if final_iteration_fn is not None and not engine.final_iteration:
            engine.final_iteration = final_iteration_fn() or 0
        iteration = iteration_fn()
        engine.before_optimizer_step(iteration)
        result = original(*args, **kwargs)
        report = engine.after_optimizer_step(iteration)
        if report is not None and report_fn is not None:
            report_fn(report)
        return result

    optimizer.step = step


def _print_sync_report(report) -> None:
    import torch.distributed as dist

    from megatron_edit.training.log_lines import sync_line

    if dist.get_rank() == dist.get_world_size() - 1:
        print(sync_line(**report.as_log_fields()), flush=True)


def wrap_get_megatron_optimizer(original: Callable, session: _Session, iteration_fn: Callable[[], int],
                                engine_factory: Optional[Callable] = None,
                                report_fn: Optional[Callable] = _print_sync_report,
                                attach_checkpointing: bool = True,
                                final_iteration_fn: Optional[Callable[[], Optional[int]]] = None):
    """The optimizer over the worker's groups (SPEC section 5 wiring), with the engine on its step and
    the local-SGD state in its checkpoint state (checkpoint/megatron_lm.py)."""
    signature = inspect.signature(original)

    def get_megatron_optimizer(*args, **kwargs):
        if session.cfg is None:
            optimizer = original(*args, **kwargs)
            megatron_lm_cpu.adjust_optimizer(optimizer)
            return optimizer
        bound = signature.bind(*args, **kwargs)
        chunks = bound.arguments["model_chunks"]
        if not all(getattr(chunk, "megatron_edit_worker_local", False) for chunk in chunks):
            # The model was wrapped by a DDP name the adapter did not replace: its gradients would be
            # reduced over all workers every step, and local SGD would silently be synchronous training.
            raise AdapterError(
                f"Megatron-LM wrapped the model in DDP outside the adapter's seam ({type(chunks[0]).__name__}): "
                f"local SGD would run synchronously on this tree (supported: {SUPPORTED_MEGATRON_LM_TEXT})")
        bound.arguments["pg_collection"] = session.process_groups()
        bound.arguments["use_gloo_process_groups"] = False  # the worker groups have no gloo twins
        optimizer = original(*bound.args, **bound.kwargs)
        for sub in mcore_adapter.sub_optimizers(optimizer):
            if hasattr(sub, "distributed_optimizer_instance_id"):
                sub.distributed_optimizer_instance_id = session.topology.worker_index
        session.engine = (engine_factory or _make_engine)(session, chunks, optimizer)
        hook_optimizer_step(optimizer, session.engine, iteration_fn, report_fn,
                            final_iteration_fn or _megatron_lm_train_iters)
        if attach_checkpointing:
            from megatron_edit.checkpoint import megatron_lm as checkpointing

            checkpointing.attach(optimizer, session.engine, session.topology.worker_index,
                                 session.topology.num_workers)
        return optimizer

    get_megatron_optimizer.megatron_edit = True
    return get_megatron_optimizer


def _make_engine(session: _Session, chunks, optimizer):
    from megatron.core.utils import get_model_config

    from megatron_edit.local_sgd import LocalSGD

    args = session.args
    return LocalSGD(session.cfg, session.topology, chunks, optimizer, get_model_config(chunks[0]),
                    seed=args.seed, global_batch_size=args.global_batch_size,
                    budget_samples=(args.train_iters or 0) * args.global_batch_size)


def _megatron_lm_train_iters() -> Optional[int]:
    """The run's last iteration. With ``--train-samples`` Megatron-LM sets ``args.train_iters`` in
    ``update_train_iters`` (constant batch: samples // global batch; a batch-size ramp-up counted step by
    step), called from ``get_optimizer_param_scheduler`` after ``get_megatron_optimizer``, so the engine
    learns it here, at its first step, for its final sync."""
    from megatron.training.global_vars import get_args

    return get_args().train_iters


def _megatron_lm_iteration() -> int:
    from megatron.training.global_vars import get_args

    return get_args().curr_iteration + 1


def installed() -> bool:
    training = sys.modules.get("megatron.training.training")
    return training is not None and getattr(training.get_megatron_optimizer, "megatron_edit", False)


def install() -> None:
    """Check this Megatron-LM, then replace the seam names (idempotent). Call before ``pretrain()`` (the
    launcher calls it before the script runs). Without CUDA, Megatron-LM is switched to CPU first."""
    import importlib

    megatron_lm_cpu.enable()
    for module in ("megatron.training.arguments", "megatron.training.initialize", "megatron.training.training",
                   "megatron.training.global_vars", "megatron.training.checkpointing"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise AdapterError(f"cannot import Megatron-LM's {module} ({e}): put a Megatron-LM checkout "
                               f"on PYTHONPATH ({SUPPORTED_MEGATRON_LM_TEXT})") from None
    try:
        importlib.import_module("megatron.training.models.dist_utils")  # core_v0.19 model builders
    except ImportError:
        pass
    from megatron.core import package_info

    if installed():
        return
    training = sys.modules["megatron.training.training"]
    args_module = sys.modules[_args_module_name()]
    check_megatron_lm(package_info.__version__, megatron_lm_tree_version(sys.modules["megatron.training"].__file__))
    args_module.parse_args = wrap_parse_args(args_module.parse_args)
    args_module.validate_args = wrap_validate_args(args_module.validate_args, _SESSION)
    training.initialize_megatron = megatron_lm_cpu.wrap_initialize_megatron(training.initialize_megatron)
    training.DDP = worker_local_ddp_class(training.DDP, _SESSION)
    dist_utils = sys.modules.get("megatron.training.models.dist_utils")
    if dist_utils is not None:
        dist_utils.DistributedDataParallel = worker_local_ddp_class(dist_utils.DistributedDataParallel, _SESSION)
    training.get_megatron_optimizer = wrap_get_megatron_optimizer(
        training.get_megatron_optimizer, _SESSION, _megatron_lm_iteration)
