"""Saturating element-wise add of two residual-stream vectors (``numerics.residual_add``)."""

import operator

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import saturate, vector_layout

__all__ = ["ResidualAdd"]


class ResidualAdd(wiring.Component):
    """``o = sat(a + b, bits)`` element by element, on whole vectors.

    The two inputs are joined: a transfer takes one vector from each, in the same cycle. The
    sum is registered, so the block is a one-stage pipeline that accepts a pair every cycle
    while the output is being taken.

    Parameters
    ----------
    dim : int
        Elements per vector.
    bits : int
        Width of the residual stream (inputs and output).

    Members
    -------
    a : ``In(stream.Signature(vector_layout(bits, dim)))``
        First addend (the residual).
    b : ``In(stream.Signature(vector_layout(bits, dim)))``
        Second addend (the block output); transfers together with ``a``.
    o : ``Out(stream.Signature(vector_layout(bits, dim)))``
        Saturated sum.
    """

    def __init__(self, *, dim, bits):
        dim, bits = operator.index(dim), operator.index(bits)
        if dim < 1:
            raise ValueError(f"dim must be at least 1, not {dim}")
        if bits < 2:
            raise ValueError(f"bits must be at least 2 for a signed residual, not {bits}")
        self._dim, self._bits = dim, bits
        layout = vector_layout(bits, dim)
        super().__init__({
            "a": In(stream.Signature(layout)),
            "b": In(stream.Signature(layout)),
            "o": Out(stream.Signature(layout)),
        })

    @property
    def dim(self):
        return self._dim

    @property
    def bits(self):
        return self._bits

    def latency(self):
        """Cycles from the input transfer to the first cycle ``o.valid`` is high."""
        return 1

    def initiation_interval(self):
        """Cycles between input transfers when inputs are always valid and ``o`` always
        ready."""
        return 1

    def elaborate(self, platform):
        m = Module()
        # The output register is free when it is empty or being emptied this cycle.
        take = self.a.valid & self.b.valid & (~self.o.valid | self.o.ready)
        m.d.comb += [self.a.ready.eq(take), self.b.ready.eq(take)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(take):
            m.d.sync += self.o.valid.eq(1)
            for k in range(self._dim):
                total = self.a.payload[k] + self.b.payload[k]
                m.d.sync += self.o.payload[k].eq(saturate(total, self._bits))
        return m
