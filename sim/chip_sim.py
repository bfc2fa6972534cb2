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

__all__ = ["ChipError", "ChipSim", "chip_sim_executable", "generate_rtl", "lora_status_fields"]

_DRIVER = Path(__file__).with_name("chip_main.cpp")


def _driver(root, lora):
    """The C++ driver: ``chip_main.cpp``, or for a chip with LoRA ports the same file with
    ``HW_LORA`` defined (written under ``root/_driver``)."""
    if lora is None:
        return _DRIVER
    path = Path(root) / "_driver" / "chip_main_lora.cpp"
    text = "#define HW_LORA 1\n" + _DRIVER.read_text()
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def lora_status_fields(word):
    """The chip's ``lora_status`` word as a dict (``hdl.lora_loader.STATUS_LAYOUT``), the
    error by name."""
    from hardwire.hdl.lora_loader import LoraError
    err = (word >> 8) & 0xFF
    try:
        err_name = LoraError(err).name
    except ValueError:
        err_name = str(err)
    return {"bank": word & 1, "on": word >> 1 & 1, "pending": word >> 2 & 1,
            "locked": word >> 3 & 1, "busy": word >> 4 & 1, "enabled": word >> 5 & 1,
            "valid": word >> 6 & 1, "error": err_name}


class ChipError(HardwireError):
    """The chip raised an error flag (token out of range, context full) or timed out."""

    def __init__(self, kind, cycles):
        self.kind = kind
        self.cycles = cycles
        super().__init__(f"chip error: {kind} (after {cycles} cycles)")


def _say(progress, msg):
    if progress is not None:
        print(f"[hardwire] {msg}", file=progress, flush=True)


def chip_key(qm, plan, lora=None):
    """Cache key of a chip's Verilog: datapath digest, plan, LoRA spec (if any) and the
    generating sources."""
    import hardwire.compiler.chip_builder
    import hardwire.compiler.plan
    import hardwire.hdl
    parts = (qm.digest(), repr(plan)) + (() if lora is None else (repr(lora),))
    return "\n".join(parts + (sources_digest(
        hardwire.hdl, hardwire.compiler.chip_builder, hardwire.compiler.plan),))


def chip_sim_executable(qm, plan, *, build_dir="build", trace=None, progress=None,
                        rebuild=False, timings=None, lora=None):
    """Path of the (cached) Verilator executable of ``qm``'s chip under ``plan``.

    ``trace`` is ``None``, ``"fst"`` or ``"vcd"`` (a separate, tracing build); ``rebuild``
    exports and builds even if cached; a ``timings`` dict receives ``export_seconds`` and
    ``build_seconds``; ``lora`` (a :class:`~hardwire.compiler.chip_builder.LoraSpec`) builds
    the chip with its LoRA datapath and loader, and a driver that speaks the ``B``/``C``/``S``
    upload commands.
    """
    from hardwire.compiler.chip_builder import build_chip, chip_name
    name = chip_name(qm, lora=lora)
    root = Path(build_dir) / "rtl"
    t0 = time.perf_counter()

    def make():
        return build_chip(qm, plan) if lora is None else build_chip(qm, plan, lora=lora)
    verilog = cached_export(make, name=name, key=chip_key(qm, plan, lora),
                            cache_dir=root / "_verilog", progress=progress, rebuild=rebuild)
    t1 = time.perf_counter()
    exe = build_executable(verilog, top=name, driver=_driver(root, lora), prefix="Vchip",
                           exe="chipsim", build_dir=root, trace=trace, progress=progress,
                           rebuild=rebuild)
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

    def lora_status(self):
        """The ``lora_status`` word (see :func:`lora_status_fields`)."""
        self._cmd("S")
        return int(self._read()[1])

    def lora_cmd(self, code):
        """Send one ``LoraCmd`` code; returns the status word 4 idle cycles later."""
        self._cmd(f"C {int(code)}")
        v = int(self._read()[1])
        if v < 0:
            raise HardwireError(f"chip simulation: LoRA command {int(code)} was not taken")
        return v

    def lora_bytes(self, data, *, chunk=4096):
        """Stream image bytes on ``lora_in``, one a cycle."""
        data = bytes(data)
        for k in range(0, len(data), chunk):
            part = data[k:k + chunk]
            self._cmd("B " + part.hex())
            n = int(self._read()[1])
            if n != len(part):
                raise HardwireError(f"chip simulation: lora_in took {n} of {len(part)} bytes")

    def lora_load(self, image, *, enable=True):
        """BEGIN, the image's bytes, COMMIT (and ENABLE); returns the status fields after the
        last command. Raises :class:`HardwireError` naming the loader's error if the chip
        refused the image or the adapter is not on afterwards."""
        from hardwire.hdl.lora_loader import LoraCmd
        t0 = time.perf_counter()
        st = lora_status_fields(self.lora_cmd(LoraCmd.BEGIN))
        if st["error"] != "OK":
            raise HardwireError(f"chip simulation: LoRA BEGIN refused ({st['error']})")
        self.lora_bytes(image)
        st = lora_status_fields(self.lora_cmd(LoraCmd.COMMIT))
        if st["error"] != "OK":
            raise HardwireError(f"chip simulation: the chip refused the adapter image at "
                                f"COMMIT ({st['error']})")
        if enable:
            st = lora_status_fields(self.lora_cmd(LoraCmd.ENABLE))
            if st["error"] != "OK" or not st["on"]:
                raise HardwireError(f"chip simulation: the adapter is not on after ENABLE "
                                    f"(status {st})")
        st["seconds"] = time.perf_counter() - t0
        return st

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
                 progress=None, lora=None, lora_image=None):
    """Build (cached) and run the chip for ``qm``; greedy-generate ``n`` tokens.

    ``trace`` is a waveform file name ending in ``.fst`` or ``.vcd``. ``lora`` (a
    :class:`~hardwire.compiler.chip_builder.LoraSpec`) builds the chip with its LoRA datapath;
    ``lora_image`` (HWLA bytes, ``pack_lora``) is then uploaded through ``lora_in``/``lora_cmd``
    (BEGIN, bytes, COMMIT, ENABLE; ``lora_status`` must show the adapter on, no error) before
    the first token. Returns ``tokens``, ``cycles`` (one count per token fed),
    ``sim_seconds`` and ``sim_tokens_per_s`` (and ``lora_status``, ``upload_seconds``).
    """
    if lora_image is not None and lora is None:
        raise HardwireError("an adapter image needs a chip built with LoRA (lora=LoraSpec)")
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
    exe = chip_sim_executable(qm, plan, build_dir=build_dir, trace=fmt, progress=progress,
                              lora=lora)
    extra = {}
    with ChipSim(exe, trace=Path(trace).absolute() if trace else None) as sim:
        if lora_image is not None:
            st = sim.lora_load(lora_image)
            extra = {"upload_seconds": st.pop("seconds"), "lora_status": st}
            _say(progress, f"adapter image uploaded ({len(lora_image):,} bytes) and committed "
                           f"in {extra['upload_seconds']:.2f} s: bank {st['bank']}, on")
        t0 = time.perf_counter()
        tokens, cycles = sim.generate(prompt_tokens, n)
        wall = time.perf_counter() - t0
    res = {"tokens": tokens, "cycles": cycles, "sim_seconds": wall,
           "sim_tokens_per_s": len(cycles) / wall if wall else 0.0, **extra}
    _say(progress, f"simulated {len(cycles)} tokens ({sum(cycles):,} cycles) in {wall:.2f} s: "
                   f"{res['sim_tokens_per_s']:.1f} tokens/s, "
                   f"{sum(cycles) / wall if wall else 0:,.0f} cycles/s"
                   + (f"; waveform in {trace}" if trace else ""))
    return res
