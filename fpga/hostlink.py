"""Gateware side of the host link: framed commands over a byte stream, driving a LlamaChip.

:class:`HostLinkEngine` parses request frames (format in :mod:`.protocol` and
``docs/host_link.md``) from a byte stream (a :class:`~.uart.UARTRx`), executes them against
the chip's ports and queues replies in a :class:`FrameTx`, which serializes them (header,
payload, CRC) onto a byte stream (a :class:`~.uart.UARTTx`). Replies are built while the
next command step runs, so a GENERATE computes token ``k + 1`` while token ``k`` is sent.

Every malformed frame is answered with exactly one ERROR frame, and parsing restarts at the
next sync byte once the line has been idle for ``timeout_cycles``, so garbage cannot wedge
the link: bytes outside a frame, a bad version, an unknown command or a length not allowed
for the command are drained until the line goes idle, then reported (BAD_SYNC, BAD_VERSION,
UNKNOWN_CMD, BAD_LENGTH); a bad CRC is reported the same way (a corrupted length may have
misaligned the frame); a frame cut short is reported after ``timeout_cycles`` of silence
(TIMEOUT). Tokens are range- and context-checked before they reach the chip, and a chip that
does not answer within ``token_timeout_cycles`` is reported (CHIP_TIMEOUT).

Commands are dispatched through :attr:`HostLinkEngine.handlers` (command -> function adding
its states to the FSM), so a new command is one method and one :func:`~.protocol.length_rule`
entry. With ``lora=True`` the engine also forwards the LoRA upload commands (0x10..0x16) to
the chip's adapter loader (``lora_in``, ``lora_cmd``, ``lora_status``; see
``hdl/lora_loader.py``).
"""

import functools
import operator
from typing import ClassVar

from amaranth.hdl import Cat, Const, Module, Signal, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from hardwire.hdl.arith import pos_shape, xor_terms
from hardwire.hdl.lora_loader import STATUS_LAYOUT

from . import protocol as P

__all__ = ["FRAME_REQUEST", "FrameTx", "HostLinkEngine", "connect_chip", "crc16_next",
           "word_table"]


def word_table(m, sel, out, words, default=None):
    """Drive ``out`` with ``words[sel]`` (combinational), else ``default`` (if given)."""
    with m.Switch(sel):
        for n, w in enumerate(words):
            with m.Case(n):
                m.d.comb += out.eq(w)
        if default is not None:
            with m.Default():
                m.d.comb += out.eq(default)


def connect_chip(m, link, chip):
    """Wire a :class:`HostLinkEngine` to a chip's ports (token streams, reset, status, ID
    ROM and, for an engine built with ``lora=True``, the LoRA loader's ports)."""
    wiring.connect(m, link.chip_in, chip.token_in)
    wiring.connect(m, chip.token_out, link.chip_out)
    m.d.comb += [
        chip.reset_ctx.eq(link.reset_ctx),
        link.pos.eq(chip.pos), link.busy.eq(chip.busy),
        link.err_token.eq(chip.err_token), link.err_context.eq(chip.err_context),
        chip.id_addr.eq(link.id_addr), link.id_data.eq(chip.id_data),
    ]
    if link.lora:
        wiring.connect(m, link.lora_in, chip.lora_in)
        wiring.connect(m, link.lora_cmd, chip.lora_cmd)
        m.d.comb += link.lora_status.eq(chip.lora_status)


def crc16_next(crc, byte):
    """CRC-16/CCITT-FALSE register after one more byte, as XORs of the input bits (the bit
    equations are derived in Python by running the serial algorithm on symbolic bits)."""
    # Each bit is the set of input bit indices it XORs: crc bits 0..15, byte bits 16..23.
    reg = [frozenset([k]) for k in range(16)]
    for k in range(8):
        reg[8 + k] = reg[8 + k] ^ frozenset([16 + k])
    for _ in range(8):
        top = reg[15]
        reg = [frozenset()] + reg[:15]
        for k in (0, 5, 12):                # 0x1021
            reg[k] = reg[k] ^ top
    return xor_terms(Cat(crc, byte), reg)


#: A reply for :class:`FrameTx`: command byte, payload length, and where the payload comes
#: from: ``data[0:length]`` (``info = 0``) or the INFO words (``info = 1``).
FRAME_REQUEST = data.StructLayout({
    "cmd": 8, "length": 16, "info": 1, "data": data.ArrayLayout(8, 8),
})


class FrameTx(wiring.Component):
    """Serializes reply frames: sync, version, command, length, payload, CRC.

    INFO payloads are ``info_words`` followed by the 64 chip ID ROM words, each big-endian;
    the ID ROM is read through ``id_addr``/``id_data`` (each word is read after its address
    has been stable for two cycles, so a combinational or a one-cycle read both work).

    Parameters
    ----------
    info_words : sequence of int
        32-bit words sent before the ID ROM words in an INFO payload.

    Members
    -------
    req : ``In(stream.Signature(FRAME_REQUEST))``
        Frames to send; taken when the previous frame is completely handed to ``o``.
    o : ``Out(stream.Signature(8))``
        Frame bytes.
    id_addr : ``Out(unsigned(6))``; id_data : ``In(unsigned(32))``
        The chip's ID ROM.
    """

    def __init__(self, *, info_words):
        words = [operator.index(w) for w in info_words]
        if any(not 0 <= w < 1 << 32 for w in words):
            raise ValueError(f"info_words must be 32-bit unsigned words, not {words}")
        self._info_words = words
        super().__init__({"req": In(stream.Signature(FRAME_REQUEST)),
                          "o": Out(stream.Signature(8)),
                          "id_addr": Out(unsigned(6)), "id_data": In(unsigned(32))})

    info_words = property(lambda self: list(self._info_words))

    @property
    def info_length(self):
        """Payload bytes of an INFO reply."""
        return 4 * (len(self._info_words) + P.ID_WORDS)

    def elaborate(self, platform):
        m = Module()
        r = Signal(FRAME_REQUEST)
        crc = Signal(16)
        k = Signal(range(5))                 # header byte index
        idx = Signal(16)                     # payload byte index
        cur = Signal(8)
        n_head = len(self._info_words)

        header = [Const(P.SYNC, 8), Const(P.VERSION, 8), r.cmd, r.length[8:16], r.length[0:8]]
        word = idx[2:]
        byte_sel = ~idx[0:2]                 # big-endian bytes: 3 - idx % 4
        m.d.comb += self.id_addr.eq(word - n_head)
        info_word = Signal(32)
        word_table(m, word, info_word, self._info_words, default=self.id_data)
        info_byte = info_word.word_select(byte_sel, 8)
        inline_byte = r.data[idx[0:3]]

        def send(value, then):
            m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(value)]
            with m.If(self.o.ready):
                m.d.sync += crc.eq(crc16_next(crc, value))
                then()

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.req.ready.eq(1)
                with m.If(self.req.valid):
                    m.d.sync += [r.eq(self.req.payload), crc.eq(0xFFFF), k.eq(0), idx.eq(0)]
                    m.next = "HEAD"
            with m.State("HEAD"):
                head_byte = Signal(8)
                with m.Switch(k):
                    for n, v in enumerate(header):
                        with m.Case(n):
                            m.d.comb += head_byte.eq(v)
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(head_byte)]
                with m.If(self.o.ready):
                    with m.If(k != 0):       # the sync byte is not covered by the CRC
                        m.d.sync += crc.eq(crc16_next(crc, head_byte))
                    m.d.sync += k.eq(k + 1)
                    with m.If(k == 4):
                        m.next = "FETCH0"
                        with m.If(r.length == 0):
                            m.next = "CRC_HI"
            with m.State("FETCH0"):
                m.next = "FETCH1"
            with m.State("FETCH1"):
                with m.If(r.info):
                    m.d.sync += cur.eq(info_byte)
                with m.Else():
                    m.d.sync += cur.eq(inline_byte)
                m.next = "PAY"
            with m.State("PAY"):
                def next_byte():
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx == r.length - 1):
                        m.next = "CRC_HI"
                    with m.Else():
                        m.next = "FETCH0"
                send(cur, next_byte)
            for state, byte, then in (("CRC_HI", crc[8:16], "CRC_LO"),
                                      ("CRC_LO", crc[0:8], "IDLE")):
                with m.State(state):
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(byte)]
                    with m.If(self.o.ready):
                        m.next = then
        return m


class HostLinkEngine(wiring.Component):
    """The host link's protocol engine (see the module docstring and ``docs/host_link.md``).

    Parameters
    ----------
    token_bits : int
        Width of the chip's token streams.
    vocab_size, seq_len : int
        The chip's vocabulary and context (tokens are checked against them before feeding).
    clock_hz : int
        The design clock, reported by INFO.
    clocks_per_bit : int
        The UART bit period in clocks, reported by INFO.
    build_id : int
        32-bit build identifier, reported by INFO.
    max_payload : int
        Request payload buffer in bytes (even, 4..65534): FEED carries up to
        ``max_payload / 2`` tokens.
    timeout_cycles : int
        Line idle time (cycles since the last byte) that ends a truncated frame or a run of
        bytes being drained.
    token_timeout_cycles : int
        Watchdog for one token's answer from the chip.
    lora : bool
        Forward the LoRA commands (0x10..0x16) to the chip's adapter loader; without it they
        are UNKNOWN_CMD.

    Members
    -------
    rx : ``In(stream.Signature(8))``
        Request bytes (from the UART receiver; taken whenever they arrive).
    tx : ``Out(stream.Signature(8))``
        Reply bytes (to the UART transmitter).
    chip_in : ``Out(stream.Signature(unsigned(token_bits)))``
        To the chip's ``token_in``.
    chip_out : ``In(stream.Signature(unsigned(token_bits)))``
        From the chip's ``token_out``.
    reset_ctx : ``Out(1)``
        To the chip's ``reset_ctx`` (one-cycle pulse while the chip is not busy).
    pos : ``In(pos_shape(seq_len))``; busy, err_token, err_context : ``In(1)``
        The chip's status outputs.
    id_addr : ``Out(unsigned(6))``; id_data : ``In(unsigned(32))``
        The chip's ID ROM.
    active : ``Out(1)``
        A command is executing.
    error : ``Out(1)``
        Pulses when an ERROR frame is queued.
    lora_in : ``Out(stream.Signature(8))``; lora_cmd : ``Out(stream.Signature(3))``
        (``lora=True`` only) image bytes and commands to the chip's LoRA loader.
    lora_status : ``In(STATUS_LAYOUT)``
        (``lora=True`` only) the loader's status word.
    """

    def __init__(self, *, token_bits, vocab_size, seq_len, clock_hz, clocks_per_bit,
                 build_id=0, max_payload=512, timeout_cycles, token_timeout_cycles=1 << 28,
                 lora=False):
        token_bits, vocab_size, seq_len = map(operator.index, (token_bits, vocab_size, seq_len))
        max_payload = operator.index(max_payload)
        if not 1 <= vocab_size <= 1 << 16:
            raise ValueError(f"vocab_size ({vocab_size}) must be 1..65536: tokens travel as "
                             "16-bit words")
        if token_bits < max(1, (vocab_size - 1).bit_length()):
            raise ValueError(f"token_bits ({token_bits}) cannot hold token {vocab_size - 1}")
        if not 1 <= seq_len <= 0xFFFF:
            raise ValueError(f"seq_len ({seq_len}) must be 1..65535: STATUS reports pos as "
                             "16 bits")
        if not (4 <= max_payload <= 0xFFFE and max_payload % 2 == 0):
            raise ValueError(f"max_payload ({max_payload}) must be even and 4..65534")
        for name, v in (("clock_hz", clock_hz), ("clocks_per_bit", clocks_per_bit),
                        ("build_id", build_id)):
            if not 0 <= operator.index(v) < 1 << 32:
                raise ValueError(f"{name} ({v}) must fit a 32-bit word")
        if operator.index(timeout_cycles) < 1 or operator.index(token_timeout_cycles) < 1:
            raise ValueError("timeout_cycles and token_timeout_cycles must be positive")
        if not isinstance(lora, bool):
            raise TypeError(f"lora must be a bool, not {lora!r}")
        self._lora = lora
        self._token_bits, self._vocab, self._seq_len = token_bits, vocab_size, seq_len
        self._clock_hz, self._cpb = operator.index(clock_hz), operator.index(clocks_per_bit)
        self._build_id, self._max_payload = operator.index(build_id), max_payload
        self._timeout = operator.index(timeout_cycles)
        self._token_timeout = operator.index(token_timeout_cycles)
        token = unsigned(token_bits)
        lora_ports = {"lora_in": Out(stream.Signature(8)), "lora_cmd": Out(stream.Signature(3)),
                      "lora_status": In(STATUS_LAYOUT)} if lora else {}
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "chip_in": Out(stream.Signature(token)),
            "chip_out": In(stream.Signature(token)),
            "reset_ctx": Out(1),
            "pos": In(pos_shape(seq_len)),
            "busy": In(1),
            "err_token": In(1),
            "err_context": In(1),
            "id_addr": Out(unsigned(6)),
            "id_data": In(unsigned(32)),
            "active": Out(1),
            "error": Out(1),
            **lora_ports,
        })

    token_bits = property(lambda self: self._token_bits)
    vocab_size = property(lambda self: self._vocab)
    seq_len = property(lambda self: self._seq_len)
    clock_hz = property(lambda self: self._clock_hz)
    clocks_per_bit = property(lambda self: self._cpb)
    build_id = property(lambda self: self._build_id)
    max_payload = property(lambda self: self._max_payload)
    timeout_cycles = property(lambda self: self._timeout)
    token_timeout_cycles = property(lambda self: self._token_timeout)
    lora = property(lambda self: self._lora)

    @property
    def info_words(self):
        """The INFO words before the ID ROM (:data:`.protocol.INFO_HEADER_WORDS`)."""
        return [self._build_id, self._clock_hz, self._cpb, self._max_payload]

    #: Command -> name of the method that adds its execution states. A handler
    #: ``method(s, entry)`` must define state ``entry`` (entered once a frame for its command
    #: passed every check; the payload is in ``s.rd``'s memory, its first four bytes in
    #: ``s.args``) and end every path with ``s.reply(...)`` or ``s.fail(...)``.
    HANDLERS: ClassVar[dict] = {P.Cmd.INFO: "_exec_info", P.Cmd.RESET: "_exec_reset",
                P.Cmd.FEED: "_exec_feed", P.Cmd.GENERATE: "_exec_generate",
                P.Cmd.STATUS: "_exec_status"}

    @property
    def handlers(self):
        """Command -> ``handler(s, entry)``: :attr:`HANDLERS`, plus the LoRA commands
        (:meth:`_exec_lora`) if the engine was built with ``lora=True``."""
        out = {cmd: getattr(self, name) for cmd, name in self.HANDLERS.items()}
        if self._lora:
            out.update({cmd: functools.partial(self._exec_lora, cmd)
                        for cmd in P.LORA_COMMANDS})
        return out

    def length_rule(self, cmd):
        """``(min, max, multiple_of)`` payload length of a request (see
        :func:`.protocol.length_rule`)."""
        return P.length_rule(cmd, self._max_payload)

    def elaborate(self, platform):
        m = Module()
        m.submodules.frame_tx = ftx = FrameTx(info_words=self.info_words)
        wiring.connect(m, ftx.o, wiring.flipped(self.tx))
        m.d.comb += [self.id_addr.eq(ftx.id_addr), ftx.id_data.eq(self.id_data)]
        m.submodules.buffer = buf = memory.Memory(shape=8, depth=self._max_payload, init=[])
        wr, rd = buf.write_port(), buf.read_port()
        _State(m, self, ftx, wr, rd).build_fsm()
        return m

    # ------------------------------------------------------------------ command handlers

    def _exec_info(self, s, entry):
        with s.m.State(entry):
            s.reply(P.Cmd.INFO | P.REPLY, s.ftx.info_length, info=True)

    def _exec_status(self, s, entry):
        with s.m.State(entry):
            flags = Cat(self.busy, self.err_token, self.err_context, s.pending_valid)
            pos = s.u16(self.pos)
            s.reply(P.Cmd.STATUS | P.REPLY, 7,
                    [pos[8:16], pos[0:8], flags, s.pending[8:16], s.pending[0:8],
                     s.errors[8:16], s.errors[0:8]])

    def _exec_reset(self, s, entry):
        m = s.m
        with m.State(entry):
            with m.If(~self.busy):
                m.d.comb += self.reset_ctx.eq(1)
                m.d.sync += s.pending_valid.eq(0)
                m.next = "RESET_REPLY"
        with m.State("RESET_REPLY"):
            s.reply(P.Cmd.RESET | P.REPLY, 0)

    def _exec_feed(self, s, entry):
        m = s.m
        with m.State(entry):
            m.d.sync += s.i.eq(0)
            m.next = "FEED_RD0"
        with m.State("FEED_RD0"):                   # read port: address now, data next cycle
            m.d.comb += s.rd.addr.eq(Cat(Const(0, 1), s.i))
            m.next = "FEED_RD1"
        with m.State("FEED_RD1"):
            m.d.comb += s.rd.addr.eq(Cat(Const(1, 1), s.i))
            m.d.sync += s.tok[8:16].eq(s.rd.data)
            m.next = "FEED_RD2"
        with m.State("FEED_RD2"):
            m.d.sync += s.tok[0:8].eq(s.rd.data)
            m.next = "FEED_CHECK"
        with m.State("FEED_CHECK"):
            with m.If(s.tok >= self._vocab):
                s.fail(P.Err.TOKEN_RANGE, s.i)
            with m.Elif(self.pos == self._seq_len):
                s.fail(P.Err.CONTEXT_FULL, s.i)
            with m.Else():
                m.next = "FEED_OFFER"

        def next_token():
            m.d.sync += s.i.eq(s.i + 1)
            with m.If(s.i == (s.length >> 1) - 1):
                m.next = "FEED_REPLY"
            with m.Else():
                m.next = "FEED_RD0"
        s.token_step("FEED", s.tok, done=next_token)
        with m.State("FEED_REPLY"):
            s.reply(P.Cmd.FEED | P.REPLY, 2, [s.pending[8:16], s.pending[0:8]])

    def _exec_generate(self, s, entry):
        m = s.m
        n, stop = Cat(s.args[1], s.args[0]), Cat(s.args[3], s.args[2])
        with m.State(entry):
            m.d.sync += s.i.eq(0)
            with m.If(~s.pending_valid):
                s.fail(P.Err.NO_TOKEN, 0)
            with m.Elif(n == 0):
                s.fail(P.Err.BAD_ARG, 0)
            with m.Else():
                m.next = "GEN_CHECK"
        with m.State("GEN_CHECK"):
            with m.If(self.pos == self._seq_len):
                s.fail(P.Err.CONTEXT_FULL, s.i)
            with m.Else():
                m.next = "GEN_OFFER"

        def after_token():
            m.d.sync += s.i.eq(s.i + 1)
            m.next = "GEN_REPLY"
        s.token_step("GEN", s.pending, done=after_token)
        with m.State("GEN_REPLY"):
            last = (s.i == n) | ((s.length == 4) & (s.pending == stop))

            def then():
                m.next = "DONE"
                with m.If(~last):
                    m.next = "GEN_CHECK"
            s.reply(P.Cmd.GENERATE | P.REPLY, 3, [s.pending[8:16], s.pending[0:8], last],
                    then=then)


    def _exec_lora(self, cmd, s, entry):
        """A LoRA command: forward the payload bytes (LORA_DATA) or the loader command, then
        reply with the loader's status, or LORA_REJECTED if the loader reports an error."""
        m, code = s.m, P.LORA_COMMANDS[cmd]
        status = self.lora_status.as_value()
        if cmd == P.Cmd.LORA_STATUS:
            with m.State(entry):
                s.reply(cmd | P.REPLY, 2, [status[8:16], status[0:8]])
            return
        if code is None:                                # LORA_DATA: stream the buffer
            with m.State(entry):
                m.d.sync += s.i.eq(0)
                m.next = f"{entry}_READ"
            with m.State(f"{entry}_READ"):              # read port: data next cycle
                m.d.comb += s.rd.addr.eq(s.i)
                m.next = f"{entry}_SEND"
            with m.State(f"{entry}_SEND"):
                m.d.comb += [s.rd.addr.eq(s.i), self.lora_in.valid.eq(1),
                             self.lora_in.payload.eq(s.rd.data)]
                with m.If(self.lora_in.ready):
                    m.d.sync += s.i.eq(s.i + 1)
                    m.next = f"{entry}_READ"
                    with m.If(s.i == s.length - 1):
                        m.next = f"{entry}_SETTLE"
        else:
            with m.State(entry):
                m.d.comb += [self.lora_cmd.valid.eq(1), self.lora_cmd.payload.eq(code)]
                with m.If(self.lora_cmd.ready):
                    m.next = f"{entry}_SETTLE"
        with m.State(f"{entry}_SETTLE"):                # the status register catches up
            m.next = f"{entry}_CHECK"
        with m.State(f"{entry}_CHECK"):
            with m.If(self.lora_status.error != 0):
                s.fail(P.Err.LORA_REJECTED, self.lora_status.error)
            with m.Else():
                s.reply(cmd | P.REPLY, 2, [status[8:16], status[0:8]])


def _entry(cmd):
    return f"CMD_{int(cmd):02X}"


class _State:
    """Registers and helpers shared by the parser and the command handlers."""

    def __init__(self, m, link, ftx, wr, rd):
        self.m, self.link, self.ftx, self.wr, self.rd = m, link, ftx, wr, rd
        self.timer = Signal(range(link.timeout_cycles + 1))
        self.hdr = Signal(data.ArrayLayout(8, 4))          # version, cmd, len hi, len lo
        self.hcount = Signal(range(4))
        self.crc = Signal(16)
        self.crc_rx = Signal(16)
        self.count = Signal(16)                            # payload bytes received
        self.args = Signal(data.ArrayLayout(8, 4))         # the first 4 payload bytes
        self.err_code, self.err_cmd, self.err_detail = Signal(8), Signal(8), Signal(16)
        self.junk = Signal(16)
        self.errors = Signal(16)
        self.pending = Signal(16)
        self.pending_valid = Signal()
        self.tok = Signal(16)
        self.i = Signal(16)
        self.watchdog = Signal(range(link.token_timeout_cycles + 1))

    version = property(lambda self: self.hdr[0])
    cmd = property(lambda self: self.hdr[1])
    length = property(lambda self: Cat(self.hdr[3], self.hdr[2]))

    @staticmethod
    def u16(v):
        return v.as_unsigned()[:16] if len(v) >= 16 else Cat(v, Const(0, 16 - len(v)))

    def reply(self, cmd, length, payload=(), *, info=False, then="DONE"):
        """Offer a frame to the transmitter; once it is taken, go to state ``then`` (or call
        it, if it is a function)."""
        m, req = self.m, self.ftx.req
        m.d.comb += [req.valid.eq(1), req.payload.cmd.eq(cmd), req.payload.length.eq(length),
                     req.payload.info.eq(info)]
        for k, b in enumerate(payload):
            m.d.comb += req.payload.data[k].eq(b)
        with m.If(req.ready):
            if callable(then):
                then()
            else:
                m.next = then

    def fail(self, code, detail):
        m = self.m
        m.d.sync += [self.err_code.eq(code), self.err_cmd.eq(self.cmd),
                     self.err_detail.eq(detail)]
        m.next = "SEND_ERROR"

    def token_step(self, prefix, token, *, done):
        """States ``<prefix>_OFFER`` (token to the chip) and ``<prefix>_WAIT`` (its answer
        becomes the pending token, then ``done()``), with the chip watchdog."""
        m, link = self.m, self.link
        with m.State(f"{prefix}_OFFER"):
            m.d.comb += [link.chip_in.valid.eq(1), link.chip_in.payload.eq(token)]
            m.d.sync += self.watchdog.eq(0)
            with m.If(link.chip_in.ready):
                m.next = f"{prefix}_WAIT"
        with m.State(f"{prefix}_WAIT"):
            m.d.comb += link.chip_out.ready.eq(1)
            m.d.sync += self.watchdog.eq(self.watchdog + 1)
            with m.If(link.chip_out.valid):
                m.d.sync += [self.pending.eq(link.chip_out.payload),
                             self.pending_valid.eq(1)]
                done()
            with m.Elif(self.watchdog == link.token_timeout_cycles):
                self.fail(P.Err.CHIP_TIMEOUT, self.i)

    def build_fsm(self):
        m, link, wr = self.m, self.link, self.wr
        rx = link.rx
        got = rx.valid & rx.ready
        idle = self.timer == link.timeout_cycles
        with m.If(got):
            m.d.sync += self.timer.eq(0)
        with m.Elif(~idle):
            m.d.sync += self.timer.eq(self.timer + 1)

        def count_junk():
            m.d.comb += rx.ready.eq(1)
            with m.If(got & (self.junk != 0xFFFF)):
                m.d.sync += self.junk.eq(self.junk + 1)

        def crc_in():
            m.d.sync += self.crc.eq(crc16_next(self.crc, rx.payload))

        # length rules per command, from the one table in .protocol
        known, length_ok = Const(0, 1), Const(0, 1)
        handlers = link.handlers
        for cmd in handlers:
            lo, hi, mult = link.length_rule(cmd)
            is_cmd = self.cmd == cmd
            ok = (self.length >= lo) & (self.length <= hi)
            if mult == 2:
                ok &= ~self.length[0]
            known |= is_cmd
            length_ok |= is_cmd & ok

        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += [rx.ready.eq(1), link.chip_out.ready.eq(1)]   # drop stale tokens
                with m.If(rx.valid):
                    with m.If(rx.payload == P.SYNC):
                        m.d.sync += [self.crc.eq(0xFFFF), self.hcount.eq(0)]
                        m.next = "HEADER"
                    with m.Else():
                        m.d.sync += self.junk.eq(1)
                        m.next = "JUNK"
            with m.State("JUNK"):                   # bytes outside a frame: wait for silence
                count_junk()
                with m.If(idle):
                    m.d.sync += [self.err_code.eq(P.Err.BAD_SYNC), self.err_cmd.eq(0),
                                 self.err_detail.eq(self.junk), self.junk.eq(0)]
                    m.next = "SEND_ERROR"
            with m.State("HEADER"):
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    m.d.sync += [self.hdr[self.hcount].eq(rx.payload),
                                 self.hcount.eq(self.hcount + 1)]
                    crc_in()
                    with m.If(self.hcount == 3):
                        m.next = "CHECK"
                with m.Elif(idle):
                    self._timeout(1 + self.hcount)
            with m.State("CHECK"):
                m.d.sync += self.count.eq(0)
                with m.If(self.version != P.VERSION):
                    self._drain(P.Err.BAD_VERSION, self.version)
                with m.Elif(~known):
                    self._drain(P.Err.UNKNOWN_CMD, 0)
                with m.Elif(~length_ok):
                    self._drain(P.Err.BAD_LENGTH, self.length)
                with m.Elif(self.length == 0):
                    m.next = "CRC_HI"
                with m.Else():
                    m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                m.d.comb += [rx.ready.eq(1), wr.addr.eq(self.count), wr.data.eq(rx.payload)]
                with m.If(rx.valid):
                    m.d.comb += wr.en.eq(1)
                    with m.If(self.count < 4):
                        m.d.sync += self.args[self.count[:2]].eq(rx.payload)
                    m.d.sync += self.count.eq(self.count + 1)
                    crc_in()
                    with m.If(self.count == self.length - 1):
                        m.next = "CRC_HI"
                with m.Elif(idle):
                    self._timeout(5 + self.count)
            for state, byte, then, got_bytes in (("CRC_HI", self.crc_rx[8:16], "CRC_LO", 5),
                                                 ("CRC_LO", self.crc_rx[0:8], "VERIFY", 6)):
                with m.State(state):
                    m.d.comb += rx.ready.eq(1)
                    with m.If(rx.valid):
                        m.d.sync += byte.eq(rx.payload)
                        m.next = then
                    with m.Elif(idle):
                        self._timeout(got_bytes + self.length)
            with m.State("VERIFY"):
                with m.If(self.crc_rx != self.crc):
                    self._drain(P.Err.BAD_CRC, self.crc_rx)
                with m.Else():
                    m.d.sync += self.junk.eq(0)
                    with m.Switch(self.cmd):
                        for cmd in handlers:
                            with m.Case(cmd):
                                m.next = _entry(cmd)
            with m.State("DRAIN"):                  # rest of a bad frame: wait for silence
                m.d.comb += rx.ready.eq(1)
                with m.If(idle):
                    m.next = "SEND_ERROR"
            with m.State("SEND_ERROR"):
                count_junk()
                m.d.comb += link.error.eq(self.ftx.req.ready)
                with m.If(self.ftx.req.ready & (self.errors != 0xFFFF)):
                    m.d.sync += self.errors.eq(self.errors + 1)
                self.reply(P.ERROR_REPLY, 4, [self.err_code, self.err_cmd,
                                              self.err_detail[8:16], self.err_detail[0:8]])
            with m.State("DONE"):                   # bytes received meanwhile are junk
                with m.If(self.junk != 0):
                    m.next = "JUNK"
                with m.Else():
                    m.next = "IDLE"

            for cmd, handler in handlers.items():
                handler(self, _entry(cmd))

            parser = ("IDLE", "JUNK", "HEADER", "CHECK", "PAYLOAD", "CRC_HI", "CRC_LO",
                      "VERIFY", "DRAIN")
            in_parser = Const(0, 1)
            for name in parser:
                in_parser |= fsm.ongoing(name)
        # While a command runs, bytes that arrive are counted as junk (one request at a
        # time): once the command is done they are reported as BAD_SYNC.
        m.d.comb += link.active.eq(~in_parser)
        with m.If(~in_parser):
            count_junk()

    def _timeout(self, got_bytes):
        m = self.m
        m.d.sync += [self.err_code.eq(P.Err.TIMEOUT), self.err_cmd.eq(self.cmd),
                     self.err_detail.eq(got_bytes)]
        m.next = "SEND_ERROR"

    def _drain(self, code, detail):
        m = self.m
        m.d.sync += [self.err_code.eq(code), self.err_cmd.eq(self.cmd),
                     self.err_detail.eq(detail), self.junk.eq(0)]
        m.next = "DRAIN"
