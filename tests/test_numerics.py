"""The integer primitives and tables of compiler.numerics."""

import math

import numpy as np
import pytest

from hardwire.compiler import numerics as nx


def test_rshift_round_ties_up_and_is_arithmetic():
    assert nx.rshift_round(5, 1) == 3        # 2.5 -> 3
    assert nx.rshift_round(-5, 1) == -2      # -2.5 -> -2 (ties towards +inf)
    assert nx.rshift_round(-6, 2) == -1      # -1.5 -> -1
    assert nx.rshift_round(7, 0) == 7
    with pytest.raises(ValueError):
        nx.rshift_round(1, -1)


def test_sat_clamps_to_twos_complement_range():
    assert list(nx.sat([-300, -128, 0, 127, 300], 8)) == [-128, -128, 0, 127, 127]


def test_tables_have_the_documented_formats():
    t = nx.make_tables(head_size=8, seq_len=16)
    c = t.config
    assert t.rsqrt.shape == (1 << c.rsqrt_bits,) and t.rsqrt.max() <= 1 << c.rsqrt_frac
    assert t.recip.shape == (1 << (c.recip_bits - 1),)
    assert t.recip.min() > 1 << 15 and t.recip.max() < 1 << 16
    assert t.exp[0] == 1 << c.exp_frac and t.exp[-1] == 0 and np.all(np.diff(t.exp) <= 0)
    assert t.rope_cos.shape == (16, 4) and t.rope_cos[0, 0] == 1 << c.rope_frac
    assert t.rope_sin[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("v", [1, 7, 1000, 123456, 2**40 + 12345])
def test_rsqrt_lookup_is_close_to_the_real_value(v):
    t = nx.make_tables(head_size=2, seq_len=1)
    r, s2 = nx.rsqrt_lookup(v, t)
    approx = r * 2.0 ** -(t.config.rsqrt_frac + s2)
    assert abs(approx * math.sqrt(v) - 1) < 2 ** -7


def test_rmsnorm_matches_float_within_quantization():
    rng = np.random.default_rng(0)
    t = nx.make_tables(head_size=2, seq_len=1)
    x = rng.integers(-5000, 5000, 64)
    g = np.full(64, 1 << 12)            # gain 1.0 in Q12 with out scale 1/16 ...
    y = nx.rmsnorm(x, gain=g, gain_shift=12, eps=1, tables=t, out_bits=16)
    ref = x / np.sqrt(np.mean(x.astype(float) ** 2)) / math.sqrt(64)
    assert np.max(np.abs(y - ref * 1)) <= 2      # y = x/rms * gain/sqrt(dim) ~ ref


def test_attention_head_is_a_softmax_weighted_mean():
    t = nx.make_tables(head_size=4, seq_len=8)
    rng = np.random.default_rng(1)
    q = rng.integers(-100, 100, 4)
    k = rng.integers(-100, 100, (5, 4))
    v = rng.integers(-100, 100, (5, 4))
    # scale: score units -> natural log units = exp_mult / 2**exp_shift / 32
    out = nx.attention_head(q, k, v, exp_mult=1 << 10, exp_shift=12, tables=t, out_bits=10)
    s = (k @ q) * (1 << 10) / 2**12 / 32
    p = np.exp(s - s.max())
    ref = (p / p.sum()) @ v
    assert np.max(np.abs(out - ref)) <= 2


def test_argmax_lowest_index_wins_ties():
    assert nx.argmax([3, 7, 7, 1]) == 1


def test_swiglu_exp_zero_is_swiglu():
    """``exp_max = 0`` reproduces the plain SwiGLU exactly (k = 0)."""
    r = np.random.default_rng(3)
    table = r.integers(-(1 << 15), 1 << 15, 1024)
    h1, h3 = r.integers(-512, 512, 300), r.integers(-128, 128, 300)
    kw = dict(silu_table=table, silu_offset=512, mult=90001, shift=30)
    hid, k = nx.swiglu_exp(h1, h3, exp_max=0, **kw)
    assert k == 0 and np.array_equal(hid, nx.swiglu(h1, h3, **kw))
    assert np.abs(hid).max() == 128   # saturates somewhere: the comparison is not vacuous


def test_vector_exponent_each_k():
    """k is the smallest shift whose rounded extremes fit +-127, else E."""
    assert nx.vector_exponent([127, -127], exp_max=2) == 0
    assert nx.vector_exponent([128], exp_max=2) == 1
    assert nx.vector_exponent([-128], exp_max=2) == 1
    assert nx.vector_exponent([254], exp_max=2) == 1       # (254 + 1) >> 1 = 127
    assert nx.vector_exponent([255], exp_max=2) == 2       # rounds to 128 at k = 1
    assert nx.vector_exponent([-255], exp_max=2) == 1      # (-255 + 1) >> 1 = -127
    assert nx.vector_exponent([10 ** 6], exp_max=2) == 2   # saturates at k = E
