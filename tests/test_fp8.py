"""FP8 with local SGD (SPEC 2.6), without a GPU: a stand-in for TE's FP8 tensor class.

What can be checked here: the flag rules; that the fp32 main shards (never FP8 weights) are what local SGD
reads; and that the outer write-back requantizes FP8 params per DDP bucket, in bucket order, with the same
param lists on every rank of the shard group -- and with exactly the params, main shards and offsets that
megatron-core's own inner step (``DistributedOptimizer._get_fp8_params_and_shard_fp32_from_fp8``) uses.
"""
from types import SimpleNamespace

import pytest
import torch

from megatron_edit import fp8, mcore_adapter
from megatron_edit.arguments import FlagError, parse_and_validate


class StandInFloat8(torch.nn.Parameter):
    """Marks a param as FP8 for the patched ``is_float8tensor`` (TE's class needs CUDA)."""


def _is_fp8(t) -> bool:
    return isinstance(t, StandInFloat8)


@pytest.fixture
def fp8_calls(monkeypatch):
    """Patch megatron-core's FP8 hooks: the predicate, and quantize_param_shard recording its calls."""
    from megatron.core import fp8_utils
    from megatron.core.optimizer import distrib_optimizer

    calls = []

    def quantize_param_shard(params, mains, offsets, group, fsdp_shard_model_params=None):
        calls.append((list(params), list(mains), list(offsets), group))

    monkeypatch.setattr(fp8_utils, "is_float8tensor", _is_fp8)
    monkeypatch.setattr(distrib_optimizer, "is_float8tensor", _is_fp8)
    monkeypatch.setattr(fp8_utils, "quantize_param_shard", quantize_param_shard)
    return calls


# ------------------------------------------------------------------ flags
def test_fp8_flag_rules():
    assert fp8.fp8_flag_error(None, False, False) is None
    assert fp8.fp8_flag_error("hybrid", True, True, te_available=True) is None
    assert fp8.fp8_flag_error(None, True, True) == "--fp8-param-gather needs --fp8-format"
    missing = fp8.fp8_flag_error("e4m3", False, True, te_available=False)
    assert "--fp8-format e4m3" in missing and "Transformer Engine" in missing and "\n" not in missing
    assert "--use-distributed-optimizer" in fp8.fp8_flag_error("hybrid", True, False, te_available=True)


@pytest.mark.skipif(fp8.transformer_engine_available(), reason="Transformer Engine is installed")
@pytest.mark.parametrize("fmt", fp8.FP8_FORMATS)
def test_fp8_without_transformer_engine_fails_with_one_line(fmt):
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--train-iters", "2", "--lr", "0.1", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--bf16", "--fp8-format", fmt]
    with pytest.raises(FlagError) as e:
        parse_and_validate(argv, world_size=1)
    assert str(e.value).startswith(f"--fp8-format {fmt} needs Transformer Engine")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ a distributed optimizer, two ranks
def _params():
    """Bucket 0: a (FP8, 8), b (bf16, 8). Bucket 1: c (FP8, 8), d (FP8, 4). Same objects on both 'ranks'
    would be wrong (each rank has its own), so build them per rank with the same values."""
    torch.manual_seed(0)
    a = StandInFloat8(torch.randn(8).bfloat16())
    b = torch.nn.Parameter(torch.randn(8).bfloat16())
    c = StandInFloat8(torch.randn(2, 4).bfloat16())
    d = StandInFloat8(torch.randn(4).bfloat16())
    return dict(a=a, b=b, c=c, d=d)


# The shard group of 2 ranks splits the 28 elements of the two buckets: rank 0 owns a and c[0:4], rank 1
# owns b, c[4:8] and d (ranges inside each param).
SHARDS = {0: {"a": (0, 8), "c": (0, 4)}, 1: {"b": (0, 8), "c": (4, 8), "d": (0, 4)}}


class FakeDistributedOptimizer:
    """The attributes megatron-core's DistributedOptimizer methods read (0.16.1 to 0.19.2), with the real
    ``_get_fp8_params_and_shard_fp32_from_fp8`` bound to it."""

    def __init__(self, rank: int):
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

        self.p = _params()
        self.names = {id(v): k for k, v in self.p.items()}
        self.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
        buckets = [SimpleNamespace(params_list=[self.p["a"], self.p["b"]]),
                   SimpleNamespace(params_list=[self.p["c"], self.p["d"]])]
        self.buffers = [SimpleNamespace(params=[self.p[n] for n in "abcd"], buckets=buckets)]
        self.data_parallel_group = f"shard-group-of-rank{rank}"
        self._ranges = {id(self.p[n]): Range(*r) for n, r in SHARDS[rank].items()}
        self.model_float16_groups = [[self.p[n] for n in SHARDS[rank]]]
        self.shard_fp32_from_float16_groups = [
            [self.p[n].detach().float().view(-1)[r[0]:r[1]].clone() for n, r in SHARDS[rank].items()]]
        self.model_fp32_groups, self.shard_fp32_groups = [[]], [[]]
        self._get_fp8_params_and_shard_fp32_from_fp8 = (
            DistributedOptimizer._get_fp8_params_and_shard_fp32_from_fp8.__get__(self))
        # 0.18 / 0.19: the real method selects by the class's own predicate (a classmethod, as in megatron).
        for name in ("_is_fp8_param_for_param_gather", "_is_distopt_quantized_param"):
            if hasattr(DistributedOptimizer, name):
                setattr(self, name, getattr(DistributedOptimizer, name))

    def _get_model_param_range_map(self, param):
        return {"param": self._ranges[id(param)]}

    def main(self, name):
        for p, m in zip(self.model_float16_groups[0], self.shard_fp32_from_float16_groups[0]):
            if p is self.p[name]:
                return m
        return None


def _unit(opt, params):
    shards = [SimpleNamespace(model_param=p, main=m, model_view=v) for p, m, v in mcore_adapter.main_param_pairs(opt)]
    return SimpleNamespace(shards=shards, bucket_group=SimpleNamespace(params=set(params)), keys=set())


def _named(opt, calls):
    return [([opt.names[id(p)] for p in params], offsets, group) for params, _, offsets, group in calls]


def test_local_sgd_reads_the_fp32_main_shards_not_fp8_weights(fp8_calls):
    opt = FakeDistributedOptimizer(rank=1)
    pairs = mcore_adapter.main_param_pairs(opt)
    assert [opt.names[id(p)] for p, _, _ in pairs] == ["b", "c", "d"]
    for model_param, main, _ in pairs:
        # The very tensors the optimizer steps (identity, not a copy) and fp32, also for FP8 params.
        assert any(main is m for m in opt.shard_fp32_from_float16_groups[0])
        assert main.dtype == torch.float32 and not _is_fp8(main)
    # The inner step's FP8 selection names the same fp32 tensors as sources for rank 1's FP8 params.
    params, mains, offsets = opt._get_fp8_params_and_shard_fp32_from_fp8()
    assert [opt.names[id(p)] for p in params] == ["a", "c", "d"]
    assert mains[0] is None and mains[1] is opt.main("c") and mains[2] is opt.main("d")
    assert offsets == [None, 4, 0]


def test_write_back_requantizes_per_bucket_in_the_same_order_on_every_rank(fp8_calls):
    per_rank = {}
    for rank in (0, 1):
        opt = FakeDistributedOptimizer(rank)
        unit = _unit(opt, opt.p.values())
        for s in unit.shards:  # the outer update wrote new fp32 values
            s.main.fill_(float(rank + 1))
        fp8_calls.clear()
        fp8.write_back_model_params(unit, [], opt, num_layers=0)
        per_rank[rank] = (opt, list(fp8_calls))
        # A bf16 param is copied from its main shard and never goes through quantize_param_shard.
        if rank == 1:
            assert torch.equal(opt.p["b"].detach().float(), torch.full((8,), 2.0))
        else:
            assert not torch.equal(opt.p["b"].detach().float(), torch.full((8,), 1.0))
        # FP8 params are not written by a plain copy (the stand-in quantize records but writes nothing).
        assert not torch.equal(opt.p["d"].detach().float(), torch.full((4,), 2.0))

    named = {r: _named(opt, calls) for r, (opt, calls) in per_rank.items()}
    # One call per bucket holding FP8 params, bucket order, every FP8 param of the bucket on every rank.
    assert [n for n, _, _ in named[0]] == [["a"], ["c", "d"]]
    assert [n for n, _, _ in named[0]] == [n for n, _, _ in named[1]]
    assert named[0][1][1] == [0, None] and named[1][1][1] == [4, 0]
    assert all(g == "shard-group-of-rank0" for _, _, g in named[0])
    opt1, calls1 = per_rank[1]
    assert calls1[0][1] == [None] and calls1[1][1][0] is opt1.main("c") and calls1[1][1][1] is opt1.main("d")

    # Together the calls cover exactly what megatron-core's inner step passes to quantize_param_shard.
    for opt, calls in per_rank.values():
        params, mains, offsets = opt._get_fp8_params_and_shard_fp32_from_fp8()
        flat = [(p, m, o) for ps, ms, os_, _ in calls for p, m, o in zip(ps, ms, os_)]
        assert [f[0] for f in flat] == params
        assert all(f[1] is m for f, m in zip(flat, mains)) and [f[2] for f in flat] == offsets


def test_write_back_of_one_bucket_group_touches_only_its_buckets(fp8_calls):
    opt = FakeDistributedOptimizer(rank=0)
    fp8.write_back_model_params(_unit(opt, [opt.p["c"], opt.p["d"]]), [], opt, num_layers=0)
    assert [n for n, _, _ in _named(opt, fp8_calls)] == [["c", "d"]]


def test_selection_follows_the_optimizers_own_fp8_predicate(fp8_calls, monkeypatch):
    """Since 0.19 the distributed optimizer picks the params it requantizes with
    ``_is_fp8_param_for_param_gather`` (e.g. not grouped NVFP4 tensors, which are FP8-typed storage but
    take another path); before, with ``is_float8tensor``. A param that the predicate leaves out (here d)
    is left out of the outer write-back's requantize too, whatever ``is_float8tensor`` says."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opt = FakeDistributedOptimizer(rank=1)
    d = opt.p["d"]
    if hasattr(DistributedOptimizer, "_is_fp8_param_for_param_gather"):
        original = DistributedOptimizer._is_fp8_param_for_param_gather
        monkeypatch.setattr(DistributedOptimizer, "_is_fp8_param_for_param_gather",
                            classmethod(lambda cls, t: t is not d and original(t)))
        opt._is_fp8_param_for_param_gather = DistributedOptimizer._is_fp8_param_for_param_gather
    else:
        from megatron.core import fp8_utils
        from megatron.core.optimizer import distrib_optimizer

        monkeypatch.setattr(fp8_utils, "is_float8tensor", lambda t: t is not d and _is_fp8(t))
        monkeypatch.setattr(distrib_optimizer, "is_float8tensor", lambda t: t is not d and _is_fp8(t))
    assert _is_fp8(d)
    fp8.write_back_model_params(_unit(opt, opt.p.values()), [], opt, num_layers=0)
    assert [n for n, _, _ in _named(opt, fp8_calls)] == [["a"], ["c"]]
    params, _, _ = opt._get_fp8_params_and_shard_fp32_from_fp8()
    assert [p for ps, _, _, _ in fp8_calls for p in ps] == params  # what the inner step requantizes


def test_without_fp8_params_write_back_is_a_plain_copy(monkeypatch):
    from megatron.core import fp8_utils

    monkeypatch.setattr(fp8_utils, "quantize_param_shard", lambda *a, **k: pytest.fail("no FP8 params"))
    opt = FakeDistributedOptimizer(rank=1)
    unit = _unit(opt, opt.p.values())
    for s in unit.shards:
        s.main.fill_(3.0)
    fp8.write_back_model_params(unit, [], opt, num_layers=0)
    assert torch.equal(opt.p["d"].detach().float(), torch.full((4,), 3.0))  # not FP8 here: copied
    assert torch.equal(opt.p["c"].detach().float().view(-1)[4:], torch.full((4,), 3.0))
