"""Token-level Verilator simulation of a whole chip (the ``rtl`` engine).

:func:`build_chip_sim` exports a ``LlamaChip`` to Verilog and compiles it, with the C++ driver
``chip_main.cpp``, into one executable, cached under ``<build_dir>/rtl/<name>-<hash12>/`` by
the hash of the Verilog and the build options. :class:`ChipSim` runs that executable and talks
its line protocol (feed a token, get the next token and the cycles it took).
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError
from hardwire.sim.toolchain import ensure_toolchain

__all__ = ["build_chip_sim", "ChipSim", "ChipError", "generate_rtl"]

_DRIVER = Path(__file__).with_name("chip_main.cpp")
_FORMAT = 1


class ChipError(HardwireError):
    """The chip raised an error flag (token out of range, context full) or timed out."""

    def __init__(self, kind, cycles):
        self.kind = kind
        self.cycles = cycles
        super().__init__(f"chip error: {kind} (after {cycles} cycles)")


def _say(progress, msg):
    if progress is not None:
        print(f"[hardwire] {msg}", file=progress, flush=True)


def build_chip_sim(verilog, *, name, build_dir="build", trace=False, progress=None):
    """Compile the chip's Verilog with the driver; return the executable's path (cached)."""
    env = ensure_toolchain()
    driver = _DRIVER.read_text()
    opts = {"format": _FORMAT, "trace": bool(trace), "cflags": "-O1"}
    h = hashlib.sha256()
    for part in (verilog, driver, json.dumps(opts, sort_keys=True)):
        h.update(part.encode())
    out = Path(build_dir) / "rtl" / f"{name}-{h.hexdigest()[:12]}"
    exe = out / "obj" / "chipsim"
    if exe.is_file():
        _say(progress, f"simulation cached: {out}")
        return exe
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "chip.v").write_text(verilog)
    (tmp / "chip_main.cpp").write_text(driver)
    cmd = ["verilator", "--cc", "--exe", "--build", "-j", str(os.cpu_count() or 2),
           "-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "fast", "--x-initial", "fast",
           "--top-module", "top", "--prefix", "Vchip", "-Mdir", "obj", "-o", "chipsim",
           "-CFLAGS", opts["cflags"], "chip.v", "chip_main.cpp"]
    if trace:
        cmd[1:1] = ["--trace-fst"]
    _say(progress, f"building the Verilator simulation of {name} (one-time, cached) ...")
    t0 = time.perf_counter()
    log = tmp / "build.log"
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise HardwireError(f"Verilator build failed (exit {r.returncode}); see {log}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _say(progress, f"built in {time.perf_counter() - t0:.1f} s")
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
    """Build (cached) and run the chip for ``qm``; greedy-generate ``n`` tokens."""
    from hardwire.compiler.chip_builder import build_chip, chip_name
    from hardwire.compiler.plan import plan_chip
    from hardwire.sim.cocotb_runner import export_verilog
    c = qm.config
    if len(prompt_tokens) + n > c.seq_len + 1:
        n = c.seq_len + 1 - len(prompt_tokens)
    plan = plan_chip(qm, fold=fold)
    name = chip_name(qm)
    t0 = time.perf_counter()
    chip = build_chip(qm, plan)
    verilog = export_verilog(chip, "top")
    _say(progress, f"elaborated {name} in {time.perf_counter() - t0:.1f} s")
    exe = build_chip_sim(verilog, name=name, build_dir=build_dir, trace=bool(trace),
                         progress=progress)
    t0 = time.perf_counter()
    with ChipSim(exe, trace=trace) as sim:
        tokens, cycles = sim.generate(prompt_tokens, n)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "cycles": cycles, "sim_seconds": wall,
            "sim_tokens_per_s": len(cycles) / wall if wall else 0.0}

