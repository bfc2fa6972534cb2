"""Verilator simulation of the whole board, its UART bridged to a pseudo-terminal.

:func:`board_sim_verilog` exports a :class:`~.board.BoardCore` (UART + host link + chip,
wrapped in :class:`~hardwire.sim.verilated.SimTop`) and :func:`build_board_sim` compiles it
with the driver ``sim/board_main.cpp`` into one executable; both are cached under
``<build_dir>/board/`` by :mod:`hardwire.sim.verilated`, the same fast build the ``rtl``
engine uses. :class:`BoardSim` runs it: the driver opens a
pty (``posix_openpt``) and prints its path; a host program opens that path as a serial port
(:class:`~.host.HostLink`, ``hardwire chat --port``) exactly as it would open a real board's
``/dev/ttyUSB0``.

The simulation is clocked directly by the simulator (no PLL; see ``docs/host_link.md``) and
uses a small UART bit period (``--baud-divisor``, default 8 clocks per bit) for speed; the
baud rate set on the pty does not matter.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError
from hardwire.sim.verilated import build_executable, cached_export, sources_digest

__all__ = [
    "SIM_CLOCKS_PER_BIT",
    "BoardSim",
    "board_sim_design",
    "build_board_sim",
    "run_board_sim",
]

#: Default UART bit period of the simulation (clocks per bit).
SIM_CLOCKS_PER_BIT = 8
#: Nominal clock reported by INFO in simulation.
SIM_CLOCK_HZ = 50_000_000


def _driver_path():
    import hardwire.sim  # the C++ driver ships with hardwire.sim (package data)
    return Path(hardwire.sim.__file__).with_name("board_main.cpp")


def _say(progress, msg):
    if progress is not None:
        print(f"[hardwire] {msg}", file=progress, flush=True)


def sim_timeout_cycles(cpb):
    """Host link inter-byte timeout in simulation: 64 byte times."""
    return 64 * 10 * cpb


def build_board_sim(verilog_path, *, name, build_dir="build", progress=None):
    """Compile a board's Verilog (top module ``name``, from :func:`board_sim_verilog`) with
    the pty driver; return the executable's path (cached by content hash)."""
    return build_executable(verilog_path, top=name, driver=_driver_path(), prefix="Vboard",
                            exe="boardsim", build_dir=Path(build_dir) / "board",
                            progress=progress)


class BoardSim:
    """A running board simulation; :attr:`port` is the pty to open as a serial port."""

    def __init__(self, exe, *, cpb=SIM_CLOCKS_PER_BIT, idle_cycles=256, log=None):
        # run flat out for twice the link's inter-byte timeout after any activity
        args = [str(exe), "--cpb", str(cpb), "--idle-cycles", str(idle_cycles),
                "--active-tail", str(2 * sim_timeout_cycles(cpb)), "--stdin-eof-quits"]
        self._p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=log if log is not None else subprocess.DEVNULL,
                                   text=True, bufsize=1)
        self.port = None
        line = self._p.stdout.readline().split()
        if len(line) == 2 and line[0] == "PTY":
            self.port = line[1]
            line = self._p.stdout.readline().split()
        if self.port is None or line != ["READY"]:
            self.close()
            raise HardwireError(f"board simulation did not start ({' '.join(line)!r})")

    @property
    def running(self):
        return self._p.poll() is None

    def wait(self):
        return self._p.wait()

    def close(self):
        if self._p.poll() is None:
            try:
                self._p.stdin.close()          # --stdin-eof-quits
                self._p.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._p.terminate()
                try:
                    self._p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._p.kill()
                    self._p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def board_sim_design(qm, *, fold=None, cpb=SIM_CLOCKS_PER_BIT, lora=None):
    """The :class:`~.design.BoardDesign` simulated for ``qm``: nominal 50 MHz clock, ``cpb``
    clocks per UART bit, a 64-byte-time inter-byte timeout; ``lora`` (a
    :class:`~hardwire.compiler.chip_builder.LoraSpec`) builds the chip's LoRA datapath."""
    from .design import board_design
    return board_design(qm, fold=fold, clock_hz=SIM_CLOCK_HZ, cpb=cpb,
                        timeout_cycles=sim_timeout_cycles(cpb), target="sim", lora=lora)


def board_sim_verilog(qm, *, fold=None, cpb=SIM_CLOCKS_PER_BIT, build_dir="build",
                      progress=None, lora=None):
    """``(name, verilog path)`` of the simulated board for ``qm``. Elaborating a chip takes a
    while, so the export is cached under ``<build_dir>/board/_verilog`` by the datapath
    digest, the options and the generating sources."""
    import hardwire.compiler.chip_builder
    import hardwire.compiler.plan
    import hardwire.fpga
    import hardwire.hdl
    from hardwire.compiler.chip_builder import chip_name
    key = {"digest": qm.digest(), "fold": fold, "cpb": cpb, "sources": sources_digest(
        hardwire.hdl, hardwire.fpga, hardwire.compiler.chip_builder, hardwire.compiler.plan)}
    if lora is not None:                    # absent without LoRA: plain caches stay valid
        key["lora"] = repr(lora)
    key = json.dumps(key, sort_keys=True)
    name = chip_name(qm, lora=lora)
    path = cached_export(lambda: board_sim_design(qm, fold=fold, cpb=cpb, lora=lora).core,
                         name=name,
                         key=key, cache_dir=Path(build_dir) / "board" / "_verilog",
                         progress=progress)
    return name, path


def start_board_sim(qm, *, fold=None, cpb=SIM_CLOCKS_PER_BIT, build_dir="build",
                    progress=None, log=None, lora=None):
    """Build (cached) and start the board simulation of ``qm`` (with the LoRA datapath of
    ``lora``, a ``LoraSpec``, if given); returns a :class:`BoardSim`."""
    name, verilog = board_sim_verilog(qm, fold=fold, cpb=cpb, build_dir=build_dir,
                                      progress=progress, lora=lora)
    exe = build_board_sim(verilog, name=name, build_dir=build_dir, progress=progress)
    return BoardSim(exe, cpb=cpb, log=log)


def run_board_sim(path, *, wbits="8", seq_len=None, fold=None, cpb=SIM_CLOCKS_PER_BIT,
                  build_dir="build", progress=sys.stderr, out=sys.stdout, lora=None,
                  qat=False):
    """``hardwire board-sim``: build, start, print the pty path, run until interrupted.

    ``lora`` (a :class:`~hardwire.compiler.chip_builder.LoraSpec`, from ``--lora-targets``
    and ``--lora-rank``) builds the chip with its LoRA datapath and loader; upload an adapter
    with ``hardwire lora load IMAGE --port PTY``."""
    from hardwire.compiler.loaders import load_model
    from hardwire.compiler.quantize import quantize_model
    if cpb < 4:
        raise HardwireError(f"--baud-divisor ({cpb}) must be at least 4 clocks per bit")
    model = load_model(path, seq_len=seq_len)
    qm = quantize_model(model, wbits=wbits, qat=qat)
    with start_board_sim(qm, fold=fold, cpb=cpb, build_dir=build_dir, progress=progress,
                         log=None, lora=lora) as sim:
        print(sim.port, file=out, flush=True)
        _say(progress, f"board simulation of {model.name} on {sim.port}: connect with "
                       f"`hardwire chat --port {sim.port}`; Ctrl-C stops it")
        try:
            while sim.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
