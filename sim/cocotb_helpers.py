"""Helpers for cocotb test modules driving Amaranth components exported to Verilog.

Port naming: Amaranth's Verilog export flattens a component's signature with ``__`` between
path parts, so a ``stream.Signature`` member ``o`` becomes the ports ``o__valid``, ``o__ready``
and ``o__payload`` (a struct/array payload is one flat ``o__payload`` vector, element 0 in the
LSBs); the ``sync`` domain adds ``clk`` and ``rst`` (synchronous, active high).

Stream timing model (robust under Verilator): inputs are driven on the falling clock edge and
the handshake is sampled in the ``ReadOnly`` phase of the same time step, i.e. after all
combinational logic has settled and before the rising edge where the transfer happens.

Also here: two's-complement conversions (:func:`to_bits`, :func:`to_signed`), packing of
vectors of signed elements into one payload integer (:func:`pack_signed`,
:func:`unpack_signed`), :class:`CycleCounter`, and :func:`load_vectors` (re-exported).
"""

from __future__ import annotations

import random as _random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from hardwire.sim.cocotb_runner import load_vectors

__all__ = [
    "load_vectors", "start_clock", "reset", "stream_send", "stream_recv", "CycleCounter",
    "to_bits", "to_signed", "pack_signed", "unpack_signed", "port", "log_transfers",
    "assert_vectors",
]


# ------------------------------------------------------------------------ bit-level conversion

def to_bits(value, width: int) -> int:
    """Two's-complement bit pattern (non-negative int) of ``value`` in ``width`` bits.

    Accepts ``-2**(width-1) <= value < 2**width`` (signed or unsigned interpretation).
    """
    value = int(value)
    if not -(1 << (width - 1)) <= value < (1 << width):
        raise ValueError(f"{value} does not fit in {width} bits")
    return value & ((1 << width) - 1)


def to_signed(bits, width: int) -> int:
    """Interpret the low ``width`` bits of ``bits`` as a two's-complement signed integer."""
    bits = int(bits) & ((1 << width) - 1)
    return bits - (1 << width) if bits >> (width - 1) else bits


def pack_signed(values, width: int) -> int:
    """Pack signed integers into one flat payload: element 0 in the least significant bits."""
    payload = 0
    for index, value in enumerate(values):
        payload |= to_bits(value, width) << (index * width)
    return payload


def unpack_signed(payload, n: int, width: int, *, signed: bool = True) -> list[int]:
    """Inverse of :func:`pack_signed`: ``n`` elements of ``width`` bits, element 0 = LSBs."""
    payload = int(payload)
    mask = (1 << width) - 1
    out = [(payload >> (i * width)) & mask for i in range(n)]
    return [to_signed(v, width) for v in out] if signed else out


# ------------------------------------------------------------------------------ handle helpers

def port(dut, name: str):
    """The handle of port ``name`` with a clear error listing similar ports if it is missing."""
    try:
        return getattr(dut, name)
    except AttributeError:
        stem = name.split("__")[0]
        names = sorted(h._name for h in dut if h._name.startswith(stem))
        raise AttributeError(f"{dut._name} has no port {name!r}; ports starting with "
                             f"{stem!r}: {names}") from None


def _rng(rng):
    if rng is None:
        return _random  # seeded by cocotb from COCOTB_RANDOM_SEED
    if isinstance(rng, int):
        return _random.Random(rng)
    return rng


def start_clock(dut, period_ns: float = 10, *, clk: str = "clk"):
    """Start a free-running clock on ``clk``; returns the :class:`cocotb.clock.Clock`."""
    clock = Clock(port(dut, clk), period_ns, unit="ns")
    clock.start()
    return clock


async def reset(dut, cycles: int = 2, *, clk: str = "clk", rst: str = "rst") -> None:
    """Hold the synchronous reset ``rst`` high for ``cycles`` rising edges of a running clock.

    Returns just after the falling edge following reset release (ready for stream drivers).
    """
    clock, reset_ = port(dut, clk), port(dut, rst)
    await FallingEdge(clock)
    reset_.value = 1
    for _ in range(cycles):
        await RisingEdge(clock)
    await FallingEdge(clock)
    reset_.value = 0


# ------------------------------------------------------------------------------------ streams

async def stream_send(dut, prefix: str, values, *, clk: str = "clk", valid_prob: float = 1.0,
                      rng=None, max_stall_cycles: int = 100_000) -> int:
    """Send ``values`` (ints, signed or unsigned) on the stream input ``prefix``.

    Drives ``<prefix>__valid``/``<prefix>__payload`` and honours ``<prefix>__ready``; with
    ``valid_prob < 1`` random bubbles are inserted (``rng``: ``random.Random``, a seed, or None
    for cocotb's seeded global generator). Returns the number of cycles taken. Raises
    :class:`AssertionError` if the sink stalls for ``max_stall_cycles`` cycles.
    """
    clock = port(dut, clk)
    valid, ready, payload = (port(dut, f"{prefix}__{s}") for s in ("valid", "ready", "payload"))
    width = len(payload)
    rng = _rng(rng)
    values = [to_bits(v, width) for v in values]
    index = cycles = stall = 0
    while index < len(values):
        await FallingEdge(clock)
        cycles += 1
        offer = valid_prob >= 1.0 or rng.random() < valid_prob
        valid.value = int(offer)
        payload.value = values[index]
        await ReadOnly()
        if offer and int(ready.value):
            index += 1  # transfers on the coming rising edge
            stall = 0
        else:
            stall += 1
            if stall >= max_stall_cycles:
                raise AssertionError(f"{prefix}: sink stalled for {stall} cycles "
                                     f"after {index}/{len(values)} items")
    await FallingEdge(clock)
    valid.value = 0
    return cycles


async def stream_recv(dut, prefix: str, n: int, *, clk: str = "clk", signed: bool = False,
                      ready_prob: float = 1.0, rng=None,
                      max_stall_cycles: int = 100_000) -> list[int]:
    """Receive ``n`` payloads from the stream output ``prefix``.

    Drives ``<prefix>__ready`` (randomly low with ``ready_prob < 1`` for backpressure) and
    samples ``<prefix>__payload`` when ``valid & ready``. ``signed=True`` returns
    two's-complement values of the payload width (use :func:`unpack_signed` for vectors).
    Raises :class:`AssertionError` if no item arrives for ``max_stall_cycles`` cycles.
    """
    clock = port(dut, clk)
    valid, ready, payload = (port(dut, f"{prefix}__{s}") for s in ("valid", "ready", "payload"))
    width = len(payload)
    rng = _rng(rng)
    out: list[int] = []
    stall = 0
    while len(out) < n:
        await FallingEdge(clock)
        accept = ready_prob >= 1.0 or rng.random() < ready_prob
        ready.value = int(accept)
        await ReadOnly()
        if accept and int(valid.value):
            bits = payload.value.to_unsigned()
            out.append(to_signed(bits, width) if signed else bits)
            stall = 0
        else:
            stall += 1
            if stall >= max_stall_cycles:
                raise AssertionError(f"{prefix}: no output for {stall} cycles "
                                     f"after {len(out)}/{n} items")
    await FallingEdge(clock)
    ready.value = 0
    return out


# ---------------------------------------------------------------------------------- counting

class CycleCounter:
    """Counts rising edges of ``clk`` in a background task: ``counter.cycles``.

    >>> counter = CycleCounter(dut).start()
    >>> ...; latency = counter.cycles - t0
    """

    def __init__(self, dut, *, clk: str = "clk"):
        self._clock = port(dut, clk)
        self.cycles = 0
        self._task = None

    async def _count(self) -> None:
        while True:
            await RisingEdge(self._clock)
            self.cycles += 1

    def start(self) -> "CycleCounter":
        if self._task is None:
            self._task = cocotb.start_soon(self._count())
        return self

    def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        return self.cycles


async def log_transfers(dut, log, *, held=None, clk: str = "clk") -> None:
    """Forever append the cycle number of every transfer on each stream port named in ``log``
    (sampled before the rising edge, so cycle ``t`` is the edge where the transfer happens).

    With ``held="o"``, also append to ``log["held"]`` every cycle in which that port dropped or
    changed a payload it was still offering (a stream must hold its payload until taken).
    """
    clock = port(dut, clk)
    ports = [name for name in log if name != "held"]
    cycle, offered = 0, None
    while True:
        await FallingEdge(clock)
        await ReadOnly()
        cycle += 1
        for name in ports:
            if int(port(dut, f"{name}__valid").value) and int(port(dut, f"{name}__ready").value):
                log[name].append(cycle)
        if held is not None:
            valid = int(port(dut, f"{held}__valid").value)
            ready = int(port(dut, f"{held}__ready").value)
            payload = port(dut, f"{held}__payload").value.to_unsigned() if valid else None
            if offered is not None and payload != offered:
                log["held"].append(cycle)
            offered = payload if valid and not ready else None


def assert_vectors(words, expect, width: int, *, what: str = "vector") -> None:
    """Unpack each payload word into ``len(expect[k])`` signed elements and compare; the message
    names the first mismatching vector and element."""
    for k, (word, want) in enumerate(zip(words, expect)):
        got = unpack_signed(word, len(want), width)
        bad = [j for j in range(len(want)) if got[j] != int(want[j])]
        assert not bad, (f"{what} {k}: element {bad[0]} is {got[bad[0]]}, expected "
                         f"{int(want[bad[0]])} ({len(bad)} mismatches)")
    assert len(words) == len(expect), f"{len(words)} {what}s, expected {len(expect)}"
