"""Argmax: random (tie-heavy) and stories260K logits vs ``numerics.argmax``, cycles, errors."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.hdl.argmax import Argmax
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
TOP = "argmax"
_verilog = {}


def run(dut, x, expect, *, valid_prob=1.0, ready_prob=1.0, expect_failure=False):
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    vectors = dict(x=x, expect=np.asarray(expect), bits=dut.bits, lanes=dut.lanes,
                   valid_prob=valid_prob, ready_prob=ready_prob, latency=dut.latency(),
                   interval=dut.initiation_interval())
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="argmax_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


def random_case(seed, *, n, bits, count=60):
    """Full-range vectors, narrow-range ones (many ties) and hand-made corner cases."""
    r = rng(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = [np.full(n, lo), np.full(n, hi), np.arange(n) % 2 * hi, np.arange(n)[::-1]]
    for p in range(n):                      # maximum at p, tied by a later element
        v = r.integers(lo, hi, n)
        v[p] = v[r.integers(p, n)] = hi
        x.append(v)
    for k in range(count - len(x)):
        x.append(r.integers(lo, hi + 1, n) if k % 2 else r.integers(-2, 3, n))
    x = np.array(x)
    return x, [nx.argmax(v) for v in x]


@pytest.mark.parametrize("n, lanes", [(12, 3), (8, 1), (6, 6), (16, 4)])
def test_random(n, lanes):
    x, expect = random_case(n, n=n, bits=5)
    assert len(set(expect)) == n            # every position wins somewhere
    run(Argmax(n=n, bits=5, lanes=lanes), x, expect)


def test_random_backpressure():
    x, expect = random_case(1, n=12, bits=5, count=100)
    run(Argmax(n=12, bits=5, lanes=3), x, expect, valid_prob=0.6, ready_prob=0.3)


def stories_case():
    qm = stories_qmodel()
    trace = stories_trace()
    dut = Argmax(n=qm.config.vocab_size, bits=qm.classifier.requant.out_bits, lanes=8)
    return dut, np.array([t["logits"] for t in trace]), [t["next_token"] for t in trace]


def test_stories260k():
    dut, logits, tokens = stories_case()
    assert dut.index_bits == 9 and dut.initiation_interval() == 512 // 8
    run(dut, logits, tokens)
    run(dut, logits, tokens, valid_prob=0.7, ready_prob=0.5)


def test_negative_control():
    dut, logits, tokens = stories_case()
    tokens[4] += 1
    res = run(dut, logits, tokens, expect_failure=True)
    assert "vector 4:" in res.tests[0].message


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0, bits=8, lanes=1), r"^n must be at least 1, not 0$"),
    (dict(n=512, bits=32, lanes=24), r"^lanes \(24\) must divide n \(512\)$"),
    (dict(n=512, bits=0, lanes=8), r"^bits must be at least 1, not 0$"),
])
def test_bad_config(kwargs, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            Argmax(**kwargs)
        del info
        gc.collect()
