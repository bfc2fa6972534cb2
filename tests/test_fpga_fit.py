"""The fit check of ``hardwire synth``: flip-flops, DP16KD and multipliers estimated from the
board top's RTLIL in seconds (``fpga/fit.py``), the memory rule imposed on Yosys, and a plan
that cannot fit refused before any tool runs (exit 2, one line, ``fit.json`` written)."""

import json
import re
import subprocess
import sys
import time

import pytest
from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from hardwire.compiler.errors import HardwireError
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.quantize import quantize_model
from hardwire.fpga.fit import (
    DP16KD_ASPECTS,
    ROM_LOGIC_BITS,
    dp16kd_blocks,
    estimate_resources,
    memory_attrs,
    memory_rule,
    unit_of,
)
from hardwire.fpga.flow import memory_mapping, rtlil_of, yosys_script
from hardwire.fpga.synth import check_memories, default_router, fit_board, synth_qmodel
from hardwire.sim.toolchain import ensure_toolchain

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

MINI = {"dim": 8, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "hidden_dim": 8,
        "vocab_size": 8, "seq_len": 4, "shared_classifier": False}


def test_dp16kd_blocks():
    # the KV cache of stories260K: 4 kv heads x 8 dims x 10 bits, 512 positions: 512x36
    assert dp16kd_blocks(320, 512) == 9
    assert dp16kd_blocks(320, 512, max_width=18) == 18       # true dual port only
    assert dp16kd_blocks(8, 11008) == 6                       # w1: 2048x9 x 6
    assert dp16kd_blocks(8, 32768) == 16                      # the embedding table
    assert dp16kd_blocks(17, 1024) == 1 and dp16kd_blocks(17, 1025) == 2
    assert dp16kd_blocks(32, 2048) == 4                       # a RoPE table
    assert dp16kd_blocks(1, 16384) == 1 and dp16kd_blocks(1, 16385) == 2
    assert dp16kd_blocks(36, 512) == 1 and dp16kd_blocks(37, 512) == 2
    # every aspect holds at most 18 Kbit, so a block count never beats bits / 18 Kbit
    for w, d in ((3, 5000), (100, 100), (9, 2048), (300, 7)):
        assert dp16kd_blocks(w, d) >= w * d / (18 * 1024)
        assert dp16kd_blocks(w, d) == min(-(-w // aw) * -(-d // ad) for ad, aw in DP16KD_ASPECTS)
    with pytest.raises(HardwireError, match="at least 1x1"):
        dp16kd_blocks(0, 10)


def _mem(width, size, rd=1, wr=0, rd_async=0):
    return {"width": width, "size": size, "rd_sync": rd, "rd_async": rd_async, "wr": wr,
            "init": wr == 0}


def test_memory_rule():
    assert memory_rule(_mem(17, 64)) == ("logic", 0)                      # mult_rom
    assert memory_rule(_mem(1, ROM_LOGIC_BITS - 1)) == ("logic", 0)
    assert memory_rule(_mem(32, ROM_LOGIC_BITS // 32)) == ("block", 1)   # at the threshold
    assert memory_rule(_mem(8, 11008)) == ("block", 6)
    assert memory_rule(_mem(17, 8192, rd_async=1, rd=0)) == ("logic", 0)  # no BRAM port
    # two read ports share a true-dual-port block (x18) or take one x36 block each
    assert memory_rule(_mem(17, 1024, rd=2)) == ("block", 1)
    assert memory_rule(_mem(36, 512, rd=2)) == ("block", 2)
    assert memory_rule(_mem(80, 4, wr=1)) == ("distributed", 0)          # tiny KV cache
    assert memory_rule(_mem(8, 512, wr=1)) == ("block", 1)               # link buffer
    assert memory_rule(_mem(320, 512, wr=1)) == ("block", 9)             # KV cache
    assert memory_rule(_mem(320, 512, wr=1, rd=2)) == ("block", 18)


def test_unit_of():
    assert unit_of("core.chip.layer3.attention.cache") == ("attention", 3)
    assert unit_of("core.chip.layer0.wq_gather") == ("*_gather", 0)
    assert unit_of("core.chip.embedding") == ("embedding", None)
    assert unit_of("core.uart_rx$51") == ("uart_rx", None)
    assert unit_of("core.link") == ("link", None)


class Known(wiring.Component):
    """Registers and memories of known sizes: a 7-bit and a 13-bit register (one with an
    asynchronous reset domain), a small ROM (LUT logic, its 16-bit read register a
    flip-flop), a large ROM (one DP16KD), a 320x512 RAM (nine x36 DP16KDs) and a small RAM
    (LUT RAM, its 8-bit read register a flip-flop)."""
    a: In(unsigned(10))
    y: Out(unsigned(16))

    def __init__(self, extra=0):
        self._extra = extra
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.small = small = Memory(shape=16, depth=8, init=range(8))
        m.submodules.big = big = Memory(shape=17, depth=1024, init=range(1024))
        m.submodules.kv = kv = Memory(shape=320, depth=512, init=[])
        m.submodules.tiny = tiny = Memory(shape=8, depth=16, init=[])
        rs, rb, rk, rt = (small.read_port(), big.read_port(), kv.read_port(),
                          tiny.read_port())
        wk, wt = kv.write_port(), tiny.write_port()
        r7, r13 = Signal(7), Signal(13, reset_less=True)
        m.d.comb += [rs.addr.eq(self.a), rb.addr.eq(self.a), rk.addr.eq(self.a),
                     rt.addr.eq(self.a), wk.addr.eq(r7), wk.data.eq(self.a * 3),
                     wk.en.eq(r7[0]), wt.addr.eq(r13), wt.data.eq(r7), wt.en.eq(r13[1])]
        m.d.sync += [r7.eq(r7 + self.a), r13.eq(rb.data ^ rs.data)]
        out = rk.data[:16] ^ rt.data
        if self._extra:
            r = Signal(self._extra)
            m.d.sync += r.eq(self.a)
            out = out ^ r
        m.d.comb += self.y.eq(out)
        return m


def test_estimate_of_a_known_design():
    est = estimate_resources(rtlil_of(Known(), "known"))
    assert est["FF"] == 7 + 13 + 16 + 8
    assert est["DP16KD"] == est["DP16KD_packed"] == 1 + 9
    assert {p: (m["map"], m["DP16KD"]) for p, m in est["memories"].items()} == {
        "big": ("block", 1), "kv": ("block", 9), "small": ("logic", 0),
        "tiny": ("distributed", 0)}
    assert est["MULT18X18D"] == 1             # a * 3 (the fit moves constants to logic)
    assert memory_attrs(est) == (("n:big", "rom_style", "block"),
                                 ("n:kv", "ram_style", "block"),
                                 ("n:small", "rom_style", "logic"),
                                 ("n:tiny", "ram_style", "distributed"))
    # negative control: one more 5-bit register is counted
    assert estimate_resources(rtlil_of(Known(extra=5), "known"))["FF"] == est["FF"] + 5


def test_check_memories():
    est = {"memories": {"core.a.rom": {"map": "logic"}, "core.b.rom": {"map": "block"},
                        "core.c.mem": {"map": "distributed"}}}
    ok = {"top.core.a.rom": "FF", "top.core.b.rom": "$__PDPW16KD_",
          "top.core.c.mem": "$__TRELLIS_DPR16X4_"}
    assert check_memories(ok, est) == []
    bad = dict(ok, **{"top.core.a.rom": "$__DP16KD_"})
    del bad["top.core.c.mem"]
    assert check_memories(bad, est) == ["core.a.rom: rule logic, Yosys $__DP16KD_",
                                        "core.c.mem: rule distributed, Yosys none"]


def _quantized(**cfg):
    return quantize_model(random_model(seed=3, **cfg), wbits=8, calib_tokens=[1, 5, 3, 7, 2])


def test_yosys_maps_memories_by_the_rule(tmp_path):
    """Yosys' memory_libmap on a small chip's board top, with the attributes of the memory
    rule: every memory where the estimate put it. The chip (dim 16, hidden 48) has weight
    ROMs on both sides of the threshold (wq 2,048 bits: logic; w1 6,144 bits: block)."""
    qm = _quantized(**{**MINI, "dim": 16, "hidden_dim": 48, "n_heads": 2, "n_kv_heads": 2})
    b, fit = fit_board(qm, "target=1000000000", build_dir=tmp_path / "amaranth")
    est = b.estimate
    assert est["memories"]["core.chip.layer0.wq.weight_rom"]["map"] == "logic"
    assert est["memories"]["core.chip.layer0.w1.weight_rom"]["map"] == "block"
    assert {m["map"] for m in est["memories"].values()} == {"logic", "block", "distributed"}
    name = b.design.name
    (tmp_path / "d.il").write_text(b.il)
    lines = yosys_script(name, "d.il", memory_attrs=memory_attrs(est)).splitlines()
    k = next(i for i, s in enumerate(lines) if s.endswith("-run map_ram:map_luts"))
    script = lines[:k] + [lines[k].replace("map_ram:map_luts", "map_ram:map_ffram")]
    (tmp_path / "m.ys").write_text("\n".join(script) + "\n")
    p = subprocess.run([ensure_toolchain()["YOSYS"], "-q", "-l", "y.log", "-s", "m.ys"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, (tmp_path / "y.log").read_text()[-2000:]
    mapping = memory_mapping(tmp_path / "y.log")
    assert len(mapping) == len(est["memories"])
    assert check_memories(mapping, est) == []
    assert fit["estimate"]["DP16KD"] == sum(m["DP16KD"] for m in est["memories"].values())


def test_fit_refuses_over_budget_before_yosys(tmp_path):
    """Lowered device limits: the fit fails in seconds, naming the binding resources and the
    largest units, writes fit.json and runs no tool; the same chip fits the real device."""
    qm = _quantized(**MINI)
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(HardwireError) as exc:
        synth_qmodel(qm, out, fold="target=1000000000", progress=False,
                     limits={"FF": 5000, "DP16KD": 3})
    msg = str(exc.value)
    assert time.monotonic() - t0 < 120 and "\n" not in msg
    m = re.fullmatch(r"random-s3 does not fit the LFE5U-85F: the plan --fold target=1000000000 "
                     r"needs ([\d,]+) FF > 5,000 \(largest: attention [\d,]+, .*\), (\d+) "
                     r"DP16KD > 3 \(largest: .*\); estimate in (.*fit\.json)", msg)
    assert m, msg
    fit = json.loads((out / "fit.json").read_text())
    assert m.group(3) == str(out / "fit.json") and not fit["fits"]
    assert fit["estimate"]["FF"] == int(m.group(1).replace(",", "")) > 5000
    assert fit["estimate"]["DP16KD"] == int(m.group(2))
    assert sum(u["FF"] for u in fit["estimate"]["units"].values()) == fit["estimate"]["FF"]
    assert not (out / "yosys.log").exists()
    # negative control: the real device's limits are not binding for this chip
    b, fit = fit_board(qm, "target=1000000000", build_dir=tmp_path / "ok")
    assert b.fits and fit["fits"] and fit["estimate"]["over"] == []
    with pytest.raises(HardwireError, match="resource limits must be non-negative"):
        fit_board(qm, "target=1000000000", build_dir=tmp_path / "ok", limits={"LUT": 3})


def test_synth_cli_refuses_stories260k(tmp_path, models_dir):
    """``hardwire synth`` on stories260K, most folded: its flip-flops and block RAM exceed
    the LFE5U-85F, so it stops after elaboration (no Yosys) with exit 2, one line naming both
    resources and their largest units, and fit.json."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "hardwire", "synth",
                        str(models_dir / "stories260K.bin"), "-o", str(out),
                        "--fold", "target=1000000000", "--json"],   # --json: no progress
                       capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stdout == "", p.stderr
    assert "Traceback" not in p.stderr
    m = re.match(r"hardwire: error: stories260K does not fit the LFE5U-85F: the plan --fold "
                 r"target=1000000000 needs ([\d,]+) FF > 83,640 \(largest: ([^)]*)\), "
                 r"(\d+) DP16KD > 208 \(largest: attention \d+, .*\); estimate in "
                 r"(.*fit\.json)$", p.stderr)
    assert m, p.stderr
    # the three largest FF units, largest first (their order moves with the blocks' pipelines)
    largest = [u.rsplit(" ", 1) for u in m.group(2).split(", ")]
    assert [u for u, _ in largest][0] == "*_gather"
    assert {u for u, _ in largest} == {"*_gather", "swiglu", "attention"}
    counts = [int(n.replace(",", "")) for _, n in largest]
    assert counts == sorted(counts, reverse=True)
    fit = json.loads((out / "fit.json").read_text())
    est = fit["estimate"]
    assert not fit["fits"] and fit["model"] == "stories260K"
    assert est["FF"] == int(m.group(1).replace(",", "")) and est["DP16KD"] == int(m.group(3))
    # per layer: KV caches 2 x 9 DP16KD (320 bits x 512 positions at 512x36)
    assert est["units"]["attention"]["units"] == 5 and est["units"]["attention"]["DP16KD"] >= 90
    kv = [m for p, m in est["memories"].items() if p.endswith(("k_mem", "v_mem"))]
    assert len(kv) == 10 and all((m["width"], m["size"], m["DP16KD"]) == (320, 512, 9)
                                 for m in kv)
    assert not (out / "yosys.log").exists()


def test_fit_search_falls_back_to_shared_layers(tmp_path):
    """When even the most folded plan with a unit per layer exceeds the flip-flops, the
    search continues with one shared decoder unit (``layers=shared``) and picks a plan that
    fits; the report names the choice and lists both tries."""
    qm = _quantized(**{**MINI, "n_layers": 3})
    ded, _ = fit_board(qm, "target=1000000000", build_dir=tmp_path / "d")
    sh, _ = fit_board(qm, "target=1000000000,layers=shared", build_dir=tmp_path / "s")
    ff_ded, ff_sh = ded.estimate["FF"], sh.estimate["FF"]
    assert ff_sh < ff_ded - 1000      # two decoder units' registers fewer
    limit = (ff_ded + ff_sh) // 2
    b, fit = fit_board(qm, None, build_dir=tmp_path / "auto", limits={"FF": limit})
    assert b.fits and b.design.plan.shared_layers and "layers shared" in fit["chosen"]
    tried = [t["fold"] for t in fit["tried"]]
    assert tried[:2] == ["target=1000000000", "target=1000000000,layers=shared"]
    assert not fit["tried"][0]["fits"] and fit["estimate"]["FF"] <= limit
    # the ROM check after Yosys expects the shared unit's weight ROMs, not one per layer
    from hardwire.compiler.plan import rom_bits
    from hardwire.fpga.synth import _EMBED_ROM, _WEIGHT_ROM, expected_weight_roms
    plan = b.design.plan
    roms = [p for p in b.estimate["memories"] if _WEIGHT_ROM.search(p) or _EMBED_ROM.search(p)]
    assert expected_weight_roms(rom_bits(qm, plan), plan) == len(roms) == 9
    assert expected_weight_roms(rom_bits(qm, ded.design.plan), ded.design.plan) == 3 * 7 + 2
    # negative control: with the real device the per-layer plans are kept
    b, fit = fit_board(qm, None, build_dir=tmp_path / "auto2")
    assert not b.design.plan.shared_layers and "layers shared" not in fit["chosen"]


def test_fit_search_keeps_a_routability_margin(tmp_path):
    """A searched plan keeps its MULT18X18D (and packed DP16KD) within the routability margin
    ``fill``: with the MULT18X18D margin just below the planner default's, the search passes
    over the planner default (recorded as fitting but not routable) and picks a more folded
    plan within the margin; with no margin (the negative control) the planner default is
    chosen. Margins outside (0, 1] or for other blocks are refused."""
    qm = _quantized(**MINI)
    free = {"DP16KD": 1, "MULT18X18D": 1}
    planned, fit = fit_board(qm, None, build_dir=tmp_path / "free", fill=free)
    hi = planned.soft_report["dsps"]
    assert planned.fold is None and fit["chosen"] == "planner default (fits)"
    assert fit["routable"] and fit["tried"][0]["dsps_after_soft"] < hi   # most folded: fewer
    b, fit = fit_board(qm, None, build_dir=tmp_path / "margin",
                       fill={"MULT18X18D": (hi - 1) / 156})   # the 85F has 156 MULT18X18D
    assert fit["routable_limits"] == {"DP16KD": int(0.85 * 208), "MULT18X18D": hi - 1}
    assert b.fold is not None and b.fits and b.soft_report["dsps"] <= hi - 1
    assert fit["routable"]
    default = [t for t in fit["tried"] if t["fold"] is None]
    assert len(default) == 1 and default[0]["fits"] and not default[0]["routable"]
    assert default[0]["dsps_after_soft"] == hi
    assert [t["routable"] for t in fit["tried"] if t["fold"] == b.fold] == [True]
    for bad in ({"MULT18X18D": 0}, {"DP16KD": 1.5}, {"LUT4": 0.5}):
        with pytest.raises(HardwireError, match=r"routability margins must be"):
            fit_board(qm, None, build_dir=tmp_path / "bad", fill=bad)


def test_nextpnr_routes_with_router2_unless_told():
    assert default_router(()) == ("--router", "router2")
    assert default_router(["--no-tmdriv"]) == ("--router", "router2", "--no-tmdriv")
    assert default_router(("--router", "router1")) == ("--router", "router1")
    assert default_router(("--router=router1", "--seed", "2")) == ("--router=router1", "--seed",
                                                                   "2")
