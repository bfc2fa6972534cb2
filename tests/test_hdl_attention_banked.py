"""Banked Attention and KVCache (``n_layers > 1``): random configs and stories260K with every
position's layers in a random order, each output vs ``numerics.attention_head`` of its own
layer over its own layer's cache rows; cycles, context-full errors, configs."""

import gc
import warnings

import numpy as np
import pytest
from amaranth.back import rtlil
from amaranth.hdl import Module, Mux, Signal, UnusedElaboratable
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hardwire.compiler import numerics as nx
from hardwire.hdl.attention import Attention
from hardwire.hdl.kvcache import KVCache

from golden_vectors import rng, stories_qmodel, stories_trace
from test_hdl_attention import run_bench



class LayerInPayload(wiring.Component):
    """A banked ``Attention`` whose ``layer`` travels in the input payload, so the existing
    attention bench drives it: the layer reaches the unit's ``layer`` port at the input
    transfer (combinationally, the latest the contract allows) and is held from then on."""

    def __init__(self, attention):
        self._attention = attention
        fields = {name: field.shape for name, field in attention.i.payload.shape()}
        super().__init__({
            "i": In(stream.Signature(data.StructLayout(
                {**fields, "layer": range(attention.n_layers)}))),
            "o": Out(stream.Signature(attention.o.payload.shape())),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.attention = att = self._attention
        take = self.i.valid & self.i.ready
        held = Signal(range(att.n_layers))
        with m.If(take):
            m.d.sync += held.eq(self.i.payload.layer)
        m.d.comb += [att.layer.eq(Mux(take, self.i.payload.layer, held)),
                     att.i.valid.eq(self.i.valid), self.i.ready.eq(att.i.ready),
                     self.error.eq(att.error)]
        m.d.comb += [getattr(att.i.payload, f).eq(getattr(self.i.payload, f))
                     for f in ("pos", "q", "k", "v")]
        wiring.connect(m, att.o, wiring.flipped(self.o))
        return m


def make(tables, **kwargs):
    c = tables.config
    return Attention(exp_table=tables.exp, recip_table=tables.recip, recip_bits=c.recip_bits,
                     recip_frac=c.recip_frac, exp_len=c.exp_len, **kwargs)


def heads(dut, tables, layer, q, keys, values, *, indices=False):
    """Every head of layer ``layer`` at one position over its cache rows ``keys``/``values``
    (0..pos); with ``indices`` the unclamped exp-table indices instead."""
    hs, group = dut.head_size, dut.n_heads // dut.n_kv_heads
    mult, shift = dut.exp_mult[layer], dut.exp_shift[layer]
    out = []
    for h in range(dut.n_heads):
        kv = slice(h // group * hs, (h // group + 1) * hs)
        qh = q[h * hs:(h + 1) * hs]
        if indices:
            s = keys[:, kv] @ qh
            out.extend(nx.rshift_round((s.max() - s) * mult, shift))
        else:
            out.extend(nx.attention_head(qh, keys[:, kv], values[:, kv], exp_mult=mult,
                                         exp_shift=shift, tables=tables, out_bits=dut.out_bits,
                                         out_shift=dut.out_shift))
    return np.array(out, dtype=np.int64)


def expected(dut, tables, seq, *, shared_cache=False):
    """Outputs of the inputs ``seq`` (``(layer, pos, q, k, v)``, ``pos < n_pos``) in order:
    each layer attends over its own rows (with ``shared_cache``, as a cache that ignores the
    layer would: one row per position, the last write wins)."""
    keys = np.zeros((dut.n_layers, dut.n_pos, dut.kv_dim), dtype=np.int64)
    values = np.zeros_like(keys)
    out = []
    for layer, pos, q, k, v in seq:
        bank = 0 if shared_cache else layer
        keys[bank, pos], values[bank, pos] = k, v
        out.append(heads(dut, tables, layer, q, keys[bank, :pos + 1], values[bank, :pos + 1]))
    return np.array(out)


def run(dut, seq, expect, *, layers=None, valid_prob=1.0, ready_prob=1.0, expect_error=0,
        expect_failure=False):
    """``seq`` through the attention bench (``layers``: the layer fields sent, default the
    sequence's own)."""
    top = LayerInPayload(dut)
    layout = top.i.payload.shape()
    layers = [s[0] for s in seq] if layers is None else layers
    inputs = [format(layout.const({"pos": int(p), "q": [int(x) for x in q],
                                   "k": [int(x) for x in k], "v": [int(x) for x in v],
                                   "layer": int(lay)}).as_value().value, "x")
              for lay, (_, p, q, k, v) in zip(layers, seq)]
    return run_bench(dut, top, "attention_banked", inputs, [s[1] for s in seq], expect,
                     valid_prob=valid_prob, ready_prob=ready_prob, expect_error=expect_error,
                     expect_failure=expect_failure)


def layer_order(r, n_layers, n_pos):
    """For each position 0..n_pos-1, every layer once, in a random order (as a chip runs
    layers 0..L-1 of a position before the next position, and more)."""
    return [(int(layer), pos) for pos in range(n_pos) for layer in r.permutation(n_layers)]


# (n_layers, n_kv_heads, head_lanes, n_pos); n_heads = 4, head_size = 4, 10-bit q/k/v, 8-bit
# output as in the real chip. kv-head ratios 1 and 2; per-layer exp_mult/exp_shift random.
RANDOM = {
    "L2_gqa2": (2, 2, 2, 5),
    "L3_gqa1": (3, 4, 1, 4),
    "L4_gqa2": (4, 2, 4, 4),
}


def random_case(name, seed=0):
    n_layers, n_kv_heads, head_lanes, n_pos = RANDOM[name]
    r = rng(seed)
    shifts = r.integers(13, 21, n_layers)
    ratios = 10.0 ** r.uniform(-2.3, -1.3, n_layers)     # index per unit of score gap
    mults = np.minimum(np.round(ratios * 2.0 ** shifts), (1 << 17) - 1).astype(np.int64)
    tables = nx.make_tables(head_size=4, seq_len=n_pos)
    dut = make(tables, n_heads=4, n_kv_heads=n_kv_heads, head_size=4, n_pos=n_pos, bits=10,
               out_bits=8, out_shift=2, head_lanes=head_lanes, n_layers=n_layers,
               exp_mult=mults, exp_shift=shifts)
    # magnitudes vary per input, so score gaps range from tiny to far beyond the table; every
    # layer has its own keys and values
    seq = []
    for layer, pos in layer_order(r, n_layers, n_pos):
        scale = 1 << int(r.integers(3, 10))
        q = np.clip(r.integers(-512, 512, dut.dim) * scale // 512, -512, 511)
        k = np.clip(r.integers(-512, 512, dut.kv_dim) * scale // 512, -512, 511)
        v = r.integers(-512, 512, dut.kv_dim)
        seq.append((layer, pos, q, k, v))
    expect = expected(dut, tables, seq)
    # the data can tell: clamped and mid-table indices in every layer, a cache mixing layers
    # gives other outputs
    for layer in range(n_layers):
        keys = {p: k for lay, p, _, k, _ in seq if lay == layer}
        idx = np.concatenate([heads(dut, tables, layer, q, np.array([keys[t] for t in
                                                                      range(p + 1)]),
                                    None, indices=True)
                              for lay, p, q, _, _ in seq if lay == layer])
        assert (idx > tables.config.exp_len - 1).any(), f"layer {layer}: no index clamped"
        assert ((idx > 0) & (idx < tables.config.exp_len - 1)).any()
    assert (expected(dut, tables, seq, shared_cache=True) != expect).any()
    return dut, tables, seq, expect


@pytest.mark.parametrize("name", list(RANDOM))
def test_random(name):
    """Every position's layers in a random order; outputs bit for bit, latency and interval
    measured at every input == the formula (the same as one layer's)."""
    dut, tables, seq, expect = random_case(name)
    single = make(tables, n_heads=dut.n_heads, n_kv_heads=dut.n_kv_heads,
                  head_size=dut.head_size, n_pos=dut.n_pos, bits=10, out_bits=8, out_shift=2,
                  head_lanes=dut.head_lanes, exp_mult=dut.exp_mult[0],
                  exp_shift=dut.exp_shift[0])
    assert [dut.latency(p) for p in range(dut.n_pos)] == \
        [single.latency(p) for p in range(dut.n_pos)]
    run(dut, seq, expect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        del single
        gc.collect()


def test_random_backpressure():
    dut, _, seq, expect = random_case("L2_gqa2")
    run(dut, seq, expect, valid_prob=0.3, ready_prob=0.2)


def test_context_full():
    """After every layer's positions 0..n_pos-1, a full-context input (pos = n_pos) of one
    layer is consumed with no output and sets the sticky error; no layer's rows change (a
    wrapped write would have replaced a row 0), as repeats of pos n_pos-1 show."""
    dut, tables, seq, _ = random_case("L3_gqa1")      # test_random's unit (a cached build)
    r = rng(5)
    n = dut.n_pos
    junk = np.full(dut.kv_dim, 511)
    seq = seq + [(1, n, r.integers(-512, 512, dut.dim), junk, -junk - 1)]
    last = {lay: (k, v) for lay, p, _, k, v in seq if p == n - 1}
    for layer in (2, 1, 0):
        seq.append((layer, n - 1, r.integers(-512, 512, dut.dim), *last[layer]))
    expect = expected(dut, tables, [s for s in seq if s[1] < n])
    run(dut, seq, expect, expect_error=1)


def stories_case(n_pos=12):
    """All five layers of a real run at positions 0..n_pos-1 (the golden trace's own rotated
    q, k and v, its ``L{i}.att`` out), the layers of each position in a random order."""
    qm = stories_qmodel()
    c, tables, nc = qm.config, qm.tables, qm.numerics
    dut = make(tables, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_size=c.head_size,
               n_pos=c.seq_len, exp_mult=[L.exp_mult for L in qm.layers],
               exp_shift=[L.exp_shift for L in qm.layers], bits=nc.qkv_bits,
               out_bits=nc.act_bits, out_shift=nc.qkv_bits - nc.act_bits, head_lanes=2,
               n_layers=c.n_layers)
    trace = stories_trace()[:n_pos]
    assert [t["pos"] for t in trace] == list(range(n_pos))
    order = layer_order(rng(7), c.n_layers, n_pos)
    seq = [(layer, pos, *(trace[pos][f"L{layer}.{x}"] for x in ("q_rope", "k_rope", "v")))
           for layer, pos in order]
    expect = np.array([trace[pos][f"L{layer}.att"] for layer, pos in order])
    return dut, tables, seq, expect


def test_stories260k():
    """The real constants (five layers' exp_mult/exp_shift, 8 heads on 4 kv heads, head size
    8, 512 positions); the golden trace's outputs are also the per-layer numpy function's."""
    dut, tables, seq, expect = stories_case()
    assert dut.n_layers == 5 and len(set(zip(dut.exp_mult, dut.exp_shift))) == 5
    assert (expected(dut, tables, seq) == expect).all()
    assert (expected(dut, tables, seq, shared_cache=True) != expect).any()
    run(dut, seq, expect)


def test_negative_control():
    """One input (position 5) sent with the next layer's index instead of its own: the bench
    must fail."""
    dut, _, seq, expect = stories_case()
    layers = [s[0] for s in seq]
    j = next(i for i, s in enumerate(seq) if s[1] == 5)
    layers[j] = (layers[j] + 1) % dut.n_layers
    run(dut, seq, expect, layers=layers, expect_failure=True)


def test_cycle_formula():
    """Banking changes no cycle: stories260K's five-layer unit has one layer's formula."""
    dut, *_ = stories_case(n_pos=1)
    assert dut.head_groups == 4
    assert [dut.latency(p) for p in (0, 1, 11, 511)] == [24, 32, 112, 4112]
    assert dut.initiation_interval(11) == dut.latency(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        del dut
        gc.collect()


# -- KVCache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_pos", [4, 5])
def test_kvcache_banked(n_pos):
    """Writes to random (layer, pos) rows (and out-of-range ones), then every row read back,
    vs a numpy model with one context per layer (n_pos 4: the layer as address bits above
    pos; 5: layer * n_pos + pos)."""
    L, kv_dim, bits = 3, 4, 10
    dut = KVCache(n_pos=n_pos, kv_dim=kv_dim, bits=bits, n_layers=L)
    r = rng(11)
    k_mem = np.zeros((L, n_pos, kv_dim), dtype=np.int64)
    v_mem = np.zeros_like(k_mem)
    writes = [(int(r.integers(L)), int(r.integers(n_pos + 2)), r.integers(-512, 512, kv_dim),
               r.integers(-512, 512, kv_dim)) for _ in range(40)]
    for layer, pos, k, v in writes:
        if pos < n_pos:
            k_mem[layer, pos], v_mem[layer, pos] = k, v
    assert any(pos >= n_pos for _, pos, _, _ in writes)
    got = {}

    async def bench(ctx):
        for layer, pos, k, v in writes:
            ctx.set(dut.layer, layer)
            ctx.set(dut.w.payload, {"pos": pos, "k": [int(x) for x in k],
                                    "v": [int(x) for x in v]})
            ctx.set(dut.w.valid, 1)
            await ctx.tick()
        ctx.set(dut.w.valid, 0)
        ctx.set(dut.read.en, 1)
        for layer in range(L):
            for pos in range(n_pos):
                ctx.set(dut.layer, layer)
                ctx.set(dut.read.addr, pos)
                await ctx.tick()
                got[layer, pos] = ([ctx.get(dut.read.k[j]) for j in range(kv_dim)],
                                   [ctx.get(dut.read.v[j]) for j in range(kv_dim)])
        got["error"] = ctx.get(dut.error)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert got.pop("error") == 1
    for (layer, pos), (k, v) in got.items():
        assert k == list(k_mem[layer, pos]) and v == list(v_mem[layer, pos]), (layer, pos)
    # the data can tell: layers hold different rows at the same position
    assert (k_mem[0] != k_mem[1]).any()


def test_kvcache_bad_config():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=r"^n_layers must be at least 1, not 0$") as info:
            KVCache(n_pos=8, kv_dim=4, n_layers=0)
        del info
        gc.collect()


# -- interface and configs -------------------------------------------------------------------

TABLES = nx.make_tables(head_size=4, seq_len=8)
GOOD = dict(n_heads=4, n_kv_heads=2, head_size=4, n_pos=8, bits=10, out_bits=8, out_shift=2,
            exp_table=TABLES.exp, recip_table=TABLES.recip, recip_bits=10, recip_frac=25,
            exp_len=512)


def test_interface():
    """n_layers = 1: today's unit (no ``layer`` port, int constants, the same RTLIL as without
    the parameter); n_layers = 3: a ``layer`` port and per-layer tuples."""
    one = Attention(**GOOD, exp_mult=1000, exp_shift=18)
    also = Attention(**GOOD, exp_mult=1000, exp_shift=18, n_layers=1)
    assert "layer" not in one.signature.members and one.n_layers == 1
    assert (one.exp_mult, one.exp_shift) == (1000, 18)
    assert rtlil.convert(one, name="a") == rtlil.convert(also, name="a")
    cache = KVCache(n_pos=8, kv_dim=4)
    assert "layer" not in cache.signature.members and cache.n_layers == 1
    three = Attention(**GOOD, exp_mult=np.array([1000, 2000, 3000]), exp_shift=(18, 19, 20),
                      n_layers=3)
    assert three.signature.members["layer"] == In(range(3))
    assert (three.exp_mult, three.exp_shift) == ((1000, 2000, 3000), (18, 19, 20))
    assert all(type(x) is int for x in three.exp_mult + three.exp_shift)
    assert KVCache(n_pos=8, kv_dim=4, n_layers=3).signature.members["layer"] == In(range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        del three
        gc.collect()


@pytest.mark.parametrize("over, message", [
    (dict(n_layers=0), r"^n_layers must be at least 1, not 0$"),
    (dict(exp_mult=1000), r"^exp_mult must be a sequence of n_layers \(3\) ints, not 1000$"),
    (dict(exp_mult=(1000, 2000)), r"^exp_mult has 2 entries, not n_layers \(3\)$"),
    (dict(exp_shift=(18, 18, 18, 18)), r"^exp_shift has 4 entries, not n_layers \(3\)$"),
    (dict(exp_mult=(1000, 2.5, 3000)), r"^layer 1: exp_mult must be an int, not 2\.5$"),
    (dict(exp_shift=(18, 18, -1)), r"^layer 2: exp_shift must be non-negative, not -1$"),
    (dict(exp_mult=(1000, 1 << 17, 3000)), r"^layer 1: exp_mult \(131072\) must lie in "
                                           r"\[0, 2\*\*17\) to be a multiplier operand$"),
    (dict(exp_mult=(-1, 1000, 3000)), r"^layer 0: exp_mult \(-1\) must lie in \[0, 2\*\*17\)"
                                      r" to be a multiplier operand$"),
])
def test_bad_config(over, message):
    kwargs = dict(GOOD, exp_mult=(1000, 2000, 3000), exp_shift=(18, 19, 20), n_layers=3)
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            Attention(**{**kwargs, **over})
        del info
        gc.collect()
