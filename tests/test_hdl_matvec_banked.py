"""Banked ``MatVecUnit`` (``n_layers > 1``) against the per-layer golden function.

For every input vector of layer ``l`` the unit must produce ``numerics.requantize(
numerics.matvec(W[l], x), mult[l], shift[l] + E - k, out_bits)`` bit for bit (with ``E = 0``:
``shift[l]``), ``l`` given on the ``layer`` port. Covered: random units with 2 to 5 layers fed a
random layer sequence, the real stories260K ``wq`` and ``w2`` of all 5 layers on golden trace
vectors, measured cycles against the (unchanged) formulas, negative controls (the unit driven
with another layer than the reference uses) and constructor validation.

This module is also the cocotb test module of its bench (the ``cocotb`` section below runs
inside the simulator, started by :func:`run` through ``hardwire.sim.cocotb_runner``): vectors
go in bursts of one layer; a burst's vectors are sent back to back, and ``layer`` changes only
after the burst's last output transfer (while the unit is idle it shows a wrong layer, which
must not matter: ``layer`` is set at the first input transfer).
"""

import gc
import itertools
import random
import re
from pathlib import Path

import cocotb
import numpy as np
import pytest
from amaranth.back import rtlil
from amaranth.hdl import Shape
from cocotb.triggers import FallingEdge, ReadOnly
from golden_vectors import rng, stories_qmodel, stories_trace
from hardwire.compiler import numerics as nx
from hardwire.hdl.matvec import MatVecUnit
from hardwire.sim.cocotb_helpers import (
    load_vectors,
    log_transfers,
    pack_signed,
    reset,
    start_clock,
    stream_recv,
    unpack_signed,
)
from hardwire.sim.cocotb_runner import run_cocotb

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"

# configuration errors and formula checks construct units that are never elaborated
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


@pytest.fixture(autouse=True)
def _collect_unused():
    """Collect those units inside the test, where the filter above applies."""
    yield
    gc.collect()


# ------------------------------------------------------------------------ cocotb (simulator)

async def _send_burst(dut, words, layer, wrong, valid_prob, r):
    """Send one burst's input words; ``layer`` is driven with the first offered word (``wrong``
    before it, while the unit is idle) and held."""
    sent = 0
    while sent < len(words):
        await FallingEdge(dut.clk)
        offer = valid_prob >= 1.0 or r.random() < valid_prob
        dut.i__valid.value = int(offer)
        dut.i__payload.value = words[sent]
        if sent == 0:
            dut.layer.value = layer if offer else wrong
        await ReadOnly()
        if offer and int(dut.i__ready.value):
            sent += 1
    await FallingEdge(dut.clk)
    dut.i__valid.value = 0


async def _run(dut, v, valid_prob, ready_prob):
    """Stream the vectors burst by burst, compare every chunk; return the transfer log."""
    in_bits, out_bits, pe = int(v["in_bits"]), int(v["out_bits"]), int(v["pe"])
    n_layers = int(v["n_layers"])
    n, rows = v["expect"].shape
    groups = rows // pe
    start_clock(dut)
    await reset(dut)
    log = {"i": [], "o": []}
    cocotb.start_soon(log_transfers(dut, log))
    words = [pack_signed(x, in_bits) for x in v["x"]]
    if "k" in v:
        words = [w | (int(k) << (len(x) * in_bits)) for w, x, k in zip(words, v["x"], v["k"])]
    r = random.Random(3)
    start = 0
    for _, burst in itertools.groupby(range(n), key=lambda j: int(v["burst"][j])):
        burst = list(burst)
        drive = int(v["drive"][burst[0]])
        wrong = (drive + 1 + r.randrange(n_layers - 1)) % n_layers
        dut.layer.value = wrong
        send = cocotb.start_soon(_send_burst(dut, [words[j] for j in burst], drive, wrong,
                                             valid_prob, r))
        got = await stream_recv(dut, "o", len(burst) * groups, ready_prob=ready_prob, rng=r)
        await send
        for c, word in enumerate(got):
            vec, grp = start + c // groups, c % groups
            out = unpack_signed(word, pe, out_bits)
            want = [int(e) for e in v["expect"][vec, grp * pe:(grp + 1) * pe]]
            bad = [j for j in range(pe) if out[j] != want[j]]
            assert not bad, (f"vector {vec} (layer {int(v['layer'][vec])}), row "
                             f"{grp * pe + bad[0]}: got {out[bad[0]]}, expected {want[bad[0]]} "
                             f"({len(bad)} mismatches in chunk {grp})")
        start += len(burst)
    return log, groups


@cocotb.test()
async def banked_full_rate(dut):
    """Inputs of a burst back to back, output always ready: values and cycles."""
    v = load_vectors()
    log, groups = await _run(dut, v, 1.0, 1.0)
    i, o, burst = log["i"], log["o"], v["burst"]
    n = len(i)
    measured = {
        "latency": {o[k * groups] - i[k] for k in range(n)},
        "cycles_per_vector": {o[k * groups + groups - 1] - i[k] for k in range(n)},
        "interval": {i[k + 1] - i[k] for k in range(n - 1) if burst[k] == burst[k + 1]},
        "chunk_interval": {o[k * groups + j + 1] - o[k * groups + j]
                           for k in range(n) for j in range(groups - 1)},
    }
    assert measured["interval"], "no burst of two or more vectors: interval not measured"
    for name, got in measured.items():
        if name == "chunk_interval" and groups == 1:
            continue
        want = int(v[name])
        assert got == {want}, f"{name}: measured {sorted(got)}, formula {want}"
    dut._log.info("cycles ok: " + ", ".join(f"{k}={int(v[k])}" for k in measured))


@cocotb.test()
async def banked_backpressure(dut):
    """Random input gaps and output ready: values only."""
    v = load_vectors()
    await _run(dut, v, float(v["valid_prob"]), float(v["ready_prob"]))


# ------------------------------------------------------------------------------ pytest side

def golden(w, mult, shift, x, layer, out_bits, *, k=None, exp_max=0):
    """The per-layer golden function, vector by vector."""
    k = np.full(len(x), exp_max) if k is None else np.asarray(k)
    return np.array([nx.requantize(nx.matvec(w[l], v), mult[l], shift[l] + exp_max - kk,
                                   out_bits) for v, l, kk in zip(x, layer, k)])


def layer_bursts(seed, n_layers, n_bursts):
    """A random layer sequence in bursts of 1 to 3 vectors: every layer occurs, consecutive
    bursts differ in layer, at least one burst has two vectors. Returns (layer, burst) per
    vector."""
    r = random.Random(seed)
    order = list(range(n_layers))
    r.shuffle(order)
    while len(order) < n_bursts:
        order.append(r.choice([l for l in range(n_layers) if l != order[-1]]))
    sizes = [r.randint(1, 3) for _ in order]
    sizes[r.randrange(len(sizes))] = 2
    layer = np.array([l for l, s in zip(order, sizes) for _ in range(s)])
    burst = np.array([b for b, s in enumerate(sizes) for _ in range(s)])
    return layer, burst


def run(dut, x, layer, burst, expect, *, k=None, drive=None, testcase=None,
        expect_failure=False, valid_prob=0.7, ready_prob=0.4):
    """Run the bench on ``dut``: ``layer`` is the reference's layer of each vector, ``drive``
    the one put on the port (default: the same)."""
    vectors = dict(x=x, layer=layer, burst=burst, expect=expect,
                   drive=layer if drive is None else drive, n_layers=dut.n_layers,
                   in_bits=dut.in_bits, out_bits=dut.out_bits, pe=dut.pe,
                   valid_prob=valid_prob, ready_prob=ready_prob, latency=dut.latency(),
                   cycles_per_vector=dut.cycles_per_vector(),
                   interval=dut.initiation_interval(), chunk_interval=dut.chunk_interval())
    if k is not None:
        vectors["k"] = np.asarray(k)
    return run_cocotb(component_or_verilog=dut, toplevel="matvec_banked",
                      test_module=Path(__file__).stem, test_dir=TESTS, build_root=BUILD_ROOT,
                      vectors=vectors, testcase=testcase, expect_failure=expect_failure,
                      timeout_s=300)


def random_layers(seed, n_layers, rows, cols, weight_bits, *, exp_max=0):
    """Random per-layer weights, multipliers and shifts (shifts differ between layers and
    make some outputs saturate), a random layer sequence, inputs with the extremes and, with
    ``exp_max``, random exponents."""
    r = rng(seed)
    wmax = (1 << (weight_bits - 1)) - 1
    w = r.integers(-wmax, wmax + 1, (n_layers, rows, cols))
    w[0, 0, :] = wmax
    w[-1, -1, ::2] = -wmax
    mult = r.integers(0, 1 << 17, (n_layers, rows))
    mult[0, 0], mult[-1, -1] = (1 << 17) - 1, 0
    layer, burst = layer_bursts(seed, n_layers, n_layers + 2)
    x = r.integers(-128, 128, (len(layer), cols))
    x[0], x[1] = -128, 127
    big = np.percentile(np.abs(np.einsum("lrc,nc->lnr", w, x) * mult[:, None]), 90)
    base = max(exp_max, int(big).bit_length() - 7)
    shift = [base + int(d) for d in r.integers(-exp_max, 3, n_layers)]
    k = r.integers(0, exp_max + 1, len(layer)) if exp_max else None
    return w, mult, shift, x, layer, burst, k


# n_layers, rows, cols, pe, simd, weight_bits, exp_max
RANDOM_CASES = [
    (3, 8, 12, 2, 3, 4, 0),      # 4 row groups, 4 column steps
    (2, 6, 10, 6, 2, 8, 2),      # one row group (multipliers from the banked ROM), exponent
    (5, 12, 16, 2, 16, 6, 0),    # one column step: a chunk every cycle
    (4, 10, 6, 5, 3, 8, 2),      # 2 row groups, 2 column steps, exponent
]


@pytest.mark.parametrize("n_layers, rows, cols, pe, simd, weight_bits, exp_max", RANDOM_CASES)
def test_random(n_layers, rows, cols, pe, simd, weight_bits, exp_max):
    seed = n_layers * 100 + rows + cols
    w, mult, shift, x, layer, burst, k = random_layers(seed, n_layers, rows, cols, weight_bits,
                                                       exp_max=exp_max)
    dut = MatVecUnit(weights=w, weight_bits=weight_bits, mult=mult, shift=shift, out_bits=8,
                     pe=pe, simd=simd, exp_max=exp_max, n_layers=n_layers)
    expect = golden(w, mult, shift, x, layer, 8, k=k, exp_max=exp_max)
    assert set(layer) == set(range(n_layers))
    assert 0 < np.mean(np.abs(expect) == 127) < 0.5   # saturates some, not all
    run(dut, x, layer, burst, expect, k=k, testcase="banked_full_rate")
    run(dut, x, layer, burst, expect, k=k, testcase="banked_backpressure")


def twin_layers():
    """Three layers: 1 is 0 with another shift, 2 is 0 with other multipliers, so only the
    shift (1) or the multiplier (2) selection tells them apart."""
    w, mult, shift, x, layer, burst, _ = random_layers(77, 3, 8, 12, 4)
    w[1] = w[2] = w[0]
    mult[1] = mult[0]
    mult[2] = rng(78).integers(0, 1 << 17, 8)
    shift = [shift[0], shift[0] + 1, shift[0]]
    dut = MatVecUnit(weights=w, weight_bits=4, mult=mult, shift=shift, out_bits=8, pe=2,
                     simd=3, n_layers=3)
    return dut, x, layer, burst, golden(w, mult, shift, x, layer, 8)


def test_twin_layers():
    dut, x, layer, burst, expect = twin_layers()
    run(dut, x, layer, burst, expect, testcase="banked_full_rate")


@pytest.mark.parametrize("swap", [(0, 1), (0, 2)])
def test_twin_layers_negative_control(swap):
    """Driving layer ``b`` for the reference's layer ``a`` (and vice versa) must fail even when
    the two differ only in the shift (0, 1) or only in the multipliers (0, 2)."""
    dut, x, layer, burst, expect = twin_layers()
    a, b = swap
    drive = np.where(layer == a, b, np.where(layer == b, a, layer))
    assert np.any(layer == a) and np.any(layer == b)
    res = run(dut, x, layer, burst, expect, drive=drive, testcase="banked_full_rate",
              expect_failure=True)
    assert re.search(rf"vector \d+ \(layer [{a}{b}]\)", res.tests[0].message)


# ------------------------------------------------------------------------------ stories260K

def stories_banked(name):
    """The banked unit of matrix ``name`` over all layers of stories260K, folded as the
    default plan folds it (the same constants ``compiler/chip_builder.py`` takes)."""
    from hardwire.compiler.plan import plan_chip

    qm = stories_qmodel()
    plan = plan_chip(qm)
    mats = [getattr(L, name) for L in qm.layers]
    folds = {(plan.matrices[f"L{i}.{name}"].pe, plan.matrices[f"L{i}.{name}"].simd)
             for i in range(len(mats))}
    assert len(folds) == 1, f"{name} folded differently by layer: {folds}"
    (pe, simd), = folds
    assert len({(m.bits, m.requant.out_bits) for m in mats}) == 1
    ek = {"exp_max": qm.numerics.hid_exp_max} if name == "w2" else {}
    return MatVecUnit(weights=np.stack([m.q for m in mats]), weight_bits=mats[0].bits,
                      in_bits=qm.numerics.act_bits,
                      mult=np.stack([m.requant.mult for m in mats]),
                      shift=[m.requant.shift for m in mats],
                      out_bits=mats[0].requant.out_bits, pe=pe, simd=simd, form="rom",
                      n_layers=len(mats), **ek)


STORIES = {"wq": ("attn_norm", "q"), "w2": ("hidden", "w2")}


def stories_vectors(name, seed):
    """Golden-trace inputs and outputs of ``name`` for a random layer sequence covering all
    5 layers (each vector: layer ``l`` at some position)."""
    src, dst = STORIES[name]
    trace = stories_trace()
    n_layers = len(stories_qmodel().layers)
    layer, burst = layer_bursts(seed, n_layers, n_layers + 1)
    pos = rng(seed).integers(0, len(trace), len(layer))
    x = np.array([trace[p][f"L{l}.{src}"] for p, l in zip(pos, layer)])
    expect = np.array([trace[p][f"L{l}.{dst}"] for p, l in zip(pos, layer)])
    k = np.array([trace[p][f"L{l}.hidden_k"] for p, l in zip(pos, layer)]) \
        if name == "w2" else None
    return x, layer, burst, expect, k


@pytest.mark.parametrize("name", ["wq", "w2"])
def test_stories260k(name):
    dut = stories_banked(name)
    assert dut.n_layers == 5 and len(set(dut.shift)) > 1   # the shifts do differ by layer
    x, layer, burst, expect, k = stories_vectors(name, 5 if name == "wq" else 6)
    # the trace is the golden model: it agrees with the per-layer function built from the unit
    assert np.array_equal(expect, golden(dut.weights, dut.mult, dut.shift, x, layer,
                                         dut.out_bits, k=k, exp_max=dut.exp_max))
    if name == "w2":
        assert dut.exp_max == 2 and len(set(k.tolist())) > 1
    run(dut, x, layer, burst, expect, k=k, testcase="banked_full_rate")


def test_stories260k_negative_control():
    """wq driven with the next layer for every vector must fail."""
    dut = stories_banked("wq")
    x, layer, burst, expect, _ = stories_vectors("wq", 5)
    res = run(dut, x, layer, burst, expect, drive=(layer + 1) % 5,
              testcase="banked_full_rate", expect_failure=True)
    assert "vector 0 (layer" in res.tests[0].message


# ------------------------------------------------------------------------ formulas, structure

def unit(layers=2, **change):
    """A banked unit of ``layers`` random layers (shifts 9, 10, ...), parameters changed."""
    r = rng(1)
    kw = dict(weights=r.integers(-7, 8, (layers, 8, 12)), weight_bits=4,
              mult=r.integers(0, 1 << 17, (layers, 8)), shift=list(range(9, 9 + layers)),
              out_bits=8, pe=2, simd=3, n_layers=layers)
    return MatVecUnit(**{**kw, **change})


@pytest.mark.parametrize("pe, simd, exp_max", [(2, 3, 0), (8, 3, 2), (1, 12, 0)])
def test_cycle_formulas_unchanged(pe, simd, exp_max):
    """The cycle formulas of a banked unit are those of each of its layers' own unit."""
    banked = unit(4, pe=pe, simd=simd, exp_max=exp_max)
    for layer in range(4):
        single = MatVecUnit(weights=banked.weights[layer], weight_bits=4,
                            mult=banked.mult[layer], shift=banked.shift[layer], out_bits=8,
                            pe=pe, simd=simd, exp_max=exp_max)
        for f in ("latency", "cycles_per_vector", "chunk_interval", "initiation_interval"):
            assert getattr(banked, f)() == getattr(single, f)(), f
        assert (banked.pipeline_depth, banked.buffer_depth, banked.steps) == \
            (single.pipeline_depth, single.buffer_depth, single.steps)


def memory_sizes(text):
    """``{name: depth}`` of the ROMs in an RTLIL text."""
    return {name: int(size) for size, name in
            re.findall(r"memory width \d+ size (\d+) \\(\w+_rom)\b", text)}


def test_one_deep_memory_per_kind():
    """L layers' weights are one ROM of depth L*steps (layer in the high address part), their
    multipliers one of depth L*row_groups; a single row group's too."""
    dut = unit(3)
    assert dut.rom_shape == (3 * dut.steps, 2 * 3 * 4)
    assert memory_sizes(rtlil.convert(dut, name="mv", emit_src=False)) == \
        {"weight_rom": 3 * dut.steps, "mult_rom": 3 * dut.row_groups}
    one_group = unit(5, pe=8)
    assert memory_sizes(rtlil.convert(one_group, name="mv", emit_src=False)) == \
        {"weight_rom": 5 * one_group.steps, "mult_rom": 5}


def test_deterministic():
    """The same constants give byte-identical RTLIL."""
    assert rtlil.convert(unit(4, exp_max=2), name="mv", emit_src=False) == \
        rtlil.convert(unit(4, exp_max=2), name="mv", emit_src=False)


def test_single_layer_unchanged():
    """``n_layers=1`` is the unit without the option: the same RTLIL, no ``layer`` port, and
    none of the banked logic."""
    r = rng(2)
    kw = dict(weights=r.integers(-7, 8, (8, 12)), weight_bits=4,
              mult=r.integers(0, 1 << 17, 8), shift=9, out_bits=8, pe=2, simd=3, exp_max=2)
    plain = rtlil.convert(MatVecUnit(**kw), name="mv", emit_src=False)
    one = MatVecUnit(**kw, n_layers=1)
    assert rtlil.convert(one, name="mv", emit_src=False) == plain
    assert "layer" not in one.signature.members
    assert memory_sizes(plain) == {"weight_rom": one.steps, "mult_rom": one.row_groups}
    assert one.weights.shape == (8, 12) and one.mult.shape == (8,) and one.shift == 9
    for name in ("weight_addr", "group_addr", "shift_sel", "layer"):
        assert name not in plain
    assert "layer" in rtlil.convert(unit(2), name="mv", emit_src=False)


def test_banked_properties():
    dut = unit(3, weights=np.stack([np.full((8, 12), v) for v in (1, 7, 3)]))
    assert dut.n_layers == 3 and Shape.cast(dut.signature.members["layer"].shape).width == 2
    assert dut.weights.shape == (3, 8, 12) and dut.mult.shape == (3, 8)
    assert dut.shift == (9, 10, 11) and (dut.rows, dut.cols) == (8, 12)
    assert dut.acc_width == (12 * 7 * 128).bit_length() + 1    # the worst layer's
    with pytest.raises(ValueError):
        dut.weights[1, 0, 0] = 2          # read-only
    with pytest.raises(ValueError):
        dut.mult[0, 0] = 2


@pytest.mark.parametrize("change, message", [
    (dict(n_layers=0), r"^n_layers must be at least 1, not 0$"),
    (dict(form="const"), r"^form='const' supports only n_layers=1, not n_layers=2: use "
                         r"form='rom'$"),
    (dict(weights=np.ones((3, 8, 12), int)),
     r"^weights must have n_layers=2 matrices along axis 0, not shape \(3, 8, 12\)$"),
    (dict(weights=np.ones((8, 12), int)),
     r"^weights must be a 3-D \(layers, rows, cols\) array, not shape \(8, 12\)$"),
    (dict(mult=np.ones((3, 8), int)),
     r"^mult must have shape \(2, 8\) \(one per layer and row\), not \(3, 8\)$"),
    (dict(mult=np.ones(8, int)),
     r"^mult must be a 2-D \(layers, rows\) array, not shape \(8,\)$"),
    (dict(shift=9), r"^shift must be a sequence of 2 ints \(one per layer\), not 9$"),
    (dict(shift=[9, 9, 9]), r"^shift must hold 2 ints \(one per layer\), not 3$"),
    (dict(shift=[9, -1]), r"^layer 1: shift must be non-negative, not -1$"),
    (dict(weights=np.stack([np.ones((8, 12), int), np.full((8, 12), -8)])),
     r"^layer 1: weights must lie within \+-7 for weight_bits=4: found -8 at \(0, 0\)$"),
    (dict(mult=np.array([[1] * 8, [1] * 7 + [1 << 17]])),
     r"^layer 1: mult must lie in \[0, 2\*\*17\): found 131072 at row 7$"),
    (dict(weights=np.stack([np.ones((8, 12), int), np.full((8, 12), 7)]), acc_bits=14),
     r"^layer 1: accumulator of 14 bits overflows: worst case needs 15$"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        unit(2, **change)
