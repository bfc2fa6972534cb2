"""ResidualAdd: random and stories260K vectors vs ``numerics.residual_add``, cycles, errors."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.hdl.residual import ResidualAdd
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
TOP = "residual_add"
_verilog = {}


def run(dut, a, b, expect, *, valid_prob=1.0, ready_prob=1.0, expect_failure=False):
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    vectors = dict(a=a, b=b, expect=expect, bits=dut.bits, valid_prob=valid_prob,
                   ready_prob=ready_prob, latency=dut.latency(),
                   interval=dut.initiation_interval())
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="residual_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


def random_case(seed, dim, bits, n):
    r = rng(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    a = r.integers(lo, hi, (n, dim))
    b = r.integers(lo, hi, (n, dim))
    a[0], b[0] = lo, lo          # saturates low
    a[1], b[1] = hi - 1, hi - 1  # saturates high
    return a, b, nx.residual_add(a, b, bits)


def test_random_full_rate():
    a, b, expect = random_case(0, 8, 6, 40)
    run(ResidualAdd(dim=8, bits=6), a, b, expect)


def test_random_backpressure():
    a, b, expect = random_case(1, 8, 6, 60)
    run(ResidualAdd(dim=8, bits=6), a, b, expect, valid_prob=0.6, ready_prob=0.5)


def test_stories260k():
    qm = stories_qmodel()
    trace = stories_trace()
    a = np.array([t["embed"] for t in trace])
    b = np.array([t["L0.wo"] for t in trace])
    expect = np.array([t["L0.attn_res"] for t in trace])
    # residual adds of every layer: attention and FFN outputs onto the stream
    for i in range(qm.config.n_layers):
        x_in = [t["embed"] if i == 0 else t[f"L{i - 1}.out"] for t in trace]
        a = np.concatenate([a, x_in, [t[f"L{i}.attn_res"] for t in trace]])
        b = np.concatenate([b, [t[f"L{i}.wo"] for t in trace], [t[f"L{i}.w2"] for t in trace]])
        expect = np.concatenate([expect, [t[f"L{i}.attn_res"] for t in trace],
                                 [t[f"L{i}.out"] for t in trace]])
    dut = ResidualAdd(dim=qm.config.dim, bits=qm.numerics.resid_bits)
    run(dut, a, b, expect, valid_prob=0.8, ready_prob=0.7)
    run(dut, a, b, expect)


def test_negative_control():
    trace = stories_trace()
    a = np.array([t["embed"] for t in trace])
    b = np.array([t["L0.wo"] for t in trace])
    expect = np.array([t["L0.attn_res"] for t in trace])
    expect[3, 17] += 1
    res = run(ResidualAdd(dim=64, bits=18), a, b, expect, expect_failure=True)
    assert "vector 3: element 17" in res.tests[0].message


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=0, bits=18), r"^dim must be at least 1, not 0$"),
    (dict(dim=64, bits=1), r"^bits must be at least 2 for a signed residual, not 1$"),
])
def test_bad_config(kwargs, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            ResidualAdd(**kwargs)
        del info
        gc.collect()
