"""A TEST DOUBLE of the LlamaChip interface, for unit-testing the host link and the board.

It is not a model of anything: its "next token" is the arithmetic function
:func:`double_next` of the token and the position, produced ``latency`` cycles after the
token is taken. Everything else follows the LlamaChip interface contract (hdl/chip.py):
ready only while idle, sticky ``err_token``/``err_context`` with the offending token
consumed and dropped, ``reset_ctx`` (while idle) clearing the position and the flags, a
combinational 64-word ID ROM.

With ``lora`` (the ``header``/``image_length`` of a :class:`~hardwire.hdl.lora_loader.LoraLoader`)
it holds a REAL LoraLoader behind ``lora_in``/``lora_cmd``/``lora_status``, with ``boundary`` =
not busy, as LlamaChip does; the adapter state it reads when it takes a token (on, bank) shifts
the next token by :func:`lora_shift`, so a test sees which adapter computed each token.
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hardwire.fpga.hostlink import word_table
from hardwire.hdl.arith import pos_shape
from hardwire.hdl.lora_loader import STATUS_LAYOUT, LoraLoader

__all__ = ["ChipDouble", "DoubleModel", "double_next", "lora_shift"]


def double_next(token, pos, vocab_size, shift=0):
    return (7 * token + 3 * pos + 1 + shift) % vocab_size


def lora_shift(on, bank):
    """What the adapter adds to the double's next token: 0 off, 5 bank 0, 16 bank 1."""
    return (5 + 11 * bank) if on else 0


class DoubleModel:
    """Python reference of :class:`ChipDouble` (position, flags, outputs)."""

    def __init__(self, vocab_size, seq_len):
        self.vocab, self.seq_len = vocab_size, seq_len
        self.pos, self.err_token, self.err_context = 0, False, False

    def feed(self, token, shift=0):
        if token >= self.vocab:
            self.err_token = True
            return None
        if self.pos == self.seq_len:
            self.err_context = True
            return None
        out = double_next(token, self.pos, self.vocab, shift)
        self.pos += 1
        return out

    def reset(self):
        self.pos, self.err_token, self.err_context = 0, False, False


class ChipDouble(wiring.Component):
    def __init__(self, *, vocab_size, seq_len, latency=5, id_words=(), lora=None):
        self.vocab_size, self.seq_len, self.latency = vocab_size, seq_len, latency
        self.token_bits = max(1, (vocab_size - 1).bit_length()) + 1
        self.id_words = list(id_words) + [0] * (64 - len(id_words))
        self.loader = None if lora is None else LoraLoader(**lora)
        token = unsigned(self.token_bits)
        lora_ports = {} if lora is None else {
            "lora_in": In(stream.Signature(8)), "lora_cmd": In(stream.Signature(3)),
            "lora_status": Out(STATUS_LAYOUT)}
        super().__init__({
            "token_in": In(stream.Signature(token)),
            "token_out": Out(stream.Signature(token)),
            "reset_ctx": In(1),
            "pos": Out(pos_shape(seq_len)),
            "busy": Out(1),
            "err_token": Out(1),
            "err_context": Out(1),
            "id_addr": In(unsigned(6)),
            "id_data": Out(unsigned(32)),
            **lora_ports,
        })

    def elaborate(self, platform):
        m = Module()
        tok = Signal(self.token_bits)
        wait = Signal(range(self.latency + 1))
        word_table(m, self.id_addr, self.id_data, self.id_words)
        shift = 0
        if self.loader is not None:
            m.submodules.loader = ld = self.loader
            wiring.connect(m, wiring.flipped(self.lora_in), ld.i)
            wiring.connect(m, wiring.flipped(self.lora_cmd), ld.cmd)
            m.d.comb += [self.lora_status.eq(ld.status), ld.boundary.eq(~self.busy)]
            shift = Mux(ld.on, Mux(ld.bank, 16, 5), 0)
        m.d.comb += self.token_in.ready.eq(~self.busy & ~self.reset_ctx)
        with m.If(self.reset_ctx & ~self.busy):
            m.d.sync += [self.pos.eq(0), self.err_token.eq(0), self.err_context.eq(0)]
        with m.If(self.token_in.valid & self.token_in.ready):
            with m.If(self.token_in.payload >= self.vocab_size):
                m.d.sync += self.err_token.eq(1)
            with m.Elif(self.pos == self.seq_len):
                m.d.sync += self.err_context.eq(1)
            with m.Else():
                nxt = (self.token_in.payload * 7 + self.pos * 3 + 1 + shift) % self.vocab_size
                m.d.sync += [tok.eq(nxt), self.busy.eq(1), wait.eq(self.latency),
                             self.pos.eq(self.pos + 1)]
        with m.If(self.busy):
            with m.If(wait != 0):
                m.d.sync += wait.eq(wait - 1)
            with m.Else():
                m.d.comb += [self.token_out.valid.eq(1), self.token_out.payload.eq(tok)]
                with m.If(self.token_out.ready):
                    m.d.sync += self.busy.eq(0)
        return m
