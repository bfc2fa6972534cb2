"""The board: a chip behind the host link on a UART, for the ULX3S (ECP5-85F) and for
simulation.

:class:`BoardCore` is everything clocked by the design clock: UART receiver and
transmitter, the :class:`~.hostlink.HostLinkEngine` protocol engine, the chip and the LED logic.
It has no clock generation of its own, which makes it the top of the board simulation: there
the simulator drives ``clk``/``rst`` of the ``sync`` domain directly (the simulation-only
clock path, standing in for the PLL; see ``docs/host_link.md``).

:class:`ULX3SBoard` is the FPGA top: the 25 MHz oscillator (resource ``clk25``) feeds an
ECP5 ``EHXPLLL`` whose dividers :func:`ecp5_pll` computes for the design clock
(default 50 MHz); the ``sync`` domain runs from the PLL output and is held in reset until
the PLL locks. The FT231X USB UART (resource ``uart``) carries the host link; LEDs show
activity and errors (see :class:`BoardCore`).
"""

import math
import operator
from dataclasses import dataclass

from amaranth.hdl import ClockDomain, Elaboratable, Instance, Module, Signal
from amaranth.lib import io, wiring
from amaranth.lib.cdc import ResetSynchronizer
from amaranth.lib.wiring import In, Out

from .hostlink import HostLinkEngine, connect_chip
from .uart import UARTRx, UARTTx

__all__ = [
    "LED_BUSY",
    "LED_CHIP_ERROR",
    "LED_HEARTBEAT",
    "LED_LINK_ERROR",
    "LED_PLL_LOCK",
    "BoardCore",
    "PLLConfig",
    "ULX3SBoard",
    "clocks_per_bit",
    "ecp5_pll",
]

#: LED assignments (ULX3S LEDs 0..7).
LED_BUSY, LED_LINK_ERROR, LED_CHIP_ERROR, LED_HEARTBEAT, LED_PLL_LOCK = 0, 1, 2, 3, 7

# ECP5 EHXPLLL limits (MHz), as used by Project Trellis' ecppll.
_PFD_MIN, _PFD_MAX, _VCO_MIN, _VCO_MAX, _VCO_BEST = 3.125, 400.0, 400.0, 800.0, 600.0


@dataclass(frozen=True)
class PLLConfig:
    """EHXPLLL dividers: ``f_out = f_in / clki_div * clkfb_div`` (CLKOP feedback), VCO
    ``= f_out * clkop_div``."""
    clki_div: int
    clkfb_div: int
    clkop_div: int
    f_in_mhz: float
    f_out_mhz: float
    f_vco_mhz: float

    @property
    def clkop_cphase(self):
        # 0 degrees (LiteX's convention); the output's phase to CLKI is irrelevant here
        return self.clkop_div - 1


def ecp5_pll(f_in_mhz, f_out_mhz):
    """Dividers giving the output frequency closest to ``f_out_mhz`` (ties: VCO closest to
    600 MHz), with the same search and limits as Project Trellis' ``ecppll``."""
    best, best_key = None, None
    for clki_div in range(1, 129):
        f_pfd = f_in_mhz / clki_div
        if not _PFD_MIN <= f_pfd <= _PFD_MAX:
            continue
        for clkfb_div in range(1, 81):
            f_out = f_pfd * clkfb_div
            for clkop_div in range(1, 129):
                f_vco = f_out * clkop_div
                if not _VCO_MIN <= f_vco <= _VCO_MAX:
                    continue
                key = (abs(f_out - f_out_mhz), abs(f_vco - _VCO_BEST))
                if best_key is None or key < best_key:
                    best_key = key
                    best = PLLConfig(clki_div, clkfb_div, clkop_div, f_in_mhz, f_out, f_vco)
    if best is None:
        raise ValueError(f"no EHXPLLL configuration for {f_in_mhz} -> {f_out_mhz} MHz")
    return best


def clocks_per_bit(clock_hz, baud):
    """UART bit period in clocks; the rounding error must stay below 2 %."""
    cpb = round(clock_hz / baud)
    err = abs(clock_hz / cpb - baud) / baud if cpb else 1.0
    if cpb < 4 or err > 0.02:
        raise ValueError(f"{baud} baud is not reachable from a {clock_hz / 1e6:g} MHz clock "
                         f"({clock_hz / max(cpb, 1):.0f} baud, {100 * err:.1f}% off)")
    return cpb


class BoardCore(wiring.Component):
    """UART + :class:`~.hostlink.HostLinkEngine` + chip, in the ``sync`` domain.

    Parameters
    ----------
    chip : LlamaChip (or any component with its ports and ``token_bits``, ``vocab_size``
        and ``seq_len`` properties)
        The chip; it becomes a submodule.
    clock_hz : int
        Design clock (reported by INFO; sets the LED timings).
    clocks_per_bit : int
        UART bit period in clocks.
    build_id : int
        32-bit build identifier (INFO).
    timeout_cycles : int or None
        Host link inter-byte timeout; default ``max(clock_hz // 50, 40 * clocks_per_bit)``
        (20 ms, but at least four byte times).
    token_timeout_cycles : int or None
        Chip watchdog per token; default ``2**28`` cycles.
    max_payload : int
        Host link request buffer (bytes).

    Members
    -------
    uart_rx : ``In(1, init=1)``
        Serial input (from the host).
    uart_tx : ``Out(1, init=1)``
        Serial output (to the host).
    led : ``Out(8)``
        0: busy (a command or a token is being processed), 1: a link error was reported
        (lit ~0.25 s), 2: a chip error flag is set, 3: heartbeat (~1 Hz), 7: left 0 here (the
        FPGA top shows the PLL lock on it).
    """

    def __init__(self, chip, *, clock_hz, clocks_per_bit, build_id=0, timeout_cycles=None,
                 token_timeout_cycles=None, max_payload=512):
        self._chip = chip
        self._clock_hz = operator.index(clock_hz)
        self._cpb = operator.index(clocks_per_bit)
        if timeout_cycles is None:
            timeout_cycles = max(self._clock_hz // 50, 40 * self._cpb)
        self._link = HostLinkEngine(
            token_bits=chip.token_bits, vocab_size=chip.vocab_size, seq_len=chip.seq_len,
            clock_hz=self._clock_hz, clocks_per_bit=self._cpb, build_id=build_id,
            max_payload=max_payload, timeout_cycles=timeout_cycles,
            token_timeout_cycles=(1 << 28) if token_timeout_cycles is None
            else token_timeout_cycles, lora=hasattr(chip, "lora_in"))
        self._uart_rx = UARTRx(clocks_per_bit=self._cpb)
        self._uart_tx = UARTTx(clocks_per_bit=self._cpb)
        super().__init__({"uart_rx": In(1, init=1), "uart_tx": Out(1, init=1),
                          "led": Out(8)})

    chip = property(lambda self: self._chip)
    link = property(lambda self: self._link)
    clock_hz = property(lambda self: self._clock_hz)
    clocks_per_bit = property(lambda self: self._cpb)

    def elaborate(self, platform):
        m = Module()
        chip, link = self._chip, self._link
        m.submodules.chip = chip
        m.submodules.link = link
        m.submodules.uart_rx = urx = self._uart_rx
        m.submodules.uart_tx = utx = self._uart_tx
        m.d.comb += [urx.rx.eq(self.uart_rx), self.uart_tx.eq(utx.tx)]
        wiring.connect(m, urx.o, link.rx)
        wiring.connect(m, link.tx, utx.i)
        connect_chip(m, link, chip)

        stretch = Signal(range(max(2, self._clock_hz // 4 + 1)))
        with m.If(link.error):
            m.d.sync += stretch.eq(self._clock_hz // 4)
        with m.Elif(stretch != 0):
            m.d.sync += stretch.eq(stretch - 1)
        beat = Signal(max(1, (self._clock_hz // 2).bit_length()))
        m.d.sync += beat.eq(beat + 1)
        m.d.comb += [
            self.led[LED_BUSY].eq(chip.busy | link.active),
            self.led[LED_LINK_ERROR].eq(stretch != 0),
            self.led[LED_CHIP_ERROR].eq(chip.err_token | chip.err_context),
            self.led[LED_HEARTBEAT].eq(beat[-1]),
        ]
        return m


class ULX3SBoard(Elaboratable):
    """FPGA top for the ULX3S: PLL from the 25 MHz oscillator, the FT231X UART, LEDs.

    Parameters
    ----------
    core : BoardCore
        Built for ``clock_hz`` = the PLL's actual output frequency (see
        :meth:`pll_for`).
    """

    def __init__(self, core):
        self._core = core
        self._pll = self.pll_for(core.clock_hz)
        if not math.isclose(self._pll.f_out_mhz * 1e6, core.clock_hz, rel_tol=1e-6):
            raise ValueError(f"the PLL makes {self._pll.f_out_mhz:g} MHz from 25 MHz, not "
                             f"{core.clock_hz / 1e6:g} MHz: build the core for that clock")

    core = property(lambda self: self._core)
    pll = property(lambda self: self._pll)

    @staticmethod
    def pll_for(clock_hz):
        """The EHXPLLL configuration for ``clock_hz`` from the 25 MHz oscillator."""
        return ecp5_pll(25.0, clock_hz / 1e6)

    def elaborate(self, platform):
        m = Module()
        pll = self._pll
        m.submodules.clk25 = clk25 = io.Buffer("i", platform.request("clk25", 0, dir="-"))
        m.domains.sync = cd_sync = ClockDomain("sync")
        locked = Signal()
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI="25", a_FREQUENCY_PIN_CLKOP=f"{pll.f_out_mhz:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
            a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=pll.clki_div, p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=pll.clkop_div,
            p_CLKOP_CPHASE=pll.clkop_cphase, p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP",
            p_CLKFB_DIV=pll.clkfb_div,
            i_RST=0, i_STDBY=0, i_CLKI=clk25.i, o_CLKOP=cd_sync.clk, i_CLKFB=cd_sync.clk,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked)
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")
        platform.add_clock_constraint(cd_sync.clk, self._core.clock_hz)

        m.submodules.core = core = self._core
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = uart_rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = uart_tx = io.Buffer("o", uart.tx)
        m.d.comb += [core.uart_rx.eq(uart_rx.i), uart_tx.o.eq(core.uart_tx)]
        for k in range(8):
            m.submodules[f"led{k}"] = led = io.Buffer("o", platform.request("led", k, dir="-"))
            m.d.comb += led.o.eq(locked if k == LED_PLL_LOCK else core.led[k])
        return m
