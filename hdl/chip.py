# amaranth: UnusedElaboratable=no
"""The whole model as one chip: embedding ROM, one hardware decoder layer per layer, final
norm, classifier and argmax, with a position counter, error flags, an ID ROM and a debug tap.

(The first line tells Amaranth not to warn about an argmax of a chip built only to read its
cycle formulas.)
"""

import operator

import numpy as np

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .argmax import Argmax
from .arith import pos_shape, vector_layout
from .decoder import DecoderLayer
from .embedding import EmbeddingROM
from .lora_loader import STATUS_LAYOUT, LoraLoader
from .matvec import MatVecUnit
from .rmsnorm import RMSNorm
from .rope import RoPETable

__all__ = [
    "ID_MAGIC",
    "ID_VERSION",
    "ID_WORDS",
    "WEIGHT_CLASSES",
    "LlamaChip",
    "id_rom_words",
]

#: Word 0 of the ID ROM: ``"HWR1"`` in ASCII.
ID_MAGIC = 0x48575231
#: Word 1 of the ID ROM: layout version of this map.
ID_VERSION = 1
#: Words in the ID ROM (``id_addr`` is 6 bits).
ID_WORDS = 64
#: Weight classes in the order of their 4-bit fields in ID word 17.
WEIGHT_CLASSES = ("embed", "attn_qkv", "attn_out", "ffn_gate_up", "ffn_down")


def _hex_words(hex_digest, n, *, what):
    data = bytes.fromhex(hex_digest)
    if len(data) < 4 * n:
        raise ValueError(f"{what} has {len(data)} bytes, at least {4 * n} are needed")
    return [int.from_bytes(data[4 * k:4 * k + 4], "big") for k in range(n)]


def id_rom_words(*, model_hash, dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size,
                 seq_len, weight_bits, digest, lora_mask=0, lora_r_max=0,
                 lora_image_length=0):
    """Contents of the chip's ID ROM (see :class:`LlamaChip`), as a list of 32-bit words.

    ``model_hash`` and ``digest`` are hex strings (the model's content sha256 and the
    quantized datapath's digest); ``weight_bits`` maps each of :data:`WEIGHT_CLASSES` to its
    width (3..15). A chip with LoRA sets ``lora_mask`` (bit ``i``: target ``i`` of
    ``wq, wk, wv, wo, w1, w2, w3``), ``lora_r_max`` and ``lora_image_length`` (words 19, 20).
    """
    words = [ID_MAGIC, ID_VERSION]
    words += _hex_words(model_hash, 8, what="model_hash")
    for name, v in (("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads),
                    ("n_kv_heads", n_kv_heads), ("hidden_dim", hidden_dim),
                    ("vocab_size", vocab_size), ("seq_len", seq_len)):
        v = operator.index(v)
        if not 0 < v < 1 << 32:
            raise ValueError(f"{name} ({v}) must fit a 32-bit word")
        words.append(v)
    packed = 0
    for k, name in enumerate(WEIGHT_CLASSES):
        if name not in weight_bits:
            raise ValueError(f"weight_bits has no width for {name!r}")
        b = operator.index(weight_bits[name])
        if not 0 < b < 16:
            raise ValueError(f"weight_bits[{name!r}] ({b}) must fit 4 bits")
        packed |= b << (4 * k)
    words.append(packed)
    words += _hex_words(digest, 1, what="digest")
    if lora_mask:
        if not (0 < lora_mask < 1 << 7 and 0 < lora_r_max < 1 << 16
                and 0 < lora_image_length < 1 << 32):
            raise ValueError(f"LoRA ID fields out of range: mask {lora_mask}, r_max "
                             f"{lora_r_max}, image length {lora_image_length}")
        words += [lora_mask | lora_r_max << 8, lora_image_length]
    return words + [0] * (ID_WORDS - len(words))


class LlamaChip(wiring.Component):
    """A Llama model as a hard-wired chip: one token in, the greedy next token out.

    ``token_in`` -> range and context checks -> :class:`EmbeddingROM` -> one
    :class:`DecoderLayer` per layer (each with its own weight ROMs and KV cache; the RoPE
    table is the chip's, see below) -> final
    :class:`RMSNorm` -> classifier :class:`MatVecUnit` -> :class:`Argmax` (``lanes`` = the
    classifier's ``pe``, fed its chunks directly) -> ``token_out``. One token is processed at
    a time: ``token_in`` is ready while the chip is idle (not ``busy``), and ``busy`` lasts
    from the token's transfer until its ``token_out`` transfer. Every accepted in-range token
    produces exactly one ``token_out``, in order. Cycles from the ``token_in`` transfer at
    position ``pos`` to the first cycle ``token_out.valid`` is high: :meth:`cycles_per_token`.

    **Layer-serial chip**: ``layers`` may instead be a single :class:`DecoderLayer` whose
    blocks hold the constants of all ``L = layer.n_layers`` layers (one shared unit, one
    KV cache with ``L`` regions). The residual vector then loops through it ``L`` times: the
    chip drives its ``layer`` port with a counter; the unit's output for layer ``l < L-1`` is
    taken into a loop register (one residual vector) while the counter moves to ``l + 1``,
    and from the next cycle that register is the unit's input; layer ``L-1``'s output goes to
    the final norm. Cycles are the dedicated chip's plus one per loop (``L{k}.handoff`` in
    :meth:`cycle_breakdown`), with about ``1/L`` of the layer logic and flip-flops.

    A token with id ``>= vocab_size`` sets the sticky ``err_token``; a token fed while
    ``pos == seq_len`` sets the sticky ``err_context``; either way it is consumed and dropped
    (no output, position and KV caches unchanged). ``reset_ctx`` (a pulse while not busy;
    ignored while busy, and ``token_in`` is not taken in its cycle) sets ``pos`` to 0 and
    clears both flags; the KV caches are not cleared (attention reads rows ``0..pos`` only).

    ID ROM (``id_data`` is combinational in ``id_addr``), 32-bit words:

    ======  =================================================================================
    word    contents
    ======  =================================================================================
    0       magic ``0x48575231`` (``"HWR1"``)
    1       format version, 1
    2..9    the model content hash (sha256), 32 bytes as big-endian words
    10..16  dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, seq_len
    17      weight bits: ``embed | attn_qkv << 4 | attn_out << 8 | ffn_gate_up << 12 |
            ffn_down << 16``
    18      first 4 bytes of the quantized datapath digest (big-endian)
    19      LoRA: ``target mask | r_max << 8`` (mask bit 0 ``wq`` .. 6 ``w3``, as the image
            header), 0 without LoRA
    20      LoRA: the length in bytes of a complete adapter image for this build, 0 without
    21..63  zero
    ======  =================================================================================

    Debug tap (never stalls the chip): in the cycle after layer ``i``'s output vector (golden
    trace ``L{i}.out``) transfers, ``tap_valid`` is high for one cycle with ``tap_layer = i``
    and the vector on ``tap_data``.

    When the layers' RoPE units are built with ``shared_table`` (as
    :func:`~hardwire.compiler.chip_builder.build_chip` does), the chip holds their cos/sin
    table once, in a :class:`~.rope.RoPETable` (one ROM, a read port for q and one for k)
    whose read ports serve whichever layer's units read (one layer at a time).

    The shared classifier of a tied-embedding model uses the same integer table as the
    embedding. Folded ``1 x embedding.lanes`` (``rom_port``) it reads the embedding's ROM
    through its ``shared`` port, so the table is stored once: the embedding reads only
    between a token's transfer and its vector, the classifier only after the final norm.
    Otherwise the two are separate ROMs (the classifier's folded by ``pe``/``simd``).

    Parameters
    ----------
    embedding : EmbeddingROM
        Token embedding, ``out_bits`` = the residual width.
    layers : sequence of DecoderLayer
        The decoder layers, in order (same ``dim``, residual width and ``n_pos``).
    final_norm : RMSNorm
        Final norm.
    classifier : MatVecUnit
        ``vocab_size x dim`` classifier (logits).
    id_words : sequence of int
        At most 64 words of 32 bits for the ID ROM (:func:`id_rom_words`).
    lora_loader : LoraLoader, optional
        With LoRA projections in the layers: the adapter loader, whose ``wr``, ``bank`` and
        ``on`` drive every layer's LoRA ports; its ``boundary`` is high while the chip is
        idle (not ``busy``), so a bank switch or enable never lands inside a token.

    Members
    -------
    token_in : ``In(stream.Signature(unsigned(token_bits)))``
        ``token_bits = max(1, ceil(log2(vocab_size))) + 1``.
    token_out : ``Out(stream.Signature(unsigned(token_bits)))``
        The argmax next token of each accepted in-range token.
    reset_ctx : ``In(1)``
        New context (see above).
    pos : ``Out(pos_shape(seq_len))``
        Tokens consumed in this context (incremented when a token is accepted).
    busy : ``Out(1)``
        A token is being processed.
    err_token, err_context : ``Out(1)``
        Sticky error flags (see above).
    id_addr : ``In(unsigned(6))``; id_data : ``Out(unsigned(32))``
        ID ROM, combinational read.
    tap_valid : ``Out(1)``; tap_layer : ``Out(unsigned(max(1, ceil(log2(n_layers)))))``;
    tap_data : ``Out(vector_layout(resid_bits, dim))``
        Layer output debug tap.
    lora_in : ``In(stream.Signature(8))``; lora_cmd : ``In(stream.Signature(3))``;
    lora_status : ``Out(STATUS_LAYOUT)``
        Only with ``lora_loader``: its image bytes, commands and status word.
    """

    def __init__(self, *, embedding, layers, final_norm, classifier, id_words,
                 lora_loader=None):
        layers = list(layers)
        if not isinstance(embedding, EmbeddingROM):
            raise ValueError(f"embedding must be an EmbeddingROM, not "
                             f"{type(embedding).__name__}")
        if not layers:
            raise ValueError("layers must hold at least one DecoderLayer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, DecoderLayer):
                raise ValueError(f"layers[{k}] must be a DecoderLayer, not "
                                 f"{type(layer).__name__}")
        banked = [k for k, layer in enumerate(layers) if layer.n_layers > 1]
        if banked and len(layers) > 1:
            raise ValueError(f"layers[{banked[0]}] holds {layers[banked[0]].n_layers} layers: "
                             "a layer-serial chip has exactly one (shared) DecoderLayer")
        self._serial = bool(banked)
        self._n_layers = layers[0].n_layers if banked else len(layers)
        if not isinstance(final_norm, RMSNorm):
            raise ValueError(f"final_norm must be an RMSNorm, not {type(final_norm).__name__}")
        if not isinstance(classifier, MatVecUnit):
            raise ValueError(f"classifier must be a MatVecUnit, not "
                             f"{type(classifier).__name__}")
        dim, rbits, n_pos = layers[0].dim, layers[0].resid_bits, layers[0].n_pos
        vocab = embedding.vocab

        def same(what, got, want, why):
            if got != want:
                raise ValueError(f"{what} is {got}, expected {want} ({why})")

        same("embedding.dim", embedding.dim, dim, "layers[0].dim")
        same("embedding.out_bits", embedding.out_bits, rbits, "the residual width")
        for k, layer in enumerate(layers[1:], 1):
            same(f"layers[{k}].dim", layer.dim, dim, "layers[0].dim")
            same(f"layers[{k}].resid_bits", layer.resid_bits, rbits, "layers[0].resid_bits")
            same(f"layers[{k}].n_pos", layer.n_pos, n_pos, "layers[0].n_pos")
        same("final_norm.dim", final_norm.dim, dim, "layers[0].dim")
        same("final_norm.in_bits", final_norm.in_bits, rbits, "the residual width")
        same("classifier shape", (classifier.rows, classifier.cols), (vocab, dim),
             "vocab_size x dim")
        same("classifier.in_bits", classifier.in_bits, final_norm.out_bits,
             "final_norm.out_bits")
        if classifier.rom_port:
            if not embedding.shared_reader:
                raise ValueError("the classifier reads its weights through a port, but the "
                                 "embedding has no shared_reader")
            if not (classifier.pe == 1 and classifier.simd == embedding.lanes
                    and classifier.weight_bits == embedding.weight_bits
                    and np.array_equal(classifier.weights, embedding.table)):
                raise ValueError("a classifier reading the embedding ROM needs the embedding's "
                                 "table and width, pe = 1 and simd = embedding.lanes")
        id_words = [operator.index(w) for w in id_words]
        if len(id_words) > ID_WORDS:
            raise ValueError(f"id_words has {len(id_words)} words, the ROM holds {ID_WORDS}")
        bad = [w for w in id_words if not 0 <= w < 1 << 32]
        if bad:
            raise ValueError(f"id_words must be 32-bit unsigned words, not {bad[0]}")

        with_lora = [k for k, layer in enumerate(layers) if layer.lora_targets]
        if lora_loader is not None:
            if not isinstance(lora_loader, LoraLoader):
                raise ValueError(f"lora_loader must be a LoraLoader, not "
                                 f"{type(lora_loader).__name__}")
            if not with_lora:
                raise ValueError("lora_loader given, but no layer has a LoRA projection")
            for k in with_lora:
                same(f"layers[{k}].lora_wr.addr width", len(layers[k].lora_wr.addr),
                     lora_loader.addr_bits, "the loader's addr_bits")
        elif with_lora:
            raise ValueError(f"layers[{with_lora[0]}] has LoRA projections but no lora_loader "
                             "was given")
        shared = [layer.blocks["rope_q"].shared_table for layer in layers]
        if any(shared) and not all(shared):
            raise ValueError(f"layers[{shared.index(not shared[0])}]: either every layer's "
                             "RoPE units share the chip's table or none does")
        self._rope_table = RoPETable(ropes=[(layer.blocks["rope_q"], layer.blocks["rope_k"])
                                            for layer in layers]) if all(shared) else None
        self._lora_loader = lora_loader
        self._embedding, self._layers = embedding, layers
        self._final_norm, self._classifier = final_norm, classifier
        self._argmax = Argmax(n=vocab, bits=classifier.out_bits, lanes=classifier.pe)
        self._id_words = id_words + [0] * (ID_WORDS - len(id_words))
        self._dim, self._resid_bits, self._seq_len, self._vocab = dim, rbits, n_pos, vocab
        self._token_bits = max(1, (vocab - 1).bit_length()) + 1
        token = unsigned(self._token_bits)
        lora_ports = {"lora_in": In(stream.Signature(8)), "lora_cmd": In(stream.Signature(3)),
                      "lora_status": Out(STATUS_LAYOUT)} if lora_loader is not None else {}
        super().__init__({
            **lora_ports,
            "token_in": In(stream.Signature(token)),
            "token_out": Out(stream.Signature(token)),
            "reset_ctx": In(1),
            "pos": Out(pos_shape(n_pos)),
            "busy": Out(1),
            "err_token": Out(1),
            "err_context": Out(1),
            "id_addr": In(unsigned(6)),
            "id_data": Out(unsigned(32)),
            "tap_valid": Out(1),
            "tap_layer": Out(unsigned(max(1, (self._n_layers - 1).bit_length()))),
            "tap_data": Out(vector_layout(rbits, dim)),
        })

    embedding = property(lambda self: self._embedding)
    layers = property(lambda self: list(self._layers))
    final_norm = property(lambda self: self._final_norm)
    classifier = property(lambda self: self._classifier)
    argmax = property(lambda self: self._argmax)
    id_words = property(lambda self: list(self._id_words))
    lora_loader = property(lambda self: self._lora_loader)
    rope_table = property(lambda self: self._rope_table)
    dim = property(lambda self: self._dim)
    n_layers = property(lambda self: self._n_layers)
    layer_serial = property(lambda self: self._serial, doc="One shared DecoderLayer computes "
                            "every layer in turn (see the class doc).")
    resid_bits = property(lambda self: self._resid_bits)
    seq_len = property(lambda self: self._seq_len)
    vocab_size = property(lambda self: self._vocab)
    token_bits = property(lambda self: self._token_bits)

    @property
    def mac_units(self):
        """Multipliers of every projection and the classifier: ``sum(pe * simd)`` (one shared
        unit's on a layer-serial chip)."""
        return (sum(layer.mac_units for layer in self._layers) +
                self._classifier.mac_units)

    def cycle_breakdown(self, pos, *, lora_on=True):
        """Cycles per stage of one token at ``pos`` (``token_out.ready`` high), keyed
        ``embed``, ``L{i}.<stage>`` (see :meth:`DecoderLayer.cycle_breakdown`; on a
        layer-serial chip also ``L{i}.handoff``, 1, for every layer but the last),
        ``final_norm``, ``classifier``, ``argmax``; they add up to :meth:`cycles_per_token`.
        ``lora_on``: with the adapter on (the default) or off (the base cycles)."""
        if not 0 <= pos < self._seq_len:
            raise ValueError(f"pos ({pos}) must lie in [0, seq_len = {self._seq_len})")
        out = {"embed": self._embedding.latency()}
        for k in range(self._n_layers):
            layer = self._layers[0 if self._serial else k]
            out.update({f"L{k}.{n}": c for n, c in
                        layer.cycle_breakdown(pos, lora_on=lora_on).items()})
            if self._serial and k < self._n_layers - 1:
                out[f"L{k}.handoff"] = 1
        out["final_norm"] = self._final_norm.latency()
        out["classifier"] = self._classifier.cycles_per_vector()
        out["argmax"] = self._argmax.latency()
        return out

    def cycles_per_token(self, pos, *, lora_on=True):
        """Cycles from the ``token_in`` transfer of a token at position ``pos`` to the first
        cycle its ``token_out.valid`` is high, with ``token_out.ready`` held high. The next
        token can be taken in the cycle after the ``token_out`` transfer."""
        return sum(self.cycle_breakdown(pos, lora_on=lora_on).values())

    def _serial_loop(self, m, src, work_pos):
        """Loop the residual vector from ``src`` through the shared layer ``L`` times; returns
        the stream of layer ``L-1``'s output. ``cur`` is the layer the unit computes. Layer
        ``l < L-1``'s output is taken into a loop register (the unit's input is held by its
        producer until the unit's residual add takes it, and the unit's ``i.ready`` depends
        combinationally on its ``o.ready``, so the output cannot feed the input directly)."""
        layer, last = self._layers[0], self._n_layers - 1
        cur = Signal(range(self._n_layers), name="layer_cur")
        buf = Signal.like(layer.o.payload, name="layer_loop")
        buf_valid = Signal(name="layer_loop_valid")
        is_last = cur == last
        m.d.comb += [
            layer.pos.eq(work_pos),
            layer.layer.eq(cur),
            layer.i.valid.eq(buf_valid | src.valid),
            layer.i.payload.eq(Mux(buf_valid, buf, src.payload)),
            src.ready.eq(layer.i.ready & ~buf_valid),
        ]
        out = stream.Signature(layer.o.payload.shape()).create(path=("layer_out",))
        m.d.comb += [
            out.valid.eq(layer.o.valid & is_last),
            out.payload.eq(layer.o.payload),
            layer.o.ready.eq(Mux(is_last, out.ready, ~buf_valid)),
        ]
        with m.If(layer.o.valid & layer.o.ready):
            with m.If(is_last):
                m.d.sync += cur.eq(0)
            with m.Else():
                m.d.sync += [buf.eq(layer.o.payload), buf_valid.eq(1), cur.eq(cur + 1)]
        with m.If(buf_valid & layer.i.ready):
            m.d.sync += buf_valid.eq(0)
        self._tap_layer = cur
        return out

    def elaborate(self, platform):
        m = Module()
        emb, norm, cls, amax = self._embedding, self._final_norm, self._classifier, self._argmax
        m.submodules.embedding = emb
        for k, layer in enumerate(self._layers):
            m.submodules[f"layer{k}"] = layer
        m.submodules.final_norm = norm
        m.submodules.classifier = cls
        m.submodules.argmax = amax

        # ---- token gate: range and context checks, position, busy, error flags
        work_pos = Signal(pos_shape(self._seq_len))    # position of the token in flight
        tok = self.token_in.payload
        in_vocab = tok < self._vocab
        has_room = self.pos < self._seq_len
        ok = in_vocab & has_room
        idle = ~self.busy & ~self.reset_ctx
        m.d.comb += [
            emb.i.payload.eq(tok[:emb.token_bits]),
            emb.i.valid.eq(self.token_in.valid & idle & ok),
            self.token_in.ready.eq(idle & (emb.i.ready | ~ok)),
        ]
        with m.If(self.token_in.valid & self.token_in.ready):
            with m.If(ok):
                m.d.sync += [self.busy.eq(1), work_pos.eq(self.pos), self.pos.eq(self.pos + 1)]
            with m.If(~in_vocab):
                m.d.sync += self.err_token.eq(1)
            with m.If(~has_room):
                m.d.sync += self.err_context.eq(1)
        with m.If(self.reset_ctx & ~self.busy):
            m.d.sync += [self.pos.eq(0), self.err_token.eq(0), self.err_context.eq(0)]

        # ---- datapath
        if self._serial:
            out = self._serial_loop(m, emb.o, work_pos)
        else:
            src = emb.o
            for layer in self._layers:
                wiring.connect(m, src, layer.i)
                m.d.comb += layer.pos.eq(work_pos)
                src = layer.o
            out = src
        wiring.connect(m, out, norm.i)
        wiring.connect(m, norm.o, cls.i)
        if cls.rom_port:        # the tied classifier reads the embedding table (never both)
            wiring.connect(m, cls.rom, emb.shared)
        wiring.connect(m, cls.o, amax.i)
        m.d.comb += [
            self.token_out.valid.eq(amax.o.valid),
            self.token_out.payload.eq(amax.o.payload),
            amax.o.ready.eq(self.token_out.ready),
        ]
        with m.If(self.token_out.valid & self.token_out.ready):
            m.d.sync += self.busy.eq(0)

        # ---- one RoPE table for all layers: the layers run one after another (one token in
        # flight, and a layer's RoPE units run between its input and output transfers), so
        # at most one layer's units read the table in any cycle (rope_table.clash: never)
        if self._rope_table is not None:
            m.submodules.rope_table = rt = self._rope_table
            for k, layer in enumerate(self._layers):
                wiring.connect(m, layer.rope_q_table, rt.q[k])
                wiring.connect(m, layer.rope_k_table, rt.k[k])

        # ---- LoRA: the loader drives every layer's SRAM writes, bank and switch
        if self._lora_loader is not None:
            m.submodules.lora_loader = ld = self._lora_loader
            wiring.connect(m, wiring.flipped(self.lora_in), ld.i)
            wiring.connect(m, wiring.flipped(self.lora_cmd), ld.cmd)
            m.d.comb += [ld.boundary.eq(~self.busy), self.lora_status.eq(ld.status)]
            for layer in self._layers:
                if layer.lora_targets:
                    m.d.comb += [layer.lora_wr.en.eq(ld.wr.en), layer.lora_wr.bank.eq(ld.wr.bank),
                                 layer.lora_wr.addr.eq(ld.wr.addr),
                                 layer.lora_wr.data.eq(ld.wr.data),
                                 layer.lora_bank.eq(ld.bank), layer.lora_on.eq(ld.on)]

        # ---- debug tap: the transfer of each layer's output, registered
        m.d.sync += self.tap_valid.eq(0)
        for k, layer in enumerate(self._layers):
            with m.If(layer.o.valid & layer.o.ready):
                m.d.sync += [self.tap_valid.eq(1), self.tap_data.eq(layer.o.payload),
                             self.tap_layer.eq(self._tap_layer if self._serial else k)]

        # ---- ID ROM (combinational)
        with m.Switch(self.id_addr):
            for addr, word in enumerate(self._id_words):
                if word:
                    with m.Case(addr):
                        m.d.comb += self.id_data.eq(word)
        return m

