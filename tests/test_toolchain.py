"""Prove the PyPI toolchain end to end on a tiny component.

The toy computes ``y = 3*x + 1`` for a stream of ``signed(8)`` into a stream of ``signed(16)``:
a 256x16 ROM (``memory.Memory``, synchronous read) holds ``2*x + 1`` and an adder adds ``x``,
so both the ROM and logic survive synthesis. It is simulated with cocotb + Verilator against
numpy (with random bubbles and backpressure), checked to *fail* on a perturbed golden value,
checked to reuse the cached Verilator build, and pushed through yosys ``synth_ecp5``,
nextpnr-ecp5 and ecppack (all yowasp, from PyPI).
"""

from pathlib import Path

import numpy as np
import pytest
from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hardwire.compiler.errors import HardwireError
from hardwire.fpga.flow import count_cells, rtlil_of, synthesize_rtlil
from hardwire.sim.cocotb_helpers import pack_signed, to_bits, to_signed, unpack_signed
from hardwire.sim.cocotb_runner import run_cocotb, save_vectors
from hardwire.sim.toolchain import ensure_toolchain, tool_versions, toolchain_env

BENCHES = Path(__file__).parent / "benches"


class Toy(wiring.Component):
    """``o = 3*i + 1``, one register stage (the ROM's read register), valid/ready honoured."""

    i: In(stream.Signature(signed(8)))
    o: Out(stream.Signature(signed(16)))

    def elaborate(self, platform):
        m = Module()
        # ROM[a] = 2*x + 1 where x is the signed value of the address bits a.
        table = [2 * (a - 256 if a >= 128 else a) + 1 for a in range(256)]
        m.submodules.rom = rom = memory.Memory(shape=signed(16), depth=256, init=table)
        rd = rom.read_port(domain="sync")
        x_reg = Signal(signed(8))
        advance = ~self.o.valid | self.o.ready
        m.d.comb += [
            self.i.ready.eq(advance),
            rd.en.eq(advance),
            rd.addr.eq(self.i.payload.as_unsigned()),
            self.o.payload.eq(rd.data + x_reg),
        ]
        with m.If(advance):
            m.d.sync += [self.o.valid.eq(self.i.valid), x_reg.eq(self.i.payload)]
        return m


def golden(x):
    return x.astype(np.int16) * 3 + 1


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    return tmp_path_factory.mktemp("sim-build")


def _vectors(tmp_path, name, n=300, seed=1, perturb=None):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=n, dtype=np.int64).astype(np.int8)
    x[:4] = [-128, 127, 0, -1]  # corners
    expected = golden(x)
    if perturb is not None:
        expected[perturb] += 1
    return save_vectors(tmp_path / name, x=x, expected=expected, valid_prob=0.7,
                        ready_prob=0.6, seed=seed)


def _run(sim_root, vectors, **kwargs):
    return run_cocotb(component_or_verilog=Toy(), toplevel="hw_toy",
                      test_module="toolchain_bench", test_dir=BENCHES, build_root=sim_root,
                      vectors=vectors, timeout_s=120, **kwargs)


def test_toolchain_present():
    env = ensure_toolchain()
    assert Path(env["VERILATOR_ROOT"], "include", "verilated.mk").is_file()
    assert "CFG_CXXFLAGS_PCH_I=-include" in env["MAKEFLAGS"]
    versions = tool_versions()
    assert versions["verilator"] != "not installed"


def test_stream_port_names():
    from hardwire.sim.cocotb_runner import export_verilog

    text = export_verilog(Toy(), "hw_toy")
    header = text[text.index("module hw_toy("):].split(";")[0]
    for name in ("clk", "rst", "i__valid", "i__ready", "i__payload",
                 "o__valid", "o__ready", "o__payload"):
        assert name in header
    assert export_verilog(Toy(), "hw_toy") == text  # deterministic


def test_sim_matches_numpy(sim_root, tmp_path):
    results = _run(sim_root, _vectors(tmp_path, "good"))
    assert results.passed == ["toy_matches_numpy"] and not results.failed


def test_sim_negative_control(sim_root, tmp_path):
    results = _run(sim_root, _vectors(tmp_path, "bad", perturb=137), expect_failure=True)
    assert results.failed == ["toy_matches_numpy"]
    assert "137" in results.tests[0].message
    with pytest.raises(AssertionError, match="toy_matches_numpy"):
        _run(sim_root, _vectors(tmp_path, "bad2", perturb=5))
    with pytest.raises(AssertionError, match="expected a cocotb test to fail"):
        _run(sim_root, _vectors(tmp_path, "good2"), expect_failure=True)


def test_sim_build_is_cached(sim_root, tmp_path):
    vectors = _vectors(tmp_path, "cache", n=40, seed=3)
    first = _run(sim_root, vectors)
    marker = first.build.build_dir / "hardwire-build.json"
    stamp = marker.stat().st_mtime_ns
    exe_stamp = (first.build.build_dir / "hw_toy").stat().st_mtime_ns
    second = _run(sim_root, vectors)
    assert second.cached and second.build.build_s == 0.0
    assert second.build.build_dir == first.build.build_dir
    assert marker.stat().st_mtime_ns == stamp
    assert (first.build.build_dir / "hw_toy").stat().st_mtime_ns == exe_stamp


def test_synthesis_ecp5(tmp_path):
    out = tmp_path / "synth"
    il = out / "hw_toy.il"
    out.mkdir()
    il.write_text(rtlil_of(Toy(), "hw_toy"))
    report = synthesize_rtlil(il, out_dir=out, top="hw_toy")
    util = report["utilization"]
    assert util["LUT4"] > 0, util
    assert util["TRELLIS_FF"] > 0, util
    # a 256x16 ROM with a synchronous read port is mapped to block RAM, not flip-flops
    assert util["DP16KD"] >= 1, util
    cells = count_cells(out / "hw_toy.json")
    assert cells.get("DP16KD", 0) >= 1 and cells.get("TRELLIS_FF", 0) < 64, cells
    assert report["fmax_mhz"] and min(report["fmax_mhz"].values()) > 0, report["fmax_mhz"]
    bit = Path(report["bitstream"])
    assert bit.is_file() and bit.stat().st_size > 1000
    assert (out / "synth.json").is_file()


class WideReg(wiring.Component):
    """More port bits than a CABGA381 has pins: must be placed out of context."""

    a: In(unsigned(128))
    y: Out(unsigned(128))

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.y.eq(self.a ^ (self.a >> 1))
        return m


def test_synthesis_out_of_context(tmp_path):
    il = tmp_path / "wide.il"
    il.write_text(rtlil_of(WideReg(), "wide"))
    report = synthesize_rtlil(il, out_dir=tmp_path / "ooc", top="wide", progress=False)
    assert report["out_of_context"] and report["bitstream"] is None
    assert report["utilization"]["TRELLIS_FF"] == 128
    assert report["utilization"]["DP16KD"] == 0


def test_synthesis_failure_is_one_line(tmp_path):
    il = tmp_path / "toy.il"
    il.write_text(rtlil_of(Toy(), "hw_toy"))
    with pytest.raises(HardwireError, match=r"yosys synth_ecp5 failed .*see .*yosys\.log"):
        synthesize_rtlil(il, out_dir=tmp_path / "bad", top="no_such_top", progress=False)


def test_missing_tool_is_an_error(tmp_path):
    with pytest.raises(HardwireError, match="YOSYS"):
        toolchain_env({"PATH": "/usr/bin:/bin", "YOSYS": str(tmp_path / "no-yosys")})


def test_signed_packing():
    assert to_bits(-1, 8) == 0xFF and to_signed(0xFF, 8) == -1 and to_signed(0x7F, 8) == 127
    values = [-128, 127, 0, -1, 5]
    packed = pack_signed(values, 8)
    assert packed & 0xFF == 0x80  # element 0 in the LSBs
    assert unpack_signed(packed, len(values), 8) == values
    with pytest.raises(ValueError):
        to_bits(-129, 8)
