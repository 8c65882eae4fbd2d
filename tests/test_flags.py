"""Command-line contract (SPEC section 3): every impossible combination fails in
``parse_and_validate`` -- before any process group exists -- with a one-line ``FlagError`` that names the
flag and the rule. Fast and in-process; one subprocess check of the real entry script.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_edit.arguments import FlagError, parse_and_validate

ROOT = Path(__file__).resolve().parents[1]
SP_MODEL = ROOT / "data" / "shakespeare_sp1024.model"

# A valid launch for world size 4 (TP1 PP1 -> DP 4): 4 layers, 4 heads, 2 x 4 x 2 = 16 global batch.
BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "10", "--lr", "1e-3",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]
DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def _without(argv, flag, nvalues=1):
    """argv with ``flag`` and its ``nvalues`` values removed."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nvalues:]


def _set(argv, flag, value):
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def fails(argv, world_size=4, *expected):
    """Assert parse_and_validate rejects argv with a single-line FlagError containing every ``expected``."""
    with pytest.raises(FlagError) as info:
        parse_and_validate(list(argv), world_size=world_size)
    msg = str(info.value)
    assert msg.strip(), "empty FlagError message"
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert "--" in msg or "world size" in msg, f"message names no flag: {msg!r}"
    for text in expected:
        assert text in msg, f"{text!r} not in {msg!r}"
    return msg


def ok(argv, world_size=4):
    return parse_and_validate(list(argv), world_size=world_size)


# ---------------------------------------------------------------------------------------------------
# The base launches are valid (otherwise every "fails" test below would pass for the wrong reason).

def test_base_is_valid_and_plain_training_has_no_local_sgd():
    args, cfg = ok(BASE)
    assert cfg is None
    assert args.data_parallel_size == 4
    assert args.max_position_embeddings == 32


@pytest.mark.parametrize("method", ["diloco", "edit", "a-edit", "streaming"])
def test_each_method_is_valid_with_distributed_optimizer(method):
    args, cfg = ok(BASE + DIST_OPT + ["--local-sgd", method, "--local-sgd-workers", "2"])
    assert cfg.method == method
    assert cfg.num_workers(args.data_parallel_size) == 2


# ---------------------------------------------------------------------------------------------------
# Megatron-side rules.

def test_world_size_not_divisible_by_tp_x_pp():
    fails(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
          "world size 6", "--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2")
    # The same flags are fine on 8 ranks (DP 2, 16 % (2 x 2) == 0).
    args, _ = ok(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 8)
    assert args.data_parallel_size == 2


def test_global_batch_not_divisible_by_micro_batch_x_dp():
    fails(_set(BASE, "--global-batch-size", "12"), 4, "--global-batch-size 12", "--micro-batch-size 2",
          "data-parallel size 4")
    # 12 is fine on 2 ranks (2 x 2 = 4 divides 12): the rule uses DP, not the world size.
    ok(_set(BASE, "--global-batch-size", "12"), 2)


def test_global_batch_must_be_positive():
    fails(_set(BASE, "--global-batch-size", "0"), 4, "--global-batch-size 0")
    fails(_set(BASE, "--global-batch-size", "-8"), 4, "--global-batch-size -8")


def test_global_batch_defaults_to_micro_batch_times_dp():
    args, _ = ok(_without(BASE, "--global-batch-size"), 4)
    assert args.global_batch_size == 2 * 4


def test_unknown_tokenizer_type():
    fails(_set(BASE, "--tokenizer-type", "GPT2BPETokenizer"), 4, "--tokenizer-type", "GPT2BPETokenizer")
    fails(_without(BASE, "--tokenizer-type"), 4, "--tokenizer-type")


def test_null_tokenizer_needs_vocab_size():
    fails(_without(BASE, "--vocab-size"), 4, "NullTokenizer", "--vocab-size")


def test_sentencepiece_needs_an_existing_model(tmp_path):
    sp = _without(_set(BASE, "--tokenizer-type", "SentencePieceTokenizer"), "--vocab-size")
    fails(sp, 4, "--tokenizer-model")
    missing = tmp_path / "nope.model"
    msg = fails(sp + ["--tokenizer-model", str(missing)], 4, "--tokenizer-model", "no such file")
    assert str(missing) in msg
    if SP_MODEL.is_file():
        args, _ = ok(sp + ["--tokenizer-model", str(SP_MODEL)])
        assert args.tokenizer_model == str(SP_MODEL)


def test_data_source_neither_or_both():
    fails(_without(BASE, "--mock-data", 0), 4, "--data-path", "--mock-data")
    fails(BASE + ["--data-path", "data/shakespeare_sp1024"], 4, "--mock-data", "--data-path", "mutually exclusive")


@pytest.mark.parametrize("split", ["1,2,3,4", "a,b,c", "-1,1,1", "0,0,0", "", "nan,1,1", "inf,1,1"])
def test_bad_split(split):
    fails(BASE + ["--split", split], 4, "--split")


@pytest.mark.parametrize("split", ["969,30,1", "98/2/0", "1"])
def test_good_split(split):
    ok(BASE + ["--split", split])


def test_heads_not_divisible_by_tp():
    argv = _set(BASE, "--num-attention-heads", "2")  # 64 % 2 == 0, but 2 heads on TP 4
    fails(argv + ["--tensor-model-parallel-size", "4", "--global-batch-size", "2"], 4,
          "--num-attention-heads 2", "--tensor-model-parallel-size 4")


def test_layers_not_divisible_by_pp():
    fails(_set(BASE, "--num-layers", "3") + ["--pipeline-model-parallel-size", "2"], 4,
          "--num-layers 3", "--pipeline-model-parallel-size 2")


def test_virtual_pipeline_rules():
    vpp = "--num-layers-per-virtual-pipeline-stage"
    pp2 = ["--pipeline-model-parallel-size", "2"]  # DP 2, 4 microbatches, 2 layers per stage
    ok(BASE + pp2 + [vpp, "1"])
    fails(BASE + [vpp, "1"], 4, vpp, "--pipeline-model-parallel-size >= 2")
    fails(_set(BASE, "--num-layers", "6") + pp2 + [vpp, "2"], 4, vpp, "does not divide")
    fails(BASE + pp2 + [vpp, "0"], 4, vpp, ">= 1")  # was a ZeroDivisionError
    # 6 microbatches per step is not a multiple of PP 4 (1 rank of DP, global 12 / micro 2).
    fails(_set(_set(BASE, "--num-layers", "8"), "--global-batch-size", "12")
          + ["--pipeline-model-parallel-size", "4", vpp, "1"], 4, "microbatches", "--pipeline-model-parallel-size 4")


def test_overlap_param_gather_needs_distributed_optimizer():
    fails(BASE + ["--overlap-param-gather"], 4, "--overlap-param-gather", "--use-distributed-optimizer")
    fails(BASE + ["--use-distributed-optimizer", "--overlap-param-gather"], 4,
          "--overlap-param-gather needs --overlap-grad-reduce")


def test_sgd_with_distributed_optimizer():
    fails(BASE + ["--optimizer", "sgd", "--use-distributed-optimizer"], 4, "--optimizer sgd",
          "--use-distributed-optimizer")
    ok(BASE + ["--optimizer", "sgd"])


def test_fp16_is_refused():
    fails(BASE + ["--fp16"], 4, "--fp16", "--bf16")


def test_min_lr_above_lr():
    fails(BASE + ["--min-lr", "1e-2"], 4, "--min-lr", "--lr")
    ok(BASE + ["--min-lr", "1e-4"])


def test_argparse_errors_are_one_line_flag_errors():
    fails(BASE + ["--no-such-flag"], 4, "--no-such-flag")
    fails(_without(BASE, "--num-layers"), 4, "--num-layers")
    fails(BASE + ["--local-sgd", "fedavg"], 4, "--local-sgd", "fedavg")


# ---------------------------------------------------------------------------------------------------
# Local-SGD rules.

LSGD = BASE + DIST_OPT


def test_workers_must_divide_data_parallel_size():
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", "3"], 4,
          "--local-sgd-workers 3 does not divide the data-parallel size 4")
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", "8"], 4, "--local-sgd-workers 8")
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", "0"], 4, "--local-sgd-workers 0")
    for w in ("1", "2", "4"):
        ok(LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", w])


def test_workers_default_to_data_parallel_size():
    args, cfg = ok(LSGD + ["--local-sgd", "diloco"], 8)
    assert cfg.workers is None and cfg.num_workers(args.data_parallel_size) == 8


def test_sync_interval_zero():
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-sync-interval", "0"], 4, "--local-sgd-sync-interval 0")


@pytest.mark.parametrize("flag,value", [("--pseudo-grad-clip", "5"), ("--pseudo-grad-anomaly-threshold", "2"),
                                        ("--pseudo-grad-weighting", "norm"), ("--pseudo-grad-peer-ratio", "4")])
@pytest.mark.parametrize("method", ["diloco", "streaming"])
def test_penalty_flags_need_edit(method, flag, value):
    fails(LSGD + ["--local-sgd", method, flag, value], 4, flag, f"--local-sgd {method}", "edit")
    ok(LSGD + ["--local-sgd", "edit", flag, value])
    ok(LSGD + ["--local-sgd", "a-edit", flag, value])


@pytest.mark.parametrize("flag,value", [("--streaming-fragments", "2"), ("--streaming-pattern", "sequential"),
                                        ("--streaming-overlap-steps", "2"), ("--streaming-mix-alpha", "0")])
@pytest.mark.parametrize("method", ["diloco", "edit", "a-edit"])
def test_streaming_flags_need_streaming(method, flag, value):
    fails(LSGD + ["--local-sgd", method, flag, value], 4, flag, "streaming")
    ok(LSGD + ["--local-sgd", "streaming", flag, value])


@pytest.mark.parametrize("method", ["diloco", "edit", "streaming"])
def test_sync_time_needs_a_edit(method):
    fails(LSGD + ["--local-sgd", method, "--local-sgd-sync-time", "60"], 4, "--local-sgd-sync-time", "a-edit")
    _, cfg = ok(LSGD + ["--local-sgd", "a-edit", "--local-sgd-sync-time", "60"])
    assert cfg.sync_time == 60.0


@pytest.mark.parametrize("extra", [
    ["--local-sgd-workers", "2"], ["--local-sgd-sync-interval", "4"], ["--outer-lr", "0.7"],
    ["--outer-momentum", "0.9"], ["--pseudo-grad-clip", "1"], ["--outer-grad-dtype", "bf16"],
    ["--streaming-fragments", "2"], ["--local-sgd-layerwise"], ["--no-local-sgd-layerwise"],
    ["--local-sgd-offload-outer-state"], ["--local-sgd-debug-slow-worker", "0:2"],
    ["--outer-optimizer=sgd"],
])
def test_our_flags_need_local_sgd(extra):
    msg = fails(LSGD + extra, 4, "needs --local-sgd")
    assert msg.startswith(extra[0].split("=")[0] + " "), msg  # names the flag as typed


def test_stochastic_rounding_needs_a_quantized_wire():
    fails(LSGD + ["--local-sgd", "diloco", "--outer-grad-stochastic-rounding"], 4,
          "--outer-grad-stochastic-rounding", "--outer-grad-dtype", "fp32")
    _, cfg = ok(LSGD + ["--local-sgd", "diloco", "--outer-grad-dtype", "int8", "--outer-grad-stochastic-rounding"])
    assert cfg.outer_grad_stochastic_rounding is True
    _, cfg = ok(LSGD + ["--local-sgd", "streaming", "--outer-grad-stochastic-rounding"])  # fp4 by default
    assert cfg.outer_grad_stochastic_rounding is True
    fails(LSGD + ["--outer-grad-stochastic-rounding"], 4, "--outer-grad-stochastic-rounding needs --local-sgd")


def test_outer_grad_reduction_picks_the_quantized_algorithm():
    _, cfg = ok(LSGD + ["--local-sgd", "streaming"])
    assert cfg.outer_grad_reduction == "reduce-scatter"
    _, cfg = ok(LSGD + ["--local-sgd", "streaming", "--outer-grad-reduction", "all-gather"])
    assert cfg.outer_grad_reduction == "all-gather"
    _, cfg = ok(LSGD + ["--local-sgd", "edit", "--outer-grad-dtype", "int4", "--outer-grad-reduction", "all-gather"])
    assert cfg.outer_grad_reduction == "all-gather"
    fails(LSGD + ["--local-sgd", "diloco", "--outer-grad-reduction", "all-gather"], 4,
          "--outer-grad-reduction all-gather needs a quantized --outer-grad-dtype")
    fails(LSGD + ["--local-sgd", "streaming", "--outer-grad-reduction", "ring"], 4, "--outer-grad-reduction", "ring")
    fails(LSGD + ["--outer-grad-reduction", "all-gather"], 4, "--outer-grad-reduction needs --local-sgd")


@pytest.mark.parametrize("flag_name", ["--pseudo-grad-peer-ratio", "--pseudo-grad-loss-ratio"])
@pytest.mark.parametrize("value", ["1", "0.5", "-2", "nan", "inf"])
def test_peer_and_loss_ratio_above_one_or_zero(flag_name, value):
    fails(LSGD + ["--local-sgd", "edit", flag_name, value], 4, flag_name, "> 1 (0 disables)")


def test_loss_ratio_defaults_and_needs_a_penalty():
    _, cfg = ok(LSGD + ["--local-sgd", "a-edit"])
    assert cfg.loss_ratio == 1.1
    _, cfg = ok(LSGD + ["--local-sgd", "edit", "--pseudo-grad-loss-ratio", "0"])
    assert cfg.loss_ratio == 0.0
    _, cfg = ok(LSGD + ["--local-sgd", "streaming"])
    assert cfg.loss_ratio == 0.0
    fails(LSGD + ["--local-sgd", "diloco", "--pseudo-grad-loss-ratio", "1.2"], 4, "--pseudo-grad-loss-ratio",
          "--local-sgd edit or a-edit")


def test_inner_state_repair_defaults_and_needs_a_penalty():
    assert ok(LSGD + ["--local-sgd", "edit"])[1].repair_inner_state is True
    assert ok(LSGD + ["--local-sgd", "a-edit"])[1].repair_inner_state is True
    assert ok(LSGD + ["--local-sgd", "edit", "--no-pseudo-grad-repair-inner-state"])[1].repair_inner_state is False
    assert ok(LSGD + ["--local-sgd", "diloco"])[1].repair_inner_state is False
    for method, flag_name in [("diloco", "--pseudo-grad-repair-inner-state"),
                              ("streaming", "--no-pseudo-grad-repair-inner-state")]:
        fails(LSGD + ["--local-sgd", method, flag_name], 4, flag_name, "--local-sgd edit or a-edit")


def test_moment_ratio_defaults_and_needs_a_penalty():
    assert ok(LSGD + ["--local-sgd", "edit"])[1].moment_ratio == 4.0
    assert ok(LSGD + ["--local-sgd", "a-edit", "--pseudo-grad-moment-ratio", "8"])[1].moment_ratio == 8.0
    assert ok(LSGD + ["--local-sgd", "edit", "--pseudo-grad-moment-ratio", "0"])[1].moment_ratio == 0.0
    assert ok(LSGD + ["--local-sgd", "streaming"])[1].moment_ratio == 0.0
    fails(LSGD + ["--local-sgd", "diloco", "--pseudo-grad-moment-ratio", "4"], 4, "--pseudo-grad-moment-ratio",
          "--local-sgd edit or a-edit")
    for bad in ("1", "0.5", "-2", "nan", "inf"):
        fails(LSGD + ["--local-sgd", "edit", "--pseudo-grad-moment-ratio", bad], 4, "--pseudo-grad-moment-ratio",
              "must be > 1 (0 disables)")


def test_final_sync_defaults_on_and_a_edit_refuses_it():
    for method in ("diloco", "edit", "streaming"):
        assert ok(LSGD + ["--local-sgd", method])[1].final_sync is True
        assert ok(LSGD + ["--local-sgd", method, "--no-local-sgd-final-sync"])[1].final_sync is False
    for flag_name in ("--local-sgd-final-sync", "--no-local-sgd-final-sync"):
        fails(LSGD + ["--local-sgd", "a-edit", flag_name], 4, flag_name, "always ends at a sync")
    fails(BASE + ["--no-local-sgd-final-sync"], 4, "--no-local-sgd-final-sync", "needs --local-sgd")


def test_peer_ratio_reaches_the_penalty():
    _, cfg = ok(LSGD + ["--local-sgd", "edit"])
    assert cfg.peer_ratio == 4.0
    _, cfg = ok(LSGD + ["--local-sgd", "a-edit", "--pseudo-grad-peer-ratio", "6"])
    assert cfg.peer_ratio == 6.0
    _, cfg = ok(LSGD + ["--local-sgd", "edit", "--pseudo-grad-peer-ratio", "0"])
    assert cfg.peer_ratio == 0.0
    _, cfg = ok(LSGD + ["--local-sgd", "diloco"])
    assert cfg.peer_ratio == 0.0


def test_sync_check_interval_is_for_a_edit_and_positive():
    fails(LSGD + ["--local-sgd", "edit", "--local-sgd-sync-check-interval", "4"], 4,
          "--local-sgd-sync-check-interval", "a-edit")
    fails(LSGD + ["--local-sgd", "a-edit", "--local-sgd-sync-check-interval", "0"], 4,
          "--local-sgd-sync-check-interval 0", ">= 1")
    _, cfg = ok(LSGD + ["--local-sgd", "a-edit", "--local-sgd-sync-check-interval", "4"])
    assert cfg.sync_check_interval == 4
    _, cfg = ok(LSGD + ["--local-sgd", "a-edit"])
    assert cfg.sync_check_interval is None  # derived from the step time


def test_outer_momentum_one_and_out_of_range():
    fails(LSGD + ["--local-sgd", "diloco", "--outer-momentum", "1.0"], 4, "--outer-momentum 1.0", "[0, 1)")
    fails(LSGD + ["--local-sgd", "diloco", "--outer-momentum", "-0.1"], 4, "--outer-momentum")
    fails(LSGD + ["--local-sgd", "diloco", "--outer-lr", "0"], 4, "--outer-lr")


def test_nan_anomaly_threshold_is_refused():
    fails(LSGD + ["--local-sgd", "edit", "--pseudo-grad-anomaly-threshold", "nan"], 4,
          "--pseudo-grad-anomaly-threshold")
    fails(LSGD + ["--local-sgd", "edit", "--pseudo-grad-anomaly-threshold", "-1"], 4,
          "--pseudo-grad-anomaly-threshold")


@pytest.mark.parametrize("method", ["edit", "a-edit"])
def test_layerwise_needs_distributed_optimizer_and_overlap_param_gather(method):
    for dist in ([], ["--use-distributed-optimizer"], ["--use-distributed-optimizer", "--overlap-grad-reduce"]):
        msg = fails(BASE + dist + ["--local-sgd", method], 4, "--local-sgd-layerwise")
        assert "--use-distributed-optimizer" in msg and "--overlap-param-gather" in msg
    _, cfg = ok(BASE + ["--local-sgd", method, "--no-local-sgd-layerwise"])
    assert cfg.layerwise is False
    _, cfg = ok(BASE + DIST_OPT + ["--local-sgd", method])
    assert cfg.layerwise is True


def test_layerwise_only_for_edit():
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-layerwise"], 4, "--local-sgd-layerwise", "diloco")
    _, cfg = ok(LSGD + ["--local-sgd", "diloco", "--no-local-sgd-layerwise"])
    assert cfg.layerwise is False


def test_debug_worker_index_out_of_range():
    w2 = LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", "2"]
    fails(w2 + ["--local-sgd-debug-slow-worker", "2:3"], 4, "--local-sgd-debug-slow-worker", "worker 2", "[0, 2)")
    fails(w2 + ["--local-sgd-debug-slow-worker=-1:3"], 4, "--local-sgd-debug-slow-worker")
    fails(w2 + ["--local-sgd-debug-corrupt-worker", "5:10:0.5"], 4, "--local-sgd-debug-corrupt-worker", "worker 5")
    _, cfg = ok(w2 + ["--local-sgd-debug-slow-worker", "1:3"])
    assert cfg.debug_slow_worker == (1, 3.0)
    _, cfg = ok(w2 + ["--local-sgd-debug-corrupt-worker", "0:10:0.5"])
    assert cfg.debug_corrupt_worker == (0, 10.0, 0.5)


@pytest.mark.parametrize("value", ["3", "a:2", "1:2:3", "1:x", ":"])
def test_malformed_worker_factor(value):
    fails(LSGD + ["--local-sgd", "diloco", "--local-sgd-debug-slow-worker", value], 4,
          "--local-sgd-debug-slow-worker")


def test_debug_slow_factor_below_one_and_corrupt_prob():
    w2 = LSGD + ["--local-sgd", "diloco", "--local-sgd-workers", "2"]
    fails(w2 + ["--local-sgd-debug-slow-worker", "0:0.5"], 4, "--local-sgd-debug-slow-worker", "factor")
    fails(w2 + ["--local-sgd-debug-corrupt-worker", "0:1:2"], 4, "--local-sgd-debug-corrupt-worker", "PROB")
    fails(w2 + ["--local-sgd-debug-corrupt-worker", "0:1"], 4, "--local-sgd-debug-corrupt-worker")


def test_streaming_overlap_and_fragments():
    s = LSGD + ["--local-sgd", "streaming", "--local-sgd-sync-interval", "4"]
    fails(s + ["--streaming-overlap-steps", "4"], 4, "--streaming-overlap-steps 4", "--local-sgd-sync-interval 4")
    fails(s + ["--streaming-fragments", "5"], 4, "--streaming-fragments 5", "--num-layers 4")
    fails(s + ["--streaming-mix-alpha", "1.5"], 4, "--streaming-mix-alpha")
    _, cfg = ok(s + ["--streaming-overlap-steps", "3", "--streaming-fragments", "4"])
    assert (cfg.streaming_overlap_steps, cfg.streaming_fragments) == (3, 4)


# ---------------------------------------------------------------------------------------------------
# Method-dependent defaults.

@pytest.mark.parametrize("method", ["edit", "a-edit"])
def test_edit_defaults(method):
    _, cfg = ok(LSGD + ["--local-sgd", method])
    assert cfg.pseudo_grad_clip == 10.0
    assert cfg.anomaly_threshold == 3.0
    assert (cfg.weighting, cfg.peer_ratio, cfg.loss_ratio) == ("uniform", 4.0, 1.1)  # paper: norm, 0, 0
    assert cfg.layerwise is True
    assert cfg.outer_grad_dtype == "fp32"
    assert (cfg.outer_lr, cfg.outer_momentum, cfg.sync_interval) == (0.8, 0.85, 128)
    assert cfg.outer_optimizer == "nesterov"


def test_diloco_defaults():
    _, cfg = ok(LSGD + ["--local-sgd", "diloco"])
    assert cfg.pseudo_grad_clip is None
    assert cfg.anomaly_threshold == 0.0
    assert cfg.weighting == "uniform"
    assert cfg.layerwise is False
    assert cfg.outer_grad_dtype == "fp32"
    assert cfg.sync_time == 600.0 and cfg.warmup_iters == 0


def test_streaming_defaults():
    _, cfg = ok(LSGD + ["--local-sgd", "streaming"])
    assert cfg.outer_grad_dtype == "fp4-e3m0"
    assert cfg.layerwise is False and cfg.weighting == "uniform" and cfg.pseudo_grad_clip is None
    assert (cfg.streaming_pattern, cfg.streaming_overlap_steps, cfg.streaming_mix_alpha) == ("strided", 1, 0.5)
    _, cfg = ok(LSGD + ["--local-sgd", "streaming", "--outer-grad-dtype", "fp32"])
    assert cfg.outer_grad_dtype == "fp32"


def test_explicit_values_override_method_defaults():
    _, cfg = ok(LSGD + ["--local-sgd", "edit", "--pseudo-grad-clip", "2.5", "--pseudo-grad-anomaly-threshold", "0",
                        "--pseudo-grad-weighting", "uniform", "--no-local-sgd-layerwise"])
    assert (cfg.pseudo_grad_clip, cfg.anomaly_threshold, cfg.weighting, cfg.layerwise) == (2.5, 0.0, "uniform", False)


# ---------------------------------------------------------------------------------------------------
# The real entry script: exit code 2, exactly one stderr line, before any process group.

def test_entry_script_bad_flags_exit_2_with_one_line():
    env = dict(os.environ, WORLD_SIZE="4")
    env.pop("MASTER_ADDR", None)  # a process group could not be built anyway: the failure must come first
    argv = [sys.executable, str(ROOT / "examples" / "pretrain_gpt.py")] + LSGD + [
        "--local-sgd", "edit", "--local-sgd-workers", "3"]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "--local-sgd-workers 3 does not divide the data-parallel size 4" in lines[0]
    assert proc.stdout == ""
    assert elapsed < 60


def test_checkpoint_flags_are_checked_before_start(tmp_path):
    from megatron_edit.arguments import FlagError, parse_and_validate

    base = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "2",
            "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-3"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--load", str(tmp_path / "missing")], "^--load .*missing: no such directory"),
        (["--save", str(a_file)], "^--save .*file: exists and is not a directory"),
        (["--save-interval", "5"], "^--save-interval needs --save"),
        (["--save", str(tmp_path), "--save-interval", "0"], "^--save-interval 0 must be >= 1"),
        (["--ckpt-format", "torch"], "--ckpt-format"),
    ]
    for extra, pattern in cases:
        with pytest.raises(FlagError, match=pattern):
            parse_and_validate(base + extra, world_size=1)
    args, _ = parse_and_validate(base + ["--save", str(tmp_path), "--load", str(tmp_path)], world_size=1)
    assert args.save == args.load == str(tmp_path) and args.ckpt_format == "torch_dist"


# ------------------------------------------------------------------ elastic workers (torchft)
FT = ["--local-sgd-fault-tolerance", "--torchft-lighthouse", "localhost:29510", "--local-sgd-workers", "2",
      "--replica-group-id", "1"]


@pytest.mark.parametrize("method", ["diloco", "edit", "streaming"])
def test_fault_tolerance_defaults_switch_off_what_torchft_cannot_carry(method):
    _, cfg = ok(BASE + ["--local-sgd", method] + FT, 2)  # 2 ranks per worker; W does not divide them
    assert cfg.fault_tolerance and cfg.replica_group_id == 1 and cfg.workers == 2
    assert not cfg.layerwise and cfg.outer_grad_dtype == "fp32" and cfg.streaming_overlap_steps == 0


@pytest.mark.parametrize("extra,expected", [
    (["--local-sgd", "a-edit"], "a-edit"),
    (["--local-sgd", "edit", "--local-sgd-layerwise"], "--local-sgd-layerwise"),
    (["--local-sgd", "streaming", "--streaming-overlap-steps", "1"], "--streaming-overlap-steps"),
    (["--local-sgd", "streaming", "--outer-grad-dtype", "fp4-e3m0"], "--outer-grad-dtype"),
    (["--local-sgd", "diloco", "--local-sgd-warmup-iters", "4"], "--local-sgd-warmup-iters"),
    (["--local-sgd", "diloco", "--local-sgd-offload-outer-state"], "--local-sgd-offload-outer-state"),
    (["--local-sgd", "diloco", "--torchft-min-replicas", "3"], "--torchft-min-replicas"),
    (["--local-sgd", "diloco", "--torchft-timeout", "0"], "--torchft-timeout"),
    (["--local-sgd", "diloco", "--replica-group-id", "2"], "--replica-group-id"),
])
def test_fault_tolerance_refuses_what_it_cannot_do(extra, expected):
    fails(BASE + FT + extra, 2, expected)


def test_fault_tolerance_needs_its_lighthouse_workers_and_index(monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    fails(BASE + ["--local-sgd", "diloco"] + _without(FT, "--torchft-lighthouse"), 2, "--torchft-lighthouse")
    fails(BASE + ["--local-sgd", "diloco"] + _without(FT, "--local-sgd-workers"), 2, "--local-sgd-workers")
    fails(BASE + ["--local-sgd", "diloco"] + _without(FT, "--replica-group-id"), 2, "--replica-group-id")
    fails(BASE + ["--local-sgd", "diloco", "--torchft-lighthouse", "h:1"], 4, "--local-sgd-fault-tolerance")
    # the environment torchft's launchers set
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "localhost:1234")
    monkeypatch.setenv("REPLICA_GROUP_ID", "0")
    _, cfg = ok(BASE + ["--local-sgd", "diloco", "--local-sgd-fault-tolerance", "--local-sgd-workers", "2"], 2)
    assert cfg.torchft_lighthouse == "localhost:1234" and cfg.replica_group_id == 0


def test_fault_tolerance_global_batch_covers_every_worker():
    # 16 = 2 (micro) x 2 (this job's DP) x 4 workers; 3 workers do not divide it
    fails(BASE + ["--local-sgd", "diloco"] + _set(FT, "--local-sgd-workers", "3"), 2, "--global-batch-size")
