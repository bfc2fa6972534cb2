"""The LoRA datapath of one target matrix: ``delta = rshift_round(B_q @ u_q * mult_b, shift_b)``
with ``u_q = sat(rshift_round(A_q @ x * mult_u, shift_u), 8)``, from two SRAM banks.

:class:`LoraUnit` computes the correction chunk by chunk (``pe`` rows each, as the base
:class:`~.matvec.MatVecUnit` emits its rows); :class:`LoraProjection` is a base unit with its
correction port fed by a :class:`LoraUnit` on the same input vector: bit for bit
``requantize(W @ x + lora_delta(x))`` (``compiler/lora.py``, ``docs/lora.md``).
"""

import operator

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import bits_for, exp_vector_layout, saturate, tree_sum, vector_layout
from .matvec import MatVecUnit

__all__ = ["lora_write_signature", "section_layout", "LoraUnit", "LoraProjection"]

U_BITS = 8          # rank-space vector u_q
DELTA_BITS = 32     # the correction, in the base accumulator's units (compiler.lora.ACC_BITS)
MULT_BITS = 17      # multipliers are < 2**17 (the image reader rejects others)
SHIFT_BITS = 6      # shifts are <= 63 (idem)


def lora_write_signature(addr_bits):
    """Body byte writes into the LoRA SRAM (driven by ``LoraLoader.wr``): ``en``, ``bank`` (the
    bank written), ``addr`` (byte offset inside the HWLA image body), ``data`` (the byte)."""
    return wiring.Signature({"en": Out(1), "bank": Out(1), "addr": Out(addr_bits),
                             "data": Out(8)})


def section_layout(rows, cols, r_max):
    """Byte offsets of the fields of one ``rows x cols`` target section (``docs/lora.md``):
    ``{"a": .., "mult_u": .., "shift_u": .., "b": .., "mult_b": .., "shift_b": .., "end": ..}``."""
    a = 0
    mult_u = a + r_max * cols
    shift_u = mult_u + 4 * r_max
    b = shift_u + 1
    mult_b = b + rows * r_max
    shift_b = mult_b + 4 * rows
    return dict(a=a, mult_u=mult_u, shift_u=shift_u, b=b, mult_b=mult_b, shift_b=shift_b,
                end=shift_b + 1)


def _pow2(name, v, lo, hi):
    if not (lo <= v <= hi and v & (v - 1) == 0):
        raise ValueError(f"{name} must be a power of two between {lo} and {hi}, not {v}")


class LoraUnit(wiring.Component):
    """LoRA correction of one target matrix, from a two-bank SRAM the host rewrites.

    For each input vector ``x`` (int8, the base matvec's input) computes, bit for bit as
    ``compiler.lora.lora_delta``::

        u      = A_q @ x                                  r_max x cols, ``simd`` MACs a cycle
        u_q[j] = sat(rshift_round(u[j] * mult_u[j], shift_u), 8)
        v      = B_q @ u_q                                one row (r_max MACs) a cycle
        delta  = rshift_round(v * mult_b, shift_b)        (low 32 bits)

    and emits ``delta`` in ``rows/pe`` chunks of ``pe`` rows, row group 0 first. With ``on``
    low when ``x`` is taken, every chunk is 0 and is offered at once (the base model, no added
    cycles). ``bank`` and ``on`` are sampled when ``x`` is taken: one vector, one bank.

    Storage, two banks each (``Memory``, byte-writable): ``A_q`` (``simd`` bytes a word),
    ``B_q`` (``r_max`` bytes a word, one row), ``mult_u``, ``mult_b`` (24-bit words, 17 bits
    used); ``shift_u``, ``shift_b`` are registers (6 bits used). A write with ``wr.en`` high
    stores ``wr.data`` at body offset ``wr.addr`` of bank ``wr.bank`` when the offset falls
    inside this unit's section (``base`` .. ``base + section_bytes``; layout
    :func:`section_layout`); byte 3 of a multiplier is ignored (the host's image reader
    rejects multipliers ``>= 2**17`` and shifts above 63). Writes take effect one cycle later.

    Cycles (``o.ready`` high, ``on``): the first chunk is taken ``first_chunk_latency() =
    a_cycles + pe + 14`` cycles after ``x`` (``a_cycles = r_max * cols / simd``), then a chunk
    every ``pe`` cycles; ``i.ready`` rises again as the last chunk is taken. Off: a chunk
    every cycle from the cycle after ``x`` is taken.

    Parameters
    ----------
    rows, cols : int
        Shape of the target matrix ``W``.
    r_max : int
        Rank the SRAM holds, a power of two from 1 to 256.
    pe : int
        Rows per output chunk; must divide ``rows`` (the base unit's ``pe``).
    simd : int
        ``A`` MACs per cycle, a power of two dividing ``cols``.
    base : int
        Byte offset of this unit's section in the image body.
    addr_bits : int
        Width of ``wr.addr``; the section must fit below ``2**addr_bits``.
    in_bits : int
        Input element width (8 for the chip).
    exp_max : int
        ``E``: the input's largest exponent (0: none), 0 to 7.

    Members
    -------
    i : ``In(stream.Signature(exp_vector_layout(in_bits, cols, exp_max)))``
        Input vectors (with ``exp_max > 0``: fields ``vec`` and ``k``).
    o : ``Out(stream.Signature(vector_layout(32, pe)))``
        Correction chunks, ``rows/pe`` per input vector.
    wr : ``In(lora_write_signature(addr_bits))``
        SRAM byte writes.
    bank : ``In(1)``
        Active (read) bank.
    on : ``In(1)``
        Adapter enabled; 0 gives ``delta = 0``.
    """

    def __init__(self, *, rows, cols, r_max, pe, simd, base=0, addr_bits=24, in_bits=8,
                 exp_max=0):
        rows, cols, r_max, pe, simd, base, addr_bits, in_bits, exp_max = map(
            operator.index, (rows, cols, r_max, pe, simd, base, addr_bits, in_bits, exp_max))
        if not 0 <= exp_max <= 7:
            raise ValueError(f"exp_max must lie in 0..7, not {exp_max}")
        if rows < 1 or cols < 1:
            raise ValueError(f"rows and cols must be positive, not {rows} x {cols}")
        _pow2("r_max", r_max, 1, 256)
        if pe < 1 or rows % pe:
            raise ValueError(f"pe ({pe}) must divide rows ({rows})")
        _pow2("simd", simd, 1, 1 << 16)
        if cols % simd:
            raise ValueError(f"simd ({simd}) must divide cols ({cols})")
        if in_bits < 2:
            raise ValueError(f"in_bits must be at least 2, not {in_bits}")
        layout = section_layout(rows, cols, r_max)
        if base < 0 or base + layout["end"] > 1 << addr_bits:
            raise ValueError(f"section {base}..{base + layout['end']} does not fit "
                             f"addr_bits={addr_bits}")
        self._rows, self._cols, self._r_max, self._pe, self._simd = rows, cols, r_max, pe, simd
        self._base, self._addr_bits, self._in_bits = base, addr_bits, in_bits
        self._layout, self._exp_max = layout, exp_max
        super().__init__({
            "i": In(stream.Signature(exp_vector_layout(in_bits, cols, exp_max))),
            "o": Out(stream.Signature(vector_layout(DELTA_BITS, pe))),
            "wr": In(lora_write_signature(addr_bits)),
            "bank": In(1),
            "on": In(1),
        })

    rows = property(lambda self: self._rows)
    cols = property(lambda self: self._cols)
    r_max = property(lambda self: self._r_max)
    pe = property(lambda self: self._pe)
    simd = property(lambda self: self._simd)
    base = property(lambda self: self._base)
    addr_bits = property(lambda self: self._addr_bits)
    in_bits = property(lambda self: self._in_bits)
    exp_max = property(lambda self: self._exp_max)
    delta_bits = property(lambda self: DELTA_BITS)

    @property
    def section_bytes(self):
        """Bytes of this unit's section in the image body."""
        return self._layout["end"]

    @property
    def row_groups(self):
        return self._rows // self._pe

    @property
    def a_cycles(self):
        """Cycles of the ``A`` pass: ``r_max * cols / simd``."""
        return self._r_max * self._cols // self._simd

    @property
    def mac_units(self):
        """Multipliers: ``simd`` (A), ``r_max`` (B), 2 requantizer multipliers."""
        return self._simd + self._r_max + 2

    @property
    def macs_per_vector(self):
        """MACs per input vector: ``r_max * (cols + rows)``."""
        return self._r_max * (self._cols + self._rows)

    @property
    def sram_bits(self):
        """Storage bits, both banks: memories as built plus the shift registers."""
        return 2 * (self._r_max * self._cols * 8 + self._r_max * 24 + self._rows * self._r_max
                    * 8 + self._rows * 24 + 2 * SHIFT_BITS)

    def first_chunk_latency(self):
        """Cycles from the input transfer to the first chunk's transfer (adapter on, ``o.ready``
        high): ``a_cycles + pe + 14``: the A pipeline (row read, products, their sum, the
        accumulator, the requantizer's product, rounding add, shift and saturation), then the
        B pipeline (row read, products, their sum, the ``mult_b`` product, the rounding add
        and shift) and the FIFO."""
        return self.a_cycles + self._pe + 14

    def chunk_times(self):
        """Transfer cycle of every chunk after the input transfer (adapter on, ``o.ready``
        high): the first at :meth:`first_chunk_latency`, then every ``pe`` cycles."""
        return [self.first_chunk_latency() + g * self._pe for g in range(self.row_groups)]

    # ---------------------------------------------------------------------------- hardware

    def elaborate(self, platform):
        m = Module()
        R, C, r, P, S = self._rows, self._cols, self._r_max, self._pe, self._simd
        G, ib = self.row_groups, self._in_bits
        KA, NA = C // S, r * C // S
        lay, base, db = self._layout, self._base, DELTA_BITS

        # ---- storage
        m.submodules.a_mem = a_mem = Memory(shape=unsigned(S * 8), depth=2 * NA, init=[])
        m.submodules.b_mem = b_mem = Memory(shape=unsigned(r * 8), depth=2 * R, init=[])
        m.submodules.mu_mem = mu_mem = Memory(shape=unsigned(24), depth=2 * r, init=[])
        m.submodules.mb_mem = mb_mem = Memory(shape=unsigned(24), depth=2 * R, init=[])
        shift_u = [Signal(SHIFT_BITS, name=f"shift_u{k}") for k in range(2)]
        shift_b = [Signal(SHIFT_BITS, name=f"shift_b{k}") for k in range(2)]

        # ---- writes (registered once, then decoded into the memories' byte enables)
        w_en, w_bank = Signal(), Signal()
        w_addr, w_data = Signal(self._addr_bits), Signal(8)
        m.d.sync += [w_en.eq(self.wr.en), w_bank.eq(self.wr.bank), w_addr.eq(self.wr.addr),
                     w_data.eq(self.wr.data)]

        def region(lo, hi):
            lo, hi = base + lay[lo], base + lay[hi]
            rel = Signal(range(max(hi - lo, 2)), name=f"rel_{lo}")
            m.d.comb += rel.eq(w_addr - lo)
            return w_en & (w_addr >= lo) & (w_addr < hi), rel

        def byte_port(mem, in_region, rel, words, lanes, lane_bits):
            wp = mem.write_port(granularity=8)
            lane = rel[:lane_bits] if lane_bits else Const(0, 1)
            word = rel >> lane_bits
            m.d.comb += [wp.addr.eq(Mux(w_bank, words, 0) + word),
                         wp.data.eq(Cat(*([w_data] * lanes)))]
            with m.If(in_region):
                m.d.comb += wp.en.eq(Const(1, lanes) << lane)
            return wp

        lb = (S - 1).bit_length()
        byte_port(a_mem, *region("a", "mult_u"), NA, S, lb)
        byte_port(b_mem, *region("b", "mult_b"), R, r, (r - 1).bit_length())
        for mem, lo, hi, words in ((mu_mem, "mult_u", "shift_u", r),
                                   (mb_mem, "mult_b", "shift_b", R)):
            ok, rel = region(lo, hi)
            wp = mem.write_port(granularity=8)
            m.d.comb += [wp.addr.eq(Mux(w_bank, words, 0) + (rel >> 2)),
                         wp.data.eq(Cat(w_data, w_data, w_data))]
            with m.If(ok & (rel[:2] != 3)):
                m.d.comb += wp.en.eq(Const(1, 3) << rel[:2])
        for regs, field in ((shift_u, "shift_u"), (shift_b, "shift_b")):
            with m.If(w_en & (w_addr == base + lay[field])):
                with m.If(w_bank):
                    m.d.sync += regs[1].eq(w_data[:SHIFT_BITS])
                with m.Else():
                    m.d.sync += regs[0].eq(w_data[:SHIFT_BITS])

        # ---- control: one vector at a time
        active = Signal()        # a vector taken, its chunks not all delivered
        on_l, bank_l = Signal(), Signal()
        sent = Signal(range(G))
        last_out = self.o.valid & self.o.ready & (sent == G - 1)
        m.d.comb += self.i.ready.eq(~active | last_out)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += sent.eq(Mux(sent == G - 1, 0, sent + 1))
            with m.If(sent == G - 1):
                m.d.sync += active.eq(0)
        take = self.i.valid & self.i.ready
        busy_a = Signal()
        x = Signal(C * ib)
        E = self._exp_max
        with m.If(take):
            m.d.sync += [active.eq(1), on_l.eq(self.on), bank_l.eq(self.bank),
                         x.eq(self.i.payload.vec.as_value() if E else
                              self.i.payload.as_value()),
                         busy_a.eq(self.on)]
        # the active bank's shifts, registered (bank_l is steady while a vector is in flight)
        sh_u, sh_b = Signal(SHIFT_BITS), Signal(SHIFT_BITS)
        if E:
            # exponent-adjusted shifts, clamped to 63 (compiler.lora.lora_delta)
            k_l = Signal(range(E + 1))
            with m.If(take):
                m.d.sync += k_l.eq(self.i.payload.k)
            top = (1 << SHIFT_BITS) - 1
            su = Mux(bank_l, shift_u[1], shift_u[0]) + (E - k_l)
            sb = Mux(bank_l, shift_b[1], shift_b[0]) + k_l
            m.d.sync += [sh_u.eq(Mux(su > top, top, su)), sh_b.eq(Mux(sb > top, top, sb))]
        else:
            m.d.sync += [sh_u.eq(Mux(bank_l, shift_u[1], shift_u[0])),
                         sh_b.eq(Mux(bank_l, shift_b[1], shift_b[0]))]

        # ---- A pass: u = A_q @ x, requantized row by row into u_q
        sa = Signal(range(NA))
        ka = Signal(range(KA))
        ja = Signal(range(r))
        rd_a = a_mem.read_port(domain="sync")
        m.d.comb += rd_a.addr.eq(Mux(bank_l, NA, 0) + sa)
        with m.If(busy_a):
            m.d.sync += [sa.eq(sa + 1), ka.eq(Mux(ka == KA - 1, 0, ka + 1)),
                         x.eq(x.rotate_right(S * ib))]
            with m.If(ka == KA - 1):
                m.d.sync += ja.eq(ja + 1)
            with m.If(sa == NA - 1):
                m.d.sync += [sa.eq(0), ja.eq(0), busy_a.eq(0)]

        def flags(name, src):
            regs = tuple(Signal.like(v, name=f"{name}_{n}") for n, v in
                         zip(("valid", "first", "last", "j"), src))
            m.d.sync += [d.eq(s) for d, s in zip(regs, src)]
            return regs

        s1 = flags("a1", (busy_a, ka == 0, ka == KA - 1, ja))
        xs = [Signal(signed(ib), name=f"a1_x{s}") for s in range(S)]
        m.d.sync += [xs[s].eq(x[s * ib:(s + 1) * ib].as_signed()) for s in range(S)]
        s2 = flags("a2", s1)
        prod = [Signal(signed(ib + 8), name=f"a2_prod{s}") for s in range(S)]
        m.d.sync += [prod[s].eq(xs[s] * rd_a.data[s * 8:(s + 1) * 8].as_signed())
                     for s in range(S)]
        s3 = flags("a3", s2)
        umax = C << (ib + 6)
        tsum = Signal(signed(bits_for(-umax, umax)), name="a3_sum")
        m.d.sync += tsum.eq(tree_sum(prod))
        rd_mu = mu_mem.read_port(domain="sync")
        m.d.comb += rd_mu.addr.eq(Mux(bank_l, r, 0) + s2[3])
        uacc = Signal(signed(bits_for(-umax, umax)))
        with m.If(s3[0]):
            m.d.sync += uacc.eq(Mux(s3[1], tsum, uacc + tsum))
        # the requantizer u_q[j] = sat(rshift_round(u[j] * mult_u[j], shift_u), 8), one
        # register per step: u[j] (uacc) and mult_u[j], the product, the rounding add, the
        # shift, then the saturation into u_q[j]
        s4 = (Signal(name="a4_valid"), Signal(range(r), name="a4_j"))
        m.d.sync += [s4[0].eq(s3[0] & s3[2]), s4[1].eq(s3[3])]
        mu4 = Signal(MULT_BITS)
        m.d.sync += mu4.eq(rd_mu.data[:MULT_BITS])
        s5 = flags("a5", s4)
        uprod = Signal(signed(uacc.shape().width + MULT_BITS + 1))
        m.d.sync += uprod.eq(uacc * mu4)
        s6 = flags("a6", s5)
        half_u = (Const(1, unsigned(1)) << sh_u) >> 1
        urnd = Signal((uprod + half_u).shape())
        m.d.sync += urnd.eq(uprod + half_u)
        s7 = flags("a7", s6)
        ushift = Signal.like(urnd)
        m.d.sync += ushift.eq(urnd >> sh_u)
        uq = [Signal(signed(U_BITS), name=f"uq{j}") for j in range(r)]
        uq_val = saturate(ushift, U_BITS)
        with m.If(s7[0]):
            with m.Switch(s7[1]):
                for j in range(r):
                    with m.Case(j):
                        m.d.sync += uq[j].eq(uq_val)

        # ---- B pass: one row of v = B_q @ u_q a cycle, delta into pe-row chunks
        busy_b = Signal()
        with m.If(s7[0] & (s7[1] == r - 1)):
            m.d.sync += busy_b.eq(1)
        rb = Signal(range(R))
        pb = Signal(range(P))
        fifo_depth = 8 // P + 2
        credits = Signal(range(fifo_depth + 1), init=fifo_depth)
        issue_b = busy_b & ((pb != 0) | (credits != 0))
        pop = self.o.valid & self.o.ready & on_l
        m.d.sync += credits.eq(credits + pop - (issue_b & (pb == 0)))
        rd_b = b_mem.read_port(domain="sync")
        rd_mb = mb_mem.read_port(domain="sync")
        m.d.comb += [rd_b.addr.eq(Mux(bank_l, R, 0) + rb),
                     rd_mb.addr.eq(Mux(bank_l, R, 0) + rb)]
        with m.If(issue_b):
            m.d.sync += [rb.eq(rb + 1), pb.eq(Mux(pb == P - 1, 0, pb + 1))]
            with m.If(rb == R - 1):
                m.d.sync += [rb.eq(0), busy_b.eq(0)]
        b1_valid, b1_end = Signal(), Signal()
        m.d.sync += [b1_valid.eq(issue_b), b1_end.eq(pb == P - 1)]
        b2_valid, b2_end = Signal(), Signal()
        m.d.sync += [b2_valid.eq(b1_valid), b2_end.eq(b1_end)]
        bprod = [Signal(signed(8 + U_BITS), name=f"b2_prod{j}") for j in range(r)]
        m.d.sync += [bprod[j].eq(rd_b.data[j * 8:(j + 1) * 8].as_signed() * uq[j])
                     for j in range(r)]
        mb2 = Signal(MULT_BITS)
        m.d.sync += mb2.eq(rd_mb.data[:MULT_BITS])
        b3_valid, b3_end = Signal(), Signal()
        m.d.sync += [b3_valid.eq(b2_valid), b3_end.eq(b2_end)]
        vmax = r << (7 + U_BITS - 1)
        vsum = Signal(signed(bits_for(-vmax, vmax)))
        mb3 = Signal(MULT_BITS)
        m.d.sync += [vsum.eq(tree_sum(bprod)), mb3.eq(mb2)]
        b4_valid, b4_end = Signal(), Signal()
        m.d.sync += [b4_valid.eq(b3_valid), b4_end.eq(b3_end)]
        dprod = Signal(signed(vsum.shape().width + MULT_BITS + 1))
        m.d.sync += dprod.eq(vsum * mb3)
        # delta = rshift_round(v * mult_b, shift_b): the rounding add, then the shift
        b5_valid, b5_end = Signal(), Signal()
        m.d.sync += [b5_valid.eq(b4_valid), b5_end.eq(b4_end)]
        half_b = (Const(1, unsigned(1)) << sh_b) >> 1
        drnd = Signal((dprod + half_b).shape())
        m.d.sync += drnd.eq(dprod + half_b)
        b6_valid, b6_end = Signal(), Signal()
        m.d.sync += [b6_valid.eq(b5_valid), b6_end.eq(b5_end)]
        d = Signal(db)
        m.d.sync += d.eq((drnd >> sh_b)[:db])
        chunk = Signal(P * db)
        new_chunk = Cat(chunk[db:], d) if P > 1 else d
        m.submodules.fifo = fifo = SyncFIFO(width=P * db, depth=fifo_depth)
        with m.If(b6_valid):
            m.d.sync += chunk.eq(new_chunk)
        m.d.comb += [fifo.w_data.eq(new_chunk), fifo.w_en.eq(b6_valid & b6_end)]

        # ---- output: the FIFO (adapter on) or zero chunks at once (off)
        m.d.comb += [
            self.o.valid.eq(active & Mux(on_l, fifo.r_rdy, 1)),
            self.o.payload.eq(Mux(on_l, fifo.r_data, 0)),
            fifo.r_en.eq(self.o.ready & on_l & active),
        ]
        return m


class LoraProjection(wiring.Component):
    """A target matrix with its LoRA path: a :class:`~.matvec.MatVecUnit` with a correction
    port and a :class:`LoraUnit` fed the same input vector.

    Bit for bit ``requantize(W @ x + lora_delta(x), mult, shift, out_bits)``; with ``on`` low
    (or an all-zero bank) the base unit's outputs. It exposes the base unit's cycle
    properties (``rows``, ``cols``, ``pe``, ``row_groups``, ``in_bits``, ``out_bits``,
    ``mac_units``) so a layer can use it in its place.

    Parameters
    ----------
    base : MatVecUnit
        The base unit, built with ``correction_bits=32``.
    lora : LoraUnit
        Same ``rows``, ``cols``, ``pe`` and ``in_bits`` as ``base``.

    Members
    -------
    i, o : as the base unit's (``i`` carries the exponent ``k`` to both units when
        ``exp_max > 0``).
    wr, bank, on : as the LoRA unit's.
    """

    def __init__(self, *, base, lora):
        if not isinstance(base, MatVecUnit) or base.correction_bits != DELTA_BITS:
            raise ValueError(f"base must be a MatVecUnit with correction_bits={DELTA_BITS}")
        if not isinstance(lora, LoraUnit):
            raise ValueError(f"lora must be a LoraUnit, not {type(lora).__name__}")
        for f in ("rows", "cols", "pe", "in_bits", "exp_max"):
            if getattr(base, f) != getattr(lora, f):
                raise ValueError(f"lora.{f} is {getattr(lora, f)}, the base unit's "
                                 f"{getattr(base, f)}")
        self._base, self._lora = base, lora
        super().__init__({
            "i": In(stream.Signature(exp_vector_layout(base.in_bits, base.cols,
                                                       base.exp_max))),
            "o": Out(stream.Signature(vector_layout(base.out_bits, base.pe))),
            "wr": In(lora_write_signature(lora.addr_bits)),
            "bank": In(1),
            "on": In(1),
        })

    base = property(lambda self: self._base)
    lora = property(lambda self: self._lora)

    def __getattr__(self, name):
        if name in ("rows", "cols", "pe", "simd", "in_bits", "out_bits", "row_groups",
                    "weights", "form", "steps", "exp_max"):
            return getattr(self._base, name)
        raise AttributeError(name)

    @property
    def mac_units(self):
        return self._base.mac_units + self._lora.mac_units

    def cycles_per_vector(self, on=True):
        """Cycles from the input transfer to the last chunk's transfer (``o.ready`` high).

        Off: the base unit's. On: row group ``g``'s first step issues (taking its correction
        chunk) at ``s_g = max(s_{g-1} + cols/simd, t_g)`` with ``t_g`` the LoRA unit's
        :meth:`LoraUnit.chunk_times`, and the last chunk leaves ``cols/simd - 1 +
        pipeline_depth`` after the last group's first step.
        """
        b = self._base
        if not on:
            return b.cycles_per_vector()
        s = None
        for t in self._lora.chunk_times():
            s = t if s is None else max(s + b.col_steps, t)
        return s + b.col_steps - 1 + b.pipeline_depth

    def added_cycles(self):
        """Cycles the LoRA path adds to a vector: ``cycles_per_vector(True) -
        cycles_per_vector(False)``."""
        return self.cycles_per_vector(True) - self.cycles_per_vector(False)
    def elaborate(self, platform):
        m = Module()
        m.submodules.base = base = self._base
        m.submodules.lora = lora = self._lora
        # both take the vector in the same cycle
        m.d.comb += [
            base.i.valid.eq(self.i.valid & lora.i.ready),
            lora.i.valid.eq(self.i.valid & base.i.ready),
            base.i.payload.eq(self.i.payload),
            lora.i.payload.eq(self.i.payload),
            self.i.ready.eq(base.i.ready & lora.i.ready),
            lora.bank.eq(self.bank),
            lora.on.eq(self.on),
        ]
        wiring.connect(m, lora.o, base.c)
        wiring.connect(m, wiring.flipped(self.wr), lora.wr)
        wiring.connect(m, base.o, wiring.flipped(self.o))
        return m
