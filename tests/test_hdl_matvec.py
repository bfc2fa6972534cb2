"""MatVecUnit against ``numerics.requantize(numerics.matvec(...))``; Gather/Scatter adapters.

MatVecUnit runs in cocotb (``benches/matvec_bench.py``): random matrices over several foldings,
weight widths and both forms, the real stories260K layer-0 ``wq``, ``w1`` and ``w2`` on golden
trace vectors, a negative control, and measured cycles against the unit's formulas. The small
stream adapters run in ``amaranth.sim``.
"""

import gc
import random
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator
from golden_vectors import rng, stories_qmodel, stories_trace
from hardwire.compiler import numerics as nx
from hardwire.hdl.matvec import MatVecUnit
from hardwire.hdl.vector import Gather, Scatter
from hardwire.sim.cocotb_runner import run_cocotb

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
POSITIONS = 4

# configuration errors and formula checks construct units that are never elaborated
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


@pytest.fixture(autouse=True)
def _collect_unused():
    """Collect those units inside the test, where the filter above applies."""
    yield
    gc.collect()


def expected(w, x, mult, shift, out_bits):
    return np.array([nx.requantize(nx.matvec(w, v), mult, shift, out_bits) for v in x])


def run(dut, x, expect, *, valid_prob=0.7, ready_prob=0.4, testcase=None,
        expect_failure=False, k=None):
    vectors = dict(x=x, expect=expect, in_bits=dut.in_bits, out_bits=dut.out_bits, pe=dut.pe,
                   valid_prob=valid_prob, ready_prob=ready_prob, latency=dut.latency(),
                   cycles_per_vector=dut.cycles_per_vector(),
                   interval=dut.initiation_interval(), chunk_interval=dut.chunk_interval())
    if k is not None:
        vectors["k"] = np.asarray(k)
    return run_cocotb(component_or_verilog=dut, toplevel="matvec", test_module="matvec_bench",
                      test_dir=TESTS / "benches", build_root=BUILD_ROOT, vectors=vectors,
                      testcase=testcase, expect_failure=expect_failure, timeout_s=300)


def random_case(seed, rows, cols, weight_bits, *, in_bits=8, out_bits=8, n=6):
    """Random weights, multipliers and inputs (with the extremes), and a shift that makes
    about a tenth of the outputs saturate."""
    r = rng(seed)
    wmax = (1 << (weight_bits - 1)) - 1
    w = r.integers(-wmax, wmax + 1, (rows, cols))
    w[0, :] = wmax
    w[-1, ::2] = -wmax
    mult = r.integers(0, 1 << 17, rows)
    mult[0], mult[-1] = (1 << 17) - 1, 0
    lo, hi = -(1 << (in_bits - 1)), (1 << (in_bits - 1)) - 1
    x = r.integers(lo, hi + 1, (n, cols))
    x[0], x[1] = lo, hi
    big = np.percentile(np.abs((x @ w.T) * mult), 90)
    shift = max(0, int(big).bit_length() - (out_bits - 1))
    return w, mult, shift, x


# rows, cols, pe, simd, weight_bits, form
RANDOM_CASES = [
    (8, 12, 2, 3, 3, "rom"),
    (8, 12, 2, 3, 4, "const"),
    (172, 16, 4, 4, 6, "rom"),        # 43 row groups
    (172, 4, 43, 1, 8, "const"),      # 43 lanes, LUT weights over 16 steps
    (12, 172, 3, 4, 8, "rom"),        # 43 column steps
    (16, 4, 2, 4, 4, "rom"),          # one column step: a chunk every cycle
    (6, 5, 6, 5, 8, "const"),         # fully unrolled: constant shift-add products
]


@pytest.mark.parametrize("rows, cols, pe, simd, weight_bits, form", RANDOM_CASES)
def test_random(rows, cols, pe, simd, weight_bits, form):
    seed = rows * 1000 + cols * 10 + weight_bits
    w, mult, shift, x = random_case(seed, rows, cols, weight_bits)
    dut = MatVecUnit(weights=w, weight_bits=weight_bits, mult=mult, shift=shift, out_bits=8,
                     pe=pe, simd=simd, form=form)
    expect = expected(w, x, mult, shift, 8)
    assert 0 < np.mean(np.abs(expect) == 127) < 0.5   # saturates some, not all
    run(dut, x, expect)


def test_random_wide_io():
    """Narrow inputs, wide outputs, a zero shift."""
    w, mult, _, x = random_case(7, 10, 6, 5, in_bits=4, out_bits=20)
    mult[:] = np.arange(10) * 37
    dut = MatVecUnit(weights=w, weight_bits=5, in_bits=4, mult=mult, shift=0, out_bits=20,
                     pe=5, simd=2, acc_bits=12, form="rom")
    run(dut, x, expected(w, x, mult, 0, 20))


def stories_unit(name, pe, simd, form):
    qm = stories_qmodel()
    mat = getattr(qm.layers[0], name)
    r = mat.requant
    # w2 takes the SwiGLU output's exponent (as the chip builds it)
    ek = {"exp_max": qm.numerics.hid_exp_max} if name == "w2" else {}
    return MatVecUnit(weights=mat.q, weight_bits=mat.bits, in_bits=qm.numerics.act_bits,
                      mult=r.mult, shift=r.shift, out_bits=r.out_bits, pe=pe, simd=simd,
                      form=form, **ek)


def trace_vectors(src, dst):
    trace = stories_trace()[:POSITIONS]
    return np.array([t[src] for t in trace]), np.array([t[dst] for t in trace])


@pytest.mark.parametrize("name, src, dst, pe, simd, form", [
    ("wq", "L0.attn_norm", "L0.q", 8, 8, "const"),
    ("w2", "L0.hidden", "L0.w2", 4, 4, "rom"),
    ("w1", "L0.ffn_norm", "L0.h1", 4, 16, "rom"),
])
def test_stories260k(name, src, dst, pe, simd, form):
    dut = stories_unit(name, pe, simd, form)
    if name == "w1":
        assert dut.out_bits == stories_qmodel().numerics.silu_bits
    x, expect = trace_vectors(src, dst)
    assert len(x) >= 2
    k = None
    if name == "w2":
        assert dut.exp_max == 2
        k = [t["L0.hidden_k"] for t in stories_trace()[:POSITIONS]]
    run(dut, x, expect, k=k)


# rows, cols, pe, simd, form
EXP_CASES = [
    (8, 12, 2, 3, "rom"),
    (6, 10, 3, 2, "const"),
    (4, 6, 4, 6, "const"),            # fully unrolled
    (12, 16, 2, 16, "rom"),           # one column step: back-to-back groups of mixed k
]


def exp_case(seed, rows, cols, *, exp_max=2, n=9):
    """Random W2-like unit inputs with a per-vector exponent: each ``k`` in ``0..exp_max``
    appears, consecutive vectors differ in ``k``."""
    w, mult, shift, x = random_case(seed, rows, cols, 8, n=n)
    k = np.arange(n) % (exp_max + 1)
    expect = np.array([nx.requantize(nx.matvec(w, v), mult, shift + exp_max - kk, 8)
                       for v, kk in zip(x, k)])
    return w, mult, shift, x, k, expect


@pytest.mark.parametrize("rows, cols, pe, simd, form", EXP_CASES)
def test_random_exponent(rows, cols, pe, simd, form):
    """The requantizer shift is ``shift + E - k``, ``k`` carried with each input vector."""
    w, mult, shift, x, k, expect = exp_case(rows + cols, rows, cols)
    dut = MatVecUnit(weights=w, weight_bits=8, mult=mult, shift=shift, out_bits=8, pe=pe,
                     simd=simd, form=form, exp_max=2)
    assert dut.cycles_per_vector() == dut.steps + dut.pipeline_depth   # no extra cycle
    for kk in range(3):   # every k in 0..2 occurs; each k > 0 changes the result
        assert np.any(k == kk)
        if kk > 0:
            fixed = expected(w, x, mult, shift + 2, 8)
            assert not np.array_equal(expect[k == kk], fixed[k == kk])
    run(dut, x, expect, k=k, testcase="full_rate")
    run(dut, x, expect, k=k, testcase="backpressure")


def test_exponent_negative_control():
    """Expected values that ignore ``k`` (shift fixed at ``shift + E``, right for ``k = 0``
    only) must fail: vector 0 has ``k = 0``, vector 1 ``k = 1``."""
    w, mult, shift, x, k, _ = exp_case(20, 8, 12)
    dut = MatVecUnit(weights=w, weight_bits=8, mult=mult, shift=shift, out_bits=8, pe=2,
                     simd=3, exp_max=2)
    res = run(dut, x, expected(w, x, mult, shift + 2, 8), k=k, testcase="full_rate",
              expect_failure=True)
    assert "vector 1, row" in res.tests[0].message



def test_negative_control():
    dut = stories_unit("wq", 8, 8, "const")
    x, expect = trace_vectors("L0.attn_norm", "L0.q")
    expect[1, 37] += 1
    run(dut, x, expect, testcase="full_rate", expect_failure=True)


def test_cycle_formulas():
    dut = stories_unit("w2", 4, 4, "rom")
    assert (dut.steps, dut.row_groups, dut.col_steps, dut.mac_units) == (688, 16, 43, 16)
    assert dut.latency() == 43 + 6
    assert dut.cycles_per_vector() == 688 + 6
    assert dut.initiation_interval() == 688
    assert (dut.acc_width, dut.buffer_depth) == (bits_needed(172 * 127 * 128), 1)
    etched = stories_unit("wq", 64, 64, "const")
    assert (etched.steps, etched.latency(), etched.pipeline_depth, etched.buffer_depth) == \
        (1, 6, 5, 6)


def bits_needed(worst):
    return worst.bit_length() + 1


# ---------------------------------------------------------------------------------- errors

GOOD = dict(weights=np.ones((8, 12), dtype=np.int64), weight_bits=4, mult=np.ones(8, int),
            shift=4, out_bits=8, pe=2, simd=3)


@pytest.mark.parametrize("change, message", [
    (dict(pe=3), r"^pe \(3\) must divide rows \(8\)$"),
    (dict(simd=5), r"^simd \(5\) must divide cols \(12\)$"),
    (dict(weights=np.full((8, 12), 8)),
     r"^weights must lie within \+-7 for weight_bits=4: found 8 at \(0, 0\)$"),
    (dict(weights=np.full((8, 12), -8)),
     r"^weights must lie within \+-7 for weight_bits=4: found -8 at \(0, 0\)$"),
    (dict(mult=np.array([1] * 7 + [1 << 17])),
     r"^mult must lie in \[0, 2\*\*17\): found 131072 at row 7$"),
    (dict(mult=np.array([-1] + [1] * 7)), r"^mult must lie in \[0, 2\*\*17\): found -1 at row 0$"),
    (dict(weights=np.full((8, 12), 7), acc_bits=12),
     r"^accumulator of 12 bits overflows: worst case needs 15$"),
    (dict(form="etched"), r"^form must be 'rom' or 'const', not 'etched'$"),
    (dict(weights=np.ones(12, int)),
     r"^weights must be a 2-D \(rows, cols\) array, not shape \(12,\)$"),
    (dict(weights=np.ones((8, 12)) * 0.5), r"^weights must hold integers, not float64$"),
    (dict(mult=np.ones(7, int)), r"^mult must have shape \(8,\) \(one per row\), not \(7,\)$"),
    (dict(weight_bits=9), r"^weight_bits must be between 3 and 8, not 9$"),
    (dict(weight_bits=2), r"^weight_bits must be between 3 and 8, not 2$"),
    (dict(shift=-1), r"^shift must be non-negative, not -1$"),
    (dict(out_bits=1), r"^out_bits must be at least 2 for signed outputs, not 1$"),
    (dict(exp_max=8), r"^exp_max must lie in 0\.\.7, not 8$"),
    (dict(exp_max=-1), r"^exp_max must lie in 0\.\.7, not -1$"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        MatVecUnit(**{**GOOD, **change})


def test_good_config_properties():
    dut = MatVecUnit(**GOOD)
    assert (dut.rows, dut.cols, dut.pe, dut.simd, dut.form) == (8, 12, 2, 3, "rom")
    assert (dut.steps, dut.mac_units, dut.acc_width) == (16, 6, bits_needed(12 * 1 * 128))
    with pytest.raises(ValueError):
        dut.weights[0, 0] = 2          # read-only
    with pytest.raises(AttributeError):
        dut.pe = 4


# ------------------------------------------------------------------------ Gather / Scatter

def simulate_adapter(dut, chunks_in, n_out, *, valid_prob, ready_prob, seed):
    """Drive ``dut.i`` with ``chunks_in`` (lists of element values), collect ``n_out``
    payloads from ``dut.o``; return them with the input and output transfer cycles."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got, t_in, t_out = [], [], []
    r = random.Random(seed)

    async def source(ctx):
        cycle = 0
        for item in chunks_in:
            ctx.set(dut.i.payload, item)
            while True:
                offer = r.random() < valid_prob
                ctx.set(dut.i.valid, offer)
                _, _, ready = await ctx.tick().sample(dut.i.ready)
                cycle += 1
                if offer and ready:
                    t_in.append(cycle)
                    break
        ctx.set(dut.i.valid, 0)

    async def sink(ctx):
        cycle = 0
        while len(got) < n_out:
            take = r.random() < ready_prob
            ctx.set(dut.o.ready, take)
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            cycle += 1
            if take and valid:
                got.append([int(e) for e in payload])
                t_out.append(cycle)

    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return got, t_in, t_out


@pytest.mark.parametrize("n, lanes", [(12, 4), (5, 5), (172, 4), (6, 1)])
@pytest.mark.parametrize("valid_prob, ready_prob", [(1.0, 1.0), (0.6, 0.5)])
def test_gather(n, lanes, valid_prob, ready_prob):
    r = rng(n * 10 + lanes)
    vecs = r.integers(-32, 32, (5, n))
    chunks = [list(map(int, c)) for v in vecs for c in v.reshape(-1, lanes)]
    dut = Gather(n=n, lanes=lanes, bits=6)
    got, t_in, t_out = simulate_adapter(dut, chunks, len(vecs), valid_prob=valid_prob,
                                        ready_prob=ready_prob, seed=n)
    assert np.array_equal(np.array(got), vecs)
    if valid_prob == ready_prob == 1.0:
        b = dut.beats
        assert {t_out[k] - t_in[k * b + b - 1] for k in range(len(vecs))} == {dut.latency()}
        assert {t_in[(k + 1) * b] - t_in[k * b] for k in range(len(vecs) - 1)} == \
            {dut.initiation_interval()}


@pytest.mark.parametrize("n, lanes", [(12, 4), (5, 5), (172, 4), (6, 1)])
@pytest.mark.parametrize("valid_prob, ready_prob", [(1.0, 1.0), (0.6, 0.5)])
def test_scatter(n, lanes, valid_prob, ready_prob):
    r = rng(n * 10 + lanes + 1)
    vecs = r.integers(-32, 32, (5, n))
    dut = Scatter(n=n, lanes=lanes, bits=6)
    b = dut.beats
    got, t_in, t_out = simulate_adapter(dut, [list(map(int, v)) for v in vecs], len(vecs) * b,
                                        valid_prob=valid_prob, ready_prob=ready_prob, seed=n)
    assert np.array_equal(np.array(got).reshape(len(vecs), n), vecs)
    if valid_prob == ready_prob == 1.0:
        # the first chunk is valid `latency` cycles after the input, the last `beats` cycles
        assert {t_out[k * b] - t_in[k] for k in range(len(vecs))} == {dut.latency()}
        assert {t_out[k * b + b - 1] - t_in[k] for k in range(len(vecs))} == {b}
        assert {t_in[k + 1] - t_in[k] for k in range(len(vecs) - 1)} == \
            {dut.initiation_interval()}


def test_gather_scatter_round_trip():
    """Scatter then Gather in one design returns the vectors unchanged."""
    from amaranth.hdl import Module
    from amaranth.lib import wiring

    class RoundTrip(wiring.Component):
        def __init__(self):
            self.scatter, self.gather = Scatter(n=12, lanes=3, bits=5), Gather(n=12, lanes=3,
                                                                                bits=5)
            super().__init__({"i": wiring.In(self.scatter.i.signature.flip()),
                              "o": wiring.Out(self.gather.o.signature)})

        def elaborate(self, platform):
            m = Module()
            m.submodules.scatter, m.submodules.gather = self.scatter, self.gather
            wiring.connect(m, wiring.flipped(self.i), self.scatter.i)
            wiring.connect(m, self.scatter.o, self.gather.i)
            wiring.connect(m, self.gather.o, wiring.flipped(self.o))
            return m

    vecs = rng(5).integers(-16, 16, (6, 12))
    got, _, _ = simulate_adapter(RoundTrip(), [list(map(int, v)) for v in vecs], 6,
                                 valid_prob=0.7, ready_prob=0.6, seed=9)
    assert np.array_equal(np.array(got), vecs)


@pytest.mark.parametrize("cls", [Gather, Scatter])
@pytest.mark.parametrize("kwargs, message", [
    (dict(n=10, lanes=4, bits=8), r"^lanes \(4\) must divide n \(10\)$"),
    (dict(n=10, lanes=0, bits=8), r"^lanes \(0\) must divide n \(10\)$"),
    (dict(n=0, lanes=1, bits=8), r"^n must be at least 1, not 0$"),
    (dict(n=8, lanes=4, bits=0), r"^bits must be at least 1, not 0$"),
])
def test_adapter_bad_config(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
