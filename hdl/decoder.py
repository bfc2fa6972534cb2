"""One transformer block as dedicated hardware: its own norms, weight ROMs, RoPE and KV cache."""

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import pos_shape, vector_layout
from .attention import Attention
from .lora import LoraProjection, lora_write_signature
from .matvec import MatVecUnit
from .residual import ResidualAdd
from .rmsnorm import RMSNorm
from .rope import RoPE
from .stream_util import Fork, Join
from .swiglu import SwiGLU
from .vector import Gather

__all__ = ["DecoderLayer"]

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def matvec_cycles(unit):
    """Cycles from a :class:`MatVecUnit`'s input transfer to its whole output vector's
    ``valid`` (``o.ready`` high): ``cycles_per_vector()``, plus 1 for the :class:`Gather`
    that collects the chunks when there is more than one."""
    return unit.cycles_per_vector() + (1 if unit.row_groups > 1 else 0)


def _matvec_cycles(unit, lora_on):
    if isinstance(unit, LoraProjection):
        return unit.cycles_per_vector(lora_on) + (1 if unit.row_groups > 1 else 0)
    return matvec_cycles(unit)


class DecoderLayer(wiring.Component):
    """A Llama decoder layer, ``x -> x + attention(norm(x)) -> ... + ffn(norm(...))``, made of
    the blocks it is given (each built for this layer, with this layer's constants).

    Dataflow (``golden.GoldenModel.step``, one layer)::

        x --+-- attn_norm --+-- wq -- RoPE --+
            |               +-- wk -- RoPE --+-- Attention(pos) -- wo --+
            |               +-- wv ----------+                          |
            +---------------------------------------------------- ResidualAdd --> h
        h --+-- ffn_norm --+-- w1 --+
            |              +-- w3 --+-- SwiGLU -- w2 --+
            +---------------------------------- ResidualAdd --> o

    Fan-out is an eager :class:`Fork` (the residual branch holds its producer's output until
    the residual add takes it); the chunks of a :class:`MatVecUnit` with more than one row
    group are collected by a :class:`Gather`; q, k (after RoPE) and v meet in a :class:`Join`
    with the position, so the three projections run in parallel, as do w1 and w3. One
    vector is processed at a time; nothing in the layer waits except on data.

    Parameters
    ----------
    attn_norm, ffn_norm : RMSNorm
        Norms on the residual stream (``in_bits`` = the residual width).
    wq, wk, wv, wo, w1, w3, w2 : MatVecUnit or LoraProjection
        The layer's projections; a :class:`~.lora.LoraProjection` adds its LoRA correction
        (all LoRA projections of a layer share ``addr_bits``).
    rope_q, rope_k : RoPE
        Rotations of q (``n = dim``) and k (``n = kv_dim``).
    attention : Attention
        Attention over the layer's own KV cache; ``n_pos`` is the context length.
    swiglu : SwiGLU
        Gate (from ``w1``) times up (from ``w3``); its ``exp_max`` must be ``w2``'s (the
        exponent ``k`` reaches ``w2`` in the payload, which connects directly).

    The blocks with per-layer constants (norms, projections, attention, SwiGLU) may all be
    built with the same ``n_layers = L > 1`` (each holding the constants of ``L`` layers):
    the unit then computes any of the ``L`` layers, chosen by its ``layer`` port, with the
    same cycles (a layer-serial chip, :class:`~.chip.LlamaChip`, loops the residual stream
    through it). LoRA projections are per-layer only.

    Members
    -------
    i : ``In(stream.Signature(vector_layout(resid_bits, dim)))``
        Residual stream in.
    pos : ``In(pos_shape(n_pos))``
        Position of the token; held stable from the input transfer until the output transfer
        (it is sampled when q, k and v enter RoPE and attention). Must be below ``n_pos``.
    o : ``Out(stream.Signature(vector_layout(resid_bits, dim)))``
        Residual stream out (golden trace ``L{i}.out``).
    layer : ``In(range(n_layers))``
        Only when the blocks hold several layers' constants (``n_layers > 1``, a layer-serial
        chip): the layer this unit computes; held stable from the input transfer until the
        output transfer, like ``pos``. Every block with per-layer constants (the norms, the
        projections, attention and its KV cache, SwiGLU) reads it.
    rope_q_table, rope_k_table : ``Out(rope_table_signature(...))``
        Only when the RoPE units share a table (``shared_table``): their table read ports,
        served by the chip's :class:`~.rope.RoPETable`.
    lora_wr : ``In(lora_write_signature(addr_bits))``; lora_bank, lora_on : ``In(1)``
        Only with LoRA projections: the SRAM byte writes (to every LoRA projection; each
        keeps the bytes of its own section), the active bank, the adapter switch.
    """

    def __init__(self, *, attn_norm, wq, wk, wv, rope_q, rope_k, attention, wo, ffn_norm, w1,
                 w3, swiglu, w2):
        blocks = dict(attn_norm=attn_norm, wq=wq, wk=wk, wv=wv, rope_q=rope_q, rope_k=rope_k,
                      attention=attention, wo=wo, ffn_norm=ffn_norm, w1=w1, w3=w3,
                      swiglu=swiglu, w2=w2)
        kinds = dict(attn_norm=RMSNorm, ffn_norm=RMSNorm, rope_q=RoPE, rope_k=RoPE,
                     attention=Attention, swiglu=SwiGLU, **{n: MatVecUnit for n in MATRICES})
        for name, block in blocks.items():
            if name in MATRICES and isinstance(block, LoraProjection):
                continue
            if not isinstance(block, kinds[name]):
                raise ValueError(f"{name} must be a {kinds[name].__name__}, not "
                                 f"{type(block).__name__}")
        lora = [n for n in MATRICES if isinstance(blocks[n], LoraProjection)]
        addr_bits = {blocks[n].lora.addr_bits for n in lora}
        if len(addr_bits) > 1:
            raise ValueError(f"the LoRA projections' addr_bits differ: {sorted(addr_bits)}")
        dim, kv_dim, hidden = attention.dim, attention.kv_dim, swiglu.n
        rbits = attn_norm.in_bits

        def same(what, got, want, why):
            if got != want:
                raise ValueError(f"{what} is {got}, expected {want} ({why})")

        for n in ("attn_norm", "ffn_norm"):
            same(f"{n}.dim", blocks[n].dim, dim, "the attention's n_heads * head_size")
            same(f"{n}.in_bits", blocks[n].in_bits, rbits, "the residual width")
        shapes = dict(wq=(dim, dim), wk=(kv_dim, dim), wv=(kv_dim, dim), wo=(dim, dim),
                      w1=(hidden, dim), w3=(hidden, dim), w2=(dim, hidden))
        for n, shape in shapes.items():
            same(f"{n} shape", (blocks[n].rows, blocks[n].cols), shape, "dim, kv_dim, hidden")
        for n in ("wq", "wk", "wv"):
            same(f"{n}.in_bits", blocks[n].in_bits, attn_norm.out_bits, "attn_norm.out_bits")
            same(f"{n}.out_bits", blocks[n].out_bits, attention.bits, "attention.bits")
        for n in ("w1", "w3"):
            same(f"{n}.in_bits", blocks[n].in_bits, ffn_norm.out_bits, "ffn_norm.out_bits")
        same("rope_q.n", rope_q.n, dim, "dim")
        same("rope_k.n", rope_k.n, kv_dim, "kv_dim")
        for n in ("rope_q", "rope_k"):
            same(f"{n}.bits", blocks[n].bits, attention.bits, "attention.bits")
            same(f"{n}.seq_len", blocks[n].seq_len, attention.n_pos, "attention.n_pos")
        if rope_q.shared_table != rope_k.shared_table:
            raise ValueError("rope_q and rope_k must both have their own table or both share "
                             "one (shared_table)")
        same("wo.in_bits", wo.in_bits, attention.out_bits, "attention.out_bits")
        same("wo.out_bits", wo.out_bits, rbits, "the residual width")
        same("swiglu.in_bits", swiglu.in_bits, w1.out_bits, "w1.out_bits")
        same("swiglu.up_bits", swiglu.up_bits, w3.out_bits, "w3.out_bits")
        same("w2.in_bits", w2.in_bits, swiglu.out_bits, "swiglu.out_bits")
        # the SwiGLU output's exponent k travels in its payload to w2's requantizer
        same("w2.exp_max", w2.exp_max, swiglu.exp_max, "swiglu.exp_max")
        for n in MATRICES[:-1]:
            same(f"{n}.exp_max", blocks[n].exp_max, 0, "only w2 takes an exponent")
        same("w2.out_bits", w2.out_bits, rbits, "the residual width")
        banked = ("attn_norm", "ffn_norm", "attention", "swiglu") + MATRICES
        n_layers = getattr(attn_norm, "n_layers", 1)
        for n in banked:
            same(f"{n}.n_layers", getattr(blocks[n], "n_layers", 1), n_layers,
                 "attn_norm.n_layers: every block holds the same layers")
        if n_layers > 1 and lora:
            raise ValueError("LoRA projections are per-layer only: a unit with n_layers > 1 "
                             "cannot take them")

        self._blocks = blocks
        self._n_layers = n_layers
        self._banked = banked
        self._dim, self._resid_bits = dim, rbits
        self._lora = tuple(lora)
        ports = {
            "i": In(stream.Signature(vector_layout(rbits, dim))),
            "pos": In(pos_shape(attention.n_pos)),
            "o": Out(stream.Signature(vector_layout(rbits, dim))),
        }
        if n_layers > 1:
            ports["layer"] = In(range(n_layers))
        if rope_q.shared_table:
            ports.update(rope_q_table=Out(rope_q.table.signature),
                         rope_k_table=Out(rope_k.table.signature))
        if lora:
            ports.update(lora_wr=In(lora_write_signature(addr_bits.pop())), lora_bank=In(1),
                         lora_on=In(1))
        super().__init__(ports)

    dim = property(lambda self: self._dim)
    resid_bits = property(lambda self: self._resid_bits)
    n_pos = property(lambda self: self._blocks["attention"].n_pos)
    n_layers = property(lambda self: self._n_layers, doc="Layers whose constants the unit "
                        "holds (1: a dedicated layer; more: a shared, layer-serial unit).")
    blocks = property(lambda self: dict(self._blocks))

    @property
    def lora_targets(self):
        """Names of the projections with a LoRA path."""
        return self._lora

    @property
    def matrices(self):
        """The layer's :class:`MatVecUnit` by name (``wq`` ... ``w2``)."""
        return {n: self._blocks[n] for n in MATRICES}

    @property
    def mac_units(self):
        """Multipliers of the projections: ``sum(pe * simd)``."""
        return sum(u.mac_units for u in self.matrices.values())

    def cycle_breakdown(self, pos, *, lora_on=True):
        """Cycles of each stage on the layer's critical path at ``pos`` (``o.ready`` high):
        a dict whose values add up to :meth:`latency`. ``lora_on``: the LoRA projections'
        cycles with the adapter on (else their base cycles)."""
        b = self._blocks

        def matvec_cycles(unit):
            return _matvec_cycles(unit, lora_on)

        q = matvec_cycles(b["wq"]) + b["rope_q"].latency()
        k = matvec_cycles(b["wk"]) + b["rope_k"].latency()
        v = matvec_cycles(b["wv"])
        return {
            "attn_norm": b["attn_norm"].latency(),
            "qkv": max(q, k, v),
            "attention": b["attention"].latency(pos),
            "wo": matvec_cycles(b["wo"]),
            "attn_res": 1,
            "ffn_norm": b["ffn_norm"].latency(),
            "w1w3": max(matvec_cycles(b["w1"]), matvec_cycles(b["w3"])),
            "swiglu": b["swiglu"].latency(),
            "w2": matvec_cycles(b["w2"]),
            "ffn_res": 1,
        }

    def latency(self, pos, *, lora_on=True):
        """Cycles from the input transfer at ``pos`` to the first cycle ``o.valid`` is high
        (``o.ready`` held high): the sum of :meth:`cycle_breakdown`. Every stage is idle when
        its input arrives, so stage latencies add; parallel branches (q/k/v, w1/w3) count
        their slowest."""
        return sum(self.cycle_breakdown(pos, lora_on=lora_on).values())

    def elaborate(self, platform):
        m = Module()
        b = self._blocks
        for name, block in b.items():
            m.submodules[name] = block
        if self._n_layers > 1:
            m.d.comb += [b[n].layer.eq(self.layer) for n in self._banked]
        if b["rope_q"].shared_table:      # the table ROM is the chip's (RoPETable)
            wiring.connect(m, b["rope_q"].table, wiring.flipped(self.rope_q_table))
            wiring.connect(m, b["rope_k"].table, wiring.flipped(self.rope_k_table))
        for name in self._lora:
            m.d.comb += [b[name].wr.en.eq(self.lora_wr.en), b[name].wr.bank.eq(self.lora_wr.bank),
                         b[name].wr.addr.eq(self.lora_wr.addr),
                         b[name].wr.data.eq(self.lora_wr.data),
                         b[name].bank.eq(self.lora_bank), b[name].on.eq(self.lora_on)]
        rvec = vector_layout(self._resid_bits, self._dim)

        def fork(name, src, shape, n):
            m.submodules[name] = f = Fork(shape=shape, n=n)
            wiring.connect(m, src, f.i)
            return f.o

        def whole(name):
            """The whole output vector stream of a projection."""
            unit = b[name]
            if unit.row_groups == 1:
                return unit.o
            m.submodules[f"{name}_gather"] = g = Gather(n=unit.rows, lanes=unit.pe,
                                                       bits=unit.out_bits)
            wiring.connect(m, unit.o, g.i)
            return g.o

        def join(name, layout, streams, sources):
            m.submodules[name] = j = Join(layout=layout, streams=streams)
            for field, src in zip(streams, sources):
                wiring.connect(m, src, getattr(j, f"i_{field}"))
            m.d.comb += j.pos.eq(self.pos)
            return j.o

        # attention half
        x = fork("x_fork", wiring.flipped(self.i), rvec, 2)
        wiring.connect(m, x[0], b["attn_norm"].i)
        xn = fork("xn_fork", b["attn_norm"].o, b["attn_norm"].o.payload.shape(), 3)
        for k, name in enumerate(("wq", "wk", "wv")):
            wiring.connect(m, xn[k], b[name].i)
        for rope, name in (("rope_q", "wq"), ("rope_k", "wk")):
            wiring.connect(m, join(f"{rope}_join", b[rope].i.payload.shape(), ("vec",),
                                   [whole(name)]), b[rope].i)
        att = b["attention"]
        wiring.connect(m, join("attention_join", att.i.payload.shape(), ("q", "k", "v"),
                               [b["rope_q"].o, b["rope_k"].o, whole("wv")]), att.i)
        wiring.connect(m, att.o, b["wo"].i)
        m.submodules.attn_res = attn_res = ResidualAdd(dim=self._dim, bits=self._resid_bits)
        wiring.connect(m, x[1], attn_res.a)
        wiring.connect(m, whole("wo"), attn_res.b)

        # feed-forward half
        h = fork("h_fork", attn_res.o, rvec, 2)
        wiring.connect(m, h[0], b["ffn_norm"].i)
        hn = fork("hn_fork", b["ffn_norm"].o, b["ffn_norm"].o.payload.shape(), 2)
        wiring.connect(m, hn[0], b["w1"].i)
        wiring.connect(m, hn[1], b["w3"].i)
        wiring.connect(m, whole("w1"), b["swiglu"].gate)
        wiring.connect(m, whole("w3"), b["swiglu"].up)
        wiring.connect(m, b["swiglu"].o, b["w2"].i)
        m.submodules.ffn_res = ffn_res = ResidualAdd(dim=self._dim, bits=self._resid_bits)
        wiring.connect(m, h[1], ffn_res.a)
        wiring.connect(m, whole("w2"), ffn_res.b)
        wiring.connect(m, ffn_res.o, wiring.flipped(self.o))
        return m
