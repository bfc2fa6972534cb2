"""Causal multi-head attention of one layer (or of ``n_layers`` layers, one at a time) over
its own KV cache (``numerics.attention_head``)."""

import operator

import numpy as np
from amaranth.hdl import Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import bits_for, pos_shape, rshift_round, saturate, tree_sum, vector_layout
from .kvcache import KVCache

__all__ = ["Attention"]

#: Widest multiplier operand of the target (ECP5 ``MULT18X18D``, signed).
_MUL_BITS = 18


def _int_table(name, table):
    table = np.asarray(table)
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, not {table.dtype} of shape "
                         f"{table.shape}")
    table = table.astype(np.int64)
    if table.size and table.min() < 0:
        raise ValueError(f"{name} entries must be non-negative, not {int(table.min())}")
    if table.size and int(table.max()).bit_length() + 1 > _MUL_BITS:
        raise ValueError(f"{name} entries up to {int(table.max())} need "
                         f"{int(table.max()).bit_length() + 1} bits as a signed multiplier "
                         f"operand; the multipliers take at most {_MUL_BITS}")
    return table


def _exp_clamp(exp_mult, exp_shift, exp_len):
    """Smallest score gap ``d`` with ``rshift_round(d * exp_mult, exp_shift) >= exp_len - 1``.

    Every larger gap indexes the last table entry too, so gaps are clamped to it before the
    multiplication: the same index, and a narrow multiplier operand.
    """
    if exp_mult == 0:
        return 0
    half = (1 << (exp_shift - 1)) if exp_shift else 0
    need = ((exp_len - 1) << exp_shift) - half      # d * exp_mult >= need
    return max(0, -(-need // exp_mult))


def _per_layer(name, value, n_layers):
    """``value``: a sequence of ``n_layers`` ints (a per-layer scalar of a banked block)."""
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of n_layers ({n_layers}) ints, not "
                         f"{value!r}") from None
    if len(values) != n_layers:
        raise ValueError(f"{name} has {len(values)} entries, not n_layers ({n_layers})")
    out = []
    for layer, v in enumerate(values):
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"layer {layer}: {name} must be an int, not {v!r}") from None
    return tuple(out)


class Attention(wiring.Component):
    """One layer's attention: store ``k``/``v`` at ``pos``, then every head over ``0..pos``.

    For query head ``h`` (kv head ``h // (n_heads // n_kv_heads)``), over the cached rows
    ``t = 0..pos``: ``s_t = q_h . k_t``, ``e_t = exp_table[min(rshift_round((max_t s_t - s_t)
    * exp_mult, exp_shift), exp_len - 1)]``, ``Z = sum e_t``, ``acc_d = sum e_t v_td`` and
    ``out_hd = sat(rshift_round(acc_d * recip_table[m - 2**(recip_bits-1)], recip_frac + n -
    recip_bits + out_shift), out_bits)`` where ``m`` is ``Z``'s leading ``recip_bits`` bits
    and ``n`` its bit length.

    Schedule: ``head_lanes`` heads are computed side by side (one dot product of
    ``head_size`` products and one ``e_t * v_t`` row update per lane per cycle); the
    ``n_heads // head_lanes`` head groups take turns. For each group the cache is swept twice,
    one row per cycle: pass 1 finds the maximum score, pass 2 recomputes the scores, looks up
    ``e_t`` and accumulates ``Z`` and ``acc``. A row's pass-2 pipeline is registered at every
    stage: the row read, the ``head_size`` products ``q_hd * k_td`` (the multipliers apart
    from the adder tree), the score, the clamped gap ``max - s_t``, its product by
    ``exp_mult``, the exp-table index (the ROM address), the ROM read, its data registered
    (before the ``e_t * v_t`` products), the accumulators. The sweeps of successive groups follow back to back; each group's
    reciprocal and output scaling (six pipelined cycles: leading-one detection and ROM read,
    the registered ROM data, the products, the rounding add, the shift, the saturation)
    overlap the next group's sweep. Score gaps are clamped before the ``exp_mult`` product at
    the first gap that reaches the last table entry (the index is unchanged, the multiplier
    operand stays narrow).

    Simulation speed: every pipeline register loads only behind its stage's valid bit, so a
    Verilated chip evaluates a stage's logic only on the cycles it is used (the unit is idle
    for most of a token); the accumulators and output products are one signal per element
    (at most 64 bits each) instead of packed vectors, and the rounding constant is only as
    wide as the largest output shift (no 66-bit arithmetic).

    An input with ``pos >= n_pos`` (context full) is consumed without output, leaves the cache
    unchanged and sets the sticky ``error``.

    Banked (``n_layers = L > 1``): the unit computes the attention of any of ``L`` layers, the
    one on the ``layer`` port. ``exp_mult`` and ``exp_shift`` are per layer (sequences of
    ``L`` ints), the exp and reciprocal tables are shared. The KV cache holds ``L * n_pos``
    rows, the layer in the high address bits: an input at ``pos`` of layer ``l`` writes row
    ``(l, pos)`` and attends over rows ``(l, 0..pos)``, so every layer has its own context.
    The gap clamp is the largest of the layers' clamps (exact for every layer: beyond its own
    clamp a layer's gaps all index the last table entry, and the index only grows with the
    gap); the ``exp_mult`` product is a multiplier by the layer's constant (selected from
    ``layer``), and the exp-table index the layer's rounding shift of it (a choice of ``L``
    constant shifts): the same pipeline stages and cycles as ``L = 1``.

    Parameters
    ----------
    n_heads, n_kv_heads : int
        Query and key/value heads; ``n_kv_heads`` divides ``n_heads`` (grouped-query).
    head_size : int
        Elements per head.
    n_pos : int
        Context length (rows of the KV cache).
    exp_table : numpy integer array
        Softmax weights ``round(2**exp_frac * exp(-i * step))``, at least ``exp_len`` entries.
    exp_mult, exp_shift : int, or sequence of ``n_layers`` ints
        Score gap to exp-table index scale (``QLayer.exp_mult``/``exp_shift``): one int, or
        with ``n_layers > 1`` one per layer (the properties return tuples then).
    recip_table : numpy integer array
        ``2**(recip_bits-1)`` reciprocals of the mantissa of ``Z``.
    recip_bits, recip_frac : int
        Mantissa width and fraction bits of ``recip_table``.
    exp_len : int
        Entries of ``exp_table`` in use (the index saturates at ``exp_len - 1``).
    bits : int
        Element width of q, k and v (the KV cache rows).
    out_bits : int
        Element width of the output (default ``bits``).
    out_shift : int
        Extra right shift of the output (``qkv_bits - act_bits`` narrows the values' scale).
    head_lanes : int
        Heads computed in parallel; divides ``n_heads``.
    n_layers : int
        Layers the unit computes (default 1: today's single-layer unit, no ``layer`` port).

    Members
    -------
    i : ``In(stream.Signature(StructLayout({"pos": ..., "q": ..., "k": ..., "v": ...})))``
        ``pos`` of ``pos_shape(n_pos)`` (holds ``0..n_pos``); the rotated query ``q`` of
        ``vector_layout(bits, dim)``, the rotated key ``k`` and the value ``v`` of
        ``vector_layout(bits, kv_dim)`` (``dim = n_heads * head_size``, ``kv_dim =
        n_kv_heads * head_size``).
    o : ``Out(stream.Signature(vector_layout(out_bits, dim)))``
        Heads' outputs, concatenated (head 0 in the LSBs).
    error : ``Out(1)``
        Sticky: an input had ``pos >= n_pos``.
    layer : ``In(range(n_layers))``
        Only when ``n_layers > 1``: the layer of the input, set at (or before) the input
        transfer and held until its output transfer; it selects the layer's constants and
        its rows of the KV cache.
    """

    def __init__(self, *, n_heads, n_kv_heads, head_size, n_pos, exp_table, exp_mult, exp_shift,
                 recip_table, recip_bits, recip_frac, exp_len, bits=8, out_bits=None,
                 out_shift=0, head_lanes=1, n_layers=1):
        out_bits = bits if out_bits is None else out_bits
        n_layers = operator.index(n_layers)
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}")
        if n_layers == 1:
            mults, shifts = (operator.index(exp_mult),), (operator.index(exp_shift),)
        else:
            mults = _per_layer("exp_mult", exp_mult, n_layers)
            shifts = _per_layer("exp_shift", exp_shift, n_layers)
        (n_heads, n_kv_heads, head_size, n_pos, recip_bits, recip_frac,
         exp_len, bits, out_bits, out_shift, head_lanes) = map(operator.index, (
            n_heads, n_kv_heads, head_size, n_pos, recip_bits,
            recip_frac, exp_len, bits, out_bits, out_shift, head_lanes))
        for name, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads),
                            ("head_size", head_size), ("n_pos", n_pos), ("exp_len", exp_len),
                            ("recip_bits", recip_bits)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads "
                             f"({n_kv_heads})")
        if head_lanes < 1 or n_heads % head_lanes:
            raise ValueError(f"head_lanes ({head_lanes}) must divide n_heads ({n_heads})")
        if bits < 2 or out_bits < 2:
            raise ValueError(f"bits ({bits}) and out_bits ({out_bits}) must be at least 2 for "
                             "signed elements")
        def where(layer):
            return "" if n_layers == 1 else f"layer {layer}: "
        for layer, value in enumerate(shifts):
            if value < 0:
                raise ValueError(f"{where(layer)}exp_shift must be non-negative, not {value}")
        for name, value in (("recip_frac", recip_frac), ("out_shift", out_shift)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, not {value}")
        for layer, value in enumerate(mults):
            if not 0 <= value < 1 << (_MUL_BITS - 1):
                raise ValueError(f"{where(layer)}exp_mult ({value}) must lie in "
                                 f"[0, 2**{_MUL_BITS - 1}) to be a multiplier operand")
        exp_table = _int_table("exp_table", exp_table)
        if exp_table.size < exp_len:
            raise ValueError(f"exp_table has {exp_table.size} entries, fewer than exp_len "
                             f"({exp_len})")
        exp_table = exp_table[:exp_len]
        recip_table = _int_table("recip_table", recip_table)
        if recip_table.size != 1 << (recip_bits - 1):
            raise ValueError(f"recip_table has {recip_table.size} entries; recip_bits "
                             f"({recip_bits}) needs 2**{recip_bits - 1} = "
                             f"{1 << (recip_bits - 1)}")
        if exp_table[0] < 1 << (recip_bits - 1):
            raise ValueError(f"exp_table[0] ({int(exp_table[0])}) is below 2**{recip_bits - 1}:"
                             f" the softmax sum would have fewer than recip_bits ({recip_bits}) "
                             "mantissa bits")
        # |acc * recip| <= n_pos * max(exp) * 2**(bits-1) * max(recip): the product's width
        z_max = n_pos * int(exp_table.max())
        need = (z_max * int(recip_table.max()) << (bits - 1)).bit_length() + 1
        if need > 64:
            raise ValueError(f"acc * recip needs {need} bits, more than the golden model's 64")
        self._n_heads, self._n_kv_heads, self._head_size, self._n_pos = \
            n_heads, n_kv_heads, head_size, n_pos
        self._n_layers, self._mults, self._shifts = n_layers, mults, shifts
        self._exp_table, self._exp_len = exp_table, exp_len
        self._recip_table, self._recip_bits, self._recip_frac = \
            recip_table, recip_bits, recip_frac
        self._bits, self._out_bits, self._out_shift = bits, out_bits, out_shift
        self._head_lanes = head_lanes
        members = {
            "i": In(stream.Signature(data.StructLayout({
                "pos": pos_shape(n_pos),
                "q": vector_layout(bits, self.dim),
                "k": vector_layout(bits, self.kv_dim),
                "v": vector_layout(bits, self.kv_dim),
            }))),
            "o": Out(stream.Signature(vector_layout(out_bits, self.dim))),
            "error": Out(1),
        }
        if n_layers > 1:
            members["layer"] = In(range(n_layers))
        super().__init__(members)

    n_heads = property(lambda self: self._n_heads)
    n_kv_heads = property(lambda self: self._n_kv_heads)
    head_size = property(lambda self: self._head_size)
    n_pos = property(lambda self: self._n_pos)
    n_layers = property(lambda self: self._n_layers)
    exp_len = property(lambda self: self._exp_len)
    recip_bits = property(lambda self: self._recip_bits)
    recip_frac = property(lambda self: self._recip_frac)
    bits = property(lambda self: self._bits)
    out_bits = property(lambda self: self._out_bits)
    out_shift = property(lambda self: self._out_shift)
    head_lanes = property(lambda self: self._head_lanes)

    @property
    def exp_mult(self):
        """``exp_mult`` (an int; with ``n_layers > 1`` a tuple, one per layer)."""
        return self._mults[0] if self._n_layers == 1 else self._mults

    @property
    def exp_shift(self):
        """``exp_shift`` (an int; with ``n_layers > 1`` a tuple, one per layer)."""
        return self._shifts[0] if self._n_layers == 1 else self._shifts

    @property
    def exp_table(self):
        return self._exp_table.copy()

    @property
    def recip_table(self):
        return self._recip_table.copy()

    @property
    def dim(self):
        return self._n_heads * self._head_size

    @property
    def kv_dim(self):
        return self._n_kv_heads * self._head_size

    @property
    def head_groups(self):
        """Turns of the ``head_lanes`` lanes: ``n_heads // head_lanes``."""
        return self._n_heads // self._head_lanes

    def latency(self, pos):
        """Cycles from the input transfer at ``pos`` to the first cycle ``o.valid`` is high
        (``o`` ready: the cycles to the output transfer): the input register and the cache
        write (2), two sweeps of ``pos + 1`` rows per head group, then fourteen registers
        (row read, ``q * k`` products, score, clamped gap, its ``exp_mult`` product, exp-table
        index, exp ROM read, its data, accumulator, reciprocal ROM read, its data, product,
        rounding add, shift) and the output."""
        if not 0 <= pos < self._n_pos:
            raise ValueError(f"pos ({pos}) must lie in [0, n_pos = {self._n_pos})")
        return 2 * self.head_groups * (pos + 1) + 16

    def initiation_interval(self, pos):
        """Cycles from the input transfer at ``pos`` to the next input transfer, with ``i``
        always valid and ``o`` always ready (the next input is taken with the output)."""
        return self.latency(pos)

    # widths of the datapath (exact bounds)
    def _ranges(self):
        b, hs = self._bits, self._head_size
        lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
        s_lo, s_hi = hs * lo * hi, hs * lo * lo
        e_max = int(self._exp_table.max())
        z_max = self._n_pos * e_max
        return dict(score=signed(bits_for(s_lo, s_hi)), gap_max=s_hi - s_lo,
                    e=unsigned(max(1, e_max.bit_length())), z=unsigned(z_max.bit_length()),
                    acc=signed(bits_for(z_max * lo, z_max * hi)))

    def elaborate(self, platform):
        m = Module()
        b, hs, H, G = self._bits, self._head_size, self._head_lanes, self.head_groups
        group_size = self._n_heads // self._n_kv_heads
        rb = self._recip_bits
        r = self._ranges()
        head_vec = vector_layout(b, hs)

        n_layers = self._n_layers
        m.submodules.cache = cache = KVCache(n_pos=self._n_pos, kv_dim=self.kv_dim, bits=b,
                                             n_layers=n_layers)
        if n_layers > 1:
            m.d.comb += cache.layer.eq(self.layer)
        kv_w = stream.Signature(cache.w.payload.shape()).create()
        kv_r = cache.read.signature.flip().create()
        wiring.connect(m, kv_w, cache.w)
        wiring.connect(m, kv_r, cache.read)

        m.submodules.exp_rom = exp_rom = memory.Memory(
            shape=r["e"], depth=self._exp_len, init=[int(x) for x in self._exp_table])
        m.submodules.recip_rom = recip_rom = memory.Memory(
            shape=unsigned(max(1, int(self._recip_table.max()).bit_length())),
            depth=self._recip_table.size, init=[int(x) for x in self._recip_table])

        err = Signal()
        m.d.comb += self.error.eq(err | cache.error)

        # -- the request --------------------------------------------------------------------
        # pos, k and v held in the cache write's own layout (the write payload is this
        # register as it is, no repacking every cycle)
        kv_req = Signal(kv_w.payload.shape())
        pos = kv_req.pos
        q = Signal(vector_layout(b, self.dim))
        m.d.comb += kv_w.payload.eq(kv_req)

        # -- sweep: row t of pass p for head group g -----------------------------------------
        t = Signal(range(self._n_pos))
        second = Signal()                           # pass 2
        g = Signal(range(G))
        issue = Signal()
        m.d.comb += [kv_r.addr.eq(t), kv_r.en.eq(issue)]

        # pipeline stage registers: A (rows arrive), AP (the q * k products), B (scores), B1
        # (clamped gaps), BP (their exp_mult products), B2 (exp table indices, the ROM
        # address), C (exp ROM data), D (the data registered)
        def beat(name):
            return {f: Signal(shape, name=f"{name}_{f}") for f, shape in
                    (("valid", 1), ("second", 1), ("first", 1), ("last", 1), ("g", range(G)))}
        a, ap, bb, b1, bp, b2, c, dd = (beat(x) for x in
                                        ("a", "ap", "b", "b1", "bp", "b2", "c", "d"))
        m.d.sync += [a["valid"].eq(issue), a["second"].eq(second), a["first"].eq(t == 0),
                     a["last"].eq(t == pos), a["g"].eq(g)]
        for dst, src in ((ap, a), (bb, ap), (b1, bb), (bp, b1), (b2, bp), (c, b2), (dd, c)):
            m.d.sync += [dst[f].eq(src[f]) for f in dst]

        done = Signal()     # the last group's output is written this cycle
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
                with m.If(self.i.valid & self.i.ready):
                    with m.If(self.i.payload.pos < self._n_pos):
                        m.d.sync += [kv_req.pos.eq(self.i.payload.pos),
                                     kv_req.k.eq(self.i.payload.k),
                                     kv_req.v.eq(self.i.payload.v), q.eq(self.i.payload.q)]
                        m.next = "WRITE"
                    with m.Else():
                        m.d.sync += err.eq(1)
            with m.State("WRITE"):
                m.d.comb += kv_w.valid.eq(1)
                with m.If(kv_w.ready):
                    m.d.sync += [t.eq(0), second.eq(0), g.eq(0)]
                    m.next = "SWEEP"
            with m.State("SWEEP"):
                m.d.comb += issue.eq(1)
                m.d.sync += t.eq(t + 1)
                with m.If(t == pos):
                    m.d.sync += [t.eq(0), second.eq(~second)]
                    with m.If(second):
                        m.d.sync += g.eq(g + 1)
                        with m.If(g == G - 1):
                            m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(done):
                    m.next = "IDLE"

        # -- lanes --------------------------------------------------------------------------
        # the largest layer's clamp: exact for every layer (a layer's gaps beyond its own clamp
        # all index the last table entry, and the index never falls as the gap grows)
        dcap = max(min(r["gap_max"], _exp_clamp(mult, shift, self._exp_len))
                   for mult, shift in zip(self._mults, self._shifts))
        if n_layers > 1:
            # the layer's exp_mult: the multiplier's constant operand
            exp_mult = Signal(range(max(self._mults) + 1))
            with m.Switch(self.layer):
                for layer, mult in enumerate(self._mults):
                    with m.Case(layer):
                        m.d.comb += exp_mult.eq(mult)
        # output stages F0..F5 of a head group (valid and group index of each)
        fv = [Signal(name=f"f{i}_valid") for i in range(6)]
        fg = [Signal(range(G), name=f"f{i}_g") for i in range(6)]
        m.d.sync += [fv[0].eq(dd["valid"] & dd["second"] & dd["last"]), fg[0].eq(dd["g"])]
        m.d.sync += [fv[i].eq(fv[i - 1]) for i in range(1, 6)]
        m.d.sync += [fg[i].eq(fg[i - 1]) for i in range(1, 6)]
        m.d.comb += done.eq(fv[5] & (fg[5] == G - 1))
        out = Signal(vector_layout(self._out_bits, self.dim))
        m.d.comb += self.o.payload.eq(out)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(done):
            m.d.sync += self.o.valid.eq(1)

        def element(vec, index):
            return vec.as_value()[index * b:(index + 1) * b].as_signed()

        def select(vec, heads, d):
            """Element ``d`` of head ``heads[g]`` of ``vec`` for the group index ``a.g``: a mux
            per element, so each is used once and evaluated only inside its register's enable."""
            elems = [element(vec, head * hs + d) for head in heads]
            sel = elems[-1]
            for grp in reversed(range(G - 1)):
                sel = Mux(a["g"] == grp, elems[grp], sel)
            return sel

        # Every pipeline register below loads only behind its stage's valid (pass-2 stages
        # behind valid & second): the value of a valid beat is unchanged, and a simulator
        # evaluates a stage's logic only on the cycles it is used. Data registers are
        # reset-less (their contents count only behind a valid bit, which is reset).
        a2 = a["valid"] & a["second"]
        ap2 = ap["valid"] & ap["second"]
        b2v = bb["valid"] & bb["second"]
        b1v = b1["valid"] & b1["second"]
        bpv = bp["valid"] & bp["second"]
        b2w = b2["valid"] & b2["second"]
        cv = c["valid"] & c["second"]
        dv = dd["valid"] & dd["second"]
        # rounding right shift of the output by s = shift0 + n (n: bit length of Z), at least
        # s_lo: every quotient fits in the product's width less s_lo bits
        shift0 = self._recip_frac - rb + self._out_shift
        s_hi = shift0 + r["z"].width
        s_lo = shift0 + rb
        def clamp(value):
            """``saturate(value, out_bits)`` with every mux operand already ``out_bits`` wide."""
            ob = self._out_bits
            if value.shape().width <= ob:
                return saturate(value, ob)
            lo, hi = -(1 << (ob - 1)), (1 << (ob - 1)) - 1
            return Mux(value > hi, Const(hi, signed(ob)),
                       Mux(value < lo, Const(lo, signed(ob)), value[:ob].as_signed()))

        for lane in range(H):
            heads = [grp * H + lane for grp in range(G)]
            kv_heads = [head // group_size for head in heads]

            # stage A: this lane's head (of group a.g) and its kv head; the products
            # q_d * k_d, registered (the multipliers and the adder tree in different stages)
            ap_p = [Signal(signed(2 * b), name=f"ap_p{lane}_{d}", reset_less=True)
                    for d in range(hs)]
            ap_v = Signal(head_vec, name=f"ap_v{lane}", reset_less=True)
            with m.If(a["valid"]):
                m.d.sync += [ap_p[d].eq(select(q, heads, d) * select(kv_r.k, kv_heads, d))
                             for d in range(hs)]
            with m.If(a2):
                m.d.sync += [ap_v[d].eq(select(kv_r.v, kv_heads, d)) for d in range(hs)]

            # stage AP: the dot product (the products' sum, a balanced adder tree)
            b_s = Signal(r["score"], name=f"b_score{lane}", reset_less=True)
            b_v = Signal(head_vec, name=f"b_v{lane}", reset_less=True)
            with m.If(ap["valid"]):
                m.d.sync += b_s.eq(tree_sum(ap_p))
            with m.If(ap2):
                m.d.sync += b_v.eq(ap_v)

            # stage B: pass 1 keeps the maximum; pass 2 registers the clamped score gap
            top = Signal(r["score"], name=f"max{lane}", reset_less=True)
            with m.If(bb["valid"] & ~bb["second"]):
                m.d.sync += top.eq(Mux(bb["first"] | (b_s > top), b_s, top))
            b1_gap = Signal(range(dcap + 1), name=f"b1_gap{lane}", reset_less=True)
            with m.If(b2v):
                m.d.sync += b1_gap.eq(Mux(top - b_s > dcap, dcap, top - b_s))

            # stage B1: the gap's product by exp_mult (a constant: LUT adders; banked, a
            # multiplier by the layer's constant), registered
            if n_layers == 1:
                product = b1_gap * self._mults[0]
                bp_prod = Signal.like(product, name=f"bp_prod{lane}", reset_less=True)
            else:
                product = b1_gap * exp_mult
                bp_prod = Signal(range(dcap * max(self._mults) + 1), name=f"bp_prod{lane}",
                                 reset_less=True)
            with m.If(b1v):
                m.d.sync += bp_prod.eq(product)

            # stage BP: the exp-table index of the gap (registered: the ROM address); banked,
            # the layer's rounding shift (one rounding per distinct shift, chosen by layer)
            if n_layers == 1:
                index = rshift_round(bp_prod, self._shifts[0])
            else:
                rounded = {s: rshift_round(bp_prod, s) for s in self._shifts}
                index = rounded[self._shifts[-1]]
                for layer in reversed(range(n_layers - 1) if len(rounded) > 1 else ()):
                    index = Mux(self.layer == layer, rounded[self._shifts[layer]], index)
            b2_index = Signal(range(self._exp_len), name=f"b2_index{lane}", reset_less=True)
            with m.If(bpv):
                m.d.sync += b2_index.eq(Mux(index > self._exp_len - 1, self._exp_len - 1,
                                            index))

            # stage B2: exp ROM read
            exp_rd = exp_rom.read_port()
            m.d.comb += [exp_rd.en.eq(b2w), exp_rd.addr.eq(b2_index)]
            b1_v, bp_v, b2_v, c_v, d_v = (Signal(head_vec, name=f"{x}_v{lane}",
                                                 reset_less=True)
                                          for x in ("b1", "bp", "b2", "c", "d"))
            for dst, src, en in ((b1_v, b_v, b2v), (bp_v, b1_v, b1v), (b2_v, bp_v, bpv),
                                 (c_v, b2_v, b2w), (d_v, c_v, cv)):
                with m.If(en):
                    m.d.sync += dst.eq(src)

            # stage C: the exp ROM data, registered
            e = Signal.like(exp_rd.data, name=f"d_e{lane}", reset_less=True)
            with m.If(cv):
                m.d.sync += e.eq(exp_rd.data)

            # stage D: accumulate Z and acc; the group's last row also hands them to F
            z = Signal(r["z"], name=f"z{lane}", reset_less=True)
            acc = [Signal(r["acc"], name=f"acc{lane}_{d}", reset_less=True) for d in range(hs)]
            f_z = Signal(r["z"], name=f"f_z{lane}", reset_less=True)
            f_acc = [Signal(r["acc"], name=f"f_acc{lane}_{d}", reset_less=True)
                     for d in range(hs)]
            z_next = Mux(dd["first"], 0, z) + e
            acc_next = [Mux(dd["first"], 0, acc[d]) + e * d_v[d] for d in range(hs)]
            with m.If(dv):
                m.d.sync += [z.eq(z_next)] + [x.eq(y) for x, y in zip(acc, acc_next)]
                with m.If(dd["last"]):
                    m.d.sync += [f_z.eq(z_next)] + [x.eq(y) for x, y in zip(f_acc, acc_next)]

            # stage F0: bit length n of Z, reciprocal of its leading recip_bits bits
            # (n is built once per use: each copy is evaluated only behind its own enable, the
            # synthesis merges them)
            def bit_length(value):
                n = Const(0, range(value.shape().width + 1))
                for bit in range(value.shape().width):
                    n = Mux(value[bit], bit + 1, n)
                return n
            n_bits = Shape.cast(range(r["z"].width + 1)).width
            recip_rd = recip_rom.read_port()
            m.d.comb += recip_rd.en.eq(fv[0])
            if rb > 1:
                mant = f_z >> (bit_length(f_z) - rb)[:n_bits]
                m.d.comb += recip_rd.addr.eq(mant[:rb - 1])
            f1_n = Signal(range(r["z"].width + 1), name=f"f1_n{lane}", reset_less=True)
            with m.If(fv[0]):
                m.d.sync += f1_n.eq(bit_length(f_z))

            # stage F1: the ROM data and acc registered (f_acc may change before F2)
            f2_recip = Signal.like(recip_rd.data, name=f"f2_recip{lane}", reset_less=True)
            f2_acc = [Signal(r["acc"], name=f"f2_acc{lane}_{d}", reset_less=True)
                      for d in range(hs)]
            shift = Signal(range(s_hi + 1), name=f"out_shift{lane}", reset_less=True)
            with m.If(fv[1]):
                m.d.sync += [shift.eq(shift0 + f1_n), f2_recip.eq(recip_rd.data)]
                m.d.sync += [x.eq(y) for x, y in zip(f2_acc, f_acc)]

            # stage F2: the products acc * recip (registered)
            prod_shape = (f2_acc[0] * f2_recip).shape()
            f3_p = [Signal(prod_shape, name=f"f3_p{lane}_{d}", reset_less=True)
                    for d in range(hs)]
            f3_shift = Signal.like(shift, name=f"f3_shift{lane}", reset_less=True)
            with m.If(fv[2]):
                m.d.sync += [f3_shift.eq(shift)] + [f3_p[d].eq(f2_acc[d] * f2_recip)
                                                    for d in range(hs)]

            # stages F3, F4: rounding right shift by s = recip_frac + n - recip_bits + out_shift
            # (rshift_round_var), the rounding add and the shift registered apart; the
            # rounding constant 2**(s-1) only as wide as s can need
            half = (Const(1, unsigned(1)) << f3_shift)[1:s_hi + 1]     # 2**(s-1), 0 if s = 0
            f4_r = [Signal((f3_p[0] + half).shape(), name=f"f4_r{lane}_{d}", reset_less=True)
                    for d in range(hs)]
            f4_shift = Signal.like(shift, name=f"f4_shift{lane}", reset_less=True)
            with m.If(fv[3]):
                m.d.sync += [f4_shift.eq(f3_shift)] + [f4_r[d].eq(f3_p[d] + half)
                                                       for d in range(hs)]
            q_bits = max(self._out_bits, f4_r[0].shape().width - max(0, s_lo))
            f5_q = [Signal(signed(q_bits), name=f"f5_q{lane}_{d}", reset_less=True)
                    for d in range(hs)]
            with m.If(fv[4]):
                m.d.sync += [f5_q[d].eq(f4_r[d] >> f4_shift) for d in range(hs)]

            # stage F5: saturate into the head's slot of the output
            with m.If(fv[5]):
                with m.Switch(fg[5]):
                    for grp, head in enumerate(heads):
                        with m.Case(grp):
                            m.d.sync += [out[head * hs + d].eq(clamp(f5_q[d]))
                                         for d in range(hs)]
        return m
