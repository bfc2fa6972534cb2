"""Banked RMSNorm and SwiGLU (``n_layers > 1``, a ``layer`` input): random and stories260K
vectors in a random layer order vs the per-layer ``numerics`` functions, cycles and config
errors. (That ``n_layers = 1`` builds the very RTLIL of the blocks before banking was checked
once, against commit f60e8e6, when banking was added; the existing block tests still run.)

This module is also the cocotb test module of the bench (:func:`banked`): the existing benches
do not drive a ``layer`` port.
"""

import gc
import random
import warnings
from pathlib import Path

import cocotb
import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable
from cocotb.triggers import FallingEdge, ReadOnly

from hardwire.compiler import numerics as nx
from hardwire.hdl.rmsnorm import RMSNorm
from hardwire.hdl.swiglu import SwiGLU
from hardwire.sim.cocotb_helpers import (
    load_vectors,
    log_transfers,
    pack_signed,
    port,
    reset,
    start_clock,
    stream_recv,
    unpack_signed,
)
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BUILD_ROOT = REPO / "build" / "cocotb"
# the last commit before the blocks were banked: their n_layers=1 hardware must not change


# ------------------------------------------------------------------------------ cocotb bench

async def _drive(dut, names, words, layers, n_layers, valid_prob, rnd):
    """Send vector ``j`` on the streams ``names`` (together) with ``layer = layers[j]``.

    A new layer is put on the port only once the previous result is offered on ``o`` (or
    taken); until then it is held. In the cycles where no vector is in flight and none is
    offered, ``layer`` gets a random value: the block must not read it then.
    """
    clk, o_valid, o_ready = dut.clk, dut.o__valid, dut.o__ready
    valid = [port(dut, f"{n}__valid") for n in names]
    payload = [port(dut, f"{n}__payload") for n in names]
    ready = port(dut, f"{names[0]}__ready")
    sent = taken = 0
    while sent < len(layers):
        await FallingEdge(clk)
        free = taken == sent or (taken == sent - 1 and int(o_valid.value))
        offer = free and (valid_prob >= 1.0 or rnd.random() < valid_prob)
        for v, p, w in zip(valid, payload, words):
            v.value = int(offer)
            p.value = w[sent]
        if offer:
            dut.layer.value = int(layers[sent])
        elif free:
            dut.layer.value = rnd.randrange(n_layers)
        await ReadOnly()
        taken += int(o_valid.value) & int(o_ready.value)
        sent += offer and int(ready.value)
    await FallingEdge(clk)
    for v in valid:
        v.value = 0


@cocotb.test()
async def banked(dut):
    """Vectors: ``names`` (input streams), ``in_<name>`` (N, n) and ``bits_<name>``,
    ``layers`` (N,) driven on ``layer``, ``ref_layers`` (N,) the layers of ``expect`` (N, n),
    ``out_bits``, optional ``expect_k`` (N,) (``k`` above the vector), ``n_layers``,
    ``valid_prob``, ``ready_prob``, ``latency`` and ``interval`` (checked when both
    probabilities are 1)."""
    v = load_vectors()
    names = [str(n) for n in v["names"]]
    out_bits, n = int(v["out_bits"]), v["expect"].shape[1]
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    start_clock(dut)
    await reset(dut)
    log = {names[0]: [], "o": [], "held": []}
    if len(names) > 1:
        log[names[1]] = []
    cocotb.start_soon(log_transfers(dut, log, held="o"))
    words = [[pack_signed(x, int(v[f"bits_{name}"])) for x in v[f"in_{name}"]]
             for name in names]
    send = cocotb.start_soon(_drive(dut, names, words, v["layers"], int(v["n_layers"]), vp,
                                    random.Random(1)))
    got = await stream_recv(dut, "o", len(v["expect"]), ready_prob=rp, rng=2)
    await send
    for j, (word, want) in enumerate(zip(got, v["expect"])):
        what = f"vector {j} (layer {int(v['ref_layers'][j])})"
        if "expect_k" in v:
            got_k, want_k = word >> (n * out_bits), int(v["expect_k"][j])
            assert got_k == want_k, f"{what}: k is {got_k}, expected {want_k}"
        out = unpack_signed(word, n, out_bits)
        bad = [e for e in range(n) if out[e] != int(want[e])]
        assert not bad, (f"{what}: element {bad[0]} is {out[bad[0]]}, expected "
                         f"{int(want[bad[0]])} ({len(bad)} mismatches)")
    if len(names) > 1:
        assert log[names[0]] == log[names[1]], "the input streams did not transfer together"
    assert not log["held"], f"o changed while waiting for ready in cycles {log['held'][:5]}"
    if vp == 1.0 and rp == 1.0:
        lat = {o - i for i, o in zip(log[names[0]], log["o"])}
        assert lat == {int(v["latency"])}, f"latency {lat}, formula {int(v['latency'])}"
        ii = {b - a for a, b in zip(log[names[0]], log[names[0]][1:])}
        assert ii == {int(v["interval"])}, f"interval {ii}, formula {int(v['interval'])}"


# ------------------------------------------------------------------------------ pytest side

_verilog = {}


def run(dut, top, inputs, layers, expect, *, ref_layers=None, expect_k=None, valid_prob=1.0,
        ready_prob=1.0, expect_failure=False):
    """Run :func:`banked` on ``dut``; ``inputs``: ``{name: (array, bits)}``."""
    if id(dut) not in _verilog:                 # export each design once per session
        _verilog[id(dut)] = (dut, export_verilog(dut, top))
    vectors = dict(names=np.array(list(inputs)), layers=np.asarray(layers),
                   ref_layers=np.asarray(layers if ref_layers is None else ref_layers),
                   expect=expect, out_bits=dut.out_bits, n_layers=dut.n_layers,
                   valid_prob=valid_prob, ready_prob=ready_prob, latency=dut.latency(),
                   interval=dut.initiation_interval())
    for name, (arr, bits) in inputs.items():
        vectors[f"in_{name}"], vectors[f"bits_{name}"] = np.asarray(arr), bits
    if expect_k is not None:
        vectors["expect_k"] = np.asarray(expect_k)
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=top,
                      test_module=Path(__file__).stem, test_dir=TESTS, build_root=BUILD_ROOT,
                      vectors=vectors, expect_failure=expect_failure, timeout_s=120)


def single_layer_cycles(cls, **kwargs):
    """``(latency, initiation_interval)`` of the one-layer block built from ``kwargs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)    # built to be asked only
        block = cls(**kwargs)
        cycles = block.latency(), block.initiation_interval()
        del block
        gc.collect()
    return cycles


def layer_order(r, n_layers, count):
    """``count`` layers in a random order, every layer present, repeats and jumps included."""
    layers = np.concatenate([np.arange(n_layers), r.integers(0, n_layers, count - n_layers)])
    r.shuffle(layers)
    return layers


# ------------------------------------------------------------------------------------ RMSNorm

def norm_golden(dut, x, layers, tables):
    """``numerics.rmsnorm`` of each vector with its layer's constants."""
    gain, gs, eps = dut.gain, dut.gain_shift, dut.eps
    return np.array([nx.rmsnorm(v, gain=gain[l], gain_shift=gs[l], eps=eps[l], tables=tables,
                                out_bits=dut.out_bits) for v, l in zip(x, layers)])


def norm_random_case(seed, *, n_layers, dim, lanes, in_bits=10, out_bits=6, per_layer=8):
    """Per-layer random gains, gain shifts and eps (a shared 64-entry table); inputs from
    zero to full scale."""
    r = rng(seed)
    tables = nx.make_tables(head_size=2, seq_len=1,
                            config=nx.TableConfig(rsqrt_bits=6, rsqrt_frac=12))
    dut = RMSNorm(dim=dim, in_bits=in_bits, gain=r.integers(-(1 << 11), 1 << 11, (n_layers, dim)),
                  gain_shift=[int(s) for s in r.permutation(np.arange(3, 3 + n_layers))],
                  eps=[int(e) for e in r.integers(1, 400, n_layers)], rsqrt_table=tables.rsqrt,
                  rsqrt_frac=tables.config.rsqrt_frac, out_bits=out_bits, lanes=lanes,
                  n_layers=n_layers)
    count = per_layer * n_layers
    lo, hi = -(1 << (in_bits - 1)), 1 << (in_bits - 1)
    mags = 1 << r.integers(0, in_bits, count)
    x = np.clip(r.integers(-mags[:, None], mags[:, None], (count, dim)), lo, hi - 1)
    x[0], x[1], x[2] = 0, lo, hi - 1
    layers = layer_order(r, n_layers, count)
    return dut, x, layers, tables


@pytest.mark.parametrize("n_layers, dim, lanes", [(3, 12, 3), (5, 6, 2), (2, 8, 8)])
def test_rmsnorm_random(n_layers, dim, lanes):
    """Chunks 4 (layer = high address bits), 3 (layer * chunks) and 1 (layer alone)."""
    dut, x, layers, tables = norm_random_case(dim + n_layers, n_layers=n_layers, dim=dim,
                                              lanes=lanes)
    expect = norm_golden(dut, x, layers, tables)
    # the layers' constants matter: another layer gives another result for most vectors
    assert (expect != norm_golden(dut, x, (layers + 1) % n_layers, tables)).any(1).mean() > 0.5
    assert len(np.unique(expect)) > 10
    one = single_layer_cycles(RMSNorm, dim=dim, in_bits=10, gain=dut.gain[0],
                              gain_shift=dut.gain_shift[0], eps=dut.eps[0],
                              rsqrt_table=tables.rsqrt, rsqrt_frac=12, out_bits=6, lanes=lanes)
    assert (dut.latency(), dut.initiation_interval()) == one == (2 * dim // lanes + 9,) * 2
    run(dut, "rmsnorm_banked", {"i": (x, 10)}, layers, expect)


def test_rmsnorm_random_backpressure():
    dut, x, layers, tables = norm_random_case(31, n_layers=4, dim=12, lanes=3)
    run(dut, "rmsnorm_banked", {"i": (x, 10)}, layers, norm_golden(dut, x, layers, tables),
        valid_prob=0.5, ready_prob=0.4)


def stories_norm_bank(which, lanes):
    """The 5 layers' ``attn_norm`` or ``ffn_norm`` in one block, the golden trace's inputs and
    outputs of every layer in a random layer order."""
    qm = stories_qmodel()
    norms = [getattr(L, f"{which}_norm") for L in qm.layers]
    dut = RMSNorm(dim=qm.config.dim, in_bits=qm.numerics.resid_bits,
                  gain=np.stack([q.gain for q in norms]),
                  gain_shift=[q.gain_shift for q in norms], eps=[q.eps for q in norms],
                  rsqrt_table=qm.tables.rsqrt, rsqrt_frac=qm.tables.config.rsqrt_frac,
                  out_bits=qm.numerics.act_bits, lanes=lanes, n_layers=len(norms))
    src = ["embed" if i == 0 else f"L{i - 1}.out" for i in range(len(norms))] \
        if which == "attn" else [f"L{i}.attn_res" for i in range(len(norms))]
    trace = stories_trace()
    pairs = [(t[src[i]], t[f"L{i}.{which}_norm"], i) for t in trace for i in range(len(norms))]
    order = rng(len(which)).permutation(len(pairs))
    x, expect, layers = (np.array([pairs[j][f] for j in order]) for f in range(3))
    return dut, x, layers, expect, qm.tables


@pytest.mark.parametrize("which", ["attn", "ffn"])
def test_rmsnorm_stories260k(which):
    dut, x, layers, expect, tables = stories_norm_bank(which, 4)
    assert set(layers.tolist()) == set(range(5)) and (np.diff(layers) != 1).mean() > 0.5
    # the trace is the golden model's per-layer function (one source of truth)
    assert np.array_equal(expect, norm_golden(dut, x, layers, tables))
    assert dut.latency() == 2 * 64 // 4 + 9
    run(dut, "rmsnorm_banked", {"i": (x, dut.in_bits)}, layers, expect)


def test_rmsnorm_negative_control():
    """Vector 5 driven with the next layer while the reference keeps its own: must fail."""
    dut, x, layers, expect, _ = stories_norm_bank("attn", 4)
    driven = layers.copy()
    driven[5] = (driven[5] + 1) % 5
    res = run(dut, "rmsnorm_banked", {"i": (x, dut.in_bits)}, driven, expect,
              ref_layers=layers, expect_failure=True)
    assert f"vector 5 (layer {layers[5]}): element" in res.tests[0].message


# ------------------------------------------------------------------------------------- SwiGLU

def swiglu_golden(dut, gate, up, layers):
    """``numerics.swiglu`` / ``swiglu_exp`` of each pair with its layer's constants:
    ``(hidden, k)`` (``k`` None without an exponent)."""
    tab, off, mult, shift = dut.silu_table, dut.silu_offset, dut.mult, dut.shift
    kw = [dict(silu_table=tab[l], silu_offset=off[l], mult=mult[l], shift=shift[l],
               out_bits=dut.out_bits) for l in layers]
    if not dut.exp_max:
        return np.array([nx.swiglu(g, u, **k) for g, u, k in zip(gate, up, kw)]), None
    res = [nx.swiglu_exp(g, u, exp_max=dut.exp_max, **k) for g, u, k in zip(gate, up, kw)]
    return np.array([h for h, _ in res]), np.array([k for _, k in res])


def swiglu_random_case(seed, *, n_layers, n, lanes, exp_max, in_bits=6, up_bits=5, out_bits=7,
                       per_layer=8):
    """Per-layer random tables (different offsets and sizes of padding), multipliers and
    shifts; with ``exp_max`` the ``up`` range grows so that every ``k`` occurs."""
    r = rng(seed)
    size = (1 << in_bits) + 8
    tables = r.integers(-(1 << 15), 1 << 15, (n_layers, size))
    offsets = [int(o) for o in (1 << (in_bits - 1)) + r.integers(0, 9, n_layers)]
    for l, off in enumerate(offsets):       # the gate's extremes reach both table ends
        tables[l, off - (1 << (in_bits - 1))] = -(1 << 15)
        tables[l, off + (1 << (in_bits - 1)) - 1] = (1 << 15) - 1
    dut = SwiGLU(n=n, in_bits=in_bits, up_bits=up_bits, silu_table=tables,
                 silu_offset=offsets, mult=[int(m) for m in r.integers(1 << 16, 1 << 17, n_layers)],
                 shift=[int(s) for s in r.integers(28, 31, n_layers)], out_bits=out_bits,
                 lanes=lanes, exp_max=exp_max, n_layers=n_layers)
    count = per_layer * n_layers
    g_lo, g_hi = nx.sat(np.array([-1 << 30, 1 << 30]), in_bits)
    u_lo, u_hi = nx.sat(np.array([-1 << 30, 1 << 30]), up_bits)
    gate = r.integers(g_lo, g_hi + 1, (count, n))
    up = r.integers(u_lo, u_hi + 1, (count, n))
    if exp_max:
        caps = r.integers(0, 16, count)
        up = np.clip(up, -caps[:, None], caps[:, None])
    gate[0], up[0] = g_lo, u_lo
    gate[1], up[1] = g_hi, u_hi
    return dut, gate, up, layer_order(r, n_layers, count)


@pytest.mark.parametrize("n_layers, n, lanes, exp_max", [(4, 12, 4, 0), (3, 6, 2, 2),
                                                          (5, 5, 1, 2)])
def test_swiglu_random(n_layers, n, lanes, exp_max):
    dut, gate, up, layers = swiglu_random_case(n + n_layers, n_layers=n_layers, n=n,
                                               lanes=lanes, exp_max=exp_max)
    assert len(set(dut.shift)) > 1 and len(set(dut.mult)) == n_layers
    expect, k = swiglu_golden(dut, gate, up, layers)
    other, _ = swiglu_golden(dut, gate, up, (layers + 1) % n_layers)
    assert (expect != other).any(1).mean() > 0.5
    assert expect.min() == -64 and expect.max() == 63
    if exp_max:
        assert set(k.tolist()) == {0, 1, 2}
    one = single_layer_cycles(SwiGLU, n=n, in_bits=6, up_bits=5, silu_table=dut.silu_table[0],
                              silu_offset=dut.silu_offset[0], mult=dut.mult[0],
                              shift=dut.shift[0], out_bits=7, lanes=lanes, exp_max=exp_max)
    assert (dut.latency(), dut.initiation_interval()) == one
    assert one == (n // lanes + 4 + (2 if exp_max else 0),) * 2
    run(dut, "swiglu_banked", {"gate": (gate, 6), "up": (up, 5)}, layers, expect, expect_k=k)


def test_swiglu_random_backpressure():
    dut, gate, up, layers = swiglu_random_case(41, n_layers=3, n=6, lanes=2, exp_max=2)
    expect, k = swiglu_golden(dut, gate, up, layers)
    run(dut, "swiglu_banked", {"gate": (gate, 6), "up": (up, 5)}, layers, expect, expect_k=k,
        valid_prob=0.6, ready_prob=0.5)


def stories_swiglu_bank(lanes):
    """The 5 layers' SiLU tables, multipliers and shifts in one block (as the chip builder
    takes them from ``qm.layers[i]``), the trace's h1/h3/hidden of every layer, shuffled."""
    qm = stories_qmodel()
    nc, Ls = qm.numerics, qm.layers
    dut = SwiGLU(n=qm.config.hidden_dim, in_bits=nc.silu_bits, up_bits=nc.act_bits,
                 silu_table=np.stack([L.silu_table for L in Ls]),
                 silu_offset=[L.silu_offset for L in Ls], mult=[L.hid_mult for L in Ls],
                 shift=[L.hid_shift for L in Ls], out_bits=nc.act_bits, lanes=lanes,
                 exp_max=nc.hid_exp_max, n_layers=len(Ls))
    trace = stories_trace()[:6]
    rows = [(t[f"L{i}.h1"], t[f"L{i}.h3"], t[f"L{i}.hidden"], t[f"L{i}.hidden_k"], i)
            for t in trace for i in range(len(Ls))]
    order = rng(7).permutation(len(rows))
    return (dut, *(np.array([rows[j][f] for j in order]) for f in range(5)))


def test_swiglu_stories260k():
    dut, h1, h3, hidden, k, layers = stories_swiglu_bank(4)
    assert dut.exp_max == 2 and len(set(dut.mult)) == 5 and set(k.tolist()) == {0, 1, 2}
    assert set(layers.tolist()) == set(range(5))
    assert dut.latency() == 172 // 4 + 4 + 2
    mine, mine_k = swiglu_golden(dut, h1, h3, layers)
    assert np.array_equal(mine, hidden) and np.array_equal(mine_k, k)
    run(dut, "swiglu_banked", {"gate": (h1, dut.in_bits), "up": (h3, dut.up_bits)}, layers,
        hidden, expect_k=k)


def test_swiglu_negative_control():
    """Vector 7 driven with another layer (its own inputs and reference): must fail."""
    dut, h1, h3, hidden, k, layers = stories_swiglu_bank(4)
    driven = layers.copy()
    driven[7] = (driven[7] + 2) % 5
    res = run(dut, "swiglu_banked", {"gate": (h1, dut.in_bits), "up": (h3, dut.up_bits)},
              driven, hidden, ref_layers=layers, expect_k=k, expect_failure=True)
    assert f"vector 7 (layer {layers[7]}):" in res.tests[0].message


# ----------------------------------------------------------------------------- construction

def raises(cls, kwargs, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            cls(**kwargs)
        del info
        gc.collect()


def norm_kwargs(**over):
    tables = nx.make_tables(head_size=2, seq_len=1)
    base = dict(dim=8, in_bits=18, gain=np.full((3, 8), 1000), gain_shift=[6, 5, 7],
                eps=[10, 11, 12], rsqrt_table=tables.rsqrt, rsqrt_frac=16, out_bits=8, lanes=2,
                n_layers=3)
    base.update(over)
    return base


def gain_with(layer, value):
    g = np.full((3, 8), 1000)
    g[layer, 3] = value
    return g


@pytest.mark.parametrize("over, message", [
    (dict(n_layers=0), r"^n_layers must be at least 1, not 0$"),
    (dict(gain=np.full((2, 8), 1)), r"^gain must be an integer array of shape \(n_layers, dim\) "
                                    r"= \(3, 8\), not int64 of shape \(2, 8\)$"),
    (dict(gain=np.full(8, 1)), r"^gain must be an integer array of shape \(n_layers, dim\) = "
                               r"\(3, 8\), not int64 of shape \(8,\)$"),
    (dict(gain_shift=[6, 6]), r"^gain_shift has 2 entries, expected n_layers = 3$"),
    (dict(eps=10), r"^eps must be a sequence of n_layers = 3 ints, not 10$"),
    (dict(gain=gain_with(2, 1 << 17)), r"^layer 2: gain values must fit an 18-bit signed "
                                       r"multiplier operand \[-131072, 131071\], not "
                                       r"\[1000, 131072\]$"),
    (dict(eps=[10, 0, 10]), r"^layer 1: eps \(0\) must be at least 1"),
    (dict(gain_shift=[6, 6, -17]), r"^layer 2: rsqrt_frac \+ gain_shift \(16 \+ -17\) must be "
                                   r"non-negative"),
    (dict(in_bits=30, eps=[1, 3 << 61, 1]), r"^layer 1: sum of squares of 8 30-bit elements "
                                            r"plus eps needs 64 bits"),
    (dict(dim=1, lanes=1, in_bits=32, gain=np.array([[1], [131071], [1]])),
     r"^layer 1: x \* gain \* rsqrt needs 65 bits, more than the golden model's 64$"),
])
def test_rmsnorm_bad_config(over, message):
    raises(RMSNorm, norm_kwargs(**over), message)


def swiglu_kwargs(**over):
    base = dict(n=8, in_bits=10, up_bits=8, silu_table=np.ones((3, 1024), dtype=np.int64),
                silu_offset=[512, 512, 512], mult=[90000, 80000, 70000], shift=[30, 29, 30],
                out_bits=8, lanes=2, n_layers=3)
    base.update(over)
    return base


def silu_with(layer, value):
    t = np.ones((3, 1024), dtype=np.int64)
    t[layer, 700] = value
    return t


@pytest.mark.parametrize("over, message", [
    (dict(n_layers=0), r"^n_layers must be at least 1, not 0$"),
    (dict(silu_table=np.ones((2, 1024), dtype=np.int64)),
     r"^silu_table must be a non-empty integer array of shape \(n_layers, size\) with "
     r"n_layers = 3, not int64 of shape \(2, 1024\)$"),
    (dict(silu_table=np.ones(1024, dtype=np.int64)), r"^silu_table must be a non-empty integer "
                                                     r"array of shape \(n_layers, size\)"),
    (dict(silu_offset=[512, 512]), r"^silu_offset has 2 entries, expected n_layers = 3$"),
    (dict(mult=90000), r"^mult must be a sequence of n_layers = 3 ints, not 90000$"),
    (dict(shift=[30] * 4), r"^shift has 4 entries, expected n_layers = 3$"),
    (dict(silu_offset=[512, 500, 512]), r"^layer 1: silu_offset \(500\) is too small for "
                                        r"10-bit gates: the table index reaches -12$"),
    (dict(silu_offset=[512, 512, 513]), r"^layer 2: silu_table of 1024 entries is too small "
                                        r"for 10-bit gates with offset 513"),
    (dict(silu_table=silu_with(1, 1 << 17)), r"^layer 1: silu_table values must fit an 18-bit "
                                             r"signed multiplier operand"),
    (dict(mult=[90000, 90000, 1 << 17]), r"^layer 2: mult \(131072\) must fit an 18-bit "
                                         r"signed multiplier operand"),
    (dict(shift=[30, -2, 30]), r"^layer 1: shift must be non-negative, not -2$"),
    (dict(shift=[30, 1, 30], exp_max=2), r"^layer 1: exp_max must lie in 0\.\.min\(shift, 7\) "
                                         r"= 0\.\.1, not 2$"),
    (dict(up_bits=40, silu_table=np.full((3, 1024), 1 << 16), shift=[30, 30, 0],
          mult=[1, 1, (1 << 17) - 1]),
     r"^layer 2: silu \* up \* mult needs 73 bits, more than the golden model's 64$"),
])
def test_swiglu_bad_config(over, message):
    raises(SwiGLU, swiglu_kwargs(**over), message)


def test_banked_members():
    """``layer`` only with ``n_layers > 1``; per-layer properties stacked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)    # built to be inspected only
        norm = RMSNorm(**norm_kwargs())
        assert norm.signature.members["layer"].shape == range(3) and norm.n_layers == 3
        assert norm.gain.shape == (3, 8) and norm.gain_shift == (6, 5, 7)
        assert norm.eps == (10, 11, 12)
        single = RMSNorm(**norm_kwargs(gain=np.full(8, 1000), gain_shift=6, eps=10, n_layers=1))
        assert "layer" not in single.signature.members and single.n_layers == 1
        assert single.gain.shape == (8,) and single.gain_shift == 6 and single.eps == 10
        sw = SwiGLU(**swiglu_kwargs())
        assert sw.signature.members["layer"].shape == range(3) and sw.n_layers == 3
        assert sw.silu_table.shape == (3, 1024) and sw.mult == (90000, 80000, 70000)
        assert sw.shift == (30, 29, 30) and sw.silu_offset == (512,) * 3
        del norm, single, sw
        gc.collect()

