"""cocotb helpers shared by the whole-chip benches (``tests/benches/chip_bench.py`` and
``lora_chip_bench.py``): the ``LlamaChip`` token handshake, its ID ROM and the per-token check
against the golden model (next token, every layer output through the debug tap, cycles).

None of them polls per cycle from Python while a token is computed: they wait on edges of
``token_out__valid`` and ``tap_valid`` and measure cycles from the simulation time, so the
simulation runs at Verilator speed.
"""

from __future__ import annotations

from cocotb.triggers import FallingEdge, First, ReadOnly, RisingEdge, Timer
from cocotb.utils import get_sim_time
from hardwire.sim.cocotb_helpers import unpack_signed

__all__ = ["TapCollector", "check_id_rom", "check_token", "feed_token", "pulse_reset_ctx",
           "wait_token_out"]


class TapCollector:
    """Collects ``(layer, vector)`` for every cycle the chip's ``tap_valid`` is high
    (``tap_layer``, ``tap_data`` unpacked as ``dim`` signed ``bits``-bit elements)."""

    def __init__(self, dut, bits, dim):
        self.dut, self.bits, self.dim, self.seen = dut, bits, dim, []

    async def run(self):
        dut = self.dut
        while True:
            await RisingEdge(dut.tap_valid)
            while True:
                await ReadOnly()
                if not int(dut.tap_valid.value):
                    break
                self.seen.append((int(dut.tap_layer.value),
                                  unpack_signed(dut.tap_data.value.to_unsigned(), self.dim,
                                                self.bits)))
                await RisingEdge(dut.clk)

    def take(self):
        """The taps seen since the last call."""
        out, self.seen = self.seen, []
        return out


async def check_id_rom(dut, words):
    """Every word of the (combinational) ID ROM equals ``words``."""
    for addr, want in enumerate(words):
        dut.id_addr.value = addr
        await Timer(1, unit="ns")
        got = int(dut.id_data.value)
        assert got == int(want), f"ID word {addr}: {got:#010x}, expected {int(want):#010x}"


async def pulse_reset_ctx(dut):
    """``reset_ctx`` high for one cycle."""
    await FallingEdge(dut.clk)
    dut.reset_ctx.value = 1
    await FallingEdge(dut.clk)
    dut.reset_ctx.value = 0


async def feed_token(dut, token):
    """Offer ``token`` on ``token_in`` until taken; return the simulation time (ns) of the
    transfer cycle's sample point (the falling edge before the rising edge that transfers it)."""
    await FallingEdge(dut.clk)
    dut.token_in__payload.value = int(token)
    dut.token_in__valid.value = 1
    while True:
        await ReadOnly()
        if int(dut.token_in__ready.value):
            break
        await FallingEdge(dut.clk)
    t_in = get_sim_time("ns")
    await FallingEdge(dut.clk)
    dut.token_in__valid.value = 0
    return t_in


async def wait_token_out(dut, t_in, *, period, limit, what):
    """Wait (at most ``limit`` cycles) for ``token_out.valid`` with ``token_out.ready`` held
    high; return ``(token, cycles)``, cycles counted from the ``token_in`` transfer at
    ``t_in`` to the first cycle the output is valid."""
    if not int(dut.token_out__valid.value):
        fired = await First(RisingEdge(dut.token_out__valid), Timer(int(limit * period), "ns"))
        assert isinstance(fired, RisingEdge), f"{what}: no output within {limit} cycles"
    await FallingEdge(dut.clk)
    await ReadOnly()
    cycles = round((get_sim_time("ns") - t_in) / period)
    return int(dut.token_out__payload.value), cycles


def check_token(what, *, out, cycles, taps, n_layers, exp_token, exp_taps, exp_cycles):
    """One token step against the golden model: the output token, one tap per layer in order
    with every element of ``L{i}.out`` (``exp_taps[i]``), and the cycle count."""
    assert out == int(exp_token), f"{what}: output {out}, golden {int(exp_token)}"
    assert [layer for layer, _ in taps] == list(range(n_layers)), \
        f"{what}: taps of layers {[layer for layer, _ in taps]}"
    for layer, got in taps:
        want = [int(x) for x in exp_taps[layer]]
        bad = [j for j in range(len(want)) if got[j] != want[j]]
        assert not bad, (f"{what}: L{layer}.out[{bad[0]}] is {got[bad[0]]}, golden "
                         f"{want[bad[0]]} ({len(bad)} mismatches)")
    assert cycles == int(exp_cycles), f"{what}: {cycles} cycles, formula {int(exp_cycles)}"
