"""Stream adapters between whole vectors and chunks of a few lanes."""

import operator

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import vector_layout

__all__ = ["Gather", "Scatter"]


def _check(n, lanes, bits):
    n, lanes, bits = map(operator.index, (n, lanes, bits))
    if bits < 1:
        raise ValueError(f"bits must be at least 1, not {bits}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if lanes < 1 or n % lanes:
        raise ValueError(f"lanes ({lanes}) must divide n ({n})")
    return n, lanes, bits


class _Adapter(wiring.Component):
    def __init__(self, n, lanes, bits, interface):
        self._n, self._lanes, self._bits = _check(n, lanes, bits)
        super().__init__(interface(vector_layout(self._bits, self._lanes),
                                   vector_layout(self._bits, self._n)))

    @property
    def n(self):
        return self._n

    @property
    def lanes(self):
        return self._lanes

    @property
    def bits(self):
        return self._bits

    @property
    def beats(self):
        """Chunks per vector: ``n / lanes``."""
        return self._n // self._lanes

    def initiation_interval(self):
        """Cycles per whole vector when the input is always valid and the output always ready:
        ``beats``."""
        return self.beats


class Gather(_Adapter):
    """Collect ``n/lanes`` chunks into one whole vector (chunk ``j`` holds elements
    ``j*lanes .. j*lanes + lanes - 1``).

    The output register is filled chunk by chunk; the vector is offered the cycle after its last
    chunk arrives, and the first chunk of the next vector may arrive in the cycle it is taken
    (``i.ready = ~o.valid | o.ready``).

    Parameters
    ----------
    n : int
        Elements per vector.
    lanes : int
        Elements per chunk; must divide ``n``.
    bits : int
        Element width (signed).

    Members
    -------
    i : ``In(stream.Signature(vector_layout(bits, lanes)))``
        Chunks, in order.
    o : ``Out(stream.Signature(vector_layout(bits, n)))``
        Whole vectors.
    """

    def __init__(self, *, n, lanes, bits):
        super().__init__(n, lanes, bits, lambda chunk, whole: {
            "i": In(stream.Signature(chunk)),
            "o": Out(stream.Signature(whole)),
        })

    def latency(self):
        """Cycles from the transfer of a vector's last chunk to ``o.valid``: 1 (the first
        chunk's transfer to ``o.valid`` is ``beats``)."""
        return 1

    def elaborate(self, platform):
        m = Module()
        beats, w = self.beats, self._lanes * self._bits
        index = Signal(range(beats))
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            whole = self.o.payload.as_value()
            with m.Switch(index):
                for j in range(beats):
                    with m.Case(j):
                        m.d.sync += whole[j * w:(j + 1) * w].eq(self.i.payload.as_value())
            m.d.sync += index.eq(index + 1)
            with m.If(index == beats - 1):
                m.d.sync += [index.eq(0), self.o.valid.eq(1)]
        return m


class Scatter(_Adapter):
    """Split one whole vector into ``n/lanes`` chunks, chunk 0 (elements ``0..lanes-1``)
    first.

    The vector is loaded into a shift register that moves one chunk down per transfer; the next
    vector may be taken in the cycle the last chunk is (``i.ready = empty | (last & o.ready)``).

    Parameters
    ----------
    n : int
        Elements per vector.
    lanes : int
        Elements per chunk; must divide ``n``.
    bits : int
        Element width (signed).

    Members
    -------
    i : ``In(stream.Signature(vector_layout(bits, n)))``
        Whole vectors.
    o : ``Out(stream.Signature(vector_layout(bits, lanes)))``
        Chunks, in order.
    """

    def __init__(self, *, n, lanes, bits):
        super().__init__(n, lanes, bits, lambda chunk, whole: {
            "i": In(stream.Signature(whole)),
            "o": Out(stream.Signature(chunk)),
        })

    def latency(self):
        """Cycles from the input transfer to the first chunk's ``o.valid``: 1 (the last chunk
        is transferred ``beats`` cycles after the input with ``o.ready`` held high)."""
        return 1

    def elaborate(self, platform):
        m = Module()
        beats, w = self.beats, self._lanes * self._bits
        left = Signal(range(beats + 1))
        buf = Signal(self._n * self._bits)
        m.d.comb += [
            self.o.valid.eq(left != 0),
            self.o.payload.eq(buf[:w]),
            self.i.ready.eq((left == 0) | ((left == 1) & self.o.ready)),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [left.eq(left - 1), buf.eq(buf >> w)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [left.eq(beats), buf.eq(self.i.payload.as_value())]
        return m
