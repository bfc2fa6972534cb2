"""8N1 UART transmitter and receiver with a parameterised bit period (``clocks_per_bit``)."""

import operator

from amaranth.hdl import Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["MIN_CLOCKS_PER_BIT", "UARTRx", "UARTTx"]

#: The receiver samples mid-bit after a half-bit wait: at least 4 clocks per bit.
MIN_CLOCKS_PER_BIT = 4


def _check_cpb(clocks_per_bit):
    cpb = operator.index(clocks_per_bit)
    if cpb < MIN_CLOCKS_PER_BIT:
        raise ValueError(f"clocks_per_bit ({cpb}) must be at least {MIN_CLOCKS_PER_BIT} "
                         "(the receiver samples in the middle of a bit)")
    return cpb


class UARTTx(wiring.Component):
    """8N1 transmitter: one start bit (0), eight data bits LSB first, one stop bit (1).

    A byte is taken from ``i`` when the transmitter is idle and occupies the line for
    ``10 * clocks_per_bit`` cycles; the next byte is taken one cycle after that.

    Parameters
    ----------
    clocks_per_bit : int
        Clock cycles per bit (``clock_hz / baud``, rounded), at least 4.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Bytes to send.
    tx : ``Out(1)``
        The serial line, idle high.
    """

    def __init__(self, *, clocks_per_bit):
        self._cpb = _check_cpb(clocks_per_bit)
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    clocks_per_bit = property(lambda self: self._cpb)

    def cycles_per_byte(self):
        """Cycles from one byte's transfer on ``i`` to the next (with ``i`` always valid)."""
        return 10 * self._cpb + 1

    def elaborate(self, platform):
        m = Module()
        shreg = Signal(10, init=0x3FF)      # line bits still to send, LSB first
        bits = Signal(range(11))
        timer = Signal(range(self._cpb))
        m.d.comb += self.tx.eq(shreg[0])
        with m.If(bits == 0):
            m.d.comb += self.i.ready.eq(1)
            with m.If(self.i.valid):
                m.d.sync += [shreg.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))),
                             bits.eq(10), timer.eq(self._cpb - 1)]
        with m.Elif(timer == 0):
            m.d.sync += [shreg.eq(Cat(shreg[1:], Const(1, 1))), bits.eq(bits - 1),
                         timer.eq(self._cpb - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m


class UARTRx(wiring.Component):
    """8N1 receiver: a two-flip-flop synchronizer, start-bit validation at half a bit, then
    each data bit and the stop bit sampled in the middle of its bit period.

    A received byte is offered on ``o`` until taken. A byte whose stop bit is 0 is dropped
    and pulses ``framing_error``; a byte completed while the previous one is still waiting is
    dropped and pulses ``overrun``.

    Parameters
    ----------
    clocks_per_bit : int
        Clock cycles per bit, at least 4.

    Members
    -------
    rx : ``In(1, init=1)``
        The serial line (asynchronous to the clock; idle high).
    o : ``Out(stream.Signature(8))``
        Received bytes.
    framing_error, overrun : ``Out(1)``
        One-cycle pulses (see above).
    """

    def __init__(self, *, clocks_per_bit):
        self._cpb = _check_cpb(clocks_per_bit)
        super().__init__({"rx": In(1, init=1), "o": Out(stream.Signature(8)),
                          "framing_error": Out(1), "overrun": Out(1)})

    clocks_per_bit = property(lambda self: self._cpb)

    def elaborate(self, platform):
        m = Module()
        cpb = self._cpb
        rx = Signal(init=1)
        m.submodules.sync_rx = FFSynchronizer(self.rx, rx, init=1)
        timer = Signal(range(cpb))
        shreg = Signal(8)
        bit = Signal(range(8))

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(cpb // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(cpb - 1), bit.eq(0)]
                    m.next = "DATA"
                    with m.If(rx):          # a glitch, not a start bit
                        m.next = "IDLE"
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], rx)), bit.eq(bit + 1),
                                 timer.eq(cpb - 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(~rx):
                        m.d.comb += self.framing_error.eq(1)
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.comb += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                    m.next = "IDLE"
        return m
