"""SwiGLU: random and stories260K vectors vs ``numerics.swiglu`` / ``swiglu_exp`` (with the
per-vector exponent), cycles, config errors."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.hdl.swiglu import SwiGLU
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
TOP = "swiglu"
_verilog = {}


def run(dut, gate, up, expect, *, valid_prob=1.0, ready_prob=1.0, expect_failure=False,
        expect_k=None):
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    vectors = dict(gate=gate, up=up, expect=expect, in_bits=dut.in_bits, up_bits=dut.up_bits,
                   out_bits=dut.out_bits, valid_prob=valid_prob, ready_prob=ready_prob,
                   latency=dut.latency(), interval=dut.initiation_interval())
    if dut.exp_max:
        vectors["expect_k"] = np.asarray(expect_k)
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="swiglu_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


def golden(dut, gate, up):
    return np.array([nx.swiglu(g, u, silu_table=dut.silu_table, silu_offset=dut.silu_offset,
                               mult=dut.mult, shift=dut.shift, out_bits=dut.out_bits)
                     for g, u in zip(gate, up)])


def golden_exp(dut, gate, up):
    """``(hidden, k)`` of ``numerics.swiglu_exp`` for each vector pair."""
    res = [nx.swiglu_exp(g, u, silu_table=dut.silu_table, silu_offset=dut.silu_offset,
                         mult=dut.mult, shift=dut.shift, exp_max=dut.exp_max,
                         out_bits=dut.out_bits) for g, u in zip(gate, up)]
    return np.array([h for h, _ in res]), np.array([k for _, k in res])


def random_case(seed, *, n, lanes, in_bits=6, up_bits=5, out_bits=7, pad=3, count=30,
                shift=28, exp_max=0):
    """A random table larger than the gate range (``pad`` entries either side)."""
    r = rng(seed)
    table = r.integers(-(1 << 15), 1 << 15, (1 << in_bits) + 2 * pad)
    table[pad], table[-pad - 1] = -(1 << 15), (1 << 15) - 1      # the gate's extremes
    mult = int(r.integers(1 << 16, 1 << 17))
    dut = SwiGLU(n=n, in_bits=in_bits, up_bits=up_bits, silu_table=table,
                 silu_offset=(1 << (in_bits - 1)) + pad, mult=mult, shift=shift,
                 out_bits=out_bits, lanes=lanes, exp_max=exp_max)
    g_lo, g_hi = nx.sat(np.array([-1 << 30, 1 << 30]), in_bits)
    u_lo, u_hi = nx.sat(np.array([-1 << 30, 1 << 30]), up_bits)
    gate = r.integers(g_lo, g_hi + 1, (count, n))
    up = r.integers(u_lo, u_hi + 1, (count, n))
    gate[0], up[0] = g_lo, u_lo                 # both table ends, both up extremes
    gate[1], up[1] = g_hi, u_hi
    return dut, gate, up, golden(dut, gate, up)


@pytest.mark.parametrize("n, lanes", [(12, 4), (5, 1), (6, 6)])
def test_random(n, lanes):
    dut, gate, up, expect = random_case(n, n=n, lanes=lanes)
    assert len(np.unique(expect)) > 30 and expect.min() == -64 and expect.max() == 63
    run(dut, gate, up, expect)


def test_random_backpressure():
    dut, gate, up, expect = random_case(12, n=12, lanes=4, count=60)
    run(dut, gate, up, expect, valid_prob=0.5, ready_prob=0.4)


@pytest.mark.parametrize("n, lanes", [(12, 4), (5, 5), (6, 1)])
def test_random_exponent(n, lanes):
    """``exp_max = 2``: vectors with a growing ``up`` range hit every ``k`` in 0..2, the
    extremes saturate; the payload carries ``k`` above the vector."""
    dut, gate, up, _ = random_case(n + 100, n=n, lanes=lanes, count=40, shift=29, exp_max=2)
    r = rng(n)
    caps = np.arange(len(up)) % 16
    up[2:] = np.clip(up[2:], -caps[2:, None], caps[2:, None])
    r.shuffle(up[2:])
    expect, k = golden_exp(dut, gate, up)
    assert set(k.tolist()) == {0, 1, 2}
    assert expect.min() == -64 and expect.max() == 63
    assert dut.latency() == n // lanes + 6
    run(dut, gate, up, expect, expect_k=k)
    run(dut, gate, up, expect, expect_k=k, valid_prob=0.6, ready_prob=0.5)


def test_exponent_negative_control():
    """A wrong exponent (and only the exponent) must fail."""
    dut, gate, up, _ = random_case(112, n=12, lanes=4, count=8, shift=29, exp_max=2)
    expect, k = golden_exp(dut, gate, up)
    k[3] = (k[3] + 1) % 3
    res = run(dut, gate, up, expect, expect_k=k, expect_failure=True)
    assert "vector 3: k is" in res.tests[0].message


def stories_swiglu(layer, lanes):
    qm = stories_qmodel()
    L = qm.layers[layer]
    nc = qm.numerics
    dut = SwiGLU(n=qm.config.hidden_dim, in_bits=nc.silu_bits, up_bits=nc.act_bits,
                 silu_table=L.silu_table, silu_offset=L.silu_offset, mult=L.hid_mult,
                 shift=L.hid_shift, out_bits=nc.act_bits, lanes=lanes,
                 exp_max=nc.hid_exp_max)
    trace = stories_trace()
    return (dut, *(np.array([t[f"L{layer}.{name}"] for t in trace])
                   for name in ("h1", "h3", "hidden", "hidden_k")))


def test_stories260k():
    dut, h1, h3, hidden, k = stories_swiglu(0, 4)
    assert dut.exp_max == 2 and len(set(k.tolist())) >= 2
    assert dut.latency() == 172 // 4 + 4 + 2
    run(dut, h1, h3, hidden, expect_k=k)
    run(dut, h1, h3, hidden, valid_prob=0.7, ready_prob=0.6, expect_k=k)


def test_negative_control():
    dut, h1, h3, hidden, k = stories_swiglu(0, 4)
    hidden[7, 100] += 1
    res = run(dut, h1, h3, hidden, expect_failure=True, expect_k=k)
    assert "vector 7: element 100" in res.tests[0].message


def kwargs(**over):
    base = dict(n=8, in_bits=10, up_bits=8, silu_table=np.ones(1024, dtype=np.int64),
                silu_offset=512, mult=90000, shift=30, out_bits=8, lanes=2)
    base.update(over)
    return base


@pytest.mark.parametrize("over, message", [
    (dict(n=0), r"^n must be at least 1, not 0$"),
    (dict(lanes=3), r"^lanes \(3\) must divide n \(8\)$"),
    (dict(up_bits=0), r"^up_bits must be at least 1, not 0$"),
    (dict(silu_table=np.ones((4, 256), dtype=np.int64)),
     r"^silu_table must be a non-empty 1-D integer array, not int64 of shape \(4, 256\)$"),
    (dict(silu_table=np.ones(256, dtype=np.int64)),
     r"^silu_table of 256 entries is too small for 10-bit gates with offset 512: the index "
     r"reaches 1023$"),
    (dict(silu_offset=500), r"^silu_offset \(500\) is too small for 10-bit gates: the table "
                            r"index reaches -12$"),
    (dict(silu_table=np.full(1024, 1 << 17)),
     r"^silu_table values must fit an 18-bit signed multiplier operand \[-131072, 131071\], "
     r"not \[131072, 131072\]$"),
    (dict(mult=1 << 17), r"^mult \(131072\) must fit an 18-bit signed multiplier operand "
                         r"\[-131072, 131071\]$"),
    (dict(shift=-2), r"^shift must be non-negative, not -2$"),
    (dict(exp_max=8), r"^exp_max must lie in 0\.\.min\(shift, 7\) = 0\.\.7, not 8$"),
    (dict(shift=1, exp_max=2), r"^exp_max must lie in 0\.\.min\(shift, 7\) = 0\.\.1, not 2$"),
    (dict(up_bits=40, silu_table=np.full(1024, 1 << 16), mult=(1 << 17) - 1, shift=0),
     r"^silu \* up \* mult needs 73 bits, more than the golden model's 64$"),
])
def test_bad_config(over, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            SwiGLU(**kwargs(**over))
        del info
        gc.collect()
