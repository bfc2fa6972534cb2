"""Tiny stream adapters for composing blocks: fan-out (:class:`Fork`) and fan-in
(:class:`Join`).

Both are combinational (no latency, no storage beyond the fork's "taken" flags), so a chain's
cycle count is the sum of its blocks' latencies. They follow the ``stream`` rules: an output's
``valid`` never depends on a ``ready``, and payloads pass straight through from producers that
hold them stable until the transfer.
"""

import operator

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Fork", "Join"]


class Fork(wiring.Component):
    """Broadcast one stream to ``n`` consumers, each taking the item in its own time.

    An "eager" fork: output ``k`` offers the item until consumer ``k`` takes it (a flag
    records that), and the input is taken in the cycle the last consumer takes it
    (``i.ready = AND_k (o[k].ready | taken[k])``). A consumer that never takes the item keeps
    the producer holding it; this is how a residual vector is "held" for the residual add
    while the rest of the block computes.

    Parameters
    ----------
    shape : shape-castable
        Payload shape.
    n : int
        Consumers, at least 1.

    Members
    -------
    i : ``In(stream.Signature(shape))``
        The item.
    o : ``Out(stream.Signature(shape)).array(n)``
        One copy per consumer.
    """

    def __init__(self, *, shape, n):
        n = operator.index(n)
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        self._shape, self._n = shape, n
        super().__init__({
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)).array(n),
        })

    shape = property(lambda self: self._shape)
    n = property(lambda self: self._n)

    def latency(self):
        """Cycles from ``i.valid`` to ``o[k].valid``: 0 (combinational)."""
        return 0

    def elaborate(self, platform):
        m = Module()
        taken = Signal(self._n)
        done = [self.o[k].ready | taken[k] for k in range(self._n)]
        m.d.comb += self.i.ready.eq(_all(done))
        for k in range(self._n):
            m.d.comb += [self.o[k].valid.eq(self.i.valid & ~taken[k]),
                         self.o[k].payload.eq(self.i.payload)]
            with m.If(self.o[k].valid & self.o[k].ready):
                m.d.sync += taken[k].eq(1)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += taken.eq(0)
        return m


class Join(wiring.Component):
    """Merge streams into one struct payload; every input transfers in the same cycle.

    ``layout`` is the output's ``StructLayout``; each field named in ``streams`` arrives on
    its own input stream (``i_<field>``), every other field is a plain input (``<field>``)
    sampled with the streams (its driver holds it stable while the output is offered, e.g. a
    position register). ``o.valid`` is the AND of the inputs' ``valid``; an input is taken only
    together with all the others (``i_<field>.ready = o.valid & o.ready``).

    Parameters
    ----------
    layout : ``data.StructLayout``
        Output payload.
    streams : sequence of str
        Fields that arrive as streams (at least one).

    Members
    -------
    i_<field> : ``In(stream.Signature(layout[field].shape))``
        One per stream field.
    <field> : ``In(layout[field].shape)``
        One per other field.
    o : ``Out(stream.Signature(layout))``
        The joined payload.
    """

    def __init__(self, *, layout, streams):
        if not isinstance(layout, data.StructLayout):
            raise ValueError(f"layout must be a data.StructLayout, not {layout!r}")
        fields = dict(layout.members)
        streams = tuple(streams)
        if not streams:
            raise ValueError("streams must name at least one field")
        for name in streams:
            if name not in fields:
                raise ValueError(f"stream field {name!r} is not in the layout "
                                 f"({', '.join(fields)})")
        self._layout, self._streams = layout, streams
        members = {f"i_{name}": In(stream.Signature(fields[name])) for name in streams}
        members.update({name: In(shape) for name, shape in fields.items()
                        if name not in streams})
        members["o"] = Out(stream.Signature(layout))
        super().__init__(members)

    layout = property(lambda self: self._layout)
    streams = property(lambda self: self._streams)

    def latency(self):
        """Cycles from the last input's ``valid`` to ``o.valid``: 0 (combinational)."""
        return 0

    def elaborate(self, platform):
        m = Module()
        ins = [getattr(self, f"i_{name}") for name in self._streams]
        m.d.comb += self.o.valid.eq(_all(s.valid for s in ins))
        for name, s in zip(self._streams, ins):
            m.d.comb += [s.ready.eq(self.o.valid & self.o.ready),
                         getattr(self.o.payload, name).eq(s.payload)]
        for name in self._layout.members:
            if name not in self._streams:
                m.d.comb += getattr(self.o.payload, name).eq(getattr(self, name))
        return m


def _all(values):
    out = None
    for v in values:
        out = v if out is None else out & v
    return out

