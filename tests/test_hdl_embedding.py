"""EmbeddingROM: random and stories260K rows vs ``GoldenModel.embed``, token range, errors."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.compiler.golden import GoldenModel
from hardwire.hdl.embedding import EmbeddingROM
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
TOP = "embedding_rom"
_verilog = {}


def run(dut, tokens, expect, *, valid_prob=1.0, ready_prob=1.0, expect_failure=False):
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    vectors = dict(tokens=np.asarray(tokens), expect=np.asarray(expect), vocab=dut.vocab,
                   out_bits=dut.out_bits, valid_prob=valid_prob, ready_prob=ready_prob,
                   latency=dut.latency(), interval=dut.initiation_interval())
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="embedding_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


def golden(dut, tokens):
    return np.array([nx.requantize(dut.table[t], dut.mult[t], dut.shift, dut.out_bits)
                     for t in tokens if t < dut.vocab]).reshape(-1, dut.dim)


def random_rom(seed, *, vocab, dim, lanes, weight_bits=5, out_bits=9, shift=12):
    r = rng(seed)
    lo, hi = nx.sat(np.array([-1 << 30, 1 << 30]), weight_bits)
    table = r.integers(lo, hi + 1, (vocab, dim))
    table[0, :] = lo                       # extremes saturate with a large multiplier
    table[1, :] = hi
    mult = r.integers(1, 1 << 17, vocab)
    mult[:2] = (1 << 17) - 1
    return EmbeddingROM(table=table, weight_bits=weight_bits, mult=mult, shift=shift,
                        out_bits=out_bits, lanes=lanes)


@pytest.mark.parametrize("vocab, dim, lanes", [(13, 6, 3), (8, 4, 1), (5, 6, 6)])
def test_random(vocab, dim, lanes):
    dut = random_rom(vocab, vocab=vocab, dim=dim, lanes=lanes)
    tokens = list(range(vocab)) + list(rng(1).integers(0, vocab, 20))
    expect = golden(dut, tokens)
    assert len(np.unique(expect)) > 12 and expect.min() == -256 and expect.max() == 255
    run(dut, tokens, expect)


def test_out_of_range_tokens():
    """Ids 13..15 of a 13-token vocabulary are dropped and raise the sticky error."""
    dut = random_rom(13, vocab=13, dim=6, lanes=3)
    tokens = [3, 0, 12, 13, 5, 15, 14, 7, 1]
    run(dut, tokens, golden(dut, tokens))
    run(dut, tokens, golden(dut, tokens), valid_prob=0.6, ready_prob=0.5)
    # without a bad id the error stays low (the bench checks error == never)
    run(dut, tokens[:3], golden(dut, tokens[:3]))


def test_random_backpressure():
    dut = random_rom(13, vocab=13, dim=6, lanes=3)
    tokens = list(rng(2).integers(0, 16, 60))
    run(dut, tokens, golden(dut, tokens), valid_prob=0.5, ready_prob=0.4)


def stories_rom(lanes=4):
    qm = stories_qmodel()
    e = qm.embed
    return EmbeddingROM(table=e.q, weight_bits=e.bits, mult=e.requant.mult,
                        shift=e.requant.shift, out_bits=e.requant.out_bits, lanes=lanes)


def test_stories260k():
    dut = stories_rom()
    assert dut.token_bits == 9 and dut.latency() == 64 // 4 + 3
    trace = stories_trace()
    tokens = [t["token"] for t in trace]
    run(dut, tokens, [t["embed"] for t in trace], valid_prob=0.7, ready_prob=0.6)
    # every row of the vocabulary against the golden model's own lookup
    g = GoldenModel(stories_qmodel())
    every = list(range(dut.vocab))
    run(dut, every, [g.embed(t) for t in every])


def test_negative_control():
    dut = stories_rom()
    trace = stories_trace()
    expect = np.array([t["embed"] for t in trace])
    expect[2, 33] += 1
    res = run(dut, [t["token"] for t in trace], expect, expect_failure=True)
    assert "vector 2: element 33" in res.tests[0].message


def kwargs(**over):
    base = dict(table=np.ones((10, 8), dtype=np.int64), weight_bits=4,
                mult=np.full(10, 1000), shift=8, out_bits=18, lanes=2)
    base.update(over)
    return base


@pytest.mark.parametrize("over, message", [
    (dict(table=np.ones(10, dtype=np.int64)),
     r"^table must be a non-empty \(vocab, dim\) integer array, not int64 of shape \(10,\)$"),
    (dict(lanes=3), r"^lanes \(3\) must divide dim \(8\)$"),
    (dict(weight_bits=0), r"^weight_bits must be at least 1, not 0$"),
    (dict(weight_bits=1), r"^table values must fit 1-bit signed weights \[-1, 0\], "
                          r"not \[1, 1\]$"),
    (dict(mult=np.full(9, 1)), r"^mult must be an integer array with one entry per token "
                               r"\(10,\), not int64 of shape \(9,\)$"),
    (dict(mult=np.full(10, 1 << 17)), r"^mult values must fit an 18-bit signed multiplier "
                                      r"operand \[-131072, 131071\], not \[131072, 131072\]$"),
    (dict(shift=-1), r"^shift must be non-negative, not -1$"),
    (dict(out_bits=0), r"^out_bits must be at least 1, not 0$"),
    (dict(weight_bits=48, mult=np.full(10, (1 << 17) - 1)),
     r"^weight \* mult needs 65 bits, more than the golden model's 64$"),
])
def test_bad_config(over, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            EmbeddingROM(**kwargs(**over))
        del info
        gc.collect()
