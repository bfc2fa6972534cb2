"""SwiGLU of the gate and up projections with a SiLU table (``numerics.swiglu``)."""

import operator

import numpy as np
from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import (bits_for, exp_vector_layout, layer_select, per_layer, rshift_round, saturate,
                    signed_range, vector_layout)

__all__ = ["SwiGLU"]

# Multiplier operands are at most 18 bits on one side (one ECP5 MULT18X18D).
_OPERAND_BITS = 18
# The golden model computes in numpy int64.
_GOLDEN_BITS = 63


class SwiGLU(wiring.Component):
    """``o = sat(rshift_round(silu_table[gate + silu_offset] * up * mult, shift), out_bits)``.

    Both input vectors are held in registers that shift by ``lanes`` elements per cycle.
    The part of the SiLU table a ``in_bits``-bit gate can reach (``2**in_bits`` entries) is a
    ``Memory`` with one synchronous read port per lane; its address is the gate with the sign
    bit flipped. Pipeline: table read, ``silu * up``, ``* mult``, round + saturate into the
    output register. One vector pair is in flight at a time; the next pair is taken in the
    cycle the result is.

    With ``exp_max = E > 0`` (``numerics.swiglu_exp``) the rounding stage keeps ``E`` more
    fraction bits, ``wide = sat(rshift_round(silu * up * mult, shift - E), out_bits + E)``
    (saturating at ``out_bits + E`` bits changes neither ``k`` nor the output), into a wide
    vector register; a stage behind it keeps the running max and min of ``wide`` over the
    vector, a further cycle turns them into the exponent ``k`` (the smallest in ``0..E`` with
    every ``|rshift_round(wide, k)| <= 2**(out_bits-1) - 1``, else ``E``), and the output is
    ``sat(rshift_round(wide, k), out_bits)`` per element (an ``E+1``-way choice) with ``k``
    beside it in the payload (:func:`~.arith.exp_vector_layout`): two cycles more.

    With ``n_layers = L > 1`` the block holds the constants of ``L`` layers (a layer-serial
    decoder passes every layer's vectors through it) and the ``layer`` input selects them:
    ``silu_table`` is ``(L, size)``, ``silu_offset``, ``mult`` and ``shift`` are sequences of
    ``L`` ints (``exp_max`` is shared). The SiLU ``Memory`` is the layers' reachable windows
    stacked along its depth (``L << in_bits`` entries, the layer in the high address bits);
    ``mult`` is selected by ``layer`` into a register at the input transfer, and with
    different shifts the rounding stage rounds by each distinct shift and picks the layer's
    (per-layer values that are all equal stay plain constants). The result (and ``k``) for
    ``layer = l`` is bit for bit that of a one-layer block built with layer ``l``'s constants,
    in the same cycles.

    Parameters
    ----------
    n : int
        Elements per vector (the hidden dimension).
    in_bits : int
        Width of the gate elements (the SiLU table index).
    up_bits : int
        Width of the up-projection elements.
    silu_table : array of int, shape ``(size,)``, or ``(n_layers, size)`` if ``n_layers > 1``
        SiLU values; entry ``gate + silu_offset`` is used for each gate value.
    silu_offset : int, or sequence of ``n_layers`` ints if ``n_layers > 1``
        Table index of gate value 0.
    mult : int, or sequence of ``n_layers`` ints if ``n_layers > 1``
        Requantisation multiplier (an 18-bit signed operand).
    shift : int, or sequence of ``n_layers`` ints if ``n_layers > 1``
        Rounding right shift of the requantisation.
    out_bits : int
        Width of the output elements.
    lanes : int
        Elements processed per cycle; must divide ``n``.
    exp_max : int
        ``E``, the largest per-vector exponent (0: no exponent, a plain vector out);
        ``0 <= E <= shift`` (every layer's ``shift``).
    n_layers : int
        Number of layers whose constants the block holds (``L``); 1 gives the plain block
        with no ``layer`` port.

    Members
    -------
    gate : ``In(stream.Signature(vector_layout(in_bits, n)))``
        Gate projection (``w1 x``).
    up : ``In(stream.Signature(vector_layout(up_bits, n)))``
        Up projection (``w3 x``); transfers together with ``gate``.
    o : ``Out(stream.Signature(exp_vector_layout(out_bits, n, exp_max)))``
        Hidden activation (with ``exp_max > 0``: fields ``vec`` and its exponent ``k``).
    layer : ``In(range(n_layers))``, only if ``n_layers > 1``
        Layer whose constants the pair is computed with. Set it at (or before) the input
        transfer and hold it until the result is offered on ``o``: it is read from the input
        transfer until ``o.valid`` rises, not while the block is idle or ``o.valid`` is high
        (so it may change in the cycle the result is taken and the next pair is accepted).
    """

    def __init__(self, *, n, in_bits, up_bits, silu_table, silu_offset, mult, shift,
                 out_bits=8, lanes=1, exp_max=0, n_layers=1):
        n, in_bits, up_bits = map(operator.index, (n, in_bits, up_bits))
        exp_max, n_layers = operator.index(exp_max), operator.index(n_layers)
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}")
        offsets = per_layer("silu_offset", silu_offset, n_layers)
        mults = per_layer("mult", mult, n_layers)
        shifts = per_layer("shift", shift, n_layers)
        out_bits, lanes = operator.index(out_bits), operator.index(lanes)
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        if lanes < 1 or n % lanes:
            raise ValueError(f"lanes ({lanes}) must divide n ({n})")
        for name, bits in (("in_bits", in_bits), ("up_bits", up_bits), ("out_bits", out_bits)):
            if bits < 1:
                raise ValueError(f"{name} must be at least 1, not {bits}")
        table = np.asarray(silu_table)
        if n_layers == 1:
            if table.ndim != 1 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
                raise ValueError(f"silu_table must be a non-empty 1-D integer array, not "
                                 f"{table.dtype} of shape {table.shape}")
            tables, where = table[None], [""]
        else:
            if (table.ndim != 2 or table.shape[0] != n_layers or table.size == 0
                    or not np.issubdtype(table.dtype, np.integer)):
                raise ValueError(f"silu_table must be a non-empty integer array of shape "
                                 f"(n_layers, size) with n_layers = {n_layers}, not "
                                 f"{table.dtype} of shape {table.shape}")
            tables, where = table, [f"layer {l}: " for l in range(n_layers)]
        g_lo, g_hi = signed_range(in_bits)
        o_lo, o_hi = signed_range(_OPERAND_BITS)
        windows = []
        for w, tab, off, mul, sh in zip(where, tables, offsets, mults, shifts):
            if off + g_lo < 0:
                raise ValueError(f"{w}silu_offset ({off}) is too small for {in_bits}-bit "
                                 f"gates: the table index reaches {off + g_lo}")
            if off + g_hi >= tab.size:
                raise ValueError(f"{w}silu_table of {tab.size} entries is too small for "
                                 f"{in_bits}-bit gates with offset {off}: the index reaches "
                                 f"{off + g_hi}")
            window = tab[off + g_lo:off + g_hi + 1].astype(np.int64)
            if window.min() < o_lo or window.max() > o_hi:
                raise ValueError(f"{w}silu_table values must fit an {_OPERAND_BITS}-bit signed "
                                 f"multiplier operand [{o_lo}, {o_hi}], not "
                                 f"[{window.min()}, {window.max()}]")
            if not o_lo <= mul <= o_hi:
                raise ValueError(f"{w}mult ({mul}) must fit an {_OPERAND_BITS}-bit signed "
                                 f"multiplier operand [{o_lo}, {o_hi}]")
            if sh < 0:
                raise ValueError(f"{w}shift must be non-negative, not {sh}")
            if not 0 <= exp_max <= min(sh, 7):
                raise ValueError(f"{w}exp_max must lie in 0..min(shift, 7) = "
                                 f"0..{min(sh, 7)}, not {exp_max}")
            prod_max = (int(np.abs(window).max()) * (1 << (up_bits - 1)) * abs(mul)
                        + (1 << sh >> 1))
            if prod_max.bit_length() > _GOLDEN_BITS:
                raise ValueError(f"{w}silu * up * mult needs {prod_max.bit_length() + 1} bits, "
                                 f"more than the golden model's {_GOLDEN_BITS + 1}")
            windows.append(window)

        self._n, self._in_bits, self._up_bits, self._out_bits = n, in_bits, up_bits, out_bits
        self._n_layers = n_layers
        self._silu_tables, self._silu_offsets = tables.astype(np.int64), offsets
        self._windows = np.array(windows)
        self._mults, self._shifts, self._lanes = mults, shifts, lanes
        self._exp_max = exp_max
        members = {
            "gate": In(stream.Signature(vector_layout(in_bits, n))),
            "up": In(stream.Signature(vector_layout(up_bits, n))),
            "o": Out(stream.Signature(exp_vector_layout(out_bits, n, exp_max))),
        }
        if n_layers > 1:
            members["layer"] = In(range(n_layers))
        super().__init__(members)

    n = property(lambda self: self._n)
    in_bits = property(lambda self: self._in_bits)
    up_bits = property(lambda self: self._up_bits)
    out_bits = property(lambda self: self._out_bits)
    n_layers = property(lambda self: self._n_layers)

    @property
    def silu_table(self):
        """SiLU table, ``(size,)``; ``(n_layers, size)`` if ``n_layers > 1``."""
        t = self._silu_tables
        return t[0].copy() if self._n_layers == 1 else t.copy()

    def _per_layer_value(self, values):
        return values[0] if self._n_layers == 1 else tuple(values)

    silu_offset = property(lambda self: self._per_layer_value(self._silu_offsets),
                           doc="Table index of gate 0: an int; a tuple per layer if "
                               "``n_layers > 1``.")
    mult = property(lambda self: self._per_layer_value(self._mults),
                    doc="Requantisation multiplier: an int; a tuple per layer if "
                        "``n_layers > 1``.")
    shift = property(lambda self: self._per_layer_value(self._shifts),
                     doc="Requantisation shift: an int; a tuple per layer if ``n_layers > 1``.")
    lanes = property(lambda self: self._lanes)
    exp_max = property(lambda self: self._exp_max)

    def latency(self):
        """Cycles from the input transfer to the first cycle ``o.valid`` is high:
        ``n / lanes + 4`` (one chunk per cycle, then table read, two multiply stages and the
        rounding stage), ``+ 2`` with ``exp_max > 0`` (the running max/min stage and the
        exponent register)."""
        return self._n // self._lanes + 4 + (2 if self._exp_max else 0)

    def initiation_interval(self):
        """Cycles between input transfers with the inputs always valid and ``o`` always ready
        (the next pair is taken in the cycle the result is)."""
        return self.latency()

    def elaborate(self, platform):
        m = Module()
        n, lanes, in_bits, up_bits = self._n, self._lanes, self._in_bits, self._up_bits
        chunks = n // lanes

        n_layers = self._n_layers
        s_bits = bits_for(int(self._windows.min()), int(self._windows.max()))
        # entry j is the value for gate j - 2**(in_bits-1): the address is the gate with its
        # sign bit flipped (and the layer above it: the layers' windows are stacked)
        m.submodules.silu_mem = silu_mem = memory.Memory(
            shape=signed(s_bits), depth=n_layers << in_bits,
            init=self._windows.reshape(-1).tolist())
        ports = [silu_mem.read_port() for _ in range(lanes)]

        g = Signal(vector_layout(in_bits, n))
        u = Signal(vector_layout(up_bits, n))
        g_low = vector_layout(in_bits, lanes)(g.as_value()[:lanes * in_bits])
        u_low = vector_layout(up_bits, lanes)(u.as_value()[:lanes * up_bits])
        cnt = Signal(range(chunks))
        issue, v1, v2, v3 = Signal(), Signal(), Signal(), Signal()
        uk = Signal(vector_layout(up_bits, lanes))
        p1 = [Signal(signed(s_bits + up_bits)) for _ in range(lanes)]
        p2 = [Signal(signed(s_bits + up_bits + _OPERAND_BITS)) for _ in range(lanes)]

        layer = () if n_layers == 1 else (self.layer,)
        for k, port in enumerate(ports):
            gk = g_low[k]
            m.d.comb += [port.addr.eq(Cat(gk[:-1], ~gk[-1], *layer)), port.en.eq(issue)]
        # the layer's multiplier, registered at the input transfer (off the multiplier's path)
        mult = self._mults[0]
        if len(set(self._mults)) > 1:
            mult = Signal(signed(_OPERAND_BITS), name="mult")
            mult_sel = layer_select(m, self.layer, self._mults, "mult_sel")
        m.d.sync += [v1.eq(issue), v2.eq(v1), v3.eq(v2)]
        with m.If(issue):
            m.d.sync += [uk.eq(u_low),
                         g.eq(g.as_value() >> (lanes * in_bits)),
                         u.eq(u.as_value() >> (lanes * up_bits))]
        with m.If(v1):
            m.d.sync += [p1[k].eq(ports[k].data * uk[k]) for k in range(lanes)]
        with m.If(v2):
            m.d.sync += [p2[k].eq(p1[k] * mult) for k in range(lanes)]
        E, ob = self._exp_max, self._out_bits

        def requant(v, e, bits):
            """``sat(rshift_round(v, shift - e), bits)`` with the layer's shift: one rounding
            per distinct shift, the layer picking among them."""
            distinct = sorted(set(self._shifts))
            out = saturate(rshift_round(v, distinct[0] - e), bits)
            for sh in distinct[1:]:
                hit = Cat(self.layer == l for l, s in enumerate(self._shifts) if s == sh).any()
                out = Mux(hit, saturate(rshift_round(v, sh - e), bits), out)
            return out

        if E == 0:
            with m.If(v3):
                y = Cat(requant(p2[k], 0, ob) for k in range(lanes))
                o_bits = self.o.payload.as_value()
                m.d.sync += o_bits.eq(Cat(o_bits[lanes * ob:], y))
        else:
            # wide values (E more fraction bits) shift into a register, element 0 ending low
            wb = ob + E
            wide = Signal(n * wb)
            with m.If(v3):
                y = Cat(requant(p2[k], E, wb) for k in range(lanes))
                m.d.sync += wide.eq(Cat(wide[lanes * wb:], y))
            # running max and min over the vector, one stage behind (the chunk just written
            # is the top of the register)
            v4 = Signal()
            m.d.sync += v4.eq(v3)
            w_lo, w_hi = signed_range(wb)
            hi, lo = Signal(signed(wb), init=w_lo), Signal(signed(wb), init=w_hi)
            fresh = [wide[(n - lanes + k) * wb:(n - lanes + k + 1) * wb].as_signed()
                     for k in range(lanes)]

            def tree(vals, pick):
                vals = list(vals)
                while len(vals) > 1:
                    vals = [pick(vals[i], vals[i + 1]) if i + 1 < len(vals) else vals[i]
                            for i in range(0, len(vals), 2)]
                return vals[0]

            with m.If(v4):
                m.d.sync += [hi.eq(tree([hi, *fresh], lambda a, b: Mux(a > b, a, b))),
                             lo.eq(tree([lo, *fresh], lambda a, b: Mux(a < b, a, b)))]
            # the exponent: the smallest k whose rounded extremes fit +-(2**(ob-1) - 1)
            top = (1 << (ob - 1)) - 1
            k_next = E
            for kk in reversed(range(E)):
                fits = (rshift_round(hi, kk) <= top) & (rshift_round(lo, kk) >= -top)
                k_next = Mux(fits, kk, k_next)
            k_reg = Signal(range(E + 1))
            elems = []
            for j in range(n):
                wj = wide[j * wb:(j + 1) * wb].as_signed()
                out = saturate(rshift_round(wj, E), ob)
                for kk in reversed(range(E)):
                    out = Mux(k_reg == kk, saturate(rshift_round(wj, kk), ob), out)
                elems.append(out)
            m.d.comb += [self.o.payload.vec.as_value().eq(Cat(*elems)),
                         self.o.payload.k.eq(k_reg)]

        both = self.gate.valid & self.up.valid
        take = Signal()
        m.d.comb += [self.gate.ready.eq(take), self.up.ready.eq(take)]
        with m.If(take):
            m.d.sync += [g.eq(self.gate.payload), u.eq(self.up.payload), cnt.eq(0)]
            if not isinstance(mult, int):
                m.d.sync += mult.eq(mult_sel)
            if E:
                m.d.sync += [hi.eq(w_lo), lo.eq(w_hi)]

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += take.eq(both)
                with m.If(both):
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += issue.eq(1)
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == chunks - 1):
                    m.next = "DRAIN"
            if E == 0:
                with m.State("DRAIN"):
                    with m.If(v3 & ~v2):        # the last chunk is being written
                        m.next = "OUT"
            else:
                with m.State("DRAIN"):
                    with m.If(v4 & ~v3):        # the last chunk enters the max and min
                        m.next = "EXP"
                with m.State("EXP"):
                    m.d.sync += k_reg.eq(k_next)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.o.valid.eq(1), take.eq(both & self.o.ready)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
                    with m.If(both):
                        m.next = "RUN"
        return m
