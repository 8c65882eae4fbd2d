"""Wire codecs for quantized outer gradients (SPEC 2.5): pure functions, no process group."""
import math

import pytest
import torch

from megatron_edit.wire_codecs import (
    FORMAT_NAMES,
    ErrorFeedback,
    decode,
    encode,
    get_format,
    wire_bytes,
)

SCALED = [f for f in FORMAT_NAMES if get_format(f).has_scales]

# Worst-case |x - decode(encode(x))| / block absmax with round-to-nearest: half the step of the top binade
# divided by the value the absmax maps to. Written out by hand from the grids, not taken from the module.
HALF_ULP_BOUND = {
    "fp8-e4m3": 16.0 / 448.0,  # top binade [256, 448], step 32
    "fp8-e5m2": 4096.0 / 57344.0,  # top binade [32768, 57344], step 8192
    "fp4-e3m0": 0.25,  # top neighbours 0.5 and 1
    "fp4-e2m1": 1.0 / 6.0,  # top neighbours 4 and 6
    "int8": 0.5 / 127.0,
    "int4": 0.5 / 7.0,
}


def _random_blocks(n: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values whose scale changes by orders of magnitude from block to block."""
    g = torch.Generator().manual_seed(seed)
    blocks = math.ceil(n / block_size)
    magnitudes = torch.pow(10.0, torch.empty(blocks).uniform_(-8, 8, generator=g))
    return torch.randn(n, generator=g) * magnitudes.repeat_interleave(block_size)[:n]


def _block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x.numel()
    blocks = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * block_size - n)).view(blocks, block_size)
    return padded.amax(dim=1).repeat_interleave(block_size)[:n]


def _roundtrip(x, fmt, block_size=128, **kw):
    return decode(encode(x, fmt, block_size, **kw), fmt, block_size)


def test_unknown_format_names_the_flag():
    with pytest.raises(ValueError, match="--outer-grad-dtype"):
        get_format("fp6")
    assert get_format(get_format("int4")) == get_format("int4")


def test_bad_input_rejected():
    with pytest.raises(ValueError):
        encode(torch.zeros(2, 2), "int8")
    with pytest.raises(ValueError, match="--outer-grad-block-size"):
        encode(torch.zeros(4), "int8", block_size=0)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_layout_and_wire_bytes(fmt):
    for n in (0, 1, 2, 3, 127, 128, 129, 255, 256, 1000):
        for block_size in (1, 3, 16, 128):
            enc = encode(torch.randn(n), fmt, block_size)
            assert enc.payload.dtype == torch.uint8 and enc.payload.dim() == 1
            scale_bytes = 0 if enc.scales is None else 4 * enc.scales.numel()
            assert wire_bytes(n, fmt, block_size) == enc.payload.numel() + scale_bytes
            assert (enc.scales is not None) == get_format(fmt).has_scales
            if enc.scales is not None:
                assert enc.scales.dtype == torch.float32 and enc.scales.numel() == math.ceil(n / block_size)
            out = decode(enc, fmt, block_size)
            assert out.dtype == torch.float32 and out.shape == (n,)


def test_wire_bytes_values():
    assert wire_bytes(1000, "fp32") == 4000
    assert wire_bytes(1000, "bf16") == 2000
    assert wire_bytes(1000, "fp8-e4m3", 128) == 1000 + 4 * 8
    assert wire_bytes(1001, "fp4-e3m0", 128) == 501 + 4 * 8
    assert wire_bytes(1000, "int4", 1000) == 500 + 4


def test_fp32_and_bf16_exact_on_their_values():
    x = _random_blocks(1000, 128)
    assert torch.equal(_roundtrip(x, "fp32"), x)
    xb = x.to(torch.bfloat16).float()
    assert torch.equal(_roundtrip(xb, "bf16"), xb)
    assert torch.equal(_roundtrip(x, "bf16"), xb)  # round to nearest even, like torch's cast


@pytest.mark.parametrize("fmt,dtype", [("fp8-e4m3", torch.float8_e4m3fn), ("fp8-e5m2", torch.float8_e5m2)])
def test_fp8_grid_values_survive_and_rounding_matches_torch_cast(fmt, dtype):
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values)]
    for multiplier in (1.0, 2.0**-20, 2.0**12):
        x = values * multiplier  # absmax = max code * multiplier: the scale is exactly the multiplier
        assert torch.equal(_roundtrip(x, fmt, block_size=x.numel()), x)
    y = torch.randn(10000) * 100
    y[0] = get_format(fmt).max_magnitude  # one block: scale 1, rounding = the dtype's own rounding
    assert torch.equal(_roundtrip(y, fmt, block_size=y.numel()), y.to(dtype).float())


def test_e2m1_grid_values_survive():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x = torch.cat([grid, -grid])
    for multiplier in (1.0, 2.0**-10, 2.0**30):
        assert torch.equal(_roundtrip(x * multiplier, "fp4-e2m1", 16), x * multiplier)
    # Midpoints round to the even neighbour; 5 is the midpoint of 4 and 6 (4 is even code 6, 6 is code 7).
    mids = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert _roundtrip(mids, "fp4-e2m1", 8).tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_e3m0_powers_of_two_survive():
    powers = torch.tensor([2.0**k for k in range(0, -7, -1)] + [0.0])
    x = torch.cat([powers, -powers])
    for multiplier in (1.0, 3.0, 2.0**-40, 0.7):
        xm = x * multiplier
        # multiplier * 2**k is exact in fp32 and the scale is |multiplier|: every value survives
        assert torch.equal(_roundtrip(xm, "fp4-e3m0", 16), xm)


def test_e3m0_maps_to_signed_powers_of_two_times_scale():
    x = _random_blocks(1000, 128, seed=3)
    enc = encode(x, "fp4-e3m0", 128)
    assert torch.equal(enc.scales, _block_absmax(x, 128)[::128])  # absmax maps to 2^0
    ratio = decode(enc, "fp4-e3m0", 128) / enc.scales.repeat_interleave(128)[:1000]
    nonzero = ratio[ratio != 0]
    log2 = torch.log2(nonzero.abs())
    assert torch.equal(log2, torch.round(log2))
    assert log2.min() >= -6 and log2.max() <= 0
    assert ((nonzero > 0) == (x[ratio != 0] > 0)).all()
    # Rounding: 0.75 is the midpoint of 0.5 and 1 (goes up); below 2^-7 goes to 0.
    y = torch.tensor([1.0, 0.74, 0.76, 0.3, 2.0**-7 * 0.99, 2.0**-7 * 1.01, 0.011])
    assert _roundtrip(y, "fp4-e3m0", 8).tolist() == [1.0, 0.5, 1.0, 0.25, 0.0, 2.0**-6, 2.0**-6]


def test_int_grid_values_survive():
    assert torch.equal(_roundtrip(torch.arange(-127.0, 128.0), "int8", 255), torch.arange(-127.0, 128.0))
    x = torch.arange(-7.0, 8.0) * 0.125
    assert torch.equal(_roundtrip(x, "int4", 15), x)


@pytest.mark.parametrize("fmt", SCALED)
def test_error_bound_relative_to_block_absmax(fmt):
    n, block_size = 20000 + 37, 128  # partial last block
    x = _random_blocks(n, block_size, seed=1)
    err = (_roundtrip(x, fmt, block_size) - x).abs() / _block_absmax(x, block_size)
    bound = HALF_ULP_BOUND[fmt]
    assert err.max() <= bound * (1 + 1e-5)
    assert err.max() >= 0.5 * bound  # the bound is tight, not vacuous
    g = torch.Generator().manual_seed(0)
    err_sr = (_roundtrip(x, fmt, block_size, stochastic=True, generator=g) - x).abs()
    err_sr = err_sr / _block_absmax(x, block_size)
    assert err_sr.max() < 2 * bound * (1 + 1e-5)


def test_bf16_error_bound_relative_to_value():
    x = _random_blocks(5000, 128)
    # 8 significant bits: the step in [2^e, 2^(e+1)) is 2^(e-7), so half a step is <= 2^-8 |x|.
    assert ((_roundtrip(x, "bf16") - x).abs() <= x.abs() * 2.0**-8).all()
    g = torch.Generator().manual_seed(0)
    assert ((_roundtrip(x, "bf16", stochastic=True, generator=g) - x).abs() < x.abs() * 2.0**-7).all()


@pytest.mark.parametrize("fmt", SCALED)
def test_partial_last_block_scales(fmt):
    x = _random_blocks(300, 128, seed=2)
    enc = encode(x, fmt, 128)
    expected = torch.stack([x[0:128].abs().max(), x[128:256].abs().max(), x[256:].abs().max()])
    assert torch.equal(enc.scales, expected / get_format(fmt).max_magnitude)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_zeros_and_tiny_values(fmt):
    x = torch.zeros(300)
    x[128:256] = torch.linspace(-1e-30, 1e-30, 128)  # tiny but normal: still quantized relative to its block
    x[256:] = 1e-42  # subnormal block: must not produce NaN (may flush to zero)
    out = _roundtrip(x, fmt, 128)
    assert torch.isfinite(out).all()
    assert (out[:128] == 0).all()  # a block of zeros: scale 0, decodes to zeros (no 0/0)
    if fmt in HALF_ULP_BOUND:
        assert ((out[128:256] - x[128:256]).abs() <= 1e-30 * HALF_ULP_BOUND[fmt] * (1 + 1e-5)).all()
        assert encode(x, fmt, 128).scales[0] == 0
    assert (out[256:].abs() <= 2e-42).all()


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_nonfinite_flagged_and_mapped_to_zero(fmt):
    x = _random_blocks(300, 128, seed=4)
    assert not bool(encode(x, fmt, 128).nonfinite)
    bad = x.clone()
    bad[[3, 150, 299]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    enc = encode(bad, fmt, 128)
    assert enc.nonfinite.dim() == 0 and enc.nonfinite.dtype == torch.bool and bool(enc.nonfinite)
    clean = x.clone()
    clean[[3, 150, 299]] = 0.0
    out = decode(enc, fmt, 128)
    assert torch.equal(out, _roundtrip(clean, fmt, 128))
    assert (out[[3, 150, 299]] == 0).all()


@pytest.mark.parametrize("fmt", [f for f in FORMAT_NAMES if f != "fp32"])
def test_stochastic_rounding_unbiased(fmt):
    block_size, draws = 64, 4000
    g = torch.Generator().manual_seed(5)
    block = torch.randn(block_size, generator=g)
    block[0] = 4.0  # fixed absmax, so every copy gets the same scale
    block[1:6] = torch.tensor([0.01, -0.003, 0.03, 1e-4, 0.0])  # include values below E3M0's smallest step
    x = block.repeat(draws)
    out = _roundtrip(x, fmt, block_size, stochastic=True, generator=g).view(draws, block_size)
    if fmt == "bf16":
        ulp = block.abs() * 2.0**-7
    else:
        ulp = torch.full_like(block, 2 * HALF_ULP_BOUND[fmt] * 4.0)
    sigma = ulp / (2 * math.sqrt(draws))  # std of the mean of draws, each within one step
    assert ((out.mean(dim=0) - block).abs() <= 6 * sigma + 1e-12).all()
    # Deterministic rounding of the same values is visibly biased for the coarse formats.
    if fmt == "fp4-e3m0":
        assert _roundtrip(block, fmt, block_size)[1] == 0  # 0.01 / 4 is below 2^-7: always 0


def test_stochastic_rounding_reproducible():
    x = _random_blocks(1000, 128)
    for fmt in FORMAT_NAMES:
        a = encode(x, fmt, 128, stochastic=True, generator=torch.Generator().manual_seed(7))
        b = encode(x, fmt, 128, stochastic=True, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a.payload, b.payload)


def test_error_feedback_tracks_cumulative_sum():
    fmt, block_size, steps = "fp4-e3m0", 32, 200
    g = torch.Generator().manual_seed(11)
    ef = ErrorFeedback()
    total_in = torch.zeros(256)
    total_ef = torch.zeros(256)
    total_plain = torch.zeros(256)
    for _ in range(steps):
        delta = torch.randn(256, generator=g) * 0.01 + 0.002  # small bias: plain E3M0 keeps dropping it
        delta[::block_size] = 1.0  # a large value in every block pushes the rest down the E3M0 grid
        total_in += delta
        total_ef += decode(ef.encode(delta, fmt, block_size), fmt, block_size)
        total_plain += _roundtrip(delta, fmt, block_size)
        # With error feedback the gap is exactly the residual still held back: it never accumulates.
        assert torch.allclose(total_in - total_ef, ef.residual, atol=1e-4)
    assert (total_in - total_ef).abs().max() < 0.3  # at most about one step's error (bound 0.25)
    assert (total_in - total_plain).abs().max() > 10 * (total_in - total_ef).abs().max()


def test_error_feedback_state_dict_roundtrip():
    g = torch.Generator().manual_seed(12)
    a = ErrorFeedback()
    assert a.state_dict() == {"residual": None}
    for _ in range(3):
        a.encode(torch.randn(100, generator=g), "int4", 16)
    b = ErrorFeedback()
    b.load_state_dict(a.state_dict())
    nxt = torch.randn(100, generator=g)
    assert torch.equal(a.encode(nxt, "int4", 16).payload, b.encode(nxt, "int4", 16).payload)
    assert torch.equal(a.residual, b.residual)
    bad = torch.full((100,), float("nan"))
    a.encode(bad, "int4", 16)
    assert torch.isfinite(a.residual).all()
