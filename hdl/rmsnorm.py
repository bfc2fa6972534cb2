"""RMSNorm of a residual vector with a table rsqrt (``numerics.rmsnorm``/``rsqrt_lookup``)."""

import operator

import numpy as np
from amaranth.hdl import Cat, Const, Module, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import bits_for, layer_select, per_layer, saturate, vector_layout

__all__ = ["RMSNorm"]

# The golden model computes in numpy int64: every intermediate must stay below 2**63.
_GOLDEN_BITS = 63
# Multiplier operands are at most 18 bits on one side (one ECP5 MULT18X18D).
_OPERAND_BITS = 18


def _int_vector(name, value, length=None):
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-D integer array, not {arr.dtype} "
                         f"of shape {arr.shape}")
    if length is not None and arr.size != length:
        raise ValueError(f"{name} has {arr.size} entries, expected {length}")
    return arr.astype(np.int64)


class RMSNorm(wiring.Component):
    """RMSNorm of one residual vector, quantised to ``out_bits``.

    ``ss = sum(x*x) + eps``; ``(r, s2) = rsqrt_lookup(ss)`` (``s`` is the even shift that
    brings ``ss`` below ``2**rsqrt_bits``, ``r = rsqrt_table[ss >> s]``, ``s2 = s/2``);
    ``o_i = sat(rshift_round(x_i * gain_i * r, rsqrt_frac + gain_shift + s2), out_bits)``.

    The input vector is held in a register that rotates by ``lanes`` elements per cycle and is
    read twice. Pass 1 squares ``lanes`` elements per cycle into the accumulator. A leading-one
    detector turns the sum into the shift ``s``; the table is read (synchronous ``Memory``
    port) at ``ss >> s``. Pass 2 multiplies ``lanes`` elements per cycle by their gain (a
    ``Memory`` of ``dim / lanes`` rows) and by ``r``, adds the rounding constant (its own
    stage), shifts, saturates and shifts the results into the output register. One vector
    is in flight at a time; the next one is accepted in
    the cycle the result is taken.

    With ``n_layers = L > 1`` the block holds the constants of ``L`` layers (a layer-serial
    decoder passes the residual through it once per layer) and the ``layer`` input selects
    them: ``gain`` is ``(L, dim)``, ``gain_shift`` and ``eps`` are sequences of ``L`` ints
    (``rsqrt_table`` and ``rsqrt_frac`` are shared). The gain ``Memory`` is the layers'
    gains stacked along its depth (``L * dim / lanes`` rows, the layer in the high address
    bits); ``eps`` and ``gain_shift`` are selected by ``layer`` (plain constants when every
    layer has the same value). The result for ``layer = l`` is bit for bit that of a
    one-layer block built with layer ``l``'s constants, in the same cycles.

    Parameters
    ----------
    dim : int
        Elements per vector.
    in_bits : int
        Width of the residual input elements.
    gain : array of int, shape ``(dim,)``, or ``(n_layers, dim)`` if ``n_layers > 1``
        Integer gain (folds the float gain, ``sqrt(dim)`` and the output scale).
    gain_shift : int, or sequence of ``n_layers`` ints if ``n_layers > 1``
        Extra right shift of the gain; ``rsqrt_frac + gain_shift`` must not be negative.
    eps : int, or sequence of ``n_layers`` ints if ``n_layers > 1``
        Added to the sum of squares (at least 1, so the rsqrt argument is positive).
    rsqrt_table : array of int
        ``2**rsqrt_bits`` non-negative entries ``round(2**rsqrt_frac / sqrt(i))`` (shared by
        all layers).
    rsqrt_frac : int
        Fractional bits of the table entries.
    out_bits : int
        Width of the output elements.
    lanes : int
        Elements processed per cycle; must divide ``dim``.
    n_layers : int
        Number of layers whose constants the block holds (``L``); 1 gives the plain block
        with no ``layer`` port.

    Members
    -------
    i : ``In(stream.Signature(vector_layout(in_bits, dim)))``
        Residual vector.
    o : ``Out(stream.Signature(vector_layout(out_bits, dim)))``
        Normalised vector.
    layer : ``In(range(n_layers))``, only if ``n_layers > 1``
        Layer whose constants the vector is normalised with. Set it at (or before) the input
        transfer and hold it until the result is offered on ``o``: it is read from the input
        transfer until ``o.valid`` rises, not while the block is idle or ``o.valid`` is high
        (so it may change in the cycle the result is taken and the next vector is accepted).
    """

    def __init__(self, *, dim, in_bits, gain, gain_shift, eps, rsqrt_table, rsqrt_frac,
                 out_bits=8, lanes=1, n_layers=1):
        dim, in_bits, out_bits, lanes = map(operator.index, (dim, in_bits, out_bits, lanes))
        n_layers, rsqrt_frac = operator.index(n_layers), operator.index(rsqrt_frac)
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}")
        gain_shifts = per_layer("gain_shift", gain_shift, n_layers)
        epss = per_layer("eps", eps, n_layers)
        if dim < 1:
            raise ValueError(f"dim must be at least 1, not {dim}")
        if lanes < 1 or dim % lanes:
            raise ValueError(f"lanes ({lanes}) must divide dim ({dim})")
        if in_bits < 1 or out_bits < 1:
            raise ValueError(f"in_bits ({in_bits}) and out_bits ({out_bits}) must be positive")
        if n_layers == 1:
            gains = _int_vector("gain", gain, dim)[None]
            where = [""]
        else:
            gains = np.asarray(gain)
            if gains.shape != (n_layers, dim) or not np.issubdtype(gains.dtype, np.integer):
                raise ValueError(f"gain must be an integer array of shape (n_layers, dim) = "
                                 f"({n_layers}, {dim}), not {gains.dtype} of shape "
                                 f"{gains.shape}")
            gains = gains.astype(np.int64)
            where = [f"layer {l}: " for l in range(n_layers)]
        g_lo, g_hi = -(1 << (_OPERAND_BITS - 1)), (1 << (_OPERAND_BITS - 1)) - 1
        for w, g in zip(where, gains):
            if g.min() < g_lo or g.max() > g_hi:
                raise ValueError(f"{w}gain values must fit an {_OPERAND_BITS}-bit signed "
                                 f"multiplier operand [{g_lo}, {g_hi}], not "
                                 f"[{g.min()}, {g.max()}]")
        table = _int_vector("rsqrt_table", rsqrt_table)
        rsqrt_bits = table.size.bit_length() - 1
        if table.size != 1 << rsqrt_bits or rsqrt_bits < 2:
            raise ValueError(f"rsqrt_table of {table.size} entries: the index is a bit field, "
                             f"so it needs 2**rsqrt_bits entries with rsqrt_bits >= 2")
        if table.min() < 0:
            raise ValueError(f"rsqrt_table entries must be non-negative, not {table.min()}")
        for w, e in zip(where, epss):
            if e < 1:
                raise ValueError(f"{w}eps ({e}) must be at least 1: the sum of squares of a "
                                 "zero vector must stay positive")
        if rsqrt_frac < 0:
            raise ValueError(f"rsqrt_frac must be non-negative, not {rsqrt_frac}")
        for w, gs in zip(where, gain_shifts):
            if rsqrt_frac + gs < 0:
                raise ValueError(f"{w}rsqrt_frac + gain_shift ({rsqrt_frac} + {gs}) must be "
                                 "non-negative: the output shift cannot be a left shift")
        ss_max = dim << (2 * in_bits - 2)
        ss_bits = 0
        for w, e in zip(where, epss):
            bits = (ss_max + e).bit_length()
            if bits > _GOLDEN_BITS:
                raise ValueError(f"{w}sum of squares of {dim} {in_bits}-bit elements plus eps "
                                 f"needs {bits} bits, more than the golden model's "
                                 f"{_GOLDEN_BITS}")
            ss_bits = max(ss_bits, bits)
        for w, g in zip(where, gains):
            prod_max = (1 << (in_bits - 1)) * int(np.abs(g).max()) * int(table.max())
            if prod_max.bit_length() > _GOLDEN_BITS:
                raise ValueError(f"{w}x * gain * rsqrt needs {prod_max.bit_length() + 1} "
                                 f"bits, more than the golden model's {_GOLDEN_BITS + 1}")

        self._dim, self._in_bits, self._out_bits, self._lanes = dim, in_bits, out_bits, lanes
        self._n_layers = n_layers
        self._gains, self._gain_shifts, self._epss = gains, gain_shifts, epss
        self._rsqrt_table, self._rsqrt_frac, self._rsqrt_bits = table, rsqrt_frac, rsqrt_bits
        self._ss_bits = ss_bits
        members = {
            "i": In(stream.Signature(vector_layout(in_bits, dim))),
            "o": Out(stream.Signature(vector_layout(out_bits, dim))),
        }
        if n_layers > 1:
            members["layer"] = In(range(n_layers))
        super().__init__(members)

    dim = property(lambda self: self._dim)
    in_bits = property(lambda self: self._in_bits)
    out_bits = property(lambda self: self._out_bits)
    lanes = property(lambda self: self._lanes)
    n_layers = property(lambda self: self._n_layers)

    @property
    def gain(self):
        """Integer gain, ``(dim,)``; ``(n_layers, dim)`` (one row per layer) if
        ``n_layers > 1``."""
        return self._gains[0].copy() if self._n_layers == 1 else self._gains.copy()

    @property
    def gain_shift(self):
        """Gain shift: an int; a tuple of ``n_layers`` ints if ``n_layers > 1``."""
        return self._gain_shifts[0] if self._n_layers == 1 else tuple(self._gain_shifts)

    @property
    def eps(self):
        """``eps``: an int; a tuple of ``n_layers`` ints if ``n_layers > 1``."""
        return self._epss[0] if self._n_layers == 1 else tuple(self._epss)

    rsqrt_table = property(lambda self: self._rsqrt_table.copy())
    rsqrt_frac = property(lambda self: self._rsqrt_frac)
    rsqrt_bits = property(lambda self: self._rsqrt_bits)

    def latency(self):
        """Cycles from the input transfer to the first cycle ``o.valid`` is high:
        ``2 * dim / lanes + 9`` (pass 1, accumulate, leading one, table read, pass 2, five
        pipeline stages)."""
        return 2 * (self._dim // self._lanes) + 9

    def initiation_interval(self):
        """Cycles between input transfers with the input always valid and ``o`` always ready
        (the next vector is taken in the cycle the result is)."""
        return self.latency()

    def _shifts(self):
        """Even shift ``s`` for each possible leading-one position of the sum of squares."""
        out = []
        for b in range(self._ss_bits):
            s = max(0, b + 1 - self._rsqrt_bits)
            out.append(s + (s & 1))
        return out

    def elaborate(self, platform):
        m = Module()
        dim, lanes, in_bits = self._dim, self._lanes, self._in_bits
        chunks = dim // lanes
        in_chunk = vector_layout(in_bits, lanes)

        n_layers = self._n_layers
        g_bits = bits_for(int(self._gains.min()), int(self._gains.max()))
        # the layers' gains stacked along the depth, the layer in the high address bits
        m.submodules.gain_mem = gain_mem = memory.Memory(
            shape=vector_layout(g_bits, lanes), depth=n_layers * chunks,
            init=self._gains.reshape(n_layers * chunks, lanes).tolist())
        r_bits = max(1, int(self._rsqrt_table.max()).bit_length())
        m.submodules.rsqrt_mem = rsqrt_mem = memory.Memory(
            shape=unsigned(r_bits), depth=self._rsqrt_table.size,
            init=self._rsqrt_table.tolist())
        gain_rd = gain_mem.read_port()
        rsqrt_rd = rsqrt_mem.read_port()

        x = Signal(vector_layout(in_bits, dim))
        x_bits = x.as_value()
        x_low = in_chunk(x_bits[:lanes * in_bits])
        rotate = x_bits.rotate_right(lanes * in_bits)

        # pass 1: squares of one chunk, then the accumulator (starts at eps)
        sq_bits = (lanes << (2 * in_bits - 2)).bit_length()
        sq, sq_valid = Signal(sq_bits), Signal()
        acc = Signal(self._ss_bits)
        m.d.sync += sq_valid.eq(0)
        with m.If(sq_valid):
            m.d.sync += acc.eq(acc + sq)

        # leading one -> even shift s (and s/2)
        shifts = self._shifts()
        s_comb = Signal(range(max(shifts) + 1))
        for b, s in enumerate(shifts):
            with m.If(acc[b]):
                m.d.comb += s_comb.eq(s)
        s_even = Signal.like(s_comb)
        bases = [self._rsqrt_frac + gs for gs in self._gain_shifts]
        max_shift = max(bases) + max(shifts) // 2
        out_shift = Signal(range(max_shift + 1))
        # the rounding constant (1 << out_shift) >> 1, registered with out_shift at its own
        # width: rshift_round_var would add a 64-bit constant to the products, which a
        # cycle-based simulator then evaluates as multi-word arithmetic every cycle
        out_half = Signal(unsigned(max(1, max_shift)))
        m.d.comb += rsqrt_rd.addr.eq((acc >> s_even)[:self._rsqrt_bits])

        # pass 2: x * gain (stage 1), * r (stage 2), + the rounding constant (stage 3),
        # variable shift (stage 4), saturate into o (stage 5): the rounding add, the shift
        # and the saturation are registered apart (Fmax: the add's carry chain and the
        # shifter in one cycle, then the shifter and the saturation, were the chip's
        # critical path)
        cnt = Signal(range(chunks))
        issue, v1, v2, v3, v4, v5 = (Signal() for _ in range(6))
        xk = Signal(in_chunk)
        p1 = [Signal(signed(in_bits + g_bits)) for _ in range(lanes)]
        p2 = [Signal(signed(in_bits + g_bits + r_bits + 1)) for _ in range(lanes)]
        p3_bits = max(in_bits + g_bits + r_bits + 1, len(out_half) + 1) + 1    # no overflow
        p3 = [Signal(signed(p3_bits)) for _ in range(lanes)]
        if n_layers == 1:
            m.d.comb += gain_rd.addr.eq(cnt)
            base, eps = bases[0], self._epss[0]
        else:
            if chunks & (chunks - 1) == 0:
                m.d.comb += gain_rd.addr.eq(Cat(cnt, self.layer))
            else:
                m.d.comb += gain_rd.addr.eq(self.layer * chunks + cnt)
            base = layer_select(m, self.layer, bases, "base")
            eps = layer_select(m, self.layer, self._epss, "eps")
        m.d.comb += gain_rd.en.eq(issue)
        m.d.sync += [v1.eq(issue), v2.eq(v1), v3.eq(v2), v4.eq(v3), v5.eq(v4)]
        with m.If(issue):
            m.d.sync += [xk.eq(x_low), x.eq(rotate)]
        with m.If(v1):
            m.d.sync += [p1[k].eq(xk[k] * gain_rd.data[k]) for k in range(lanes)]
        with m.If(v2):
            m.d.sync += [p2[k].eq(p1[k] * rsqrt_rd.data) for k in range(lanes)]
        with m.If(v3):
            m.d.sync += [p3[k].eq(p2[k] + out_half) for k in range(lanes)]
        # out_shift >= base, so the shifted value fits p3_bits - base bits
        p4 = [Signal(signed(max(2, p3_bits - min(bases)))) for _ in range(lanes)]
        with m.If(v4):
            m.d.sync += [p4[k].eq(p3[k] >> out_shift) for k in range(lanes)]
        with m.If(v5):
            y = Cat(saturate(p4[k], self._out_bits) for k in range(lanes))
            o_bits = self.o.payload.as_value()
            m.d.sync += o_bits.eq(Cat(o_bits[lanes * self._out_bits:], y))

        accept = self.i.valid & self.i.ready
        with m.If(accept):
            m.d.sync += [x.eq(self.i.payload), acc.eq(eps), cnt.eq(0)]

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.next = "SUM"
            with m.State("SUM"):
                m.d.sync += [sq.eq(sum(x_low[k] * x_low[k] for k in range(lanes))),
                             sq_valid.eq(1), x.eq(rotate), cnt.eq(cnt + 1)]
                with m.If(cnt == chunks - 1):
                    m.d.sync += cnt.eq(0)
                    m.next = "ACC"
            with m.State("ACC"):        # the last square is being accumulated
                m.next = "LOD"
            with m.State("LOD"):
                m.d.sync += s_even.eq(s_comb)
                m.next = "INDEX"
            with m.State("INDEX"):
                m.d.comb += rsqrt_rd.en.eq(1)
                shift = base + (s_even >> 1)
                m.d.sync += [out_shift.eq(shift),
                             out_half.eq(((Const(1, 1) << shift) >> 1)[:len(out_half)])]
                m.next = "SCALE"
            with m.State("SCALE"):
                m.d.comb += issue.eq(1)
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == chunks - 1):
                    m.d.sync += cnt.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(v5 & ~v4):    # the last chunk is being written
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.o.valid.eq(1), self.i.ready.eq(self.o.ready)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
                    with m.If(self.i.valid):
                        m.next = "SUM"
        return m
