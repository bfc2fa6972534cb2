"""RoPE: random and stories260K vectors vs ``numerics.rope``, cycles, range errors, configs."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.sim import Simulator

from hardwire.compiler import numerics as nx
from hardwire.hdl.rope import RoPE, RoPETable
from hardwire.sim.cocotb_runner import run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"


def run(dut, pos, vecs, expect, *, valid_prob=1.0, ready_prob=1.0, expect_error=0,
        expect_failure=False):
    layout = dut.i.payload.shape()
    inputs = [format(layout.const({"pos": int(p), "vec": [int(x) for x in v]})
                     .as_value().value, "x") for p, v in zip(pos, vecs)]
    vectors = dict(inputs=np.array(inputs), expect=np.asarray(expect).reshape(-1, dut.n),
                   bits=dut.bits, valid_prob=valid_prob, ready_prob=ready_prob,
                   latency=dut.latency(), interval=dut.initiation_interval(),
                   expect_error=expect_error, quiet=4 * dut.latency())
    return run_cocotb(component_or_verilog=dut, toplevel="rope", test_module="rope_bench",
                      test_dir=TESTS / "benches", build_root=BUILD_ROOT, vectors=vectors,
                      expect_failure=expect_failure, timeout_s=120)


def random_case(seed, *, n, head_size, lanes, seq_len=12, bits=10, count=30):
    """Random vectors at random positions, with full-scale pairs that saturate."""
    r = rng(seed)
    tables = nx.make_tables(head_size=head_size, seq_len=seq_len)
    dut = RoPE(n=n, head_size=head_size, cos_table=tables.rope_cos,
               sin_table=tables.rope_sin, frac=tables.config.rope_frac, bits=bits, lanes=lanes)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    pos = r.integers(0, seq_len, count)
    pos[:2] = [seq_len - 1, 0]
    vecs = r.integers(lo, hi, (count, n))
    vecs[:3, 0::2], vecs[:3, 1::2] = hi - 1, lo      # |a cos - b sin| up to sqrt(2) * 2**(bits-1)
    expect = np.array([nx.rope(v, p, tables, bits=bits) for p, v in zip(pos, vecs)])
    assert (np.abs(expect) == hi - 1).any() or (expect == lo).any()   # saturation happens
    return dut, pos, vecs, expect


@pytest.mark.parametrize("n, head_size, lanes", [
    (16, 8, 1),     # one pair per cycle
    (24, 8, 6),     # lanes neither divide nor are a multiple of head_size/2: column muxes
    (32, 4, 16),    # whole vector in one cycle
])
def test_random(n, head_size, lanes):
    dut, pos, vecs, expect = random_case(n + lanes, n=n, head_size=head_size, lanes=lanes)
    run(dut, pos, vecs, expect)


def test_random_backpressure():
    dut, pos, vecs, expect = random_case(5, n=24, head_size=8, lanes=6)
    run(dut, pos, vecs, expect, valid_prob=0.5, ready_prob=0.4)


def test_position_out_of_range():
    """pos >= seq_len (12; the field also holds 12..15): no output, sticky error, and the
    following inputs are still rotated."""
    dut, pos, vecs, expect = random_case(6, n=24, head_size=8, lanes=6, count=12)
    pos = np.concatenate([pos[:4], [12, 15], pos[4:]])
    vecs = np.concatenate([vecs[:4], vecs[:2], vecs[4:]])
    run(dut, pos, vecs, expect, expect_error=1, valid_prob=0.7, ready_prob=0.7)


def stories_case(which, lanes):
    qm = stories_qmodel()
    c, tables = qm.config, qm.tables
    n = c.dim if which == "q" else c.kv_dim
    dut = RoPE(n=n, head_size=c.head_size, cos_table=tables.rope_cos,
               sin_table=tables.rope_sin, frac=tables.config.rope_frac,
               bits=qm.numerics.qkv_bits, lanes=lanes)
    trace = stories_trace()
    pos = np.array([t["pos"] for t in trace])
    vecs = np.array([t[f"L0.{which}"] for t in trace])
    expect = np.array([t[f"L0.{which}_rope"] for t in trace])
    return dut, pos, vecs, expect


@pytest.mark.parametrize("which, lanes", [("q", 4), ("k", 16)])
def test_stories260k(which, lanes):
    dut, pos, vecs, expect = stories_case(which, lanes)
    assert (pos == np.arange(len(pos))).all() and (expect != vecs).any()
    run(dut, pos, vecs, expect)


def test_negative_control():
    dut, pos, vecs, expect = stories_case("q", 4)
    expect[5, 13] += 1
    run(dut, pos, vecs, expect, expect_failure=True)


@pytest.mark.parametrize("n, lanes, chunks", [(16, 1, 8), (24, 6, 2), (64, 32, 1)])
def test_cycle_formulas(n, lanes, chunks):
    """The formulas themselves; the benches measure them (test_random, test_stories260k)."""
    tables = nx.make_tables(head_size=8, seq_len=4)
    dut = RoPE(n=n, head_size=8, cos_table=tables.rope_cos, sin_table=tables.rope_sin,
               lanes=lanes)
    assert dut.chunks == chunks
    assert dut.latency() == dut.initiation_interval() == chunks + 4
    Fragment.get(dut, None)     # elaborates


TABLES = nx.make_tables(head_size=8, seq_len=6)
GOOD = dict(n=16, head_size=8, cos_table=TABLES.rope_cos, sin_table=TABLES.rope_sin)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_size=7), r"^head_size \(7\) must be even and at least 2: RoPE rotates pairs$"),
    (dict(n=12), r"^n \(12\) must be a positive multiple of head_size \(8\)$"),
    (dict(lanes=3), r"^lanes \(3\) must divide the number of pairs n/2 \(8\)$"),
    (dict(cos_table=TABLES.rope_cos[:, :3]),
     r"^cos_table has shape \(6, 3\); expected \(seq_len, head_size//2 = 4\)$"),
    (dict(sin_table=TABLES.rope_sin[:5]),
     r"^cos_table \(6, 4\) and sin_table \(5, 4\) must have the same shape$"),
    (dict(cos_table=TABLES.rope_cos * 16, sin_table=TABLES.rope_sin * 16),
     r"^rope table values \[-259520, 262144\] need 20 bits; a multiplier operand takes at "
     r"most 18$"),
    (dict(cos_table=TABLES.rope_cos.astype(float)), r"^cos_table must hold integers"),
    (dict(bits=1), r"^bits must be at least 2 for signed elements, not 1$"),
    (dict(shared_table=1), r"^shared_table must be True or False, not 1$"),
])
def test_bad_config(kwargs, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            RoPE(**{**GOOD, **kwargs})
        del info
        gc.collect()


# ------------------------------------------------------------------ one table, shared ports

class SharedTableRoPE(wiring.Component):
    """Two "layers" of (rope_q, rope_k) units built with ``shared_table`` around one
    :class:`RoPETable`; the unit under test is layer 1's ``which`` unit (its ports are this
    component's), the other three stay idle. ``broken``: the unit's read enable does not
    reach the table (the negative control)."""

    def __init__(self, *, which, broken=False, **kwargs):
        self.units = [tuple(RoPE(**kwargs, shared_table=True) for _ in "qk") for _ in "01"]
        self.dut = self.units[1]["qk".index(which)]
        self.table = RoPETable(ropes=self.units)
        self.broken = broken
        members = self.dut.signature.members
        super().__init__({k: members[k] for k in ("i", "o", "error")})

    def latency(self):
        return self.dut.latency()

    def initiation_interval(self):
        return self.dut.initiation_interval()

    n = property(lambda self: self.dut.n)
    bits = property(lambda self: self.dut.bits)

    def elaborate(self, platform):
        m = Module()
        m.submodules.table = self.table
        for k, pair in enumerate(self.units):
            for which, unit in zip("qk", pair):
                m.submodules[f"{which}{k}"] = unit
                port = getattr(self.table, which)[k]
                if unit is self.dut and self.broken:
                    m.d.comb += [port.addr.eq(unit.table.addr), unit.table.data.eq(port.data)]
                else:
                    wiring.connect(m, unit.table, port)
        wiring.connect(m, wiring.flipped(self.i), self.dut.i)
        wiring.connect(m, self.dut.o, wiring.flipped(self.o))
        m.d.comb += self.error.eq(self.dut.error)
        return m


def shared_case(which, lanes, broken=False):
    dut, pos, vecs, expect = stories_case(which, lanes)
    c = stories_qmodel().config
    tables = stories_qmodel().tables
    shared = SharedTableRoPE(which=which, broken=broken, n=dut.n, head_size=c.head_size,
                             cos_table=tables.rope_cos, sin_table=tables.rope_sin,
                             frac=tables.config.rope_frac, bits=dut.bits, lanes=lanes)
    Fragment.get(dut, None)         # the own-table unit is only the reference here
    assert shared.latency() == dut.latency()
    return shared, pos, vecs, expect


@pytest.mark.parametrize("which, lanes", [("q", 2), ("k", 1)])
def test_shared_table_stories260k(which, lanes):
    """A unit reading the chip-style shared ROM through port ``which`` of layer 1: bit-exact
    against the golden model, same latency and interval as with its own ROM."""
    dut, pos, vecs, expect = shared_case(which, lanes)
    run(dut, pos, vecs, expect, valid_prob=0.8, ready_prob=0.7)
    run(dut, pos, vecs, expect)


def test_shared_table_negative_control():
    """The unit's read enable cut off from the table: the bench fails."""
    dut, pos, vecs, expect = shared_case("q", 2, broken=True)
    run(dut, pos, vecs, expect, expect_failure=True)


def test_rope_table_ports_and_clash():
    """The table alone (``amaranth.sim``): each port returns, one cycle later, the word at the
    address of the one unit that read (held when none did), to every unit; ``clash`` is high
    exactly when two units of a port read in the same cycle."""
    tables = nx.make_tables(head_size=8, seq_len=6)
    kw = dict(n=16, head_size=8, cos_table=tables.rope_cos, sin_table=tables.rope_sin,
              lanes=2, shared_table=True)
    units = [(RoPE(**kw), RoPE(**{**kw, "n": 8})) for _ in range(3)]
    table = RoPETable(ropes=units)
    for pair in units:      # the units only own the ports here; elaborated, so none is unused
        for unit in pair:
            Fragment.get(unit, None)
    init = units[0][0].table_init()
    assert table.depth == len(init) == 6 * 2
    layout = units[0][0].table_shape()
    r = rng(11)
    seen = []

    async def bench(ctx):
        for _ in range(80):
            addr = {}
            for which in "qk":
                for k in range(3):
                    port = getattr(table, which)[k]
                    a, en = int(r.integers(0, len(init))), int(r.random() < 0.3)
                    ctx.set(port.addr, a)
                    ctx.set(port.en, en)
                    addr[which, k] = (a, en)
            clash = ctx.get(table.clash)
            await ctx.tick()
            got = {(w, k): ctx.get(getattr(table, w)[k].data).as_value().value
                   for w in "qk" for k in range(3)}
            seen.append((addr, clash, got))

    sim = Simulator(table)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    word = [layout.const(w).as_value().value for w in init]

    def check(word):
        held, bad, clashes, reads = {"q": 0, "k": 0}, [], 0, 0
        for step, (addr, clash, got) in enumerate(seen):
            readers = {w: [a for (v, k), (a, en) in addr.items() if v == w and en]
                       for w in "qk"}
            want_clash = any(len(x) > 1 for x in readers.values())
            clashes += want_clash
            if bool(clash) != want_clash:
                bad.append(f"step {step}: clash {clash}")
            for w in "qk":
                if len(readers[w]) > 1:
                    held[w] = None          # a clash: the word is undefined
                    continue
                if readers[w]:
                    held[w] = word[readers[w][0]]
                    reads += 1
                for k in range(3):          # every unit sees the word
                    if held[w] is not None and got[w, k] != held[w]:
                        bad.append(f"step {step}: port {w}{k}")
        return clashes, reads, bad

    clashes, reads, bad = check(word)
    assert 0 < clashes < len(seen) and reads > 20 and not bad, bad[:5]
    # negative control: the same check against the words one row off must fail
    assert check(word[1:] + word[:1])[2]


def test_chip_rope_table_never_clashes():
    """A two-layer chip (``amaranth.sim``): both layers' units read the one table, never in
    the same cycle, and the tokens and layer outputs are the golden model's."""
    import test_chip as tc
    qm = tc.tiny_qmodel("mha")
    chip = tc.build_chip(qm, tc.plan_chip(qm, fold=tc.TINY["mha"][1]))
    assert chip.rope_table is not None and chip.rope_table.n_layers == 2
    script = tc.Script(qm, chip).feed(1, 5).feed_own(1)
    seen, clash, readers = [], [], set()

    async def bench(ctx):
        ctx.set(chip.token_out.ready, 1)
        for kind, token, *_ in script.ops:
            token = seen[-1][0] if kind == tc.FEED_OWN else token
            ctx.set(chip.token_in.payload, token)
            ctx.set(chip.token_in.valid, 1)
            await ctx.tick().until(chip.token_in.ready)
            ctx.set(chip.token_in.valid, 0)
            taps = []
            while not ctx.get(chip.token_out.valid):
                if ctx.get(chip.tap_valid):
                    taps.append([int(x) for x in ctx.get(chip.tap_data)])
                clash.append(ctx.get(chip.rope_table.clash))
                for k, layer in enumerate(chip.layers):
                    for w in "qk":
                        if ctx.get(getattr(layer, f"rope_{w}_table").en):
                            readers.add((k, w))
                await ctx.tick()
            seen.append((ctx.get(chip.token_out.payload), taps))
            await ctx.tick()

    sim = Simulator(chip)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert readers == {(k, w) for k in range(2) for w in "qk"}
    assert len(clash) > 1000 and not any(clash)
    for (token, taps), (want, want_taps, _) in zip(seen, script.feeds):
        assert token == want and taps == [list(t) for t in want_taps]


@pytest.mark.parametrize("make, message", [
    (lambda kw: [(RoPE(**kw), RoPE(**{**kw, "shared_table": False}))],
     r"^ropes\[0\] rope_k has its own table \(shared_table=False\)$"),
    (lambda kw: [(RoPE(**kw), RoPE(**kw)), (RoPE(**kw), RoPE(**{**kw, "lanes": 4}))],
     r"^ropes\[1\] rope_k has a different table \(tables, lanes or value width\) than "
     r"ropes\[0\] rope_q$"),
    (lambda kw: [], r"^ropes must hold at least one \(rope_q, rope_k\) pair$"),
])
def test_rope_table_bad_config(make, message):
    kw = dict(GOOD, shared_table=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            RoPETable(ropes=make(kw))
        del info
        gc.collect()
