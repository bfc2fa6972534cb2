"""The per-layer matrix-vector unit: ``requantize(matvec(W, x), mult, shift, out_bits)``.

FINN-style folding: ``pe`` output rows are computed in parallel, each consuming ``simd`` input
elements per cycle, so one input vector takes ``(rows/pe) * (cols/simd)`` steps. The weights
are either a block-RAM ROM (``form="rom"``) or constant logic (``form="const"``, "etched").
"""

import operator

import numpy as np
from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import (bits_for, exp_vector_layout, rom_read_signature, rshift_round, saturate,
                    tree_sum, vector_layout)

__all__ = ["MatVecUnit"]

#: Requantizer multipliers are unsigned and below this bound (one 18x18 multiplier operand).
MULT_LIMIT = 1 << 17
FORMS = ("rom", "const")


def _int_array(name, value, dims):
    """``value`` as an int64 array with the axes named by ``dims``, e.g. ``("rows", "cols")``."""
    a = np.asarray(value)
    if a.ndim != len(dims):
        what = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
        raise ValueError(f"{name} must be a {len(dims)}-D {what} array, not shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, not {a.dtype}")
    return a.astype(np.int64)


def _csd(c):
    """Canonical signed digits of ``c``: ``[(shift, +-1), ...]`` with ``c = sum(d << shift)``
    and no two adjacent digits non-zero (the fewest adders for a constant multiply)."""
    digits, i = [], 0
    while c:
        if c & 1:
            d = 2 - (c & 3)
            digits.append((i, d))
            c -= d
        c >>= 1
        i += 1
    return digits


def _const_mul(x, c):
    """``x * c`` for a constant ``c`` as explicit shift-adds (LUTs and carry chains, no DSP)."""
    digits = _csd(c)
    pos = [x << i for i, d in digits if d > 0]
    neg = [x << i for i, d in digits if d < 0]
    if not neg:
        return tree_sum(pos)
    if not pos:
        return -tree_sum(neg)
    return tree_sum(pos) - tree_sum(neg)


class MatVecUnit(wiring.Component):
    """Folded integer matrix-vector product with per-row requantization.

    Computes, bit for bit, ``numerics.requantize(numerics.matvec(weights, x), mult, shift,
    out_bits)`` for each whole input vector ``x``, and emits the result in ``rows/pe`` chunks of
    ``pe`` elements, row group 0 first (element ``j`` of chunk ``g`` is row ``g*pe + j``).

    The unit walks ``steps = (rows/pe) * (cols/simd)`` steps per vector, row group by row group,
    ``cols/simd`` column steps each; a step multiplies ``pe x simd`` weights by ``simd`` input
    elements (``mac_units`` multipliers). The input vector is held in a register that rotates
    by ``simd`` elements per step, so the column slice is always its low elements (no wide
    multiplexer). Pipeline, one register stage each: weight fetch (``form="rom"`` only: the
    ROM's synchronous read port), multiply, lane adder tree, accumulate, requantizer multiply;
    the rounding shift and saturation feed the output register.

    ``form="rom"``: the weights live in a ``Memory`` of depth ``steps`` and width
    ``pe*simd*weight_bits`` (one word per step, lane ``p``/element ``s`` at bits
    ``(p*simd + s)*weight_bits``), read synchronously, so Yosys maps it to ``DP16KD`` block RAM;
    the multipliers are a ``Memory`` of ``rows/pe`` words (constants when there is one group).
    ``form="const"`` ("etched"): each lane's weight is a constant selected by the step counter
    (a LUT ROM, looked up a cycle ahead into a register), one stage shorter than the ROM; when
    there is a single step (``pe == rows`` and ``simd == cols``) each product is by a literal
    constant, built as canonical-signed-digit shift-adds (LUTs and carry chains, no DSP; Yosys
    would otherwise put constant products on ``MULT18X18D``), and the requantizer multipliers
    are literal constants too (a registered LUT table of ``rows/pe`` entries otherwise).

    Cycles, with ``o.ready`` held high (``D = pipeline_depth``: 6 for ``"rom"``, 5 for
    ``"const"``): ``latency() = cols/simd + D`` (input transfer to the first chunk's
    ``o.valid``), ``cycles_per_vector() = steps + D`` (input transfer to the last chunk's
    transfer), ``chunk_interval() = cols/simd``, ``initiation_interval() = steps`` (inputs taken
    back to back, the next one in the cycle the last step issues).

    Flow control never stalls the pipeline: a row group is only started (its last column step
    issued) when the output buffer (the output register plus a small FIFO, ``buffer_depth``
    entries in all) has room for its result, counting results in flight. ``i.ready`` depends
    on registers only (not combinationally on ``o.ready``), which lets these units be chained
    in a loop. With ``o.ready`` held high the buffer never fills and the cycle formulas hold.

    The accumulator is ``acc_width`` bits: the smallest signed width that holds the worst case
    ``cols * max|w| * 2**(in_bits-1)`` (``acc_bits`` is the limit it must fit).

    With ``exp_max = E > 0`` (W2 behind a SwiGLU with a per-vector exponent) the input payload
    carries ``k`` in ``0..E`` beside the vector (:func:`exp_vector_layout`); ``k`` travels with
    the vector's steps and the requantizer shift is ``shift + E - k`` (an ``E+1``-way choice
    before the output register, no extra cycle). ``E = 0`` builds exactly the unit without
    the option.

    Banked (``n_layers = L > 1``, ``form="rom"`` only): the unit holds the constants of ``L``
    layers (``weights`` ``(L, rows, cols)``, ``mult`` ``(L, rows)``, ``shift`` ``L`` ints) and
    computes with those of the layer on the ``layer`` port: for ``layer = l`` exactly what the
    single-layer unit of layer ``l``'s constants computes, in the same cycles. The weights are
    one ``Memory`` of depth ``L*steps`` (layer ``l``'s words at ``l*steps ...``: the layer is
    the high part of the address, which counts from the layer's base loaded at the input
    transfer), the multipliers one of depth ``L*rows/pe`` (also with a single row group), and
    the requantizer has one rounding shift per distinct ``shift[l] + E - k``, chosen by a
    register loaded beside the requantizer product. The accumulator covers the worst layer.
    ``n_layers = 1`` builds exactly the unit without the option (no ``layer`` port).

    Parameters
    ----------
    weights : numpy integer array, shape (rows, cols), or (n_layers, rows, cols)
        Weight matrix (one per layer), each ``|w| <= 2**(weight_bits-1) - 1``.
    weight_bits : int
        Weight width, 3 to 8.
    in_bits : int
        Input element width (signed).
    mult : numpy integer array, shape (rows,), or (n_layers, rows)
        Per-row requantizer multipliers (one row of them per layer), ``0 <= m < 2**17``.
    shift : int, or a sequence of n_layers ints
        Requantizer rounding right shift (one per layer), ``>= 0``.
    out_bits : int
        Output element width (signed, saturated).
    pe : int
        Output rows computed in parallel; must divide ``rows``.
    simd : int
        Input elements consumed per cycle and row; must divide ``cols``.
    acc_bits : int
        Accumulator width limit: the worst case must fit in it.
    form : ``"rom"`` or ``"const"``
        Where the weights live (see above).
    exp_max : int
        ``E``: the input's largest exponent (0: none), 0 to 7.
    correction_bits : int or None
        Width of the LoRA correction port ``c`` (``None``: no port); see
        :attr:`correction_bits`.
    n_layers : int
        ``L``: layers whose constants the unit holds (``>= 1``; above 1 only with
        ``form="rom"``).
    rom_port : bool
        ``form="rom"``, one layer: the weight ROM is not built here; the unit reads it through
        the port ``rom`` from a ROM of the same words (:meth:`rom_words`) elsewhere, e.g. the
        embedding table that a tied classifier shares (same timing: a synchronous read).

    Members
    -------
    i : ``In(stream.Signature(exp_vector_layout(in_bits, cols, exp_max)))``
        Whole input vectors (with ``exp_max > 0``: fields ``vec`` and ``k``).
    o : ``Out(stream.Signature(vector_layout(out_bits, pe)))``
        Output chunks, ``rows/pe`` per input vector, row group 0 first.
    c : ``In(stream.Signature(vector_layout(correction_bits, pe)))``
        Only with ``correction_bits``: one correction chunk per row group.
    layer : ``In(range(n_layers))``
        Only with ``n_layers > 1``: the layer whose constants the vector is computed with. Set
        it at (or before) the input transfer and hold it until the vector's last output
        transfer.
    rom : ``Out(rom_read_signature(depth=steps, width=pe*simd*weight_bits))``
        Only with ``rom_port``: the weight ROM's read port.
    """

    def __init__(self, *, weights, weight_bits, in_bits=8, mult, shift, out_bits, pe, simd,
                 acc_bits=32, form="rom", correction_bits=None, exp_max=0, n_layers=1,
                 rom_port=False):
        if form not in FORMS:
            raise ValueError(f"form must be 'rom' or 'const', not {form!r}")
        rom_port = bool(rom_port)
        if rom_port and (form != "rom" or operator.index(n_layers) != 1):
            raise ValueError("rom_port needs form='rom' and one layer")
        L = operator.index(n_layers)
        if L < 1:
            raise ValueError(f"n_layers must be at least 1, not {L}")
        if L > 1 and form != "rom":
            raise ValueError(f"form={form!r} supports only n_layers=1, not n_layers={L}: "
                             f"use form='rom'")
        weight_bits, in_bits, out_bits = map(operator.index, (weight_bits, in_bits, out_bits))
        pe, simd, acc_bits = map(operator.index, (pe, simd, acc_bits))
        if L == 1:
            shifts = (operator.index(shift),)
        else:
            try:
                shifts = tuple(map(operator.index, shift))
            except TypeError:
                raise ValueError(f"shift must be a sequence of {L} ints (one per layer), not "
                                 f"{shift!r}") from None
            if len(shifts) != L:
                raise ValueError(f"shift must hold {L} ints (one per layer), not "
                                 f"{len(shifts)}")
        exp_max = operator.index(exp_max)
        if not 0 <= exp_max <= 7:
            raise ValueError(f"exp_max must lie in 0..7, not {exp_max}")
        if L == 1:
            w = _int_array("weights", weights, ("rows", "cols"))
            shape, w = w.shape, w[None]
        else:
            w = _int_array("weights", weights, ("layers", "rows", "cols"))
            shape = w.shape
            if w.shape[0] != L:
                raise ValueError(f"weights must have n_layers={L} matrices along axis 0, not "
                                 f"shape {w.shape}")
        rows, cols = w.shape[1:]
        if rows < 1 or cols < 1:
            raise ValueError(f"weights must have at least one row and column, not shape "
                             f"{shape}")
        if not 3 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be between 3 and 8, not {weight_bits}")
        if in_bits < 2:
            raise ValueError(f"in_bits must be at least 2 for signed inputs, not {in_bits}")
        if out_bits < 2:
            raise ValueError(f"out_bits must be at least 2 for signed outputs, not {out_bits}")

        def where(layer):
            return f"layer {layer}: " if L > 1 else ""

        wmax = (1 << (weight_bits - 1)) - 1
        for layer in range(L):
            bad = np.argwhere(np.abs(w[layer]) > wmax)
            if bad.size:
                r, c = map(int, bad[0])
                raise ValueError(f"{where(layer)}weights must lie within +-{wmax} for "
                                 f"weight_bits={weight_bits}: found {int(w[layer, r, c])} at "
                                 f"({r}, {c})")
        if L == 1:
            mult = _int_array("mult", mult, ("rows",))
            if mult.shape != (rows,):
                raise ValueError(f"mult must have shape ({rows},) (one per row), not "
                                 f"{mult.shape}")
            mult = mult[None]
        else:
            mult = _int_array("mult", mult, ("layers", "rows"))
            if mult.shape != (L, rows):
                raise ValueError(f"mult must have shape ({L}, {rows}) (one per layer and row), "
                                 f"not {mult.shape}")
        for layer in range(L):
            bad = np.flatnonzero((mult[layer] < 0) | (mult[layer] >= MULT_LIMIT))
            if bad.size:
                raise ValueError(f"{where(layer)}mult must lie in [0, 2**17): found "
                                 f"{int(mult[layer, bad[0]])} at row {int(bad[0])}")
        for layer in range(L):
            if shifts[layer] < 0:
                raise ValueError(f"{where(layer)}shift must be non-negative, not "
                                 f"{shifts[layer]}")
        if pe < 1 or rows % pe:
            raise ValueError(f"pe ({pe}) must divide rows ({rows})")
        if simd < 1 or cols % simd:
            raise ValueError(f"simd ({simd}) must divide cols ({cols})")
        # the accumulator covers the worst layer
        need = [bits_for(-(cols * int(np.abs(w[layer]).max()) << (in_bits - 1)),
                         cols * int(np.abs(w[layer]).max()) << (in_bits - 1))
                for layer in range(L)]
        acc_width = max(need)
        if acc_width > acc_bits:
            layer = need.index(acc_width)
            raise ValueError(f"{where(layer)}accumulator of {acc_bits} bits overflows: worst "
                             f"case needs {acc_width}")

        # per-layer constants, stacked: (L, rows, cols), (L, rows), L shifts
        self._weights = w
        self._weights.flags.writeable = False
        self._mult = mult
        self._mult.flags.writeable = False
        self._shifts = shifts
        self._n_layers = L
        self._weight_bits, self._in_bits, self._out_bits = weight_bits, in_bits, out_bits
        self._pe, self._simd, self._acc_bits = pe, simd, acc_bits
        self._acc_width, self._form = acc_width, form
        self._exp_max = exp_max
        ports = {
            "i": In(stream.Signature(exp_vector_layout(in_bits, cols, exp_max))),
            "o": Out(stream.Signature(vector_layout(out_bits, pe))),
        }
        if correction_bits is not None:
            # LoRA hook: a chunk of pe corrections per row group, added to the accumulator
            correction_bits = operator.index(correction_bits)
            if correction_bits < 2:
                raise ValueError(f"correction_bits must be at least 2, not {correction_bits}")
            ports["c"] = In(stream.Signature(vector_layout(correction_bits, pe)))
        if L > 1:
            ports["layer"] = In(range(L))
        self._rom_port = rom_port
        if rom_port:
            steps = (rows // pe) * (cols // simd)
            ports["rom"] = Out(rom_read_signature(depth=steps, width=pe * simd * weight_bits))
        self._correction_bits = correction_bits
        super().__init__(ports)

    # -------------------------------------------------------------------------- parameters

    @property
    def n_layers(self):
        """Layers whose constants the unit holds (``L``); with ``L > 1`` the ``layer`` port
        selects one."""
        return self._n_layers

    @property
    def weights(self):
        """The weight matrix ``(rows, cols)``; with ``n_layers > 1`` the stack
        ``(n_layers, rows, cols)``. Read-only."""
        return self._weights[0] if self._n_layers == 1 else self._weights

    @property
    def mult(self):
        """Requantizer multipliers ``(rows,)``; with ``n_layers > 1`` ``(n_layers, rows)``.
        Read-only."""
        return self._mult[0] if self._n_layers == 1 else self._mult

    @property
    def rows(self):
        return self._weights.shape[1]

    @property
    def cols(self):
        return self._weights.shape[2]

    @property
    def weight_bits(self):
        return self._weight_bits

    @property
    def in_bits(self):
        return self._in_bits

    @property
    def out_bits(self):
        return self._out_bits

    @property
    def shift(self):
        """The requantizer shift; with ``n_layers > 1`` a tuple of one per layer."""
        return self._shifts[0] if self._n_layers == 1 else self._shifts

    @property
    def pe(self):
        return self._pe

    @property
    def simd(self):
        return self._simd

    @property
    def acc_bits(self):
        return self._acc_bits

    @property
    def acc_width(self):
        """Width of the accumulator actually built (the worst case's signed width)."""
        return self._acc_width

    @property
    def form(self):
        return self._form

    @property
    def exp_max(self):
        """``E``: the input exponent's largest value (0: no exponent)."""
        return self._exp_max

    @property
    def correction_bits(self):
        """Width of the correction port ``c`` (``None``: no port). With it, row group ``g``'s
        accumulator starts at the ``g``-th correction chunk (``c`` element ``j`` is row
        ``g*pe + j``) instead of 0, so ``requantize(W @ x + c)`` comes out; the group's first
        step waits for its chunk, and the accumulator is ``max(acc_width, correction_bits)``
        bits wide."""
        return self._correction_bits

    # ------------------------------------------------------------------------------ cycles

    @property
    def row_groups(self):
        """Output chunks per input vector: ``rows / pe``."""
        return self.rows // self._pe

    @property
    def col_steps(self):
        """Steps per row group: ``cols / simd``."""
        return self.cols // self._simd

    @property
    def steps(self):
        """Steps (cycles of the multipliers) per input vector: ``(rows/pe) * (cols/simd)``."""
        return self.row_groups * self.col_steps

    @property
    def rom_shape(self):
        """``(depth, width)`` of the weight ROM of ``form="rom"``: ``(n_layers*steps,
        pe*simd*weight_bits)``."""
        return self._n_layers * self.steps, self._pe * self._simd * self._weight_bits

    @property
    def mac_units(self):
        """Multipliers in the datapath: ``pe * simd``."""
        return self._pe * self._simd

    @property
    def pipeline_depth(self):
        """Cycles from issuing a row group's last step to its chunk's ``o.valid``: 6 for
        ``"rom"`` (fetch, multiply, tree, accumulate, requantize, output), 5 for ``"const"``."""
        return 6 if self._form == "rom" else 5

    @property
    def buffer_depth(self):
        """Output chunks the unit can hold: ``pipeline_depth // col_steps + 1``, enough that
        it never waits for room while ``o.ready`` is high."""
        return self.pipeline_depth // self.col_steps + 1

    def latency(self):
        """Cycles from the input transfer to the first cycle the first chunk's ``o.valid`` is
        high (``o.ready`` held high): ``cols/simd + pipeline_depth``."""
        return self.col_steps + self.pipeline_depth

    def cycles_per_vector(self):
        """Cycles from the input transfer to the transfer of the last chunk, with ``o.ready``
        held high: ``steps + pipeline_depth``."""
        return self.steps + self.pipeline_depth

    def chunk_interval(self):
        """Cycles between consecutive chunks with ``o.ready`` held high: ``cols/simd``."""
        return self.col_steps

    def initiation_interval(self):
        """Cycles between input transfers when inputs are always valid and ``o`` always ready:
        ``steps`` (the next vector is taken in the cycle the last step issues)."""
        return self.steps

    # ---------------------------------------------------------------------------- hardware

    @property
    def rom_port(self):
        """The weight ROM is read through the ``rom`` port (built elsewhere)."""
        return self._rom_port

    def rom_words(self):
        """Contents of the weight ROM (``form="rom"``): :meth:`_rom_words`."""
        return self._rom_words()

    def _rom_words(self):
        """Weight ROM contents: one word per step, lane ``p``/element ``s`` at
        ``(p*simd + s)*weight_bits``; layer ``l``'s steps at ``l*steps ...``."""
        P, S, K, wb = self._pe, self._simd, self.col_steps, self._weight_bits
        mask = (1 << wb) - 1
        words = []
        for layer, g, k in np.ndindex(self._n_layers, self.row_groups, K):
            block = self._weights[layer, g * P:(g + 1) * P, k * S:(k + 1) * S]
            word = 0
            for n, v in enumerate(block.reshape(-1).tolist()):
                word |= (v & mask) << (n * wb)
            words.append(word)
        return words

    def _delay(self, m, name, values):
        """Register the correction chunk one pipeline stage further (in step with the flags)."""
        regs = [Signal(signed(self._correction_bits), name=f"corr_{name}{p}")
                for p in range(len(values))]
        m.d.sync += [r.eq(v) for r, v in zip(regs, values)]
        return regs

    def _banked_requant(self, m, req, k_acc):
        """The output chunk of an ``n_layers > 1`` unit: one rounding shift and saturation per
        distinct shift ``shift[l] + E - k`` over all layers, picked by a register loaded beside
        the requantizer product (from ``layer`` and, with ``E > 0``, the vector's exponent
        ``k_acc`` one stage before it), so the choice adds no logic level to the shift."""
        E, ob = self._exp_max, self._out_bits
        eff = [[sh + E - kk for kk in range(E + 1)] for sh in self._shifts]
        shifts = sorted({v for row in eff for v in row})
        if len(shifts) == 1:
            return Cat(*(saturate(rshift_round(v, shifts[0]), ob) for v in req))
        sel = Signal(range(len(shifts)), name="shift_sel")
        with m.Switch(self.layer):
            for layer, row in enumerate(eff):
                with m.Case(layer):
                    if not E:
                        m.d.sync += sel.eq(shifts.index(row[0]))
                        continue
                    with m.Switch(k_acc):
                        for kk, v in enumerate(row):
                            with m.Case(kk):
                                m.d.sync += sel.eq(shifts.index(v))

        def requant(v):
            out = saturate(rshift_round(v, shifts[-1]), ob)
            for n in range(len(shifts) - 2, -1, -1):
                out = Mux(sel == n, saturate(rshift_round(v, shifts[n]), ob), out)
            return out
        return Cat(*(requant(v) for v in req))

    def elaborate(self, platform):
        m = Module()
        P, S, G, K = self._pe, self._simd, self.row_groups, self.col_steps
        wb, ib, ob = self._weight_bits, self._in_bits, self._out_bits
        steps, rom = self.steps, self._form == "rom"
        mult_bits = max(1, int(self._mult.max()).bit_length())
        prod_w = wb + ib
        sum_w = prod_w + (S - 1).bit_length()
        acc_w = self._acc_width
        cb = self._correction_bits
        if cb is not None:
            acc_w = max(acc_w, cb)
        req_w = acc_w + mult_bits
        L = self._n_layers

        # ---- issue: step counters, rotating input register, output credits
        busy = Signal()
        step = Signal(range(steps))
        k = Signal(range(K))
        g = Signal(range(G))
        x = Signal(self.cols * ib)
        cap = self.buffer_depth
        count = Signal(range(cap + 1))   # chunks issued (last step) and not yet taken from o
        last_k = k == K - 1
        room = count != cap
        issue = Signal()
        if L > 1:
            # weight ROM and multiplier ROM addresses, counting alongside step and g from the
            # layer's base (loaded at the input transfer): no adder in front of the ROMs
            waddr = Signal(range(L * steps), name="weight_addr")
            gaddr = Signal(range(L * G), name="group_addr")
            wbase, gbase = (Signal(range(L * n), name=name) for n, name in
                            ((steps, "weight_base"), (G, "group_base")))
            with m.Switch(self.layer):
                for layer in range(L):
                    with m.Case(layer):
                        m.d.comb += [wbase.eq(layer * steps), gbase.eq(layer * G)]
        if cb is None:
            m.d.comb += [
                issue.eq(busy & (~last_k | room)),
                self.i.ready.eq(~busy | ((step == steps - 1) & room)),
            ]
        else:
            # a row group's first step takes its correction chunk (and waits for it)
            corr_ok = (k != 0) | self.c.valid
            m.d.comb += [
                issue.eq(busy & (~last_k | room) & corr_ok),
                self.i.ready.eq(~busy | ((step == steps - 1) & room & corr_ok)),
                self.c.ready.eq(busy & (~last_k | room) & (k == 0)),
            ]
            corr = [self.c.payload[p] for p in range(P)]
        with m.If(issue):
            m.d.sync += [
                step.eq(step + 1),
                k.eq(k + 1),
                x.eq(x.rotate_right(S * ib)),
            ]
            with m.If(last_k):
                m.d.sync += [k.eq(0), g.eq(g + 1)]
                with m.If(g == G - 1):
                    m.d.sync += g.eq(0)
            with m.If(step == steps - 1):
                m.d.sync += [step.eq(0), busy.eq(0)]
            if L > 1:
                m.d.sync += waddr.eq(waddr + 1)
                with m.If(last_k):
                    m.d.sync += gaddr.eq(gaddr + 1)
        E = self._exp_max
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += busy.eq(1)
            if L > 1:
                m.d.sync += [waddr.eq(wbase), gaddr.eq(gbase)]
            if E:
                m.d.sync += x.eq(self.i.payload.vec.as_value())
            else:
                m.d.sync += x.eq(self.i.payload.as_value())
        if E:
            # the vector's exponent, delayed alongside its steps' flags (the next vector may
            # be taken while this one's last row group is still in the pipeline)
            k_in = Signal(range(E + 1))
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += k_in.eq(self.i.payload.k)
            k_pipe = [k_in]

            def k_delay(name):
                r = Signal(range(E + 1), name=f"k_{name}")
                m.d.sync += r.eq(k_pipe[-1])
                k_pipe.append(r)
        pop = self.o.valid & self.o.ready
        m.d.sync += count.eq(count + (issue & last_k) - pop)
        chunk = [x[s * ib:(s + 1) * ib].as_signed() for s in range(S)]

        def stage(name, src):
            """Register a (valid, first, last, group) tuple one stage further."""
            valid = Signal(name=f"{name}_valid")
            first = Signal(name=f"{name}_first")
            last = Signal(name=f"{name}_last")
            grp = Signal(range(G if L == 1 else L * G), name=f"{name}_group")
            m.d.sync += [valid.eq(src[0]), first.eq(src[1]), last.eq(src[2]), grp.eq(src[3])]
            return valid, first, last, grp

        # ---- fetch (rom) / LUT (const): weights of this step for every lane
        src = (issue, k == 0, last_k, g if L == 1 else gaddr)
        if rom and E:
            k_delay("fetch")
        if rom:
            if self._rom_port:
                rd = self.rom
            else:
                m.submodules.weight_rom = weight_rom = Memory(
                    shape=unsigned(P * S * wb), depth=L * steps, init=self._rom_words())
                rd = weight_rom.read_port(domain="sync")
            m.d.comb += rd.addr.eq(step if L == 1 else waddr)
            src = stage("fetch", src)
            if cb is not None:
                corr = self._delay(m, "fetch", corr)
            m.d.comb += rd.en.eq(issue)
            xs = [Signal(signed(ib), name=f"x_fetch{s}", reset_less=True) for s in range(S)]
            with m.If(issue):
                m.d.sync += [xs[s].eq(chunk[s]) for s in range(S)]
            wl = [[rd.data[(p * S + s) * wb:(p * S + s + 1) * wb].as_signed() for s in range(S)]
                  for p in range(P)]
        elif steps == 1:
            xs = chunk
            wl = [[int(self._weights[0, p, s]) for s in range(S)] for p in range(P)]
        else:
            # LUT ROM looked up one cycle ahead (by the step counter's next value) into a
            # register, so the multipliers see a register, not a LUT tree, at no extra latency
            xs = chunk
            step_next = Signal(range(steps))
            m.d.comb += step_next.eq(step)
            with m.If(issue):
                m.d.comb += step_next.eq(Mux(step == steps - 1, 0, step + 1))
            wl = [[Signal(signed(wb), name=f"w{p}_{s}", init=int(self._weights[0, p, s]))
                   for s in range(S)] for p in range(P)]
            with m.Switch(step_next):
                for st in range(steps):
                    gg, kk = divmod(st, K)
                    block = self._weights[0, gg * P:(gg + 1) * P, kk * S:(kk + 1) * S]
                    with m.Case(st):
                        m.d.sync += [wl[p][s].eq(int(block[p, s]))
                                     for p in range(P) for s in range(S)]

        # ---- multiply (the data registers of each stage load only when the stage before
        # holds a valid step: bit for bit the same results, and an idle unit does no work in
        # a cycle-based simulator)
        mul_en = src[0]
        src = stage("mul", src)
        if E:
            k_delay("mul")
        if cb is not None:
            corr = self._delay(m, "mul", corr)
        prod = [[Signal(signed(prod_w), name=f"prod{p}_{s}", reset_less=True) for s in range(S)]
                for p in range(P)]
        with m.If(mul_en):
            for p in range(P):
                for s in range(S):
                    w_ps = wl[p][s]
                    if isinstance(w_ps, int):
                        if w_ps:
                            m.d.sync += prod[p][s].eq(_const_mul(xs[s], w_ps))
                    else:
                        m.d.sync += prod[p][s].eq(xs[s] * w_ps)

        # ---- lane adder tree
        tree_en = src[0]
        src = stage("tree", src)
        if E:
            k_delay("tree")
        lane = [Signal(signed(sum_w), name=f"lane{p}", reset_less=True) for p in range(P)]
        with m.If(tree_en):
            m.d.sync += [lane[p].eq(tree_sum(prod[p])) for p in range(P)]
        t_valid, t_first, t_last, t_group = src
        if cb is not None:
            corr = self._delay(m, "tree", corr)

        # ---- accumulate; the multipliers of the group are fetched alongside
        acc = [Signal(signed(acc_w), name=f"acc{p}") for p in range(P)]
        with m.If(t_valid):
            for p in range(P):
                with m.If(t_first):
                    m.d.sync += acc[p].eq(lane[p] if cb is None else lane[p] + corr[p])
                with m.Else():
                    m.d.sync += acc[p].eq(acc[p] + lane[p])
        a_valid = Signal()
        m.d.sync += a_valid.eq(t_valid & t_last)
        if E:
            k_delay("acc")
        if G == 1 and L == 1:
            mults = [int(v) for v in self._mult[0]]
        elif rom:
            # banked: one word per layer and group, layer l's at l*G ... (a single group's
            # constants of L > 1 layers too: read at the same stage, so no extra cycle)
            words = [sum(int(v) << (p * mult_bits) for p, v in
                         enumerate(self._mult[layer, gg * P:(gg + 1) * P]))
                     for layer in range(L) for gg in range(G)]
            m.submodules.mult_rom = mult_rom = Memory(
                shape=unsigned(P * mult_bits), depth=L * G, init=words)
            mrd = mult_rom.read_port(domain="sync")
            m.d.comb += [mrd.addr.eq(t_group), mrd.en.eq(t_valid & t_last)]
            mults = [mrd.data[p * mult_bits:(p + 1) * mult_bits] for p in range(P)]
        else:
            mults = [Signal(unsigned(mult_bits), name=f"mult{p}") for p in range(P)]
            with m.Switch(t_group):
                for gg in range(G):
                    with m.Case(gg):
                        m.d.sync += [mults[p].eq(int(self._mult[0, gg * P + p]))
                                     for p in range(P)]

        # ---- requantizer multiply; rounding shift and saturation feed the output
        q_valid = Signal()
        m.d.sync += q_valid.eq(a_valid)
        req = [Signal(signed(req_w + 1), name=f"req{p}", reset_less=True) for p in range(P)]
        with m.If(a_valid):
            m.d.sync += [req[p].eq(acc[p] * mults[p]) for p in range(P)]
        if L > 1:
            res = self._banked_requant(m, req, k_pipe[-1] if E else None)
        elif E:
            shift = self._shifts[0]
            k_delay("req")
            k_q = k_pipe[-1]

            def requant(v):
                out = saturate(rshift_round(v, shift), ob)       # k = E
                for kk in range(E - 1, -1, -1):
                    out = Mux(k_q == kk, saturate(rshift_round(v, shift + E - kk), ob), out)
                return out
            res = Cat(*(requant(req[p]) for p in range(P)))
        else:
            res = Cat(*(saturate(rshift_round(req[p], self._shifts[0]), ob) for p in range(P)))

        # ---- output register with a FIFO behind it; credits guarantee room
        free = ~self.o.valid | self.o.ready
        with m.If(free):
            m.d.sync += self.o.valid.eq(0)
        if cap > 1:
            m.submodules.fifo = fifo = SyncFIFO(width=P * ob, depth=cap - 1)
            bypass = free & ~fifo.r_rdy
            m.d.comb += [
                fifo.w_data.eq(res),
                fifo.w_en.eq(q_valid & ~bypass),
                fifo.r_en.eq(free),
            ]
            with m.If(free & fifo.r_rdy):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(fifo.r_data)]
        else:
            bypass = free
        with m.If(bypass & q_valid):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(res)]
        return m
