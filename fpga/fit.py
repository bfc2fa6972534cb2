"""Resource estimate of an elaborated design from its RTLIL, in seconds, without Yosys.

``hardwire synth`` used to check only multipliers before running Yosys; a design with too
many flip-flops or block RAMs then spent half an hour in Yosys before failing (or could
never be placed). :func:`estimate_resources` reads the RTLIL Amaranth hands to Yosys and
counts what the ECP5 needs:

* **FF**: the widths of every flip-flop cell (``$dff``, ``$adff``, ``$sdff``, ... ; Amaranth
  emits ``$dff``/``$adff`` and keeps ``process`` blocks combinational), plus the output
  register of each synchronous read port of a memory that is *not* put in block RAM (a
  DP16KD has that register inside). Yosys later removes flip-flops it proves constant or
  unused, merges duplicates and adds a few (emulated read-port enables/resets), so this is
  close, not a bound: CI chip 7,838 vs 7,421 in nextpnr (+5.6%), stories260K W8 most
  folded 149,220 vs 150,037 in Yosys' pre-LUT netlist of the session-2 ``make synth``
  (-0.5%; small ROMs then partly in block RAM).
* **DP16KD** per memory by the memory rule (:func:`memory_rule`) and the best DP16KD aspect
  (:func:`dp16kd_blocks`): each memory packed alone, as Yosys ``memory_libmap`` does. This
  is what the fit checks. Yosys 0.70 often does better than one aspect (measured, ROMs alone
  through ``synth_ecp5 -run begin:map_ffram``: 8x11008 in 5 blocks, not 6; 8x32768 in 15,
  not 16; 12x1500 and 1x18000 in 1, not 2; but 8x2100 in 2), close to ``ceil(bits / 18
  Kbit)``; that figure is reported as ``DP16KD_packed`` (single-read-port ROMs only: RAMs
  were not measured): stories260K W8, most folded, 311 by aspect, 294 by Yosys, 294 packed.
* **MULT18X18D**: :func:`~.synth.mul_cells` (every multiplier on DSPs; the fit then moves
  the narrowest to LUT logic, :func:`~.synth.soft_multipliers`).

There is no LUT4 estimate: LUT counts after ABC depend on logic optimisation across the
whole datapath (the CI chip: 18,464 LUT4 from about 2,000 RTLIL cells), and no per-cell
rule could be checked against more than one measured design here; the fit uses the
multipliers' LUT estimate (``soft_luts``) and the three counted resources.

The memory rule, which the synthesis script then imposes on Yosys (``rom_style`` /
``ram_style`` on every memory, :func:`memory_attrs`) so that the estimate and the netlist
agree:

* a **ROM** (no write port) of fewer than :data:`ROM_LOGIC_BITS` bits (a quarter of a
  DP16KD, 4,608) goes to LUT logic (``rom_style = "logic"``): as logic it costs about
  ``bits / 16`` LUT4 (a LUT4 holds 16 bits; the PFU's wide muxes select between LUTs), at
  most 288 LUT4 = 0.34% of the LFE5U-85F's LUT4, less than the 1/208 = 0.48% of its block
  RAM a whole DP16KD would take. This holds weight ROMs too: a small matrix's ROM in LUTs is
  etched just the same, and ``check_roms`` accepts a weight ROM in logic only when this rule
  put it there. ROMs at or above the threshold, and ROMs read asynchronously never, go to
  ``rom_style = "block"``;
* a **RAM** (KV caches, the host link buffer, LoRA banks) of fewer than
  :data:`RAM_DISTRIBUTED_BITS` bits, or read asynchronously, goes to distributed RAM
  (``TRELLIS_DPR16X4``, ``ram_style = "distributed"``), larger ones to block RAM: the
  break-even of Yosys' own cost model (a 16x4 LUT RAM costs 4, a DP16KD 128: 2,048 bits).
"""

from __future__ import annotations

import math
import re

from hardwire.compiler.errors import HardwireError

__all__ = ["DEVICE_LOGIC", "DP16KD_ASPECTS", "FF_TYPES", "RAM_DISTRIBUTED_BITS",
           "ROM_LOGIC_BITS", "dp16kd_blocks", "estimate_resources", "format_units",
           "memory_attrs", "memory_rule", "parse_rtlil", "unit_of"]

#: DP16KD configurations (depth, width): true dual port up to x18, pseudo dual port
#: (``PDPW16KD``: one read, one write port) x36 (Yosys ``lattice/brams_16kd.txt``).
DP16KD_ASPECTS = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
DP16KD_BITS = 18 * 1024
#: ROMs below this many bits go to LUT logic (a quarter of a DP16KD; see the module doc).
ROM_LOGIC_BITS = DP16KD_BITS // 4
#: RAMs below this many bits go to distributed LUT RAM (Yosys' cost break-even).
RAM_DISTRIBUTED_BITS = 2048
#: Flip-flop cell types of RTLIL (all map to TRELLIS_FF; latches too, via latches_map).
FF_TYPES = frozenset({"$dff", "$dffe", "$adff", "$adffe", "$sdff", "$sdffe", "$sdffce",
                      "$dffsr", "$dffsre", "$aldff", "$aldffe", "$ff", "$dlatch", "$adlatch",
                      "$dlatchsr"})
#: LUT4 and TRELLIS_FF of each ECP5 device (family data sheet; nextpnr reports the same).
DEVICE_LOGIC = {"12k": 12_096, "25k": 24_288, "45k": 43_848, "85k": 83_640}
for _size in ("25k", "45k", "85k"):
    DEVICE_LOGIC[f"um-{_size}"] = DEVICE_LOGIC[f"um5g-{_size}"] = DEVICE_LOGIC[_size]


def dp16kd_blocks(width, depth, *, max_width=36):
    """DP16KD blocks holding a ``width`` x ``depth`` memory alone, at its best aspect
    (:data:`DP16KD_ASPECTS` up to ``max_width`` bits wide): e.g. 320 x 512 -> 9 (512x36)."""
    if width < 1 or depth < 1:
        raise HardwireError(f"a memory must be at least 1x1, not {width}x{depth}")
    return min(math.ceil(width / w) * math.ceil(depth / d)
               for d, w in DP16KD_ASPECTS if w <= max_width)


def _param(v):
    v = v.strip()
    if v.startswith('"'):
        return v.strip('"').replace("\\\\", "\\")
    m = re.match(r"^(\d+)'([01xz]+)$", v)
    if m:
        return int(m.group(2), 2) if set(m.group(2)) <= {"0", "1"} else m.group(2)
    try:
        return int(v)
    except ValueError:
        return v


def parse_rtlil(text):
    """The flip-flops and memories of an RTLIL design: ``(top, modules)`` with ``top`` the
    name of the module marked ``top`` and ``modules`` ``{name: {"ffs": [(cell, width)],
    "memories": {name: {"width", "size", "rd_sync", "rd_async", "wr", "init"}}}}``
    (names without RTLIL's leading backslash)."""
    modules, top = {}, None
    mod = cell = None
    pending_top = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("attribute \\top ") and mod is None:
            pending_top = True
        elif s.startswith("module "):
            name = s.split()[1].removeprefix("\\")
            mod = modules[name] = {"ffs": [], "memories": {}}
            if pending_top:
                top = name
            pending_top = False
        elif mod is None:
            continue
        elif s.startswith("memory "):
            parts = s.split()
            kw = dict(zip(parts[1:-1:2], parts[2:-1:2]))
            mod["memories"][parts[-1].removeprefix("\\")] = {
                "width": int(kw.get("width", 1)), "size": int(kw.get("size", 0)),
                "rd_sync": 0, "rd_async": 0, "wr": 0, "init": False}
        elif s.startswith("cell "):
            _, ctype, cname = s.split()[:3]
            cell = {"type": ctype, "name": cname, "params": {}}
        elif cell is not None and s.startswith("parameter "):
            _, pname, value = s.split(maxsplit=2)
            cell["params"][pname.removeprefix("\\")] = _param(value)
        elif cell is not None and s == "end":
            _add_cell(mod, cell)
            cell = None
        elif s == "end" and cell is None and not line.startswith(" "):
            mod = None
    if top is None and modules:
        top = min(modules, key=len)
    return top, modules


def _add_cell(mod, cell):
    t, p = cell["type"], cell["params"]
    if t in FF_TYPES:
        mod["ffs"].append((cell["name"], int(p.get("WIDTH", 1))))
    elif t in ("$memrd", "$memrd_v2", "$memwr", "$memwr_v2", "$meminit", "$meminit_v2"):
        mem = mod["memories"].get(str(p.get("MEMID", "")).removeprefix("\\"))
        if mem is None:
            return
        if t.startswith("$memrd"):
            mem["rd_sync" if p.get("CLK_ENABLE", 0) else "rd_async"] += 1
        elif t.startswith("$memwr"):
            mem["wr"] += 1
        else:
            mem["init"] = True
    elif t in ("$mem", "$mem_v2"):
        name = str(p.get("MEMID", cell["name"])).removeprefix("\\")
        rd_clk = p.get("RD_CLK_ENABLE", 0)
        n_rd = int(p.get("RD_PORTS", 0))
        sync = rd_clk.bit_count() if isinstance(rd_clk, int) else str(rd_clk).count("1")
        mod["memories"][name] = {"width": int(p.get("WIDTH", 1)), "size": int(p.get("SIZE", 0)),
                                 "rd_sync": sync, "rd_async": n_rd - sync,
                                 "wr": int(p.get("WR_PORTS", 0)), "init": True}


def memory_rule(mem):
    """Where a memory goes (see the module doc): ``("logic" | "distributed" | "block",
    DP16KD blocks)``."""
    bits = mem["width"] * mem["size"]
    rd = mem["rd_sync"] + mem["rd_async"]
    if mem["wr"] == 0:
        if bits < ROM_LOGIC_BITS or mem["rd_async"]:
            return "logic", 0
        # two read ports share one true-dual-port block (x18), or one each at x36
        return "block", max(1, min(math.ceil(rd / 2) *
                                   dp16kd_blocks(mem["width"], mem["size"], max_width=18),
                                   rd * dp16kd_blocks(mem["width"], mem["size"])))
    if bits < RAM_DISTRIBUTED_BITS or mem["rd_async"]:
        return "distributed", 0
    # one write + one read port: PDPW16KD (x36); more ports replicate the array per read
    # port; two write ports need both true-dual-port ports (x18)
    max_width = 36 if mem["wr"] == 1 else 18
    return "block", max(1, rd) * dp16kd_blocks(mem["width"], mem["size"], max_width=max_width)


def unit_of(path):
    """The unit a module path (below the board top) belongs to, with its layer folded:
    ``core.chip.layer3.attention.cache`` -> ``("attention", 3)``,
    ``core.chip.layer0.wq_gather`` -> ``("*_gather", 0)``, ``core.link`` -> ``("link",
    None)``."""
    parts = [p for p in path.split(".") if p]
    while parts and parts[0] in ("core", "chip"):
        parts.pop(0)
    layer = None
    if parts and re.fullmatch(r"layer\d+", parts[0]):
        layer = int(parts.pop(0)[5:])
    if not parts:
        return ("layer" if layer is not None else "top"), layer
    unit = re.sub(r"\$\d+$", "", parts[0])
    unit = re.sub(r"^\w+?_(gather|fork|join)$", r"*_\1", unit)
    return unit, layer


def _add(units, unit, layer, key, n):
    u = units.setdefault(unit, {"FF": 0, "DP16KD": 0, "_inst": set()})
    u[key] += n
    u["_inst"].add(layer)


def estimate_resources(rtlil_text, *, muls=None):
    """FF, DP16KD and MULT18X18D a design needs, from its RTLIL (see the module doc).

    Returns a dict: ``FF``, ``DP16KD``, ``DP16KD_packed`` (lower bound, see the module
    doc), ``MULT18X18D`` (every multiplier on a DSP),
    ``memories`` (``{path: {"width", "size", "bits", "rom", "read_ports", "write_ports",
    "map", "DP16KD"}}``, sorted by path), ``units`` (``{unit: {"FF", "DP16KD", "units"}}``,
    layers aggregated, largest FF first) and ``method``."""
    from .synth import mul_cells
    top, modules = parse_rtlil(rtlil_text)
    ff, blocks, packed_total, memories, units = 0, 0, 0, {}, {}
    for name, mod in modules.items():
        path = name[len(top) + 1:] if name.startswith(top + ".") else ""
        unit, layer = unit_of(path) if path else ("top", None)
        mod_ff = sum(w for _, w in mod["ffs"])
        for mname, mem in mod["memories"].items():
            how, n = memory_rule(mem)
            if how != "block":           # the read register is a flip-flop outside a DP16KD
                mod_ff += mem["rd_sync"] * mem["width"]
            memories[f"{path}.{mname}" if path else mname] = {
                "width": mem["width"], "size": mem["size"], "bits": mem["width"] * mem["size"],
                "rom": mem["wr"] == 0, "read_ports": mem["rd_sync"] + mem["rd_async"],
                "write_ports": mem["wr"], "map": how, "DP16KD": n}
            packed = n
            if how == "block" and mem["wr"] == 0 and mem["rd_sync"] + mem["rd_async"] == 1:
                packed = min(n, math.ceil(mem["width"] * mem["size"] / DP16KD_BITS))
            memories[f"{path}.{mname}" if path else mname]["DP16KD_packed"] = packed
            blocks += n
            packed_total += packed
            _add(units, unit, layer, "DP16KD", n)
        ff += mod_ff
        _add(units, unit, layer, "FF", mod_ff)
    muls = mul_cells(rtlil_text) if muls is None else muls
    out_units = {k: {"FF": v["FF"], "DP16KD": v["DP16KD"], "units": len(v["_inst"])}
                 for k, v in sorted(units.items(), key=lambda kv: (-kv[1]["FF"], kv[0]))
                 if v["FF"] or v["DP16KD"]}
    return {"FF": ff, "DP16KD": blocks, "DP16KD_packed": packed_total,
            "MULT18X18D": sum(m["dsps"] for m in muls),
            "memories": dict(sorted(memories.items())), "units": out_units,
            "rules": {"rom_logic_below_bits": ROM_LOGIC_BITS,
                      "ram_distributed_below_bits": RAM_DISTRIBUTED_BITS},
            "method": "RTLIL of the elaborated board top: flip-flop cell widths (+ read "
                      "registers of memories outside block RAM); DP16KD per memory at its "
                      "best aspect; LUT4 not estimated"}


def format_units(units, key, n=3):
    """``"swiglu 22,795, *_gather 21,365, attention 18,000"``: the ``n`` units using most
    of ``key``."""
    top = sorted(((v[key], k) for k, v in units.items() if v[key]), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{k} {v:,}" for v, k in top[:n])


def memory_attrs(estimate):
    """Yosys attributes imposing the memory rule (``(selection, attribute, value)`` for
    :func:`~.flow.yosys_script`): one per memory, by its flattened name."""
    out = []
    for path, mem in estimate["memories"].items():
        if re.search(r"[\s*?\[\]\\]", path):
            raise HardwireError(f"memory name {path!r} cannot be selected in Yosys")
        attr = "rom_style" if mem["rom"] else "ram_style"
        out.append((f"n:{path}", attr, mem["map"]))
    return tuple(out)
