"""Index of the largest element of a chunked vector stream (``numerics.argmax``)."""

import operator

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import vector_layout

__all__ = ["Argmax"]


class Argmax(wiring.Component):
    """Index of the largest of ``n`` signed values arriving ``lanes`` at a time; the lowest
    index wins a tie.

    A vector is ``n / lanes`` consecutive beats on ``i`` (beat ``b`` carries elements
    ``b*lanes .. b*lanes + lanes - 1``, element ``b*lanes`` in the least significant bits),
    as a ``MatVecUnit`` produces its rows. Each beat is reduced by a comparator tree that
    prefers the lower lane on a tie, and merged into the running maximum only when strictly
    larger, so earlier elements win ties. The index of a vector is registered on its last beat;
    the next vector's beats are taken meanwhile, and only its last beat waits for the output.

    Parameters
    ----------
    n : int
        Elements per vector.
    bits : int
        Width of the (signed) elements.
    lanes : int
        Elements per beat; must divide ``n``.

    Members
    -------
    i : ``In(stream.Signature(vector_layout(bits, lanes)))``
        Beats of the vector.
    o : ``Out(stream.Signature(unsigned(index_bits)))``
        Index of the maximum; ``index_bits = max(1, ceil(log2(n)))``.
    """

    def __init__(self, *, n, bits, lanes=1):
        n, bits, lanes = map(operator.index, (n, bits, lanes))
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        if lanes < 1 or n % lanes:
            raise ValueError(f"lanes ({lanes}) must divide n ({n})")
        if bits < 1:
            raise ValueError(f"bits must be at least 1, not {bits}")
        self._n, self._bits, self._lanes = n, bits, lanes
        self._index_bits = max(1, (n - 1).bit_length())
        super().__init__({
            "i": In(stream.Signature(vector_layout(bits, lanes))),
            "o": Out(stream.Signature(unsigned(self._index_bits))),
        })

    n = property(lambda self: self._n)
    bits = property(lambda self: self._bits)
    lanes = property(lambda self: self._lanes)
    index_bits = property(lambda self: self._index_bits)

    def beats(self):
        """Input transfers per vector: ``n / lanes``."""
        return self._n // self._lanes

    def latency(self):
        """Cycles from the transfer of a vector's last beat to the first cycle ``o.valid`` is
        high."""
        return 1

    def initiation_interval(self):
        """Cycles between the first beats of consecutive vectors with the input always valid
        and ``o`` always ready: one beat per cycle, ``n / lanes``."""
        return self.beats()

    def elaborate(self, platform):
        m = Module()
        lanes, beats = self._lanes, self.beats()

        # comparator tree over one beat: (value, lane); the right entry wins only if larger
        level = [(self.i.payload[k], k) for k in range(lanes)]
        while len(level) > 1:
            nxt = []
            for j in range(0, len(level) - 1, 2):
                (va, ia), (vb, ib) = level[j], level[j + 1]
                take_b = vb > va
                nxt.append((Mux(take_b, vb, va), Mux(take_b, ib, ia)))
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        beat_val, beat_lane = level[0]

        beat = Signal(range(beats))
        base = Signal(range(self._n))               # index of the beat's element 0
        best_val = Signal(signed(self._bits))
        best_idx = Signal(unsigned(self._index_bits))
        beat_idx = base + beat_lane
        first, last = beat == 0, beat == beats - 1
        take_beat = first | (beat_val > best_val)
        new_val = Mux(take_beat, beat_val, best_val)
        new_idx = Mux(take_beat, beat_idx, best_idx)

        # only the last beat needs room in the output register
        m.d.comb += self.i.ready.eq(~last | ~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [best_val.eq(new_val), best_idx.eq(new_idx),
                         beat.eq(beat + 1), base.eq(base + lanes)]
            with m.If(last):
                m.d.sync += [beat.eq(0), base.eq(0),
                             self.o.payload.eq(new_idx), self.o.valid.eq(1)]
        return m
