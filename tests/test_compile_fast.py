"""The fast compile path emits exactly what stock Amaranth emits, only sooner.

``hardwire compile`` elaborates once and converts with :func:`compiler.rtlil_fast.fast_amaranth`
(a coarse comb-cycle check, string-built memory inits, direct layout constants). These tests
compare its RTLIL and Verilog with Amaranth's own ``rtlil.convert`` / ``verilog.convert`` byte
for byte, on whole chips and on small designs aimed at each replaced function, and check that
combinational cycles are still caught.
"""

import numpy as np
import pytest
from amaranth.back import rtlil, verilog
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.hdl._nir import CombinationalCycle
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from hardwire.compiler.chip_builder import build_chip, chip_name
from hardwire.compiler.emit import _ports, chip_rtlil, convert_verilog, rtlil_to_verilog
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import plan_chip
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.rtlil_fast import _layout_raw, coarse_comb_cycle, fast_amaranth


@pytest.fixture(scope="module")
def tiny_qm():
    m = random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40,
                     seq_len=16, seed=7, shared_classifier=False)
    return quantize_model(m, wbits="8")


def _stock_rtlil(component, name):
    return rtlil.convert(component, name=name, ports=_ports(component), emit_src=False)


@pytest.mark.parametrize("fold", [None, "w1=4x8:const,w2=2x4:const,embed=2,rope=2,norm=2"])
def test_chip_rtlil_and_verilog_equal_stock(tiny_qm, fold):
    plan = plan_chip(tiny_qm, fold=fold)
    name = chip_name(tiny_qm)
    fast = chip_rtlil(build_chip(tiny_qm, plan), name=name)
    assert fast == _stock_rtlil(build_chip(tiny_qm, plan), name)
    chip = build_chip(tiny_qm, plan)
    stock_v = verilog.convert(chip, name=name, ports=_ports(chip), emit_src=False)
    assert rtlil_to_verilog(fast) == stock_v


def test_chip_rtlil_sees_one_weight(tiny_qm):
    """Negative control: the comparison above is sensitive to a single weight bit."""
    plan = plan_chip(tiny_qm)
    name = chip_name(tiny_qm)
    base = chip_rtlil(build_chip(tiny_qm, plan), name=name)
    wq = tiny_qm.layers[1].wq.q
    old = int(wq[3, 5])
    wq.flags.writeable = True
    wq[3, 5] = old + 1 if old < 100 else old - 1
    try:
        assert chip_rtlil(build_chip(tiny_qm, plan), name=name) != base
    finally:
        wq[3, 5] = old


class _Roms(wiring.Component):
    """Memories of every init kind the fast path rewrites: plain signed/unsigned rows (some
    negative), array and struct layouts, a 1-bit memory, and a full-width constant."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self._plain = rng.integers(-2**12, 2**12, 37).tolist()
        self._wide = rng.integers(0, 2**62, 9).tolist()
        self._arr = rng.integers(-8, 8, (21, 5)).tolist()
        self._bits = rng.integers(0, 2, 13).tolist()
        self._struct = [{"a": rng.integers(-4, 4, 3).tolist(), "b": int(rng.integers(0, 64))}
                        for _ in range(11)]
        super().__init__({"addr": In(6), "o": Out(200)})

    def elaborate(self, platform):
        m = Module()
        mems = [
            Memory(shape=signed(13), depth=40, init=self._plain),
            Memory(shape=unsigned(120), depth=9, init=[w << 58 | w for w in self._wide]),
            Memory(shape=data.ArrayLayout(signed(4), 5), depth=21, init=self._arr),
            Memory(shape=1, depth=13, init=self._bits),
            Memory(shape=data.StructLayout({"a": data.ArrayLayout(signed(3), 3),
                                            "b": unsigned(6)}), depth=11, init=self._struct),
        ]
        outs = []
        for i, mem in enumerate(mems):
            m.submodules[f"mem{i}"] = mem
            rd = mem.read_port()
            m.d.comb += rd.addr.eq(self.addr)
            outs.append(rd.data.as_value() if hasattr(rd.data, "as_value") else rd.data)
        m.d.comb += self.o.eq(sum(o.as_unsigned() for o in outs))
        return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_inits_equal_stock(seed):
    with fast_amaranth():
        fast = _stock_rtlil(_Roms(seed), "roms")
    stock = _stock_rtlil(_Roms(seed), "roms")
    assert fast == stock
    assert fast != _stock_rtlil(_Roms(seed + 10), "roms")      # negative control
    roms = _Roms(seed)
    assert convert_verilog(_Roms(seed), name="roms") == verilog.convert(
        roms, name="roms", ports=_ports(roms), emit_src=False)


@pytest.mark.parametrize("shape, init", [
    (signed(4), 7), (signed(4), -8), (unsigned(4), 15), (unsigned(1), 1),
    (data.ArrayLayout(signed(5), 3), [-16, 15, 0]),
    (data.ArrayLayout(data.ArrayLayout(unsigned(2), 2), 2), [[1, 3], [2, 0]]),
    (data.StructLayout({"x": signed(3), "y": data.ArrayLayout(unsigned(2), 2)}),
     {"y": [3, 1], "x": -2}),
    (data.StructLayout({"x": signed(3), "y": unsigned(2)}), {"x": 1}),   # y stays 0
])
def test_layout_raw_equals_amaranth(shape, init):
    from amaranth.hdl import Const, Shape
    want = Const.cast(shape.const(init) if hasattr(shape, "const") else Const(init, shape)).value
    want &= (1 << Shape.cast(shape).width) - 1        # a field's bits, as placed in a row
    assert _layout_raw(shape, init, Shape, data) == want


@pytest.mark.parametrize("shape, init", [
    (signed(4), 8),                                   # out of range: Amaranth decides
    (unsigned(4), -1),
    (data.ArrayLayout(signed(5), 3), [1, 2]),         # short list
    (data.ArrayLayout(signed(5), 3), (1, 2, np.int64(3))),
    (data.StructLayout({"x": signed(3)}), {"z": 1}),  # unknown field
    (data.StructLayout({"x": signed(3)}), [1]),
])
def test_layout_raw_declines_what_it_does_not_mirror(shape, init):
    from amaranth.hdl import Shape
    assert _layout_raw(shape, init, Shape, data) is None


class _Loop(wiring.Component):
    """A comb loop through two signals (``cycle=True``), or bit 1 of a signal fed from its own
    bit 0 (acyclic per bit, but a cycle in the coarse signal graph)."""

    def __init__(self, cycle):
        self._cycle = cycle
        super().__init__({"a": In(2), "o": Out(2)})

    def elaborate(self, platform):
        m = Module()
        x, y = Signal(2), Signal(2)
        if self._cycle:
            m.d.comb += [x.eq(y ^ self.a), y.eq(x + 1)]
        else:
            m.d.comb += [x[0].eq(self.a[0]), x[1].eq(x[0] ^ self.a[1]), y.eq(x)]
        m.d.comb += self.o.eq(y)
        return m


def test_comb_cycle_still_caught():
    with fast_amaranth(), pytest.raises(CombinationalCycle):
        _stock_rtlil(_Loop(cycle=True), "loop")


def test_coarse_false_cycle_falls_back_to_exact_check():
    from amaranth.hdl import Fragment
    from amaranth.hdl._ir import build_netlist
    loop = _Loop(cycle=False)
    netlist_fragment = Fragment.get(loop, None)
    # the coarse graph sees a cycle (x feeds itself) ...
    seen = []
    import hardwire.compiler.rtlil_fast as rf
    orig = rf.coarse_comb_cycle

    def spy(netlist):
        seen.append(orig(netlist))
        return seen[-1]
    rf.coarse_comb_cycle = spy
    try:
        with fast_amaranth():
            build_netlist(netlist_fragment, ports=_ports(loop), name="loop")
    finally:
        rf.coarse_comb_cycle = orig
    assert seen == [True]
    # ... and the exact check lets it through, with the same text as stock
    with fast_amaranth():
        fast = _stock_rtlil(_Loop(cycle=False), "loop")
    assert fast == _stock_rtlil(_Loop(cycle=False), "loop")


def test_coarse_graph_of_chip_is_acyclic(tiny_qm):
    """The chip never needs the slow exact check (else the fast path is not fast)."""
    from amaranth.hdl import Fragment
    from amaranth.hdl._ir import _emit_netlist
    from amaranth.hdl._nir import Netlist
    chip = build_chip(tiny_qm)
    design = Fragment.get(chip, None).prepare(ports=_ports(chip), hierarchy=("chip",))
    netlist = Netlist()
    _emit_netlist(netlist, design, all_undef_to_ff=False)
    assert coarse_comb_cycle(netlist) is False


def test_patches_are_undone():
    from amaranth.hdl import _mem, _nir
    before = (_nir.Netlist.check_comb_cycles, rtlil.ModuleEmitter.emit_memory,
              _nir.Value.__new__, _mem._get_init_value)
    with fast_amaranth():
        assert _nir.Netlist.check_comb_cycles is not before[0]
    assert (_nir.Netlist.check_comb_cycles, rtlil.ModuleEmitter.emit_memory,
            _nir.Value.__new__, _mem._get_init_value) == before
