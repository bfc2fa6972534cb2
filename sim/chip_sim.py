"""Token-level Verilator simulation of a whole chip (the ``rtl`` engine).

:func:`chip_sim_executable` exports a ``LlamaChip`` (wrapped in
:class:`~hardwire.sim.verilated.SimTop`, ROMs in ``$readmemh`` files) and compiles it with the
C++ driver ``chip_main.cpp`` into one executable; both steps are cached under
``<build_dir>/rtl/`` (:mod:`hardwire.sim.verilated`). :class:`ChipSim` runs that executable
and talks its line protocol (feed a token, get the next token and the cycles it took).
"""

import subprocess
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError
from hardwire.sim.verilated import (
    build_executable,
    cached_export,
    fst_available,
    sources_digest,
    trace_format,
)

__all__ = ["ChipSim", "ChipError", "chip_sim_executable", "generate_rtl"]

_DRIVER = Path(__file__).with_name("chip_main.cpp")


class ChipError(HardwireError):
    """The chip raised an error flag (token out of range, context full) or timed out."""

    def __init__(self, kind, cycles):
        self.kind = kind
        self.cycles = cycles
        super().__init__(f"chip error: {kind} (after {cycles} cycles)")


def _say(progress, msg):
    if progress is not None:
        print(f"[hardwire] {msg}", file=progress, flush=True)


def chip_key(qm, plan):
    """Cache key of a chip's Verilog: datapath digest, plan and the generating sources."""
    import hardwire.compiler.chip_builder
    import hardwire.compiler.plan
    import hardwire.hdl
    return "\n".join((qm.digest(), repr(plan), sources_digest(
        hardwire.hdl, hardwire.compiler.chip_builder, hardwire.compiler.plan)))


def chip_sim_executable(qm, plan, *, build_dir="build", trace=None, progress=None,
                        rebuild=False, timings=None):
    """Path of the (cached) Verilator executable of ``qm``'s chip under ``plan``.

    ``trace`` is ``None``, ``"fst"`` or ``"vcd"`` (a separate, tracing build); ``rebuild``
    exports and builds even if cached; a ``timings`` dict receives ``export_seconds`` and
    ``build_seconds``.
    """
    from hardwire.compiler.chip_builder import build_chip, chip_name
    name = chip_name(qm)
    root = Path(build_dir) / "rtl"
    t0 = time.perf_counter()
    verilog = cached_export(lambda: build_chip(qm, plan), name=name, key=chip_key(qm, plan),
                            cache_dir=root / "_verilog", progress=progress, rebuild=rebuild)
    t1 = time.perf_counter()
    exe = build_executable(verilog, top=name, driver=_DRIVER, prefix="Vchip", exe="chipsim",
                           build_dir=root, trace=trace, progress=progress, rebuild=rebuild)
    if timings is not None:
        timings.update(export_seconds=t1 - t0, build_seconds=time.perf_counter() - t1)
    return exe


class ChipSim:
    """A running simulation of one chip: feed tokens, read next tokens and cycle counts."""

    def __init__(self, exe, *, trace=None):
        args = [str(exe)] + (["--trace", str(trace)] if trace else [])
        self._p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1)
        line = self._p.stdout.readline().strip()
        if line != "READY":
            self.close()
            raise HardwireError(f"chip simulation did not start ({line!r})")

    def _cmd(self, text):
        self._p.stdin.write(text + "\n")
        self._p.stdin.flush()

    def _read(self):
        line = self._p.stdout.readline()
        if not line:
            raise HardwireError("chip simulation exited unexpectedly")
        return line.split()

    def _token_reply(self):
        w = self._read()
        if w[0] == "O":
            return int(w[1]), int(w[2])
        raise ChipError(w[1], int(w[2]))

    def feed(self, token):
        """Feed one token; return ``(next_token, cycles)`` or raise :class:`ChipError`."""
        self._cmd(f"T {int(token)}")
        return self._token_reply()

    def generate(self, prompt_tokens, n, *, stop_on_bos=True):
        """Greedy generation; returns ``(tokens, cycles)`` with one cycle count per token fed."""
        cycles, out = [], []
        nxt = None
        for t in prompt_tokens:
            nxt, c = self.feed(t)
            cycles.append(c)
        while len(out) < n:
            if stop_on_bos and nxt == 1:
                break
            out.append(nxt)
            if len(out) == n:
                break
            nxt, c = self.feed(nxt)
            cycles.append(c)
        return out, cycles

    def reset_context(self):
        self._cmd("R")
        return int(self._read()[1])

    def status(self):
        self._cmd("P")
        w = self._read()
        return {"pos": int(w[1]), "busy": int(w[2]), "err_token": int(w[3]),
                "err_context": int(w[4]), "cycles": int(w[5])}

    def id_words(self):
        self._cmd("I")
        return [int(x, 16) for x in self._read()[1:]]

    def close(self):
        if self._p.poll() is None:
            try:
                self._cmd("Q")
                self._p.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def generate_rtl(qm, prompt_tokens, n, *, fold=None, build_dir="build", trace=None,
                 progress=None):
    """Build (cached) and run the chip for ``qm``; greedy-generate ``n`` tokens.

    ``trace`` is a waveform file name ending in ``.fst`` or ``.vcd``. Returns ``tokens``,
    ``cycles`` (one count per token fed), ``sim_seconds`` and ``sim_tokens_per_s``.
    """
    from hardwire.compiler.plan import plan_chip
    fmt = trace_format(trace) if trace else None
    if fmt == "fst" and not fst_available():
        raise HardwireError("FST waveforms need the liblz4 development headers (lz4.h), not "
                            "found by the C++ compiler; install them or trace to a .vcd file")
    if trace:
        parent = Path(trace).absolute().parent
        if not parent.is_dir():
            raise HardwireError(f"--trace {trace}: folder {parent} does not exist")
    c = qm.config
    if len(prompt_tokens) + n > c.seq_len + 1:
        n = c.seq_len + 1 - len(prompt_tokens)
    try:
        plan = plan_chip(qm, fold=fold)
    except ValueError as e:
        raise HardwireError(f"{e}") from None
    exe = chip_sim_executable(qm, plan, build_dir=build_dir, trace=fmt, progress=progress)
    t0 = time.perf_counter()
    with ChipSim(exe, trace=Path(trace).absolute() if trace else None) as sim:
        tokens, cycles = sim.generate(prompt_tokens, n)
    wall = time.perf_counter() - t0
    res = {"tokens": tokens, "cycles": cycles, "sim_seconds": wall,
           "sim_tokens_per_s": len(cycles) / wall if wall else 0.0}
    _say(progress, f"simulated {len(cycles)} tokens ({sum(cycles):,} cycles) in {wall:.2f} s: "
                   f"{res['sim_tokens_per_s']:.1f} tokens/s, "
                   f"{sum(cycles) / wall if wall else 0:,.0f} cycles/s"
                   + (f"; waveform in {trace}" if trace else ""))
    return res
