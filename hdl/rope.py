"""Rotary position embedding of a q or k vector (``numerics.rope``)."""

import math
import operator

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import bits_for, pos_shape, rshift_round, saturate, vector_layout

__all__ = ["RoPE"]

#: Widest multiplier operand of the target (ECP5 ``MULT18X18D``).
_MUL_BITS = 18


def _table(name, table, columns):
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] != columns:
        raise ValueError(f"{name} has shape {table.shape}; expected (seq_len, head_size//2 = "
                         f"{columns})")
    if not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, not {table.dtype}")
    return table.astype(np.int64)


class RoPE(wiring.Component):
    """Rotate adjacent pairs ``(a, b)`` of a vector by the angles of position ``pos``.

    Pair ``i`` (elements ``2i`` and ``2i+1``) uses column ``j = i % (head_size//2)`` of the
    tables: ``a' = sat(rshift_round(a*cos - b*sin, frac), bits)`` and
    ``b' = sat(rshift_round(a*sin + b*cos, frac), bits)``, with ``cos = cos_table[pos, j]``.
    ``lanes`` pairs are rotated per cycle; the vector is taken whole, shifted through the
    datapath ``lanes`` pairs at a time and returned whole.

    The tables live in one ROM (synchronous read, block RAM) whose word holds ``w`` columns
    of both tables: ``w = lanes`` when ``lanes`` divides ``hs2 = head_size//2`` (word address
    ``pos * (hs2 // lanes) + chunk % (hs2 // lanes)``), else the whole row (``w = hs2``,
    address ``pos``), from which each lane selects its column.

    An input with ``pos >= seq_len`` is consumed without output and sets the sticky ``error``.

    Parameters
    ----------
    n : int
        Vector length (``dim`` for q, ``kv_dim`` for k); a multiple of ``head_size``.
    head_size : int
        Elements per head (even).
    cos_table, sin_table : numpy integer arrays, shape ``(seq_len, head_size // 2)``
        ``round(2**frac * cos/sin(angle))`` (``Tables.rope_cos`` / ``Tables.rope_sin``).
    frac : int
        Fraction bits of the tables.
    bits : int
        Element width of the input and output vectors.
    lanes : int
        Pairs rotated per cycle; divides ``n // 2``.

    Members
    -------
    i : ``In(stream.Signature(StructLayout({"pos": ..., "vec": ...})))``
        ``pos``: position, ``pos_shape(seq_len)`` (holds ``0..seq_len``); ``vec``: the
        vector to rotate, ``vector_layout(bits, n)``.
    o : ``Out(stream.Signature(vector_layout(bits, n)))``
        Rotated vector.
    error : ``Out(1)``
        Sticky: an input had ``pos >= seq_len``.
    """

    def __init__(self, *, n, head_size, cos_table, sin_table, frac=14, bits=8, lanes=1):
        n, head_size = operator.index(n), operator.index(head_size)
        frac, bits, lanes = operator.index(frac), operator.index(bits), operator.index(lanes)
        if head_size < 2 or head_size % 2:
            raise ValueError(f"head_size ({head_size}) must be even and at least 2: RoPE "
                             "rotates pairs")
        if n < 1 or n % head_size:
            raise ValueError(f"n ({n}) must be a positive multiple of head_size ({head_size})")
        if lanes < 1 or (n // 2) % lanes:
            raise ValueError(f"lanes ({lanes}) must divide the number of pairs n/2 ({n // 2})")
        if bits < 2:
            raise ValueError(f"bits must be at least 2 for signed elements, not {bits}")
        if frac < 0:
            raise ValueError(f"frac must be non-negative, not {frac}")
        hs2 = head_size // 2
        cos_table = _table("cos_table", cos_table, hs2)
        sin_table = _table("sin_table", sin_table, hs2)
        if cos_table.shape != sin_table.shape:
            raise ValueError(f"cos_table {cos_table.shape} and sin_table {sin_table.shape} "
                             "must have the same shape")
        lo = int(min(cos_table.min(), sin_table.min()))
        hi = int(max(cos_table.max(), sin_table.max()))
        if bits_for(lo, hi) > _MUL_BITS:
            raise ValueError(f"rope table values [{lo}, {hi}] need {bits_for(lo, hi)} bits; "
                             f"a multiplier operand takes at most {_MUL_BITS}")
        self._n, self._head_size, self._frac, self._bits, self._lanes = \
            n, head_size, frac, bits, lanes
        self._cos, self._sin = cos_table, sin_table
        self._coef_bits = bits_for(lo, hi)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({
                "pos": pos_shape(self.seq_len), "vec": vector_layout(bits, n)}))),
            "o": Out(stream.Signature(vector_layout(bits, n))),
            "error": Out(1),
        })

    n = property(lambda self: self._n)
    head_size = property(lambda self: self._head_size)
    frac = property(lambda self: self._frac)
    bits = property(lambda self: self._bits)
    lanes = property(lambda self: self._lanes)
    seq_len = property(lambda self: self._cos.shape[0])

    @property
    def cos_table(self):
        return self._cos.copy()

    @property
    def sin_table(self):
        return self._sin.copy()

    @property
    def chunks(self):
        """Cycles of the datapath per vector: ``n // (2 * lanes)``."""
        return self._n // (2 * self._lanes)

    def latency(self):
        """Cycles from the input transfer to the first cycle ``o.valid`` is high (``o`` ready:
        the cycles to the output transfer): the input register, ``chunks`` ROM reads, and
        the output register behind the last one."""
        return self.chunks + 2

    def initiation_interval(self):
        """Cycles between input transfers with ``i`` always valid and ``o`` always ready (a new
        vector is accepted in the cycle the previous result is taken)."""
        return self.chunks + 2

    def _rom_layout(self):
        """``(w, words_per_pos, word_of_phase, column_of_phase_lane, phases)``."""
        hs2, lanes = self._head_size // 2, self._lanes
        w = lanes if hs2 % lanes == 0 else hs2
        phases = hs2 // math.gcd(lanes, hs2)   # the column pattern repeats every `phases` chunks
        word_of = [((ph * lanes) % hs2) // w for ph in range(phases)]
        col_of = [[((ph * lanes + lane) % hs2) % w for lane in range(lanes)]
                  for ph in range(phases)]
        return w, hs2 // w, word_of, col_of, phases

    def elaborate(self, platform):
        m = Module()
        bits, lanes, n, frac = self._bits, self._lanes, self._n, self._frac
        w, wpp, word_of, col_of, phases = self._rom_layout()

        coef_shape = signed(self._coef_bits)
        coef = data.StructLayout({"cos": data.ArrayLayout(coef_shape, w),
                                  "sin": data.ArrayLayout(coef_shape, w)})
        init = []
        for p in range(self.seq_len):
            for k in range(wpp):
                sl = slice(k * w, (k + 1) * w)
                init.append({"cos": [int(x) for x in self._cos[p, sl]],
                             "sin": [int(x) for x in self._sin[p, sl]]})
        m.submodules.rom = rom = memory.Memory(shape=coef, depth=len(init), init=init)
        rd = rom.read_port()

        busy = Signal()                           # a vector is being rotated
        chunk = Signal(range(self.chunks + 1))    # chunks whose ROM word has been requested
        phase = Signal(range(phases))             # chunk % phases (the column pattern)
        base = Signal(range(len(init)))           # first ROM word of this position
        rot = Signal()                            # rd.data holds a chunk's word this cycle
        rot_phase = Signal.like(phase)
        rot_last = Signal()
        vec = Signal(vector_layout(bits, n))      # pending input pairs, next chunk in the LSBs
        out = Signal(vector_layout(bits, n))      # results shift in from the top

        word = base
        if wpp > 1:
            word = base + Array(Const(x, range(wpp)) for x in word_of)[phase]
        m.d.comb += [
            self.i.ready.eq(~busy & (~self.o.valid | self.o.ready)),
            self.o.payload.eq(out),
            rd.addr.eq(word),
            rd.en.eq(busy & (chunk < self.chunks)),    # read only for a chunk (rot next cycle)
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.If(self.i.valid & self.i.ready):
            with m.If(self.i.payload.pos < self.seq_len):
                m.d.sync += [busy.eq(1), chunk.eq(0), phase.eq(0),
                             base.eq(self.i.payload.pos * wpp), vec.eq(self.i.payload.vec)]
            with m.Else():
                m.d.sync += self.error.eq(1)

        m.d.sync += rot.eq(0)
        with m.If(busy & (chunk < self.chunks)):
            m.d.sync += [rot.eq(1), rot_phase.eq(phase), rot_last.eq(chunk == self.chunks - 1),
                         chunk.eq(chunk + 1)]
            if phases > 1:
                m.d.sync += phase.eq(Mux(phase == phases - 1, 0, phase + 1))

        results = []
        for lane in range(lanes):
            a, b = vec[2 * lane], vec[2 * lane + 1]
            cols = [col_of[ph][lane] for ph in range(phases)]
            if len(set(cols)) == 1:
                c, s = rd.data.cos[cols[0]], rd.data.sin[cols[0]]
            else:
                c = Array(rd.data.cos[j] for j in cols)[rot_phase]
                s = Array(rd.data.sin[j] for j in cols)[rot_phase]
            results.append(saturate(rshift_round(a * c - b * s, frac), bits))
            results.append(saturate(rshift_round(a * s + b * c, frac), bits))
        step = 2 * lanes * bits
        with m.If(rot):
            m.d.sync += [
                vec.as_value().eq(vec.as_value() >> step),
                out.as_value().eq(Cat(out.as_value()[step:], *results)),
            ]
            with m.If(rot_last):
                m.d.sync += [busy.eq(0), self.o.valid.eq(1)]
        return m
