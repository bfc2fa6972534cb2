"""Token embedding lookup from a ROM, requantised to the residual stream (``GoldenModel.embed``)."""

import operator

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import (bits_for, rom_read_signature, rshift_round, saturate, signed_range,
                    vector_layout)

__all__ = ["EmbeddingROM"]

# Multiplier operands are at most 18 bits on one side (one ECP5 MULT18X18D).
_OPERAND_BITS = 18
# The golden model computes in numpy int64.
_GOLDEN_BITS = 63


class EmbeddingROM(wiring.Component):
    """Embedding row of a token, requantised: ``requantize(table[tok], mult[tok], shift,
    out_bits)``.

    The table is a ``Memory`` of ``vocab * dim / lanes`` rows of ``lanes`` weights (row
    ``tok * dim / lanes + c`` holds elements ``c*lanes .. c*lanes + lanes - 1`` of token
    ``tok``), read through one synchronous port, so it maps onto block RAM as a deep, narrow
    array; the per-token multipliers are a second ``Memory`` of ``vocab`` entries. Each cycle
    one row is read; the next cycle it is multiplied by ``mult[tok]``, and the cycle after
    it is rounded, saturated and shifted into the output register.

    A token id of ``vocab`` or more (possible when ``vocab`` is not a power of two) is taken
    and dropped: no output is produced and the sticky ``error`` output goes high until reset.

    Parameters
    ----------
    table : array of int, shape ``(vocab, dim)``
        Quantised embedding rows.
    weight_bits : int
        Width of the table entries (signed).
    mult : array of int, shape ``(vocab,)``
        Per-token requantisation multiplier (an 18-bit signed operand).
    shift : int
        Rounding right shift of the requantisation.
    out_bits : int
        Width of the output elements (the residual stream).
    lanes : int
        Elements read per cycle; must divide ``dim``.
    shared_reader : bool
        Give a second reader the table ROM through the port ``shared`` (one read port: its
        ``en`` wins the address; a tied classifier reads here between tokens' embeddings, see
        :class:`~.chip.LlamaChip`, so the table is stored once).

    Members
    -------
    i : ``In(stream.Signature(unsigned(token_bits)))``
        Token id; ``token_bits = max(1, ceil(log2(vocab)))``.
    o : ``Out(stream.Signature(vector_layout(out_bits, dim)))``
        Embedding vector on the residual stream.
    error : ``Out(1)``
        Sticky: an out-of-range token id was dropped. Cleared by reset.
    shared : ``In(rom_read_signature(depth=vocab*dim/lanes, width=lanes*weight_bits))``
        Only with ``shared_reader``: the table ROM's read port for another unit (row ``r``
        as described above, element ``k`` at bits ``k*weight_bits``). Must not be enabled
        while this unit reads (between a token's transfer and its output).
    """

    def __init__(self, *, table, weight_bits, mult, shift, out_bits=18, lanes=1,
                 shared_reader=False):
        weight_bits, shift = operator.index(weight_bits), operator.index(shift)
        out_bits, lanes = operator.index(out_bits), operator.index(lanes)
        table, mult = np.asarray(table), np.asarray(mult)
        if table.ndim != 2 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"table must be a non-empty (vocab, dim) integer array, not "
                             f"{table.dtype} of shape {table.shape}")
        vocab, dim = table.shape
        if lanes < 1 or dim % lanes:
            raise ValueError(f"lanes ({lanes}) must divide dim ({dim})")
        if weight_bits < 1:
            raise ValueError(f"weight_bits must be at least 1, not {weight_bits}")
        w_lo, w_hi = signed_range(weight_bits)
        if table.min() < w_lo or table.max() > w_hi:
            raise ValueError(f"table values must fit {weight_bits}-bit signed weights "
                             f"[{w_lo}, {w_hi}], not [{table.min()}, {table.max()}]")
        if mult.shape != (vocab,) or not np.issubdtype(mult.dtype, np.integer):
            raise ValueError(f"mult must be an integer array with one entry per token "
                             f"({vocab},), not {mult.dtype} of shape {mult.shape}")
        m_lo, m_hi = signed_range(_OPERAND_BITS)
        if mult.min() < m_lo or mult.max() > m_hi:
            raise ValueError(f"mult values must fit an {_OPERAND_BITS}-bit signed multiplier "
                             f"operand [{m_lo}, {m_hi}], not [{mult.min()}, {mult.max()}]")
        if shift < 0:
            raise ValueError(f"shift must be non-negative, not {shift}")
        if out_bits < 1:
            raise ValueError(f"out_bits must be at least 1, not {out_bits}")
        prod_max = (1 << (weight_bits - 1)) * int(np.abs(mult).max()) + (1 << shift >> 1)
        if prod_max.bit_length() > _GOLDEN_BITS:
            raise ValueError(f"weight * mult needs {prod_max.bit_length() + 1} bits, more than "
                             f"the golden model's {_GOLDEN_BITS + 1}")

        self._table = table.astype(np.int64)
        self._mult = mult.astype(np.int64)
        self._weight_bits, self._shift, self._out_bits, self._lanes = (
            weight_bits, shift, out_bits, lanes)
        self._token_bits = max(1, (vocab - 1).bit_length())
        self._shared_reader = bool(shared_reader)
        ports = {
            "i": In(stream.Signature(unsigned(self._token_bits))),
            "o": Out(stream.Signature(vector_layout(out_bits, dim))),
            "error": Out(1),
        }
        if self._shared_reader:
            ports["shared"] = In(rom_read_signature(depth=vocab * (dim // lanes),
                                                    width=lanes * weight_bits))
        super().__init__(ports)

    vocab = property(lambda self: self._table.shape[0])
    dim = property(lambda self: self._table.shape[1])
    table = property(lambda self: self._table.copy())
    weight_bits = property(lambda self: self._weight_bits)
    mult = property(lambda self: self._mult.copy())
    shift = property(lambda self: self._shift)
    out_bits = property(lambda self: self._out_bits)
    lanes = property(lambda self: self._lanes)
    token_bits = property(lambda self: self._token_bits)
    shared_reader = property(lambda self: self._shared_reader)

    def latency(self):
        """Cycles from the transfer of a valid token to the first cycle ``o.valid`` is high:
        ``dim / lanes + 3`` (one ROM row per cycle, then read, multiply, round stages)."""
        return self.dim // self._lanes + 3

    def initiation_interval(self):
        """Cycles between token transfers with tokens always valid and ``o`` always ready
        (the next token is taken in the cycle the result is)."""
        return self.latency()

    def elaborate(self, platform):
        m = Module()
        vocab, dim, lanes = self.vocab, self.dim, self._lanes
        chunks = dim // lanes

        m.submodules.rom = rom = memory.Memory(
            shape=vector_layout(self._weight_bits, lanes), depth=vocab * chunks,
            init=self._table.reshape(vocab * chunks, lanes).tolist())
        m_bits = bits_for(int(self._mult.min()), int(self._mult.max()))
        m.submodules.mult_rom = mult_rom = memory.Memory(
            shape=signed(m_bits), depth=vocab, init=self._mult.tolist())
        rom_rd = rom.read_port()
        mult_rd = mult_rom.read_port()

        tok = self.i.payload
        in_range = Const(1) if vocab == 1 << self._token_bits else tok < vocab
        accept = self.i.valid & self.i.ready
        row = Signal(range(vocab * chunks))
        cnt = Signal(range(chunks))
        # the multiplier is read once per token and held (the port is not enabled again)
        m.d.comb += [mult_rd.addr.eq(tok), mult_rd.en.eq(accept & in_range)]
        with m.If(accept & in_range):
            m.d.sync += [row.eq(tok * chunks), cnt.eq(0)]
        with m.If(accept & ~in_range):
            m.d.sync += self.error.eq(1)

        issue, v1, v2 = Signal(), Signal(), Signal()
        prod = [Signal(signed(self._weight_bits + m_bits)) for _ in range(lanes)]
        if self._shared_reader:
            sh = self.shared
            m.d.comb += [rom_rd.addr.eq(Mux(sh.en, sh.addr, row)), rom_rd.en.eq(issue | sh.en),
                         sh.data.eq(rom_rd.data.as_value())]
        else:
            m.d.comb += [rom_rd.addr.eq(row), rom_rd.en.eq(issue)]
        m.d.sync += [v1.eq(issue), v2.eq(v1)]
        with m.If(v1):
            m.d.sync += [prod[k].eq(rom_rd.data[k] * mult_rd.data) for k in range(lanes)]
        with m.If(v2):
            y = Cat(saturate(rshift_round(prod[k], self._shift), self._out_bits)
                    for k in range(lanes))
            o_bits = self.o.payload.as_value()
            m.d.sync += o_bits.eq(Cat(o_bits[lanes * self._out_bits:], y))

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid & in_range):
                    m.next = "READ"
            with m.State("READ"):
                m.d.comb += issue.eq(1)
                m.d.sync += [row.eq(row + 1), cnt.eq(cnt + 1)]
                with m.If(cnt == chunks - 1):
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(v2 & ~v1):        # the last row is being written
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.o.valid.eq(1), self.i.ready.eq(self.o.ready)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
                    with m.If(self.i.valid & in_range):
                        m.next = "READ"
        return m
