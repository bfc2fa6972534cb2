"""FPGA flow: the YoWASP Yosys workarounds, the weight-ROM check, DSP fitting, and one tiny
random chip through the full flow (board top: PLL, UART, host link, chip -> Yosys ->
nextpnr-ecp5 -> ecppack) with its synth.json figures checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hardwire.compiler.errors import HardwireError
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import plan_chip, rom_bits
from hardwire.compiler.quantize import quantize_model
from hardwire.fpga.flow import memory_mapping, rtlil_of, yosys_script
from hardwire.fpga.synth import (
    booth_commands,
    check_roms,
    estimate_dsps,
    fit_board,
    mul_breakdown,
    mul_cells,
    soft_multipliers,
    synth_qmodel,
)
from hardwire.sim.toolchain import ensure_toolchain

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

# the smallest chip: one layer, one head, dim 8, most folded
MINI = dict(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8, vocab_size=8, seq_len=4,
            shared_classifier=False)


class Mix(wiring.Component):
    """LUT logic on the elements of array-layout stream ports: Amaranth names the element
    views ``\\i__payload[0]`` .. ``[3]``, the names ABC9 gives the bits of ``\\i__payload``."""

    def __init__(self):
        layout = data.ArrayLayout(signed(8), 4)
        super().__init__({"i": In(stream.Signature(layout)), "o": Out(stream.Signature(layout))})

    def elaborate(self, platform):
        m = Module()
        r = Signal(self.o.payload.shape())
        with m.If(self.i.valid):
            for k in range(4):
                a, b = self.i.payload[k], self.i.payload[(k + 1) % 4]
                m.d.sync += r[k].eq((a ^ (b << 1)) & ~(a >> 2) | (b & r[k]))
        m.d.comb += [self.o.payload.eq(r), self.o.valid.eq(1), self.i.ready.eq(1)]
        return m


def _yosys(tmp_path, script):
    env = ensure_toolchain()
    (tmp_path / "s.ys").write_text(script)
    p = subprocess.run([env["YOSYS"], "-q", "-l", "y.log", "-s", "s.ys"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, check=False)
    return p.returncode, (tmp_path / "y.log").read_text(errors="replace")


def test_abc9_name_clash_and_the_workaround(tmp_path):
    """The report "synth_ecp5 exits 1 during ABC9 with no message": the message is
    YosysHQ/yosys#4349, visible only with ``-l``; ``splitnets`` before LUT mapping avoids it."""
    (tmp_path / "mix.il").write_text(rtlil_of(Mix(), "mix"))
    rc, log = _yosys(tmp_path, "read_rtlil mix.il\nsynth_ecp5 -top mix\n")
    assert rc != 0 and "count_id(wire->name) == 0" in log
    for mapper in ("abc9", "abc"):
        rc, log = _yosys(tmp_path, yosys_script("mix", "mix.il", lut_mapper=mapper))
        assert rc == 0 and "End of script." in log, log[-2000:]
        assert (tmp_path / "stat.txt").read_text().count("LUT4") == 1


def test_yosys_script_steps():
    s = yosys_script("top", "top.il", memory_attrs=[("n:*weight_rom", "rom_style", "block")])
    assert s.splitlines() == [
        "read_rtlil top.il", "synth_ecp5 -top top -run begin:map_ram",
        'setattr -set rom_style "block" t:$mem_v2 n:*weight_rom %i',
        "synth_ecp5 -top top -run map_ram:map_luts", "splitnets",
        "synth_ecp5 -top top -run map_luts:", "tee -o stat.txt stat", "write_json top.json"]
    assert "abc -lut 4:7 -dress" in yosys_script("top", "top.il", lut_mapper="abc")
    s = yosys_script("top", "top.il", pre_synth=["proc", "booth top/$1"])
    assert s.splitlines()[:4] == ["read_rtlil top.il", "proc", "booth top/$1",
                                  "synth_ecp5 -top top -run begin:map_luts"]
    with pytest.raises(HardwireError, match="unknown LUT mapper"):
        yosys_script("top", "top.il", lut_mapper="abc10")


def test_memory_mapping_and_rom_check(tmp_path):
    log = tmp_path / "y.log"
    log.write_text("using FF mapping for memory t.core.chip.layer0.wq.weight_rom\n"
                   "mapping memory t.core.chip.layer0.wk.weight_rom via $__DP16KD_\n"
                   "mapping memory t.core.chip.embedding.rom via $__DP16KD_\n"
                   "using FF mapping for memory t.core.chip.layer0.wq.mult_rom\n")
    mem = memory_mapping(log)
    assert mem["t.core.chip.layer0.wq.weight_rom"] == "FF"
    assert mem["t.core.chip.layer0.wk.weight_rom"] == "$__DP16KD_"
    rep = check_roms(mem, expected_roms=3, rom_bits=40000, dp16kd_used=2)
    assert not rep["ok"] and len(rep["problems"]) == 2
    assert "layer0.wq.weight_rom was mapped to flip-flops/logic" in rep["problems"][0]
    assert "2 DP16KD hold fewer than the 40,000 ROM bits" in rep["problems"][1]
    # a small weight ROM the memory rule put in LUT logic is accepted there, and only there
    rep = check_roms(mem, expected_roms=3, rom_bits=30000, dp16kd_used=2,
                     logic_roms=["core.chip.layer0.wq.weight_rom"])
    assert rep["ok"] and rep["logic_weight_roms"] == ["t.core.chip.layer0.wq.weight_rom"]
    rep = check_roms(mem, expected_roms=3, rom_bits=30000, dp16kd_used=2,
                     logic_roms=["core.chip.layer0.wk.weight_rom"])
    assert not rep["ok"] and "wq.weight_rom was mapped to flip-flops/logic" in rep["problems"][0]
    del mem["t.core.chip.layer0.wq.weight_rom"]
    rep = check_roms(mem, expected_roms=3, rom_bits=30000, dp16kd_used=2)
    assert rep["problems"] == ["Yosys mapped 2 weight ROMs, the plan has 3"]
    assert check_roms(mem, expected_roms=2, rom_bits=30000, dp16kd_used=2)["ok"]
    # the pseudo-dual-port (512x36) primitive is block RAM too
    mem["t.core.chip.embedding.rom"] = "$__PDPW16KD_"
    assert check_roms(mem, expected_roms=2, rom_bits=30000, dp16kd_used=2)["ok"]


class Muls(wiring.Component):
    a: In(signed(8))
    b: In(signed(30))
    y: Out(signed(40))

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.y.eq(self.a * self.b + self.a * self.b + (self.a * 4) +
                              self.b[:10] * self.a[:5])
        return m


def test_estimate_dsps():
    # a*b (8x30: 2 blocks, written twice but merged), a*4 (a shift), 10x5 (1 block)
    assert estimate_dsps(rtlil_of(Muls(), "muls")) == 3


def test_soft_multipliers():
    muls = mul_cells(rtlil_of(Muls(), "muls"))
    # a*b merged (2 copies), a*4 (a shift: no block), b[:10]*a[:5]
    assert sorted((m["a"], m["b"], len(m["cells"]), m["dsps"], m["pow2"]) for m in muls) == [
        (8, 4, 1, 0, True), (8, 30, 2, 2, False), (10, 5, 1, 1, False)]
    soft, rep = soft_multipliers(muls, 3)
    assert soft == [] and rep["dsps"] == 3 and rep["fits"]
    # over budget: the narrow 10x5 goes to logic first (fewest LUT4 per block saved)
    soft, rep = soft_multipliers(muls, 2)
    assert [(m["a"], m["b"]) for m in soft] == [(10, 5)] and rep["dsps"] == 2
    assert rep["soft_luts"] == 50
    soft, rep = soft_multipliers(muls, 0)
    assert len(soft) == 2 and rep["dsps"] == 0 and rep["fits"]
    cmds = booth_commands(soft)
    assert cmds[0] == "proc" and cmds[1].startswith("booth ") and cmds[1].count("muls/$") == 3
    assert mul_breakdown(muls, soft)["muls"] == {"multipliers": 2, "dsps": 3, "soft": 2,
                                                 "widths": ["8x30", "10x5"]}


class Prod(wiring.Component):
    """Products of mixed signedness and widths, and by constants (combinational; narrow, so
    that the SAT proof is quick)."""
    a: In(signed(4))
    b: In(signed(5))
    c: In(unsigned(4))
    y: Out(signed(24))

    def __init__(self, wrong=False):
        self._wrong = wrong
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.y.eq(self.a * self.b + (self.b * self.c) * 3 + self.c * 77 +
                              (1 if self._wrong else 0) * self.a[0])
        return m


def test_booth_mapping_is_equivalent(tmp_path):
    """The multipliers mapped to logic compute the same products: a SAT proof that the Yosys
    ``booth`` version equals the original, and a negative control (a design that differs in
    one input case) that the proof rejects."""
    for wrong in (False, True):
        (tmp_path / "gold.il").write_text(rtlil_of(Prod(), "gold"))
        (tmp_path / "gate.il").write_text(rtlil_of(Prod(wrong), "gate"))
        soft, rep = soft_multipliers(mul_cells((tmp_path / "gate.il").read_text()), 0)
        assert rep["soft_multipliers"] == 4
        cmds = booth_commands(soft)
        script = "\n".join(["read_rtlil gold.il", "read_rtlil gate.il", *cmds,
                            "proc",
                            "miter -equiv -flatten -make_assert gold gate miter",
                            "sat -verify -prove-asserts -show-inputs miter"]) + "\n"
        rc, log = _yosys(tmp_path, script)
        if wrong:
            assert rc != 0 and "SAT proof finished - model found: FAIL!" in log
        else:
            assert rc == 0 and "SAT proof finished - no model found: SUCCESS!" in log, \
                log[-3000:]
            assert log.count("Booth multiplier") >= 3


def test_synth_refuses_a_chip_that_cannot_fit(tmp_path):
    cfg = dict(MINI, n_layers=6)
    qm = quantize_model(random_model(seed=1, **cfg), wbits=8, calib_tokens=[1, 2, 3])
    # six layers, each its own unit, need 409 multipliers; one shared unit needs 74: with 40
    # DSPs and no LUT budget neither fits, and the refusal names the layer-serial plan
    with pytest.raises(HardwireError, match=r"does not fit the LFE5U-85F: even the most folded "
                                            r"plan \(\d+ projection .*, layers shared\) needs "
                                            r"\d+ MULT18X18D > 40: moving \d+ multipliers to "
                                            r"LUT logic \(~[\d,]+ LUT4, budget 0\) leaves \d+; "
                                            r"estimate in .*fit\.json$"):
        synth_qmodel(qm, tmp_path / "out", progress=False, soft_lut_budget=0, dsp_budget=40)
    fit = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert not fit["fits"] and len(fit["estimate"]["over"]) == 1
    assert [t["fold"] for t in fit["tried"]] == ["target=1000000000",
                                                 "target=1000000000,layers=shared"]
    assert fit["tried"][0]["dsp_estimate"] > fit["tried"][1]["dsp_estimate"] > 40
    assert not (tmp_path / "out" / "yosys.log").exists()
    # the same chip, most folded, fits once the narrow multipliers are LUT logic
    b, fit = fit_board(qm, "target=1000000000", build_dir=tmp_path / "fit",
                       soft_lut_budget=40_000)
    assert b.fits and fit["dsps"] <= 156 < fit["dsp_estimate"]
    assert fit["soft_multipliers"] > 0 and 0 < fit["soft_luts"] <= fit["soft_lut_budget"]
    assert sum(u["dsps"] for u in fit["multipliers"].values()) == fit["dsp_estimate"]


def test_synth_cli_errors():
    p = subprocess.run([sys.executable, "-m", "hardwire", "synth", "x.bin", "--board", "de10",
                        "-o", "out"], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown board 'de10'" in p.stderr
    p = subprocess.run([sys.executable, "-m", "hardwire", "synth", "x.bin", "-o", "out",
                        "--clock-mhz", "0"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert p.returncode == 2 and "must be positive" in p.stderr
    for args, message in (("--json x.json", "--nextpnr-args: --json is set by hardwire synth"),
                          ("'--router", "--nextpnr-args: No closing quotation")):
        p = subprocess.run([sys.executable, "-m", "hardwire", "synth", "x.bin", "-o", "out",
                            f"--nextpnr-args={args}"], capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 2 and p.stderr == f"hardwire: error: {message}\n", p.stderr


def test_full_flow_tiny_chip(tmp_path):
    """A tiny random chip on the ULX3S board top through Yosys, nextpnr and ecppack.

    The smallest chip is still ~22k LUT4 and 74 MULT18X18D (fixed costs: attention, norms,
    RoPE), which WebAssembly nextpnr places and routes in minutes; the test uses the classic
    ABC LUT mapping, router2 and no timing-driven placement, the fastest settings measured
    (the figures checked do not depend on them)."""
    qm = quantize_model(random_model(seed=3, **MINI), wbits=8, calib_tokens=[1, 5, 3, 7, 2])
    out = tmp_path / "synth"
    rep = synth_qmodel(qm, out, fold="macs=8", lut_mapper="abc", progress=True,
                       nextpnr_opts=("--router", "router2", "--no-tmdriv"))
    saved = json.loads((out / "synth.json").read_text())
    assert saved["name"] == rep["name"] and saved["LUT4"] == rep["LUT4"]
    bit = Path(rep["bitstream"])
    assert bit == out / f"{rep['name']}.bit" and bit.stat().st_size > 50_000
    for log in ("yosys.log", "nextpnr.log", "ecppack.log"):
        assert (out / log).is_file()
    assert rep["device"] == "LFE5U-85F" and rep["package"] == "CABGA381"
    assert 1000 < rep["LUT4"] < rep["available"]["LUT4"] == 83640
    assert 100 < rep["FF"] < 83640
    assert 0 < rep["MULT18X18D"] <= 156 and rep["available"]["DP16KD"] == 208
    # 9 weight ROMs (7 matrices, the classifier, the embedding) of 512 bits: under a quarter
    # of a DP16KD, so in LUT logic by the memory rule; every memory where the rule put it
    plan = plan_chip(qm, fold="macs=8")
    n_roms = sum(1 for k, v in rom_bits(qm, plan).items() if k != "total" and v)
    assert rep["rom_check"]["ok"] and len(rep["rom_check"]["weight_roms"]) == n_roms == 9
    assert len(rep["rom_check"]["logic_weight_roms"]) == 9
    est = rep["estimate"]
    # 31 memories: the two RoPE units share the chip's one RoPETable (32 with a table each)
    assert est["memory_rule_mismatches"] == [] and len(rep["memories"]) == 31
    # the estimate next to Yosys/nextpnr: block RAM exact, flip-flops within 10% (Yosys
    # removes constant and unused ones; here +5.6%), MULT18X18D after the soft multipliers
    assert rep["DP16KD"] == est["DP16KD"] == est["measured"]["DP16KD"] == 7
    assert rep["FF"] <= est["FF"] <= 1.1 * rep["FF"]
    assert rep["MULT18X18D"] <= est["MULT18X18D"]
    assert json.loads((out / "fit.json").read_text())["estimate"]["FF"] == est["FF"]
    assert rep["lut_mapper"] == "abc" and rep["fit"]["chosen"] == "--fold"
    # PLL 25 -> 50 MHz; Fmax of the design clock; tokens/s from the cycle formula
    assert rep["pll"] == {"clki_div": 1, "clkfb_div": 2, "clkop_div": 12, "vco_mhz": 600.0}
    fmax = rep["fmax_design_mhz"]
    assert fmax > 5 and rep["fmax_mhz"][rep["design_clock_net"]] == fmax
    cyc = rep["cycles_per_token"]
    assert cyc["tokens"] == MINI["seq_len"] and cyc["min"] <= cyc["mean"] <= cyc["max"]
    assert rep["tokens_per_s"] == pytest.approx(fmax * 1e6 / cyc["mean"], rel=1e-3)
    assert rep["baud"] == 115200 and rep["clocks_per_bit"] == 434
