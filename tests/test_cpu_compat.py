"""The CPU / gloo compatibility layer (SPEC section 6): off means untouched, the megatron-core version gate
refuses before patching anything, and when on, the CUDA-isms megatron-core uses behave on CPU (device
redirection, ``.cuda()``, ``Tensor.type()``, streams, RNG seeding and the RNG tracker); ``deactivate()``
restores every original. All in-process, with ``deactivate()`` in ``finally``.
"""
import logging

import megatron.core.package_info as package_info
import pytest
import torch

from megatron_edit import cpu_compat, mcore_adapter

rng_mod = mcore_adapter.rng_module()  # megatron.core.tensor_parallel.random (no process group needed)

# Everything the layer may patch, by owner; the tests compare identities against these snapshots.
CUDA_NAMES = ("current_device", "device_count", "set_device", "Stream", "Event", "stream", "current_stream",
              "default_stream", "set_stream", "synchronize", "empty_cache", "memory_allocated",
              "max_memory_allocated", "memory_reserved", "reset_peak_memory_stats", "nvtx", "manual_seed",
              "manual_seed_all", "get_rng_state", "set_rng_state")
RNG_NAMES = ("_get_cuda_rng_state", "_set_cuda_rng_state")


def _snapshot() -> dict:
    return {
        "cuda": dict(vars(torch.cuda)),
        "rng": dict(vars(rng_mod)),
        "tensor_cuda": torch.Tensor.cuda,
        "tensor_type": torch.Tensor.type,
        "mode_stack": torch._C._len_torch_function_stack(),
        "rng_filters": list(logging.getLogger(rng_mod.__name__).filters),
    }


def _assert_untouched(before: dict) -> None:
    after = _snapshot()
    for name in CUDA_NAMES:
        assert getattr(torch.cuda, name) is before["cuda"][name], f"torch.cuda.{name} was not restored"
    for name in RNG_NAMES:
        assert getattr(rng_mod, name) is before["rng"][name], f"{rng_mod.__name__}.{name} was not restored"
    # Nothing else changed either (and nothing was added, e.g. left behind as None).
    changed = [k for k in set(before["cuda"]) | set(after["cuda"])
               if before["cuda"].get(k, KeyError) is not after["cuda"].get(k, KeyError)]
    assert not changed, f"torch.cuda attributes changed: {sorted(changed)}"
    changed = [k for k in set(before["rng"]) | set(after["rng"])
               if before["rng"].get(k, KeyError) is not after["rng"].get(k, KeyError)]
    assert not changed, f"{rng_mod.__name__} attributes changed: {sorted(changed)}"
    assert torch.Tensor.cuda is before["tensor_cuda"] and torch.Tensor.type is before["tensor_type"]
    assert after["mode_stack"] == before["mode_stack"], "a TorchFunctionMode was left on the stack"
    assert after["rng_filters"] == before["rng_filters"]


@pytest.fixture(autouse=True)
def _layer_off():
    """Every test starts and ends with the layer off (even when an assertion fails mid-test)."""
    cpu_compat.deactivate()
    yield
    cpu_compat.deactivate()


@pytest.fixture()
def active():
    before = _snapshot()
    assert cpu_compat.activate(True) is True
    try:
        yield before
    finally:
        cpu_compat.deactivate()
    _assert_untouched(before)


# ---------------------------------------------------------------------------------------------------
# (a) off means untouched.

def test_activate_false_touches_nothing():
    before = _snapshot()
    assert cpu_compat.activate(False) is False
    assert cpu_compat.is_active() is False
    _assert_untouched(before)
    # Spot checks by identity against the module-level originals.
    assert torch.cuda.current_device is before["cuda"]["current_device"]
    assert torch.cuda.Stream is before["cuda"]["Stream"]
    assert torch.cuda.manual_seed is before["cuda"]["manual_seed"]
    assert cpu_compat.transformer_config_overrides() == {}


def test_activate_auto_is_off_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _snapshot()
    assert cpu_compat.activate(None) is False
    assert cpu_compat.is_active() is False
    _assert_untouched(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto mode activates only without CUDA")
def test_activate_auto_is_on_without_cuda():
    before = _snapshot()
    try:
        assert cpu_compat.activate(None) is True
        assert cpu_compat.is_active() is True
        assert cpu_compat.transformer_config_overrides() == {"batch_p2p_comm": False}
    finally:
        cpu_compat.deactivate()
    _assert_untouched(before)
    assert cpu_compat.is_active() is False


# ---------------------------------------------------------------------------------------------------
# (b), (c) version gate.

@pytest.mark.parametrize("version", ["0.15.0", "0.16.0", "0.16.1rc1", "0.20.0", "0.20.0rc1", "1.0.0"])
def test_unsupported_megatron_core_versions_are_refused(version):
    with pytest.raises(RuntimeError) as info:
        mcore_adapter.check_megatron_core_version(version)
    msg = str(info.value)
    assert mcore_adapter.SUPPORTED_MCORE_TEXT in msg  # the supported range
    assert f"found {version}" in msg  # the version found
    assert "\n" not in msg


@pytest.mark.parametrize("version", ["0.16.1", "0.16.2", "0.16.10", "0.17.1", "0.18.2", "0.19.0", "0.19.2"])
def test_supported_megatron_core_versions_pass(version):
    mcore_adapter.check_megatron_core_version(version)


def test_installed_megatron_core_is_supported():
    assert mcore_adapter.megatron_core_version() == package_info.__version__
    mcore_adapter.check_megatron_core_version()


@pytest.mark.parametrize("version", ["0.15.0", "0.20.0"])
def test_activate_with_unsupported_version_refuses_before_patching(monkeypatch, version):
    monkeypatch.setattr(package_info, "__version__", version)
    before = _snapshot()
    with pytest.raises(RuntimeError, match=version):
        cpu_compat.activate(True)
    assert cpu_compat.is_active() is False
    _assert_untouched(before)
    # Still off: CUDA placement is not redirected.
    assert torch.ones(2).type() == "torch.FloatTensor"


# ---------------------------------------------------------------------------------------------------
# (d) behaviour when active.

def test_cuda_placement_is_redirected_to_cpu(active):
    assert cpu_compat.is_active() is True
    z = torch.zeros(2, device="cuda")
    assert z.device.type == "cpu" and z.tolist() == [0.0, 0.0]
    assert torch.empty(3, device="cuda:0").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda")).device.type == "cpu"
    assert torch.cuda.current_device() == 0
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(2)
    y = x.cuda()
    assert y.device.type == "cpu" and torch.equal(y, x)
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda", dtype=torch.float64).dtype == torch.float64
    assert x.new_zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2, dtype=torch.int64).type() == "torch.cuda.LongTensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64  # conversion still works
    # CPU-only ops keep working under the mode.
    assert (torch.arange(4) * 2).sum().item() == 12


def test_cuda_manual_seed_seeds_the_cpu_generator(active):
    torch.manual_seed(123)
    torch.rand(7)  # move the generator so a no-op manual_seed would give different numbers
    torch.cuda.manual_seed(5)
    a = torch.rand(6)
    torch.manual_seed(5)
    b = torch.rand(6)
    assert torch.equal(a, b)
    torch.cuda.manual_seed(6)
    assert not torch.equal(torch.rand(6), b)


def test_manual_seed_all_does_not_recurse(active):
    torch.cuda.manual_seed_all(5)  # must return, not recurse into torch.manual_seed
    torch.manual_seed(9)  # torch.manual_seed calls torch.cuda.manual_seed_all
    a = torch.rand(3)
    torch.manual_seed(9)
    assert torch.equal(a, torch.rand(3))


def test_stream_context_is_reentrant(active):
    s = torch.cuda.Stream()
    ctx = torch.cuda.stream(s)
    with ctx:
        with ctx:
            t = torch.ones(2, device="cuda") + 1
    with torch.cuda.stream(torch.cuda.Stream()):
        with torch.cuda.stream(torch.cuda.Stream()):
            pass
    assert t.tolist() == [2.0, 2.0]
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().wait_stream(s)
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    assert end.elapsed_time(ev) <= 0.0 <= ev.elapsed_time(end)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == 0
    with torch.cuda.nvtx.range("x"):
        with torch.cuda.nvtx.range("y"):
            pass


def test_megatron_rng_state_round_trips_the_cpu_generator(active):
    torch.manual_seed(11)
    state = rng_mod._get_cuda_rng_state()
    assert torch.equal(state, torch.default_generator.get_state())
    a = torch.rand(5)
    assert not torch.equal(rng_mod._get_cuda_rng_state(), state)  # the generator moved
    rng_mod._set_cuda_rng_state(state)
    assert torch.equal(torch.default_generator.get_state(), state)
    assert torch.equal(torch.rand(5), a)
    # torch.cuda.get/set_rng_state are the same generator.
    s2 = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(s2)
    assert torch.equal(torch.rand(2), b)


def test_megatron_rng_tracker_forks_the_cpu_generator(active, caplog):
    tracker = rng_mod.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(7)
    expected_forked = torch.rand(6)
    torch.manual_seed(1)
    expected_default = torch.rand(6)

    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING):
        with tracker.fork("model-parallel-rng"):
            x1 = torch.rand(3)
        d1 = torch.rand(3)
        with tracker.fork("model-parallel-rng"):
            x2 = torch.rand(3)
        d2 = torch.rand(3)
    # Inside the fork: the tracker's seeded stream, continued across forks.
    assert torch.equal(torch.cat([x1, x2]), expected_forked)
    # Outside: the default stream, untouched by the forks.
    assert torch.equal(torch.cat([d1, d2]), expected_default)
    assert not any("CPU RNG state changed" in r.getMessage() for r in caplog.records)


def test_activate_is_idempotent_and_deactivate_restores(active):
    before = active
    assert cpu_compat.activate(True) is True
    assert cpu_compat.activate(None) is True
    assert cpu_compat.activate(False) is True  # False only means "do not switch on"; it reports state
    for name in CUDA_NAMES:
        assert getattr(torch.cuda, name) is not before["cuda"][name], f"torch.cuda.{name} not patched"
    for name in RNG_NAMES:
        assert getattr(rng_mod, name) is not before["rng"][name]
    assert torch._C._len_torch_function_stack() == before["mode_stack"] + 1
    cpu_compat.deactivate()
    assert cpu_compat.is_active() is False
    _assert_untouched(before)
    assert torch.ones(2).type() == "torch.FloatTensor"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")
    cpu_compat.deactivate()  # a second deactivate is harmless
