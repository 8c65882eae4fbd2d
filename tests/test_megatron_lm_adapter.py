"""The Megatron-LM adapter and launcher (issue 7).

Without Megatron-LM: its modules are small fakes in sys.modules, so the adapter's own logic (flag
registration and chaining, the wrapped construction, the step hook order, version refusals, the launcher)
is tested here. With ``MEGATRON_LM_PATH`` pointing at a Megatron-LM checkout (``MEGATRON_LM_PYTHON``: an
interpreter that can import its megatron.training, default this one), the real seam is checked too.
"""
import argparse
import inspect
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from megatron_edit import launch, megatron_lm_adapter as adapter
from megatron_edit.arguments import FlagError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(REPO, "patches", "megatron_lm_pretrain_gpt.patch")


# ------------------------------------------------------------------ fake Megatron-LM
def _megatron_lm_args(**over):
    """The Megatron-LM namespace fields our rules read, as its validate_args leaves them (DP = 4): our
    flags' defaults (from our own parser) plus Megatron-LM's."""
    from megatron_edit.arguments import add_local_sgd_args

    ns = add_local_sgd_args(argparse.ArgumentParser()).parse_args([])
    for k, v in dict(
        data_parallel_size=4, num_layers=4, load=None, save=None, ckpt_format="torch_dist", fp16=False, bf16=True,
        optimizer="adam", fp8=None, fp8_param_gather=False, use_distributed_optimizer=True,
        overlap_param_gather=True, use_torch_fsdp2=False, use_megatron_fsdp=False,
        check_weight_hash_across_dp_replicas_interval=None, num_distributed_optimizer_instances=1, seed=1234,
        global_batch_size=16, train_iters=10,
    ).items():
        setattr(ns, k, v)
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


@pytest.fixture(params=["core_v0.16", "core_v0.19"])
def fake_megatron_lm(request, monkeypatch, tmp_path):
    """megatron.training.{arguments,initialize,training,global_vars} with the signatures of a core_v0.16.1
    tree (arguments parsed inside initialize_megatron) or a core_v0.19 tree (``parse_and_validate_args``
    in arguments), in a tree whose megatron/core/package_info.py says 0.16.1 / 0.19.1. The CPU switch of
    install() is kept off: it would switch on the CPU layer for the rest of this test process."""
    from megatron.core import package_info

    from megatron_edit import megatron_lm_cpu

    flavour = request.param
    tree, core = ("0.16.1", "0.16.1") if flavour == "core_v0.16" else ("0.19.1", "0.19.2")
    root = tmp_path / "megatron"
    (root / "training").mkdir(parents=True)
    (root / "core").mkdir()
    major, minor, patch = tree.split(".")
    (root / "core" / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")
    pkg = types.ModuleType("megatron.training")
    pkg.__file__ = str(root / "training" / "__init__.py")
    pkg.__path__ = [str(root / "training")]
    arguments, initialize, training, global_vars, checkpointing = (
        types.ModuleType(f"megatron.training.{n}") for n in
        ("arguments", "initialize", "training", "global_vars", "checkpointing"))
    checkpointing.get_load_checkpoint_path_by_args = lambda args, load_arg="load": None
    state = SimpleNamespace(argv=[], validated=[], args=SimpleNamespace(curr_iteration=0))

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        parser.add_argument("--num-layers", type=int, default=4)
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_args(state.argv)

    def validate_args(args, defaults={}):
        state.validated.append(args)
        for k, v in vars(_megatron_lm_args()).items():
            if not hasattr(args, k):
                setattr(args, k, v)
        return args

    class DDP:
        def __init__(self, config, ddp_config, module, disable_bucketing=False, pg_collection=None):
            self.ddp_config, self.pg_collection = ddp_config, pg_collection

    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                               pg_collection=None, dump_param_to_param_group_map=None):
        return SimpleNamespace(step=lambda: (True, 1.0, 0))

    def initialize_megatron(extra_args_provider=None, args_defaults={}, ignore_unknown_args=False,
                            allow_no_cuda=False):
        state.initialized.append(allow_no_cuda)

    state.initialized = []
    arguments.parse_args = initialize.parse_args = parse_args
    arguments.validate_args = initialize.validate_args = validate_args
    modules = []
    if flavour == "core_v0.19":  # core_v0.19 parses in arguments.parse_and_validate_args
        arguments.parse_and_validate_args = lambda *a, **k: None
        del initialize.parse_args, initialize.validate_args
        # ... and pretrain_gpt.py's model builder wraps the chunks with this name, not training.DDP.
        dist_utils = types.ModuleType("megatron.training.models.dist_utils")
        dist_utils.DistributedDataParallel = DDP
        modules = [("megatron.training.models", types.ModuleType("megatron.training.models")),
                   ("megatron.training.models.dist_utils", dist_utils)]
    training.DDP, training.get_megatron_optimizer = DDP, get_megatron_optimizer
    training.initialize_megatron = initialize_megatron
    global_vars.get_args = lambda: state.args
    for name, module in (("megatron.training", pkg), ("megatron.training.arguments", arguments),
                         ("megatron.training.initialize", initialize), ("megatron.training.training", training),
                         ("megatron.training.global_vars", global_vars),
                         ("megatron.training.checkpointing", checkpointing), *modules):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(package_info, "__version__", core)
    monkeypatch.setattr(adapter, "_SESSION", adapter._Session())
    monkeypatch.setattr(megatron_lm_cpu, "enable", lambda: False)
    args_module = arguments if flavour == "core_v0.19" else initialize
    return SimpleNamespace(root=root, initialize=initialize, training=training, state=state, DDP=DDP,
                           get_megatron_optimizer=get_megatron_optimizer, args_module=args_module,
                           flavour=flavour, tree=tree)


# ------------------------------------------------------------------ flags
def test_chained_provider_keeps_the_users_flags_and_adds_ours_once():
    def user(parser):
        parser.add_argument("--my-flag", type=int)
        return parser

    provider = adapter.chained_extra_args_provider(user)
    # Ours again on top (a script that already chains our provider, then the wrapped parse_args): no conflict.
    parser = adapter.chained_extra_args_provider(None)(provider(argparse.ArgumentParser()))
    args = parser.parse_args(["--my-flag", "3", "--local-sgd", "edit", "--local-sgd-workers", "2"])
    assert (args.my_flag, args.local_sgd, args.local_sgd_workers) == (3, "edit", 2)
    assert adapter.chained_extra_args_provider(None)(argparse.ArgumentParser()).parse_args([]).local_sgd is None


def test_yaml_config_with_local_sgd_is_refused(fake_megatron_lm):
    f = fake_megatron_lm
    adapter.install()
    f.state.argv = ["--local-sgd", "edit"]
    args = f.args_module.parse_args(lambda p: (p.add_argument("--yaml-cfg"), p)[1], False)
    assert args.local_sgd == "edit"  # no YAML: fine
    f.state.argv = ["--yaml-cfg", "run.yaml", "--local-sgd", "edit"]
    with pytest.raises(FlagError, match="^--yaml-cfg cannot be combined with --local-sgd"):
        f.args_module.parse_args(lambda p: (p.add_argument("--yaml-cfg"), p)[1], False)


def test_install_registers_flags_through_parse_args_and_wraps_the_seam(fake_megatron_lm):
    f = fake_megatron_lm
    adapter.install()
    assert adapter.installed()
    assert issubclass(f.training.DDP, f.DDP) and f.training.DDP is not f.DDP
    wrapped = (f.args_module.parse_args, f.args_module.validate_args, f.training.DDP, f.training.get_megatron_optimizer,
               f.training.initialize_megatron)
    adapter.install()  # idempotent: nothing wrapped twice
    assert wrapped == (f.args_module.parse_args, f.args_module.validate_args, f.training.DDP,
                       f.training.get_megatron_optimizer, f.training.initialize_megatron)
    f.training.initialize_megatron(allow_no_cuda=False)
    assert f.state.initialized == [False]  # with CUDA (or CPU mode off) Megatron-LM's own choice stands
    if f.flavour == "core_v0.19":  # both DDP names are the worker-local subclass
        dist_utils = sys.modules["megatron.training.models.dist_utils"]
        assert issubclass(dist_utils.DistributedDataParallel, f.DDP) and dist_utils.DistributedDataParallel is not f.DDP
    f.state.argv = ["--num-layers", "4", "--local-sgd", "diloco", "--local-sgd-workers", "2"]
    args = f.args_module.parse_args(None, False)
    assert (args.local_sgd, args.local_sgd_workers) == ("diloco", 2)
    f.args_module.validate_args(args, {})
    assert args.num_distributed_optimizer_instances == 2
    assert adapter._SESSION.cfg.method == "diloco" and adapter._SESSION.cfg.num_workers(4) == 2


@pytest.mark.parametrize("tree,core,expected", [
    ("0.17.1", "0.17.1", "this Megatron-LM checkout is megatron-core 0.17.1 and the imported megatron.core is 0.17.1"),
    ("0.18.2", "0.18.2", "this Megatron-LM checkout is megatron-core 0.18.2"),
    ("0.16.0", "0.16.0", "this Megatron-LM checkout is megatron-core 0.16.0"),
    ("0.19.0rc1", "0.19.2", "this Megatron-LM checkout is megatron-core 0.19.0rc1"),
    ("0.20.0", "0.20.0", "this Megatron-LM checkout is megatron-core 0.20.0"),
    ("0.16.1", "0.19.2", "but the imported megatron.core is 0.19.2"),
    ("0.19.1", "0.16.1", "but the imported megatron.core is 0.16.1"),
    (None, "0.15.3", "megatron.core 0.15.3 is not supported"),
    (None, "0.18.2", "megatron.core 0.18.2 is not supported"),
])
def test_unsupported_versions_are_refused_in_one_line(fake_megatron_lm, tree, core, expected):
    with pytest.raises(adapter.AdapterError) as e:
        adapter.check_megatron_lm(core, tree)
    message = str(e.value)
    assert expected in message and "\n" not in message
    assert "core_v0.16.1" in message and "core_v0.19.x" in message  # the supported combinations


@pytest.mark.parametrize("tree,core", [("0.16.1", "0.16.1"), ("0.16.1", "0.16.2"), ("0.19.1", "0.19.2"),
                                       ("0.19.0", "0.19.0"), (None, "0.19.2")])
def test_supported_trees_pass(fake_megatron_lm, tree, core):
    adapter.check_megatron_lm(core, tree)


def test_tree_version_is_read_from_the_checkout(fake_megatron_lm, tmp_path):
    tree = fake_megatron_lm.tree
    assert adapter.megatron_lm_tree_version(str(fake_megatron_lm.root / "training" / "__init__.py")) == tree
    (fake_megatron_lm.root / "core" / "package_info.py").write_text(
        f"MAJOR = 0\nMINOR = {tree.split('.')[1]}\nPATCH = 0\nPRE_RELEASE = 'rc0'\n")
    with pytest.raises(adapter.AdapterError, match=f"checkout is megatron-core 0.{tree.split('.')[1]}.0rc0"):
        adapter.install()
    assert not adapter.installed()  # refused before anything was replaced
    assert adapter.megatron_lm_tree_version(str(tmp_path / "elsewhere" / "training" / "__init__.py")) is None


def test_a_changed_seam_is_refused_before_anything_is_replaced(fake_megatron_lm):
    f = fake_megatron_lm

    def get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=True):  # no pg_collection
        return None

    f.training.get_megatron_optimizer = get_megatron_optimizer
    with pytest.raises(adapter.AdapterError, match="get_megatron_optimizer has no parameter 'pg_collection'"):
        adapter.install()
    f.training.get_megatron_optimizer = f.get_megatron_optimizer
    del f.training.DDP
    with pytest.raises(adapter.AdapterError, match="Megatron-LM has no megatron.training.training.DDP"):
        adapter.install()
    assert not getattr(f.args_module.parse_args, "megatron_edit", False)  # nothing replaced
    del f.training.initialize_megatron
    f.training.DDP = f.DDP
    with pytest.raises(adapter.AdapterError, match="no megatron.training.training.initialize_megatron"):
        adapter.install()


# ------------------------------------------------------------------ our rules on Megatron-LM's namespace
def _validate(argv, **over):
    session = adapter._Session()
    args = _megatron_lm_args(**over)
    validate = adapter.wrap_validate_args(lambda a, d: a, session, argv_fn=lambda: argv)
    validate(args, {})
    return session, args


def test_validate_sets_the_instances_and_builds_the_config():
    session, args = _validate(["--local-sgd", "edit", "--local-sgd-workers", "2"], local_sgd="edit",
                              local_sgd_workers=2)
    assert args.num_distributed_optimizer_instances == 2
    assert session.cfg.method == "edit" and session.cfg.layerwise and session.cfg.pseudo_grad_clip == 10.0
    session, args = _validate([])
    assert session.cfg is None and args.num_distributed_optimizer_instances == 1


@pytest.mark.parametrize("over,argv,message", [
    (dict(local_sgd="a-edit"), ["--local-sgd", "a-edit"], "--local-sgd a-edit is not supported"),
    (dict(local_sgd="diloco", save="/ckpt", ckpt_format="torch"), ["--local-sgd", "diloco"],
     "--ckpt-format torch cannot hold the local-SGD state"),
    (dict(local_sgd="diloco", local_sgd_workers=3), ["--local-sgd", "diloco", "--local-sgd-workers", "3"],
     "--local-sgd-workers 3 does not divide the data-parallel size 4"),
    (dict(local_sgd="edit", overlap_param_gather=False), ["--local-sgd", "edit"],
     "--local-sgd-layerwise needs --use-distributed-optimizer and --overlap-param-gather"),
    (dict(local_sgd="edit", overlap_param_gather_with_optimizer_step=True), ["--local-sgd", "edit"],
     "--overlap-param-gather-with-optimizer-step cannot be combined with --local-sgd-layerwise"),
    (dict(local_sgd="diloco", check_weight_hash_across_dp_replicas_interval=10), ["--local-sgd", "diloco"],
     "--check-weight-hash-across-dp-replicas-interval"),
    (dict(local_sgd="diloco", local_sgd_workers=2, num_distributed_optimizer_instances=4),
     ["--local-sgd", "diloco", "--local-sgd-workers", "2"], "--num-distributed-optimizer-instances 4 conflicts"),
    (dict(local_sgd="diloco", optimizer="dist_muon"), ["--local-sgd", "diloco"], "--optimizer dist_muon"),
    (dict(outer_lr=0.5), ["--outer-lr", "0.5"], "--outer-lr needs --local-sgd"),
    (dict(fp8="hybrid"), [], "--fp8-format hybrid needs Transformer Engine"),
])
def test_invalid_combinations_fail_with_one_line(over, argv, message):
    from megatron_edit.fp8 import transformer_engine_available

    if "fp8" in over and transformer_engine_available():
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(FlagError) as e:
        _validate(argv, **over)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ the wrapped construction
class _Recorder:
    def __init__(self):
        self.events = []
        self.final_iteration = 0  # not known when built (--train-samples)

    def before_optimizer_step(self, iteration):
        self.events.append(("before", iteration))

    def after_optimizer_step(self, iteration):
        self.events.append(("after", iteration))
        return f"report{iteration}" if iteration % 2 == 0 else None


def test_hooked_step_calls_the_engine_around_the_inner_step_in_order():
    engine, reports = _Recorder(), []
    optimizer = SimpleNamespace()
    optimizer.step = lambda: engine.events.append(("step", None)) or (True, 0.5, 0)
    iterations = iter([7, 8])
    adapter.hook_optimizer_step(optimizer, engine, lambda: next(iterations), reports.append)
    assert optimizer.step() == (True, 0.5, 0)
    assert optimizer.step() == (True, 0.5, 0)
    assert engine.events == [("before", 7), ("step", None), ("after", 7), ("before", 8), ("step", None),
                             ("after", 8)]
    assert reports == ["report8"]
    assert engine.final_iteration == 0  # nobody told it


def test_hooked_step_tells_the_engine_its_last_iteration_once_known():
    """--train-samples: Megatron-LM sets args.train_iters after building the optimizer; the engine
    learns it at its first step, and an engine that knows it already is left alone."""
    engine, known = _Recorder(), iter([None, 12, 99])
    optimizer = SimpleNamespace(step=lambda: None)
    adapter.hook_optimizer_step(optimizer, engine, lambda: 1, final_iteration_fn=lambda: next(known))
    optimizer.step()
    assert engine.final_iteration == 0
    optimizer.step()
    assert engine.final_iteration == 12
    optimizer.step()
    assert engine.final_iteration == 12


def test_optimizer_gets_the_worker_groups_instance_id_and_the_engine(fake_megatron_lm):
    seen = {}

    def original(config, model_chunks, config_overrides=None, use_gloo_process_groups=True, pg_collection=None,
                 dump_param_to_param_group_map=None):
        seen.update(pg_collection=pg_collection, gloo=use_gloo_process_groups, overrides=config_overrides)
        subs = [SimpleNamespace(distributed_optimizer_instance_id=0), SimpleNamespace()]
        return SimpleNamespace(chained_optimizers=subs, step=lambda: (True, 1.0, 0))

    engine = _Recorder()
    session = adapter._Session(cfg=SimpleNamespace(), pgc="worker-pgc", topology=SimpleNamespace(worker_index=1))
    made = []
    wrapped = adapter.wrap_get_megatron_optimizer(
        original, session, iteration_fn=lambda: 3,
        engine_factory=lambda s, chunks, opt: made.append((chunks, opt)) or engine, report_fn=None,
        attach_checkpointing=False, final_iteration_fn=lambda: 9)
    chunk = SimpleNamespace(megatron_edit_worker_local=True)  # built by WorkerLocalDDP
    optimizer = wrapped("opt-config", [chunk], config_overrides="ov", use_gloo_process_groups=True)
    assert seen == dict(pg_collection="worker-pgc", gloo=False, overrides="ov")
    assert optimizer.chained_optimizers[0].distributed_optimizer_instance_id == 1
    assert made == [([chunk], optimizer)] and session.engine is engine
    optimizer.step()
    assert engine.events == [("before", 3), ("after", 3)] and engine.final_iteration == 9

    # A model wrapped by a DDP the adapter did not replace reduces gradients over all workers: local SGD
    # would silently be synchronous (seen on core_v0.19 before its model-builder seam was wrapped).
    with pytest.raises(adapter.AdapterError, match="outside the adapter's seam"):
        wrapped("opt-config", [SimpleNamespace()])

    seen.clear()
    plain = adapter.wrap_get_megatron_optimizer(original, adapter._Session(), iteration_fn=lambda: 0)
    plain("opt-config", ["chunk0"])
    assert seen["pg_collection"] is None and seen["gloo"] is True  # without --local-sgd: untouched


def test_ddp_gets_worker_groups_and_one_instance(fake_megatron_lm):
    base = fake_megatron_lm.DDP
    session = adapter._Session(cfg=SimpleNamespace(), pgc="worker-pgc")
    cls = adapter.worker_local_ddp_class(base, session)
    params = list(inspect.signature(cls).parameters)
    assert params[:-1] == list(inspect.signature(base).parameters) and params[-1] == "kwargs"
    ddp_config = SimpleNamespace(num_distributed_optimizer_instances=2, bucket_size=10)
    ddp = cls(config="cfg", ddp_config=ddp_config, module="m", disable_bucketing=True)
    assert isinstance(ddp, base) and ddp.pg_collection == "worker-pgc"
    assert ddp.ddp_config.num_distributed_optimizer_instances == 1 and ddp.ddp_config.bucket_size == 10
    assert ddp_config.num_distributed_optimizer_instances == 2  # Megatron-LM's own config is not mutated
    plain = adapter.worker_local_ddp_class(base, adapter._Session())(config="cfg", ddp_config=ddp_config, module="m")
    assert plain.pg_collection is None and plain.ddp_config is ddp_config


def test_ddp_passes_what_newer_trees_add_through():
    """core_v0.19's wrap_model_chunks_with_ddp passes full_param_layout= (a TypeError before)."""

    class DDP019:
        def __init__(self, config, ddp_config, module, disable_bucketing=False, pg_collection=None,
                     full_param_layout=None):
            self.full_param_layout, self.pg_collection = full_param_layout, pg_collection

    session = adapter._Session(cfg=SimpleNamespace(), pgc="worker-pgc")
    ddp = adapter.worker_local_ddp_class(DDP019, session)(
        config="cfg", ddp_config=SimpleNamespace(num_distributed_optimizer_instances=2), module="m",
        full_param_layout="layout")
    assert (ddp.full_param_layout, ddp.pg_collection) == ("layout", "worker-pgc")


# ------------------------------------------------------------------ CPU mode (megatron_lm_cpu)
def test_cpu_mode_sets_cpu_flags_allows_no_cuda_and_unbatched_p2p(monkeypatch, capsys):
    from megatron_edit import megatron_lm_cpu

    def initialize_megatron(extra_args_provider=None, args_defaults={}, ignore_unknown_args=False,
                            allow_no_cuda=False, store=None):
        return allow_no_cuda

    wrapped = megatron_lm_cpu.wrap_initialize_megatron(initialize_megatron)
    args = SimpleNamespace(rank=0, distributed_backend="nccl", transformer_impl="transformer_engine",
                           no_persist_layer_norm=False, gradient_accumulation_fusion=True,
                           masked_softmax_fusion=True, bias_gelu_fusion=True, bias_swiglu_fusion=True,
                           bias_dropout_fusion=True, apply_rope_fusion=True, cross_entropy_loss_fusion=False)
    config = SimpleNamespace(batch_p2p_comm=True)
    monkeypatch.setattr(megatron_lm_cpu, "_ENABLED", False)  # with CUDA: nothing changes
    megatron_lm_cpu.adjust_args(args)
    megatron_lm_cpu.adjust_model_config(config)
    assert wrapped(None, {}, False, False) is False and args.distributed_backend == "nccl"
    assert config.batch_p2p_comm is True

    monkeypatch.setattr(megatron_lm_cpu, "_ENABLED", True)
    megatron_lm_cpu.adjust_args(args)
    megatron_lm_cpu.adjust_model_config(config)
    assert wrapped(None, {}, False, False) is True and wrapped(store="s") is True  # positional or not
    assert {k: getattr(args, k) for k in megatron_lm_cpu.CPU_ARGS} == megatron_lm_cpu.CPU_ARGS
    assert config.batch_p2p_comm is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distributed_backend" in err and "cross_entropy_loss_fusion" not in err


# ------------------------------------------------------------------ the launcher
def test_launcher_installs_then_runs_the_script_as_main(monkeypatch, tmp_path):
    out = tmp_path / "seen.txt"
    script = tmp_path / "scripts" / "pretrain_x.py"
    script.parent.mkdir()
    script.write_text("import sys\nfrom megatron_edit import megatron_lm_adapter as a\n"
                      f"open({str(out)!r}, 'w').write(repr((__name__, sys.argv, sys.path[0], a.calls)))\n")
    monkeypatch.setattr(adapter, "calls", [], raising=False)
    monkeypatch.setattr(adapter, "install", lambda: adapter.calls.append("install"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert launch.main([str(script), "--num-layers", "2", "--local-sgd", "edit"]) == 0
    name, argv, path0, calls = eval(out.read_text())
    assert name == "__main__" and argv == [str(script), "--num-layers", "2", "--local-sgd", "edit"]
    assert path0 == str(script.parent) and calls == ["install"]


def test_launcher_reports_refusals_in_one_line(monkeypatch, tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('must not run')\n")

    def refuse():
        raise adapter.AdapterError("this Megatron-LM checkout is megatron-core 0.17.0")

    monkeypatch.setattr(adapter, "install", refuse)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert launch.main([str(script)]) == 2
    assert capsys.readouterr().err == "megatron_edit.launch: this Megatron-LM checkout is megatron-core 0.17.0\n"
    assert launch.main([str(tmp_path / "missing.py")]) == 2
    assert launch.main([]) == 2


# ------------------------------------------------------------------ a real Megatron-LM checkout
# (training runs inside it: tests/test_megatron_lm_training.py)
MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
needs_megatron_lm = pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM_PATH is not set")
GPT_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "10", "--lr", "1e-3",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--bf16",
             "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def _run_with_megatron_lm(code: str):
    from megatron_lm_harness import MLM_PYTHON, _environment

    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        env = dict(_environment(scratch), WORLD_SIZE="4")
        return subprocess.run([MLM_PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                              cwd=REPO)


_PARSE = (
    "import sys\n"
    "from megatron_edit import megatron_lm_adapter as a\n"
    "a.install()\n"
    "import importlib, megatron.core, megatron.training.training as T\n"
    "A = importlib.import_module(a._args_module_name())\n"
    "sys.argv = ['pretrain_gpt.py'] + {flags!r}\n"
    "args = A.parse_args(None, False)\n"
)


@needs_megatron_lm
def test_real_megatron_lm_parses_and_validates_our_flags():
    code = _PARSE.format(flags=GPT_FLAGS + ["--local-sgd", "edit", "--local-sgd-workers", "2"]) + (
        "A.validate_args(args, {})\n"
        "import os\n"
        "print('RESULT', a.installed(), T.DDP.__name__,\n"
        "      megatron.core.__file__.startswith(os.path.realpath(os.environ['MEGATRON_LM_PATH'])),\n"
        "      a._SESSION.cfg.method, args.num_distributed_optimizer_instances, args.data_parallel_size,\n"
        "      args.dist_ckpt_optim_fully_reshardable)\n"
    )
    done = _run_with_megatron_lm(code)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    assert lines[0].split()[1:] == ["True", "WorkerLocalDistributedDataParallel", "True", "edit", "2", "4", "True"]


@needs_megatron_lm
def test_real_megatron_lm_refuses_a_bad_combination_in_one_line():
    code = _PARSE.format(flags=GPT_FLAGS + ["--local-sgd", "diloco", "--local-sgd-workers", "3"]) + (
        "try:\n    A.validate_args(args, {})\nexcept Exception as e:\n    print('ERROR', type(e).__name__, e)\n"
    )
    done = _run_with_megatron_lm(code)
    assert "ERROR FlagError --local-sgd-workers 3 does not divide the data-parallel size 4" in done.stdout, \
        done.stderr[-3000:]


@needs_megatron_lm
def test_patch_applies_to_megatron_lms_pretrain_gpt(tmp_path):
    """One patch for core_v0.16.1 and core_v0.19.x: install() before the arguments are parsed."""
    import shutil

    shutil.copy(os.path.join(MEGATRON_LM, "pretrain_gpt.py"), tmp_path / "pretrain_gpt.py")
    # Outside a git work tree, git apply patches the files named in the diff relative to cwd.
    done = subprocess.run(["git", "apply", PATCH], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    patched = (tmp_path / "pretrain_gpt.py").read_text()
    assert "install_local_sgd()" in patched
    first_use = min(patched.index(m) for m in ("    pretrain(\n", "parse_and_validate_args(\n") if m in patched)
    assert patched.index("install_local_sgd()") < first_use
