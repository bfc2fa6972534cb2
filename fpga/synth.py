"""``hardwire synth``: a model as a ULX3S (ECP5-85F) bitstream, with a resource and speed
report.

:func:`synth_board` loads and quantizes the model, builds the board design
(:func:`~.design.board_design`: PLL, UART, host link, chip), lets Amaranth's
``ULX3S_85F_Platform`` prepare the build (RTLIL of the whole board top and the LPF with the
board's pins: what ``platform.build()`` would feed the tools) and runs
:func:`~.flow.synthesize_rtlil` (yowasp Yosys ``synth_ecp5`` -> nextpnr-ecp5 ``--85k
--package CABGA381`` -> ecppack). It writes ``OUT/<name>.bit`` and ``OUT/synth.json``:
LUT4, FF, DP16KD, MULT18X18D (used and available), Fmax per clock, and tokens/s.

Tokens/s is ``Fmax / mean cycles per token`` over a generation of 256 tokens (or the
context, if shorter), the cycles from ``LlamaChip.cycles_per_token(pos)``: the formula the
chip's RTL testbench (``tests/test_chip.py``) checks cycle-exactly against simulation.

Before any tool runs, the plan must fit: :func:`~.fit.estimate_resources` counts the
flip-flops, DP16KD blocks and multipliers of the elaborated board top's RTLIL (seconds); a
plan fits only if its MULT18X18D (after the narrowest multipliers go to LUT logic, up to a
LUT budget), DP16KD and FF are within the device. When no plan fits, ``OUT/fit.json`` gets
the estimate and the build stops with one line naming the binding resources; no Yosys run.
The estimate's memory rule (small ROMs in LUT logic, small RAMs in LUT RAM, the rest in
block RAM) is imposed on Yosys with ``rom_style``/``ram_style`` on every memory, and
``synth.json`` has the estimate next to the measured figures.

Weight ROMs are checked: every ``weight_rom`` (matrix units of form ``rom``) and the
embedding ROM must be mapped to ``DP16KD`` block RAM unless the memory rule put it in LUT
logic (a ROM under a quarter of a DP16KD: etched in LUTs just the same; matrices planned as
``const`` are logic by design and have no ROM); a ROM Yosys turned into flip-flops/logic
against the rule fails the build loudly, and so does a DP16KD count below ``block ROM bits /
18 Kbit``.
"""

import json
import math
import re
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError

from . import fit as fitmod
from .flow import synthesize_rtlil

__all__ = ["BOARDS", "booth_commands", "check_memories", "check_roms", "cycles_summary",
           "default_router", "estimate_dsps",
           "fit_board", "mul_breakdown", "mul_cells", "soft_multipliers", "synth_board",
           "synth_qmodel"]

#: Supported boards: name -> (amaranth-boards platform class name, nextpnr device flag).
BOARDS = {"ulx3s-85f": ("ULX3S_85F_Platform", "85k")}
_WEIGHT_ROM = re.compile(r"(^|\.)weight_rom$")
_EMBED_ROM = re.compile(r"(^|\.)embedding\.rom$")


_CONST = re.compile(r"^(\d+)'([01xz]+)$")
#: LUT4 per partial-product bit of a multiplier mapped to logic (Yosys ``booth``: about one
#: adder cell per two partial-product bits plus the Booth encoders; measured on ECP5 with
#: the stories260K chip, see BENCHMARKS.md) and of one by a constant.
SOFT_LUT_PER_BIT, SOFT_CONST_LUT_PER_BIT = 1.0, 0.5


def mul_cells(rtlil_text):
    """The ``$mul`` cells of an RTLIL design, merged as Yosys' ``opt_merge`` does (same module,
    same operands): a list of dicts with ``module``, ``cells`` (names of the merged copies),
    ``a``, ``b`` (operand widths), ``const`` (one operand constant), ``pow2`` (a constant
    power of two: a shift), ``dsps`` (MULT18X18D blocks if mapped to DSPs:
    ``ceil(a/18) * ceil(b/18)``; 0 for a shift or a 1-bit operand) and ``luts`` (estimated
    LUT4 if mapped to logic instead)."""
    groups = {}
    module, cell, cname = None, None, None
    for line in rtlil_text.splitlines():
        s = line.strip()
        if s.startswith("module "):
            module = s.split()[1]
        elif s.startswith("cell "):
            cell = {} if s.startswith("cell $mul ") else None
            cname = s.split()[2] if cell is not None else None
        elif cell is not None:
            if s.startswith("parameter "):
                _, name, value = s.split(maxsplit=2)
                cell[name] = value
            elif s.startswith("connect "):
                _, port, sig = s.split(maxsplit=2)
                cell[port] = sig
            elif s == "end":
                cell.pop("\\Y", None)
                key = (module, tuple(sorted(cell.items())))
                if key in groups:
                    groups[key]["cells"].append(cname)
                else:
                    a, b = int(cell.get("\\A_WIDTH", 0)), int(cell.get("\\B_WIDTH", 0))
                    consts = [_CONST.match(cell.get(p, "")) for p in ("\\A", "\\B")]
                    pow2 = any(c and set(c.group(2)) <= {"0", "1"} and c.group(2).count("1") <= 1
                               for c in consts)
                    const = any(consts)
                    dsps = 0 if pow2 or min(a, b) < 2 else math.ceil(a / 18) * math.ceil(b / 18)
                    per_bit = SOFT_CONST_LUT_PER_BIT if const else SOFT_LUT_PER_BIT
                    groups[key] = {"module": module.removeprefix("\\"), "cells": [cname],
                                   "a": a, "b": b, "const": const, "pow2": pow2, "dsps": dsps,
                                   "luts": 0 if pow2 else math.ceil(a * b * per_bit)}
                cell = None
    return list(groups.values())


def estimate_dsps(rtlil_text):
    """MULT18X18D blocks Yosys will use for the ``$mul`` cells of an RTLIL design (without
    running it): multipliers with the same operands in the same module are merged (as
    Yosys' ``opt_merge`` does); each one with both operands of 2+ bits takes
    ``ceil(a/18) * ceil(b/18)`` blocks; a multiplication by a constant power of two is a
    shift and takes none."""
    return sum(m["dsps"] for m in mul_cells(rtlil_text))


def soft_multipliers(muls, dsp_budget):
    """Which multipliers to map to LUT logic (Yosys ``booth``) so that the rest fit
    ``dsp_budget`` MULT18X18D blocks.

    Multiplications by a constant always go to logic (a few adders each); then, while the
    DSP count is over the budget, the multipliers with the fewest estimated LUT4 per block
    saved (the narrowest first: int8 products, then RoPE, softmax and norm products). The
    order is deterministic (ties by module and cell name). Returns ``(soft, report)``:
    ``soft`` the chosen entries of :func:`mul_cells`, ``report`` a dict with ``dsps`` (left
    on DSP blocks), ``soft_multipliers``, ``soft_luts`` (estimate) and ``fits``."""
    soft = [m for m in muls if m["const"] and m["dsps"]]
    rest = sorted((m for m in muls if m["dsps"] and not m["const"]),
                  key=lambda m: (m["luts"] / m["dsps"], m["module"], m["cells"][0]))
    dsps = sum(m["dsps"] for m in rest)
    for m in rest:
        if dsps <= dsp_budget:
            break
        soft.append(m)
        dsps -= m["dsps"]
    return soft, {"dsps": dsps, "dsp_budget": dsp_budget, "soft_multipliers": len(soft),
                  "soft_luts": sum(m["luts"] for m in soft), "fits": dsps <= dsp_budget}


def default_router(nextpnr_opts):
    """``nextpnr_opts`` with ``--router router2`` in front unless they choose a router:
    router2 routed stories260K's layer-serial chip in 7 min where router1 had routed 8% of
    its arcs after 8 min (BENCHMARKS.md, FPGA)."""
    opts = tuple(nextpnr_opts)
    if any(o == "--router" or o.startswith("--router=") for o in opts):
        return opts
    return ("--router", "router2", *opts)


def booth_commands(soft, per_line=16):
    """Yosys commands mapping the ``soft`` multipliers (:func:`soft_multipliers`) to LUT
    logic: ``proc`` (``booth`` skips modules with processes), then ``booth`` on the cells
    named ``module/cell``."""
    names = sorted(f"{m['module']}/{c}" for m in soft for c in m["cells"])
    if not names:
        return []
    return ["proc"] + [f"booth {' '.join(names[i:i + per_line])}"
                       for i in range(0, len(names), per_line)]


def _say(progress, msg):
    if progress:
        print(f"[hardwire.fpga] {msg}", file=sys.stderr, flush=True)


def cycles_summary(chip, n_tokens=256):
    """Mean/min/max of ``chip.cycles_per_token(pos)`` over positions ``0..n-1`` (``n`` =
    ``n_tokens`` capped by the context)."""
    n = max(1, min(n_tokens, chip.seq_len))
    cyc = [chip.cycles_per_token(pos) for pos in range(n)]
    return {"tokens": n, "mean": sum(cyc) / n, "min": min(cyc), "max": max(cyc),
            "source": "LlamaChip.cycles_per_token(pos) formula, checked cycle-exactly "
                      "against RTL simulation by tests/test_chip.py"}


#: Positions of the tokens/s-by-position table of synth.json.
REPORT_POSITIONS = (0, 63, 127, 255, 511)


def cycles_by_unit(chip, pos):
    """``chip.cycle_breakdown(pos)`` summed over layers: ``{"embed": ..., "attn_norm": ...,
    "qkv": ..., "attention": ..., ..., "classifier": ..., "argmax": ..., "total": ...}``."""
    out = {}
    for key, cyc in chip.cycle_breakdown(pos).items():
        unit = key.split(".", 1)[1] if re.match(r"^L\d+\.", key) else key
        out[unit] = out.get(unit, 0) + cyc
    out["total"] = sum(out.values())
    return out


def _is_block(cell):
    return "16KD" in cell                # $__DP16KD_ or $__PDPW16KD_ (512x36)


def _in(name, paths):
    return any(name == p or name.endswith("." + p) for p in paths)


def expected_weight_roms(bits, plan):
    """Weight ROMs a chip of ``plan`` has, from :func:`~hardwire.compiler.plan.rom_bits`
    ``bits``: one per unit with ROM bits, but one per matrix for all layers together when
    the layers share a unit (``L0.<name>`` stands for them)."""
    return sum(1 for k, v in bits.items() if k != "total" and v > 0 and not (
        plan.shared_layers and k.startswith("L") and not k.startswith("L0.")))


def check_roms(memories, *, expected_roms, rom_bits, dp16kd_used, logic_roms=()):
    """Weight ROM placement check (see the module docstring). ``logic_roms``: memory paths
    the memory rule put in LUT logic (:func:`~.fit.memory_rule`; may be ``FF`` in the Yosys
    log); ``rom_bits``: the bits of the weight ROMs in block RAM. Returns a report dict
    with ``ok`` and ``problems``."""
    roms = {name: cell for name, cell in memories.items()
            if _WEIGHT_ROM.search(name) or _EMBED_ROM.search(name)}
    problems = []
    for name, cell in sorted(roms.items()):
        if cell == "FF" and _in(name, logic_roms):
            continue
        if not _is_block(cell):
            how = "flip-flops/logic" if cell == "FF" else cell
            problems.append(f"weight ROM {name} was mapped to {how}, not DP16KD block RAM")
    if len(roms) < expected_roms:
        problems.append(f"Yosys mapped {len(roms)} weight ROMs, the plan has {expected_roms}")
    need = math.ceil(rom_bits / fitmod.DP16KD_BITS)
    if dp16kd_used < need:
        problems.append(f"{dp16kd_used} DP16KD hold fewer than the {rom_bits:,} ROM bits "
                        f"(at least {need} blocks)")
    return {"ok": not problems, "problems": problems, "weight_roms": roms,
            "logic_weight_roms": sorted(n for n, c in roms.items() if c == "FF"),
            "expected_weight_roms": expected_roms, "block_rom_bits": rom_bits,
            "min_dp16kd": need, "dp16kd_used": dp16kd_used}


_RULE_CELL = {"block": _is_block, "logic": lambda c: c == "FF",
              "distributed": lambda c: "DPR16X4" in c}


def check_memories(memories, estimate):
    """Yosys' memory mapping (:func:`~.flow.memory_mapping`) against the estimate's memory
    rule: a list of ``"path: rule X, Yosys Y"`` for every memory mapped otherwise (or not
    mapped at all)."""
    out = []
    for path, mem in estimate["memories"].items():
        cells = [c for n, c in memories.items() if n == path or n.endswith("." + path)]
        if len(cells) != 1 or not _RULE_CELL[mem["map"]](cells[0]):
            out.append(f"{path}: rule {mem['map']}, Yosys {cells[0] if cells else 'none'}")
    return out


def _platform(board):
    if board not in BOARDS:
        raise HardwireError(f"unknown board {board!r}; supported: {', '.join(BOARDS)}")
    from amaranth_boards import ulx3s
    cls_name, device = BOARDS[board]
    return getattr(ulx3s, cls_name)(), device


def _sync_fmax(fmax, clock_names=("sync", "clk")):
    """Fmax of the design clock: the clock net named like the ``sync`` domain, else the
    slowest clock other than the 25 MHz pin."""
    for key in fmax:
        if any(n in key for n in clock_names) and "clk25" not in key:
            return key, fmax[key]
    others = {k: v for k, v in fmax.items() if "clk25" not in k} or fmax
    key = min(others, key=others.get) if others else None
    return key, (others[key] if key else 0.0)


#: The most folded plan: every matrix 1x1, one lane per block.
MOST_FOLDED = "target=1000000000"


#: Default cap on the estimated LUT4 of multipliers mapped to logic (about a third of the
#: LFE5U-85F's 83,640: the rest is left for the datapath, ROM muxes and the host link).
SOFT_LUT_BUDGET = 32_000

#: Routability margin of the plan search: the share of the device's blocks a searched plan
#: may use (DP16KD counted packed, as Yosys maps them). stories260K's layer-serial chip on the
#: LFE5U-85F placed but did not route (router2 overuse falling, then rising again) with 191
#: DP16KD (92%) and 81 MULT18X18D, or with 196 (94%) and 140 (90%); it routed with 173 (83%)
#: and 81 (52%), and with 176 (85%) and 108 (69%) (BENCHMARKS.md, FPGA). The most folded
#: plan and an explicit ``--fold`` are not held to it (they are marked when outside).
ROUTABLE_FILL = {"DP16KD": 0.85, "MULT18X18D": 0.75}


class _Build:
    """One elaborated candidate: the board design, its top, RTLIL, LPF, multipliers, the
    choice of multipliers mapped to logic under the DSP and LUT budgets, the resource
    estimate (:func:`~.fit.estimate_resources`) and whether it all fits (``over``: the
    binding resources, empty if it fits)."""

    def __init__(self, qm, fold, *, platform, clock_mhz, baud, build_dir, dsp_budget,
                 soft_lut_budget, limits, lora=None):
        from .design import board_design
        t0 = time.monotonic()
        self.fold = fold
        self.design = board_design(qm, fold=fold, clock_hz=clock_mhz * 1e6, baud=baud,
                                   target="ulx3s", lora=lora)
        self.top = self.design.ulx3s()
        name = self.design.name
        plan = platform.build(self.top, name=name, build_dir=str(build_dir), do_build=False)
        self.il, self.lpf = plan.files[f"{name}.il"], plan.files[f"{name}.lpf"]
        self.muls = mul_cells(self.il)
        self.dsps = sum(m["dsps"] for m in self.muls)
        self.soft, self.soft_report = soft_multipliers(self.muls, dsp_budget)
        self.estimate = fitmod.estimate_resources(self.il, muls=self.muls)
        self.over = _over(self.estimate, self.soft_report, dsp_estimate=self.dsps,
                          soft_lut_budget=soft_lut_budget, limits=limits)
        self.fits = not self.over
        self.seconds = time.monotonic() - t0


def _over(est, soft_report, *, dsp_estimate, soft_lut_budget, limits):
    """The resources over the device (one phrase each, largest units named)."""
    out = []
    if est["FF"] > limits["FF"]:
        out.append(f"{est['FF']:,} FF > {limits['FF']:,} (largest: "
                   f"{fitmod.format_units(est['units'], 'FF')})")
    if est["DP16KD"] > limits["DP16KD"]:
        out.append(f"{est['DP16KD']:,} DP16KD > {limits['DP16KD']:,} (largest: "
                   f"{fitmod.format_units(est['units'], 'DP16KD')})")
    r = soft_report
    if not r["fits"] or r["soft_luts"] > soft_lut_budget:
        out.append(f"{dsp_estimate:,} MULT18X18D > {r['dsp_budget']:,}: moving "
                   f"{r['soft_multipliers']:,} multipliers to LUT logic (~"
                   f"{r['soft_luts']:,} LUT4, budget {soft_lut_budget:,}) leaves {r['dsps']:,}")
    return out


def _estimate_report(b, limits):
    est = b.estimate
    return {"FF": est["FF"], "DP16KD": est["DP16KD"], "DP16KD_packed": est["DP16KD_packed"],
            "MULT18X18D": b.soft_report["dsps"], "MULT18X18D_all_on_dsps": est["MULT18X18D"],
            "soft_multiplier_LUT4": b.soft_report["soft_luts"], "available": limits,
            "fits": b.fits, "over": b.over, "units": est["units"], "rules": est["rules"],
            "memories": est["memories"], "method": est["method"]}


def mul_breakdown(muls, soft=()):
    """Multipliers by unit (module path after ``chip.``, layer index folded to ``L*``):
    ``{unit: {"multipliers": n, "dsps": blocks if all on DSPs, "soft": n mapped to logic,
    "widths": ["AxB" ...]}}``."""
    soft_ids = {id(m) for m in soft}
    out = {}
    for m in muls:
        if not m["dsps"]:
            continue
        unit = re.sub(r"^.*?\.core\.(chip\.)?", "", m["module"])
        unit = re.sub(r"layer\d+", "L*", unit)
        u = out.setdefault(unit, {"multipliers": 0, "dsps": 0, "soft": 0, "widths": []})
        u["multipliers"] += 1
        u["dsps"] += m["dsps"]
        u["soft"] += id(m) in soft_ids
        w = f"{m['a']}x{m['b']}{'c' if m['const'] else ''}"
        if w not in u["widths"]:
            u["widths"].append(w)
    return dict(sorted(out.items()))


def fit_board(qm, fold=None, *, board="ulx3s-85f", clock_mhz=50.0, baud=115200,
              build_dir="build/fit", progress=False, dsp_budget=None,
              soft_lut_budget=SOFT_LUT_BUDGET, lora=None, limits=None, fit_json=None,
              fill=None):
    """Choose and elaborate the board design of ``qm`` (see :func:`synth_qmodel`) without
    running the tools: returns ``(build, fit report)`` (the report also in ``fit_json``, if
    given); raises :class:`HardwireError` if the chip cannot fit."""
    platform, device = _platform(board)
    return _fit(qm, fold, platform=platform, device=device, clock_mhz=clock_mhz, baud=baud,
                build_dir=Path(build_dir), progress=progress, dsp_budget=dsp_budget,
                soft_lut_budget=soft_lut_budget, lora=lora, limits=limits, fit_json=fit_json,
                fill=fill)


def _fit(qm, fold, *, platform, device, clock_mhz, baud, build_dir, progress, dsp_budget=None,
         soft_lut_budget=SOFT_LUT_BUDGET, lora=None, fit_json=None, limits=None,
         fill=None):
    """Elaborate the board for ``fold``, or (``fold=None``) choose the least folded plan
    that fits the device: its flip-flops and DP16KD (:func:`~.fit.estimate_resources`)
    within the device's (or ``limits``: ``{"FF": n, "DP16KD": n}`` overrides), its
    multipliers on the MULT18X18D blocks (at most ``dsp_budget``, default all) with the
    narrowest ones mapped to LUT logic (:func:`soft_multipliers`) up to ``soft_lut_budget``
    estimated LUT4; besides fitting, a searched plan keeps its packed DP16KD and its
    MULT18X18D within the routability margin ``fill`` (``{block: share of the device}``,
    default :data:`ROUTABLE_FILL`). The most folded plan is tried first (if it does not fit,
    no other does; it is not held to the margin),
    then the planner's, then ``pe=1,simd=S`` for S = 16, 8, 4, 2 (narrow ROM words, which
    pack block RAM best), then up to three ``macs=`` budgets between the most folded and the
    planner's. When no plan with a unit per layer fits, the same search runs with
    ``layers=shared`` (one decoder unit for every layer). Returns ``(build,
    fit report)``; writes the report to ``fit_json`` if given, also (before raising
    :class:`HardwireError`) when nothing fits."""
    from hardwire.compiler.plan import attention_mac_units, mac_units

    from .flow import DEVICE_BLOCKS
    avail = DEVICE_BLOCKS[device]["MULT18X18D"]
    budget = avail if dsp_budget is None else min(int(dsp_budget), avail)
    if budget < 0 or soft_lut_budget < 0:
        raise HardwireError("the DSP and soft-multiplier LUT budgets must be non-negative")
    fill = {**ROUTABLE_FILL, **(fill or {})}
    if set(fill) - set(ROUTABLE_FILL) or any(
            not isinstance(v, (int, float)) or not 0 < v <= 1 for v in fill.values()):
        raise HardwireError(f"routability margins must be DP16KD / MULT18X18D shares in "
                            f"(0, 1], not {fill}")
    routable = {"DP16KD": int(fill["DP16KD"] * DEVICE_BLOCKS[device]["DP16KD"]),
                "MULT18X18D": min(budget, int(fill["MULT18X18D"] * avail))}
    limits = dict(limits or {})
    if set(limits) - {"FF", "DP16KD"} or any(
            not isinstance(v, int) or v < 0 for v in limits.values()):
        raise HardwireError(f"resource limits must be non-negative FF / DP16KD counts, not "
                            f"{limits}")
    limits = {"FF": fitmod.DEVICE_LOGIC[device], "DP16KD": DEVICE_BLOCKS[device]["DP16KD"],
              "MULT18X18D": budget, **limits}
    tried = []

    def unroutable(b):
        """The blocks over the routability margin, one phrase each."""
        used = {"DP16KD": b.estimate["DP16KD_packed"], "MULT18X18D": b.soft_report["dsps"]}
        return [f"{used[k]} {k} > {routable[k]}" for k in routable if used[k] > routable[k]]

    def build(f):
        _say(progress, f"elaborating the board top ({'fold ' + f if f else 'planned fold'}) "
                       "...")
        # an Amaranth platform prepares one build only: a fresh one per candidate
        b = _Build(qm, f, platform=type(platform)(), clock_mhz=clock_mhz, baud=baud,
                   build_dir=build_dir, dsp_budget=budget, soft_lut_budget=soft_lut_budget,
                   limits=limits, lora=lora)
        r, est = b.soft_report, b.estimate
        tried.append({"fold": f, "dsp_estimate": b.dsps, "dsps_after_soft": r["dsps"],
                      "soft_multipliers": r["soft_multipliers"], "soft_luts": r["soft_luts"],
                      "FF": est["FF"], "DP16KD": est["DP16KD"], "fits": b.fits,
                      "routable": not unroutable(b), "over": b.over})
        _say(progress, f"  estimate: {est['FF']:,} FF ({limits['FF']:,} available), "
                       f"{est['DP16KD']} DP16KD ({limits['DP16KD']}), {b.dsps} MULT18X18D if "
                       f"every multiplier were a DSP; {r['soft_multipliers']} multipliers to "
                       f"LUT logic (~{r['soft_luts']:,} LUT4) leave {r['dsps']} ({budget} "
                       f"budget, {avail} available): {'fits' if b.fits else 'does not fit'}"
                       f"{margin(b)}; "
                       f"elaborated in {b.seconds:.1f} s")
        return b

    def margin(b):
        over = unroutable(b)
        return f" (over the routability margin: {', '.join(over)})" if over else ""

    def report(b, how):
        rep = {"model": qm.name, "device": platform.device, "fold": b.fold, "chosen": how,
               "fits": b.fits, "dsp_estimate": b.dsps, "dsp_available": avail,
               "dsp_budget": budget, "routable_limits": routable,
               "routable": not unroutable(b),
               "soft_lut_budget": soft_lut_budget,
               **{k: b.soft_report[k] for k in ("dsps", "soft_multipliers", "soft_luts")},
               "estimate": _estimate_report(b, limits),
               "multipliers": mul_breakdown(b.muls, b.soft), "tried": tried}
        if fit_json is not None:
            Path(fit_json).parent.mkdir(parents=True, exist_ok=True)
            Path(fit_json).write_text(json.dumps(rep, indent=1) + "\n")
        if b.fits and unroutable(b):
            _say(progress, f"the plan{margin(b)} may not route: fewer ROM bits (--seq-len, "
                           "--wbits) leave nextpnr room")
        return rep

    def refuse(b, what):
        report(b, "none fits")
        where = f"; estimate in {fit_json}" if fit_json is not None else ""
        raise HardwireError(f"{qm.name} does not fit the {platform.device}: {what} needs "
                            + ", ".join(b.over) + where)

    if fold is not None:
        b = build(fold)
        if not b.fits:
            refuse(b, f"the plan --fold {fold}")
        return b, report(b, "--fold")
    # the most folded plan first: the smallest and quickest to elaborate; when even it does
    # not fit, no plan with a unit per layer does, and the search moves on to layer-serial
    # plans (one shared decoder unit, fold layers=shared) before the (slow) planner default
    shared = ""
    most = build(MOST_FOLDED)
    if not most.fits and qm.config.n_layers > 1 and lora is None:
        shared = ",layers=shared"
        most = build(MOST_FOLDED + shared)
    if not most.fits:
        pm = most.design.plan
        refuse(most, f"even the most folded plan ({mac_units(pm)} projection and classifier "
                     f"MACs, {attention_mac_units(pm)} attention lanes"
                     f"{', layers shared' if shared else ''})")
    def ok(c):
        """Fits, within the routability margin."""
        return c.fits and not unroutable(c)

    b = build(shared[1:] or None)
    if ok(b):
        return b, report(b, "planner default (fits)" + (", layers shared" if shared else ""))
    # narrow ROM words pack block RAM best: one row per step, simd weights wide (a tied
    # classifier at the embedding's lanes reads the embedding ROM); the widest that fits
    dim = qm.config.dim
    for simd in (16, 8, 4, 2):
        if dim % simd:
            continue
        c = build(f"pe=1,simd={simd},embed={simd}{shared}")
        if ok(c):
            return c, report(c, f"pe=1, simd<={simd} (fits)" +
                             (", layers shared" if shared else ""))
    # between the two: the largest projection budget that still fits
    hi, lo = mac_units(b.design.plan), mac_units(most.design.plan)
    best = most
    for _ in range(3):
        mid = (hi + lo) // 2
        if mid <= lo:
            break
        try:
            c = build(f"macs={mid}{shared}")
        except HardwireError:
            break
        if ok(c):
            best, lo = c, mid
        else:
            hi = mid
    how = ("most folded (fits)" if best is most else "folded to fit") + \
        (", layers shared" if shared else "")
    return best, report(best, how)


def synth_qmodel(qm, out_dir, *, board="ulx3s-85f", fold=None, clock_mhz=50.0, baud=115200,
                 seed=1, lut_mapper="auto", progress=True, timeout_s=None, gen_tokens=256,
                 nextpnr_opts=(), extra=None, dsp_budget=None, soft_lut_budget=SOFT_LUT_BUDGET,
                 lora=None, limits=None):
    """Synthesize the board design of a :class:`QuantizedModel` into ``out_dir``.

    The plan is ``fold`` or the least folded one that fits (:func:`fit_board`); multipliers
    over ``dsp_budget`` MULT18X18D (default: the device's) are mapped to LUT logic with
    Yosys ``booth`` (:func:`soft_multipliers`: constants always, then the narrowest).
    ``limits`` (``{"FF": n, "DP16KD": n}``) lowers the device's figures for the fit; a plan
    that does not fit raises :class:`HardwireError` before Yosys, with ``fit.json``
    written."""
    from hardwire.compiler.plan import rom_bits
    from hardwire.compiler.quantize import wbits_label

    t0 = time.monotonic()
    out = Path(out_dir).absolute()
    platform, device = _platform(board)
    nextpnr_opts = default_router(nextpnr_opts)
    # a refused fold or board leaves no OUT behind; a design that does not fit leaves fit.json
    b, fit = _fit(qm, fold, platform=platform, device=device, clock_mhz=clock_mhz, baud=baud,
                  build_dir=out / "amaranth", progress=progress, dsp_budget=dsp_budget,
                  soft_lut_budget=soft_lut_budget, lora=lora, fit_json=out / "fit.json",
                  limits=limits)
    out.mkdir(parents=True, exist_ok=True)
    design, top, name = b.design, b.top, b.design.name
    il = out / f"{name}.il"
    lpf = out / f"{name}.lpf"
    il.write_text(b.il)
    lpf.write_text(b.lpf)
    t_elab = time.monotonic() - t0
    _say(progress, f"wrote {il.name} ({il.stat().st_size / 1e6:.1f} MB) and {lpf.name}; "
                   f"plan: {design.plan.summary().splitlines()[0]}")

    flow = synthesize_rtlil(il, out_dir=out, top=name, device=device, package="CABGA381",
                            speed="6", lpf=lpf, freq_mhz=design.clock_hz / 1e6,
                            progress=progress, seed=seed, timeout_s=timeout_s,
                            lut_mapper=lut_mapper, ecppack_opts=("--compress",),
                            bitstream_name=f"{name}.bit",
                            memory_attrs=fitmod.memory_attrs(b.estimate),
                            nextpnr_opts=nextpnr_opts, pre_synth=booth_commands(b.soft))

    bits = rom_bits(qm, design.plan)
    expected = expected_weight_roms(bits, design.plan)
    util = flow["utilization"]
    mems = b.estimate["memories"]
    weight = {p: m for p, m in mems.items() if _WEIGHT_ROM.search(p) or _EMBED_ROM.search(p)}
    roms = check_roms(flow["memories"], expected_roms=expected,
                      rom_bits=sum(m["bits"] for m in weight.values() if m["map"] == "block"),
                      dp16kd_used=util.get("DP16KD", 0),
                      logic_roms=[p for p, m in weight.items() if m["map"] == "logic"])
    est = fit["estimate"]
    cyc = cycles_summary(design.chip, gen_tokens)
    clk_name, fmax = _sync_fmax(flow["fmax_mhz"])
    clock = design.clock_hz / 1e6
    frame_bits = 10 * (5 + 3 + 2)       # one GENERATE token frame, 8N1
    avail = flow["available"]
    summary = {
        "board": board, "device": flow["device"], "package": flow["package"],
        "name": name, "model": qm.name, "model_hash": qm.model_hash,
        "config": qm.config.to_dict(), "wbits": wbits_label(qm.wbits),
        "plan": design.plan.summary(), "fit": fit,
        "clock_mhz": clock, "pll": {"clki_div": top.pll.clki_div, "clkfb_div": top.pll.clkfb_div,
                                    "clkop_div": top.pll.clkop_div, "vco_mhz": top.pll.f_vco_mhz},
        "baud": baud, "baud_actual": round(design.clock_hz / design.clocks_per_bit),
        "clocks_per_bit": design.clocks_per_bit, "build_id": f"{design.build_id:08x}",
        "LUT4": util.get("LUT4", 0), "FF": util.get("TRELLIS_FF", 0),
        "DP16KD": util.get("DP16KD", 0), "MULT18X18D": util.get("MULT18X18D", 0),
        "available": {"LUT4": avail.get("TRELLIS_COMB", 0), "FF": avail.get("TRELLIS_FF", 0),
                      "DP16KD": avail.get("DP16KD", 0),
                      "MULT18X18D": avail.get("MULT18X18D", 0)},
        "nextpnr_options": list(nextpnr_opts),
        "fmax_mhz": flow["fmax_mhz"], "design_clock_net": clk_name, "fmax_design_mhz": fmax,
        "timing_met": fmax >= clock,
        "cycles_per_token": cyc,
        "tokens_per_s": round(fmax * 1e6 / cyc["mean"], 1) if fmax else 0.0,
        "tokens_per_s_at_clock": round(clock * 1e6 / cyc["mean"], 1),
        "by_position": {str(p): {"cycles": design.chip.cycles_per_token(p),
                                 "tokens_per_s": round(fmax * 1e6 /
                                                       design.chip.cycles_per_token(p), 1)}
                        for p in REPORT_POSITIONS if p < design.chip.seq_len},
        "cycles_by_unit": {str(p): cycles_by_unit(design.chip, p)
                           for p in (0, min(255, design.chip.seq_len - 1))},
        "link_tokens_per_s": round(design.clock_hz / design.clocks_per_bit / frame_bits, 1),
        "rom_check": roms,
        "estimate": {"FF": est["FF"], "DP16KD": est["DP16KD"],
                     "DP16KD_packed": est["DP16KD_packed"], "MULT18X18D": est["MULT18X18D"],
                     "soft_multiplier_LUT4": est["soft_multiplier_LUT4"],
                     "measured": {"FF": util.get("TRELLIS_FF", 0),
                                  "DP16KD": util.get("DP16KD", 0),
                                  "MULT18X18D": util.get("MULT18X18D", 0)},
                     "memory_rule_mismatches": check_memories(flow["memories"], b.estimate),
                     "units": est["units"], "source": "fit.json"},
        "utilization": util, "memories": flow["memories"], "lut_mapper": flow["lut_mapper"],
        "bitstream": flow["bitstream"], "rtlil": str(il), "lpf": str(lpf),
        "logs": flow["logs"],
        "times_s": {"elaborate": round(t_elab, 2), **flow["times_s"],
                    "total": round(time.monotonic() - t0, 2)},
        "tool_versions": flow["tool_versions"],
        **(extra or {}),
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not roms["ok"]:
        raise HardwireError("weight ROM check failed: " + "; ".join(roms["problems"]) +
                            f"; see {out / 'synth.json'} and {flow['logs']['yosys']}")
    _say(progress, format_summary(summary))
    return summary


def format_summary(s):
    return (f"{s['name']} on {s['board']}: LUT4 {s['LUT4']:,}/{s['available']['LUT4']:,}, "
            f"FF {s['FF']:,}, DP16KD {s['DP16KD']}/{s['available']['DP16KD']}, MULT18X18D "
            f"{s['MULT18X18D']}/{s['available']['MULT18X18D']}; Fmax {s['fmax_design_mhz']:.1f}"
            f" MHz (clock {s['clock_mhz']:g} MHz{'' if s['timing_met'] else ', NOT MET'}); "
            f"{s['cycles_per_token']['mean']:,.0f} cycles/token -> {s['tokens_per_s']:,.0f} "
            f"tokens/s at Fmax (UART link limit {s['link_tokens_per_s']:,.0f}/s); "
            f"{s['times_s']['total']:.0f} s")


def synth_board(path, out_dir, *, board="ulx3s-85f", wbits="8", seq_len=None, fold=None,
                clock_mhz=50.0, baud=115200, seed=1, lut_mapper="auto", progress=True,
                timeout_s=None, lora=None, qat=False, nextpnr_opts=()):
    """``hardwire synth MODEL --board ulx3s-85f -o OUT``: returns the synth.json summary.

    ``lora`` (a :class:`~hardwire.compiler.chip_builder.LoraSpec`, ``--lora-targets`` and
    ``--lora-rank``) builds the chip with its LoRA datapath and loader; ``qat`` quantizes
    with :mod:`~hardwire.compiler.qat` fine-tuning (``--qat``)."""
    from hardwire.compiler.loaders import load_model
    from hardwire.compiler.quantize import quantize_model
    t0 = time.monotonic()
    _platform(board)                    # fail early on a bad board name
    model = load_model(path, seq_len=seq_len)
    qm = quantize_model(model, wbits=wbits, qat=qat)
    _say(progress, f"quantized {model.name} in {time.monotonic() - t0:.1f} s")
    return synth_qmodel(qm, out_dir, board=board, fold=fold, clock_mhz=clock_mhz, baud=baud,
                        seed=seed, lut_mapper=lut_mapper, progress=progress,
                        timeout_s=timeout_s, lora=lora, nextpnr_opts=tuple(nextpnr_opts),
                        extra={"model_file": str(path)} | ({} if lora is None else {
                            "lora": {"targets": list(lora.targets), "r_max": lora.r_max}}))
