"""RMSNorm: random and stories260K vectors vs ``numerics.rmsnorm``, cycles, config errors."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.hdl.rmsnorm import RMSNorm
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
TOP = "rmsnorm"
_verilog = {}


def run(dut, x, expect, *, valid_prob=1.0, ready_prob=1.0, expect_failure=False):
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    vectors = dict(x=x, expect=expect, in_bits=dut.in_bits, out_bits=dut.out_bits,
                   valid_prob=valid_prob, ready_prob=ready_prob, latency=dut.latency(),
                   interval=dut.initiation_interval())
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="rmsnorm_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


def golden(x, dut, tables):
    return np.array([nx.rmsnorm(v, gain=dut.gain, gain_shift=dut.gain_shift, eps=dut.eps,
                                tables=tables, out_bits=dut.out_bits) for v in x])


def random_case(seed, *, dim, lanes, in_bits=10, out_bits=6, n=40):
    """A random small RMSNorm (its own 64-entry table) and inputs spanning every shift."""
    r = rng(seed)
    tables = nx.make_tables(head_size=2, seq_len=1,
                            config=nx.TableConfig(rsqrt_bits=6, rsqrt_frac=12))
    gain = r.integers(-(1 << 11), 1 << 11, dim)
    dut = RMSNorm(dim=dim, in_bits=in_bits, gain=gain, gain_shift=int(r.integers(3, 7)),
                  eps=int(r.integers(1, 40)), rsqrt_table=tables.rsqrt,
                  rsqrt_frac=tables.config.rsqrt_frac, out_bits=out_bits, lanes=lanes)
    lo, hi = -(1 << (in_bits - 1)), 1 << (in_bits - 1)
    x = [np.zeros(dim, dtype=np.int64), np.full(dim, lo), np.full(dim, hi - 1)]
    for _ in range(n - 3):
        mag = 1 << int(r.integers(0, in_bits))          # small to full-scale vectors
        x.append(np.clip(r.integers(-mag, mag, dim), lo, hi - 1))
    x = np.array(x)
    return dut, x, golden(x, dut, tables)


@pytest.mark.parametrize("dim, lanes", [(12, 3), (8, 8), (6, 1)])
def test_random(dim, lanes):
    dut, x, expect = random_case(dim, dim=dim, lanes=lanes)
    assert len(np.unique(expect)) > 10   # the vectors exercise the whole output range
    run(dut, x, expect)


def test_random_backpressure():
    dut, x, expect = random_case(12, dim=12, lanes=3)
    run(dut, x, expect, valid_prob=0.5, ready_prob=0.4)


def stories_norm(which, lanes):
    qm = stories_qmodel()
    norm, src, dst = {
        "attn": (qm.layers[0].attn_norm, "embed", "L0.attn_norm"),
        "ffn": (qm.layers[0].ffn_norm, "L0.attn_res", "L0.ffn_norm"),
        "final": (qm.final_norm, f"L{qm.config.n_layers - 1}.out", "final_norm"),
    }[which]
    dut = RMSNorm(dim=qm.config.dim, in_bits=qm.numerics.resid_bits, gain=norm.gain,
                  gain_shift=norm.gain_shift, eps=norm.eps, rsqrt_table=qm.tables.rsqrt,
                  rsqrt_frac=qm.tables.config.rsqrt_frac, out_bits=qm.numerics.act_bits,
                  lanes=lanes)
    trace = stories_trace()
    return dut, np.array([t[src] for t in trace]), np.array([t[dst] for t in trace])


@pytest.mark.parametrize("which, lanes", [("attn", 4), ("ffn", 1), ("final", 8)])
def test_stories260k(which, lanes):
    dut, x, expect = stories_norm(which, lanes)
    assert dut.latency() == dut.initiation_interval() == 2 * 64 // lanes + 9
    run(dut, x, expect)
    run(dut, x, expect, valid_prob=0.7, ready_prob=0.6)


def test_negative_control():
    dut, x, expect = stories_norm("attn", 4)
    expect[5, 40] += 1
    res = run(dut, x, expect, expect_failure=True)
    assert "vector 5: element 40" in res.tests[0].message


def kwargs(**over):
    tables = nx.make_tables(head_size=2, seq_len=1)
    base = dict(dim=8, in_bits=18, gain=np.full(8, 1000), gain_shift=6, eps=10,
                rsqrt_table=tables.rsqrt, rsqrt_frac=16, out_bits=8, lanes=2)
    base.update(over)
    return base


@pytest.mark.parametrize("over, message", [
    (dict(lanes=3), r"^lanes \(3\) must divide dim \(8\)$"),
    (dict(dim=0), r"^dim must be at least 1, not 0$"),
    (dict(gain=np.full(7, 1)), r"^gain has 7 entries, expected 8$"),
    (dict(gain=np.full(8, 1 << 17)), r"^gain values must fit an 18-bit signed multiplier "
                                      r"operand \[-131072, 131071\], not \[131072, 131072\]$"),
    (dict(rsqrt_table=np.ones(1000, dtype=np.int64)),
     r"^rsqrt_table of 1000 entries: the index is a bit field, so it needs 2\*\*rsqrt_bits "
     r"entries with rsqrt_bits >= 2$"),
    (dict(rsqrt_table=np.ones(2, dtype=np.int64)), r"^rsqrt_table of 2 entries"),
    (dict(rsqrt_table=-np.ones(16, dtype=np.int64)),
     r"^rsqrt_table entries must be non-negative, not -1$"),
    (dict(eps=0), r"^eps \(0\) must be at least 1: the sum of squares of a zero vector must "
                  r"stay positive$"),
    (dict(gain_shift=-17), r"^rsqrt_frac \+ gain_shift \(16 \+ -17\) must be non-negative: "
                           r"the output shift cannot be a left shift$"),
    (dict(in_bits=32), r"^sum of squares of 8 32-bit elements plus eps needs 66 bits, more "
                       r"than the golden model's 63$"),
    (dict(dim=1, lanes=1, in_bits=32, gain=np.full(1, 131071)),
     r"^x \* gain \* rsqrt needs 65 bits, more than the golden model's 64$"),
])
def test_bad_config(over, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            RMSNorm(**kwargs(**over))
        del info
        gc.collect()
