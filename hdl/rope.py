"""Rotary position embedding of a q or k vector (``numerics.rope``)."""

import math
import operator

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import bits_for, pos_shape, rshift_round, saturate, vector_layout

__all__ = ["PIPELINE", "RoPE", "RoPETable", "rope_table_signature"]

#: Widest multiplier operand of the target (ECP5 ``MULT18X18D``).
_MUL_BITS = 18

#: Registered stages behind a chunk's ROM word: the four products of a pair (the multipliers'
#: outputs registered), the sum and the rounding add (``rshift_round`` before the shift, which
#: is wiring), the saturation into the output register.
PIPELINE = 3


def _table(name, table, columns):
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] != columns:
        raise ValueError(f"{name} has shape {table.shape}; expected (seq_len, head_size//2 = "
                         f"{columns})")
    if not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, not {table.dtype}")
    return table.astype(np.int64)


def rope_table_signature(shape, depth):
    """Read port of a RoPE table ROM, seen from the :class:`RoPE` that reads it: ``addr``
    (``Out(range(depth))``) and ``en`` (``Out(1)``) drive a synchronous read port, ``data``
    (``In(shape)``) is its word one cycle after an enabled read (held while ``en`` is low)."""
    return wiring.Signature({"addr": Out(range(depth)), "en": Out(1), "data": In(shape)})


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

    With ``shared_table`` the unit has no ROM of its own: it reads the table through its
    ``table`` port (:func:`rope_table_signature` of :meth:`table_shape` and
    :attr:`table_depth`), which a :class:`RoPETable` serves; the cycles are the same.

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
    shared_table : bool
        Read the table through the ``table`` port instead of an own ROM.

    Members
    -------
    i : ``In(stream.Signature(StructLayout({"pos": ..., "vec": ...})))``
        ``pos``: position, ``pos_shape(seq_len)`` (holds ``0..seq_len``); ``vec``: the
        vector to rotate, ``vector_layout(bits, n)``.
    o : ``Out(stream.Signature(vector_layout(bits, n)))``
        Rotated vector.
    error : ``Out(1)``
        Sticky: an input had ``pos >= seq_len``.
    table : ``Out(rope_table_signature(table_shape(), table_depth))``
        Only with ``shared_table``: the read port of the table ROM.
    """

    def __init__(self, *, n, head_size, cos_table, sin_table, frac=14, bits=8, lanes=1,
                 shared_table=False):
        if not isinstance(shared_table, bool):
            raise ValueError(f"shared_table must be True or False, not {shared_table!r}")
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
        self._shared = shared_table
        ports = {
            "i": In(stream.Signature(data.StructLayout({
                "pos": pos_shape(self.seq_len), "vec": vector_layout(bits, n)}))),
            "o": Out(stream.Signature(vector_layout(bits, n))),
            "error": Out(1),
        }
        if shared_table:
            ports["table"] = Out(rope_table_signature(self.table_shape(), self.table_depth))
        super().__init__(ports)

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

    shared_table = property(lambda self: self._shared)

    @property
    def table_depth(self):
        """Words of the table ROM: ``seq_len * words_per_pos``."""
        return self.seq_len * self._rom_layout()[1]

    def table_shape(self):
        """Shape of a table ROM word: ``w`` columns of both tables (see the class doc)."""
        coef_shape = signed(self._coef_bits)
        w = self._rom_layout()[0]
        return data.StructLayout({"cos": data.ArrayLayout(coef_shape, w),
                                  "sin": data.ArrayLayout(coef_shape, w)})

    def table_init(self):
        """Contents of the table ROM, word by word (``Memory(init=...)``)."""
        w, wpp = self._rom_layout()[:2]
        init = []
        for p in range(self.seq_len):
            for k in range(wpp):
                sl = slice(k * w, (k + 1) * w)
                init.append({"cos": [int(x) for x in self._cos[p, sl]],
                             "sin": [int(x) for x in self._sin[p, sl]]})
        return init

    def table_key(self):
        """Equal for two units exactly when their table ROMs are the same (shape, contents)."""
        w = self._rom_layout()[0]
        return (w, self._coef_bits, self._cos.shape, self._cos.tobytes(), self._sin.tobytes())

    @property
    def chunks(self):
        """Cycles of the datapath per vector: ``n // (2 * lanes)``."""
        return self._n // (2 * self._lanes)

    def latency(self):
        """Cycles from the input transfer to the first cycle ``o.valid`` is high (``o`` ready:
        the cycles to the output transfer): the input register, ``chunks`` ROM reads, and
        behind the last one the :data:`PIPELINE` stages (products; sum and rounding add;
        saturation into the output register)."""
        return self.chunks + 1 + PIPELINE

    def initiation_interval(self):
        """Cycles between input transfers with ``i`` always valid and ``o`` always ready (a new
        vector is accepted in the cycle the previous result is taken)."""
        return self.chunks + 1 + PIPELINE

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
        _, wpp, word_of, col_of, phases = self._rom_layout()

        if self._shared:
            rd = self.table
        else:
            m.submodules.rom = rom = memory.Memory(shape=self.table_shape(),
                                                   depth=self.table_depth,
                                                   init=self.table_init())
            rd = rom.read_port()

        busy = Signal()                           # a vector is in the unit (reads + pipeline)
        chunk = Signal(range(self.chunks + 1))    # chunks whose ROM word has been requested
        phase = Signal(range(phases))             # chunk % phases (the column pattern)
        base = Signal(range(self.table_depth))    # first ROM word of this position
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

        step = 2 * lanes * bits                   # vector bits per chunk (lanes pairs)

        # stage 1 (rot: the chunk's ROM word is on rd.data): the four products of each pair
        prod = []
        for lane in range(lanes):
            a, b = vec[2 * lane], vec[2 * lane + 1]
            cols = [col_of[ph][lane] for ph in range(phases)]
            if len(set(cols)) == 1:
                c, s = rd.data.cos[cols[0]], rd.data.sin[cols[0]]
            else:
                c = Array(rd.data.cos[j] for j in cols)[rot_phase]
                s = Array(rd.data.sin[j] for j in cols)[rot_phase]
            for name, x in (("ac", a * c), ("bs", b * s), ("as", a * s), ("bc", b * c)):
                p = Signal.like(x, name=f"p_{name}{lane}")
                m.d.sync += p.eq(x)
                prod.append(p)
        p_valid, p_last = Signal(), Signal()
        m.d.sync += [p_valid.eq(rot), p_last.eq(rot & rot_last)]
        with m.If(rot):
            m.d.sync += vec.as_value().eq(vec.as_value() >> step)

        # stage 2: sum or difference and the rounding add; the shift is wiring
        rounded = []
        for lane in range(lanes):
            ac, bs, as_, bc = prod[4 * lane:4 * lane + 4]
            for k, x in enumerate((rshift_round(ac - bs, frac), rshift_round(as_ + bc, frac))):
                r = Signal.like(x, name=f"r{lane}_{'ab'[k]}")
                m.d.sync += r.eq(x)
                rounded.append(r)
        r_valid, r_last = Signal(), Signal()
        m.d.sync += [r_valid.eq(p_valid), r_last.eq(p_valid & p_last)]

        # stage 3: saturation into the output register (results shift in from the top)
        with m.If(r_valid):
            m.d.sync += out.as_value().eq(
                Cat(out.as_value()[step:], *(saturate(r, bits) for r in rounded)))
            with m.If(r_last):
                m.d.sync += [busy.eq(0), self.o.valid.eq(1)]
        return m


class RoPETable(wiring.Component):
    """One RoPE table ROM for the ``rope_q`` and ``rope_k`` units of several layers.

    The table depends only on the position and the pair index, so every layer's units read
    the same words; the layers of a chip run one after another (one token in flight), so one
    ROM with two synchronous read ports (one true-dual-port block RAM: port ``q`` for the
    q units, port ``k`` for the k units) serves all of them. A port's address and enable are
    the OR of the units' addresses gated by their enables (a unit that does not read drives
    nothing), and the read data goes to every unit. At most one unit per port may read in a
    cycle; ``clash`` is high in a cycle in which two or more do (the chip's benches check it
    never is).

    Parameters
    ----------
    ropes : sequence of ``(RoPE, RoPE)``
        Per layer, its ``(rope_q, rope_k)``, built with ``shared_table=True`` and the same
        table (:meth:`RoPE.table_key`).

    Members
    -------
    q, k : ``In(rope_table_signature(...)).array(len(ropes))``
        Per layer, the table port of its ``rope_q`` / ``rope_k``.
    clash : ``Out(1)``
        Two units of the same port read in this cycle (never, in a chip).
    """

    def __init__(self, *, ropes):
        ropes = [tuple(pair) for pair in ropes]
        if not ropes:
            raise ValueError("ropes must hold at least one (rope_q, rope_k) pair")
        for k, pair in enumerate(ropes):
            if len(pair) != 2 or not all(isinstance(r, RoPE) for r in pair):
                raise ValueError(f"ropes[{k}] must be a (RoPE, RoPE) pair")
            for which, r in zip("qk", pair):
                if not r.shared_table:
                    raise ValueError(f"ropes[{k}] rope_{which} has its own table "
                                     "(shared_table=False)")
                if r.table_key() != ropes[0][0].table_key():
                    raise ValueError(f"ropes[{k}] rope_{which} has a different table (tables, "
                                     "lanes or value width) than ropes[0] rope_q")
        self._ropes = ropes
        self._shape, self._depth = ropes[0][0].table_shape(), ropes[0][0].table_depth
        sig = rope_table_signature(self._shape, self._depth)
        super().__init__({
            "q": In(sig).array(len(ropes)),
            "k": In(sig).array(len(ropes)),
            "clash": Out(1),
        })

    n_layers = property(lambda self: len(self._ropes))
    depth = property(lambda self: self._depth)

    def elaborate(self, platform):
        m = Module()
        m.submodules.rom = rom = memory.Memory(shape=self._shape, depth=self._depth,
                                               init=self._ropes[0][0].table_init())
        for name in ("q", "k"):
            rd, ports = rom.read_port(), getattr(self, name)
            m.d.comb += [rd.addr.eq(_or(port.addr & port.en.replicate(len(port.addr))
                                        for port in ports)),
                         rd.en.eq(_or(port.en for port in ports))]
            for k, port in enumerate(ports):
                m.d.comb += port.data.eq(rd.data)
                with m.If(port.en & _or(other.en for j, other in enumerate(ports) if j != k)):
                    m.d.comb += self.clash.eq(1)
        return m


def _or(values):
    values = list(values)
    out = Const(0, 1)
    for v in values:
        out = out | v
    return out
