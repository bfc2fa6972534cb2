"""LoRA adapter upload: image bytes into the inactive bank, checked commit, switch at a token
boundary, lock.

The image is the HWLA v1 format of ``docs/lora.md`` (32-byte header, body, CRC32 trailer).
The loader knows only the header's byte layout; the expected header of the build (magic,
version, header size, base digest, shape, target mask, ``r_max``) and the image length are
parameters computed by the compiler (``compiler/lora_image.py``), so this library never
imports the compiler.
"""

import enum
import operator

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import xor_terms

__all__ = ["HEADER_BYTES", "STATUS_LAYOUT", "LoraCmd", "LoraError", "LoraLoader", "crc32_next"]

#: Bytes of the image header (version 1).
HEADER_BYTES = 32
_CRC_BYTES = 4
_CRC32_POLY = 0xEDB88320            # IEEE 802.3, reflected (zlib.crc32)


class LoraCmd(enum.IntEnum):
    """Command codes on :attr:`LoraLoader.cmd`."""
    BEGIN = 0       #: start an upload into the inactive bank (bank invalid, pointer and CRC reset)
    COMMIT = 1      #: check the upload; on success the bank becomes active at the next boundary
    ENABLE = 2      #: adapter on (from the next boundary, if a valid bank is active)
    DISABLE = 3     #: adapter off (from the next boundary): bit for bit the base model
    LOCK = 4        #: refuse every further command and upload byte until reset


class LoraError(enum.IntEnum):
    """``status.error``: the result of the last command or the first bad upload byte. A
    failed COMMIT names the first failed check in this order: TRUNCATED (shorter than the
    header), MAGIC, VERSION, HEADER, MASK, R_MAX, RANK, TRUNCATED, OVERFLOW, CRC, DIGEST,
    SHAPE."""
    OK = 0          #: the last command succeeded
    LOCKED = 1      #: command or byte refused: the loader is locked
    NO_BEGIN = 2    #: a byte or COMMIT without an open upload (no BEGIN, or already committed)
    OVERFLOW = 3    #: bytes beyond the image length (not written; the commit fails)
    TRUNCATED = 4   #: COMMIT before the whole image arrived
    MAGIC = 5       #: not ``HWLA``
    VERSION = 6     #: image version is not the build's
    HEADER = 7      #: header size field or reserved field wrong
    MASK = 8        #: target mask is not the build's
    R_MAX = 9       #: ``r_max`` is not the build's
    RANK = 10       #: ``rank > r_max``
    CRC = 11        #: CRC32 trailer does not match the bytes received
    DIGEST = 12     #: packed for another base model / datapath
    SHAPE = 13      #: ``n_layers``, ``dim``, ``kv_dim`` or ``hidden_dim`` is not the build's
    BAD_CMD = 14    #: command code 5..7


#: ``status`` word, bit 0 first.
STATUS_LAYOUT = data.StructLayout({
    "bank": 1,       # active bank
    "on": 1,         # the datapath applies the adapter (enabled and the active bank is valid)
    "pending": 1,    # a committed bank waits for the next token boundary
    "locked": 1,
    "busy": 1,       # an upload is open (BEGIN seen, no COMMIT yet)
    "enabled": 1,    # ENABLE requested (takes effect at a boundary)
    "valid": 1,      # the active bank holds a committed image
    "reserved": 1,
    "error": 8,      # LoraError
})

# Header byte offset -> the check it belongs to (rank, bytes 22..23, is compared, not matched).
_FIELDS = ([(0, 4, "magic"), (4, 6, "version"), (6, 8, "header"), (8, 16, "digest"),
            (16, 18, "shape"), (18, 20, "mask"), (20, 22, "r_max"), (24, 30, "shape"),
            (30, 32, "header")])


def crc32_next(crc, byte):
    """CRC-32 (IEEE, reflected, as ``zlib.crc32`` without the final inversion) register after
    one more byte, as XORs of the input bits derived by running the serial algorithm on
    symbolic bits."""
    reg = [frozenset([k]) for k in range(32)]
    for k in range(8):
        reg[k] = reg[k] ^ frozenset([32 + k])
    for _ in range(8):
        low = reg[0]
        reg = reg[1:] + [frozenset()]
        for k in range(32):
            if _CRC32_POLY >> k & 1:
                reg[k] = reg[k] ^ low
    return xor_terms(Cat(crc, byte), reg)


class LoraLoader(wiring.Component):
    """Receives LoRA images into two SRAM banks and decides which bank the datapath uses.

    Upload: ``BEGIN`` opens an upload into the inactive bank (marking it invalid and
    cancelling a pending switch); image bytes on ``i`` follow in order: the header is compared
    with ``header``, body bytes are written to the inactive bank at ``offset - 32``, the
    CRC32 of everything before the trailer is computed as the bytes pass and the trailer is
    kept. ``COMMIT`` checks the upload (see :class:`LoraError` for the order); on success the
    bank becomes valid and *pending*, and at the next cycle with ``boundary`` high it becomes
    the active bank. On any failure the upload is closed, its bank stays invalid, and the
    active bank and ``on`` do not change. ``ENABLE``/``DISABLE`` set the adapter request;
    ``on`` and ``bank`` change only while ``boundary`` is high, so every token is computed
    with one adapter. ``LOCK`` (sticky until reset) refuses every later command and byte with
    ``LOCKED``; a switch committed before the lock still happens. Writes never go to the
    active bank.

    Parameters
    ----------
    header : bytes
        The 32 header bytes an image for this build must carry (HWLA v1 layout: magic,
        version, header size, base digest, ``n_layers``, target mask, ``r_max``, rank, dims,
        reserved). The rank field is ignored here: an image's rank must be ``<= r_max``.
    image_length : int
        Bytes of a complete image for this build (header + body + 4-byte CRC), as
        ``compiler.lora_image.image_length`` gives it.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Image bytes; always ready.
    cmd : ``In(stream.Signature(3))``
        :class:`LoraCmd` codes; not taken in a cycle with a byte on ``i`` or with a switch.
    boundary : ``In(1)``
        High while the chip is between tokens.
    wr : ``Out(wiring.Signature({"en", "bank", "addr", "data"}))``
        Body byte writes, one cycle after the byte was taken: ``bank`` is always the
        inactive bank, ``addr`` the image offset minus 32 (``addr_bits`` wide).
    bank : ``Out(1)``
        Active bank.
    on : ``Out(1)``
        The adapter is applied (enabled and the active bank valid).
    status : ``Out(STATUS_LAYOUT)``
        Active bank, on, pending switch, locked, upload open, enabled, valid, last error.
    """

    def __init__(self, *, header, image_length):
        header = bytes(header)
        if len(header) != HEADER_BYTES:
            raise ValueError(f"header must be {HEADER_BYTES} bytes, not {len(header)}")
        image_length = operator.index(image_length)
        if image_length <= HEADER_BYTES + _CRC_BYTES:
            raise ValueError(f"image_length ({image_length}) must exceed the header and CRC "
                             f"({HEADER_BYTES + _CRC_BYTES} bytes)")
        r_max = int.from_bytes(header[20:22], "little")
        if r_max < 1:
            raise ValueError("header: r_max must be at least 1")
        self._header, self._length, self._r_max = header, image_length, r_max
        self._addr_bits = max(1, (self.body_length - 1).bit_length())
        super().__init__({
            "i": In(stream.Signature(8)),
            "cmd": In(stream.Signature(3)),
            "boundary": In(1),
            "wr": Out(wiring.Signature({"en": Out(1), "bank": Out(1),
                                        "addr": Out(self._addr_bits), "data": Out(8)})),
            "bank": Out(1),
            "on": Out(1),
            "status": Out(STATUS_LAYOUT),
        })

    header = property(lambda self: self._header)
    image_length = property(lambda self: self._length)
    r_max = property(lambda self: self._r_max)
    addr_bits = property(lambda self: self._addr_bits)

    @property
    def body_length(self):
        """Bytes of one bank: the image without header and CRC."""
        return self._length - HEADER_BYTES - _CRC_BYTES

    def elaborate(self, platform):
        m = Module()
        n = self._length
        active = Signal()
        valid = Signal(2)
        pending, enabled, on, locked, open_ = Signal(), Signal(), Signal(), Signal(), Signal()
        error = Signal(8)
        count = Signal(range(n + 1))            # bytes received (saturates at the image length)
        overflow = Signal()
        crc = Signal(32)
        trailer = Signal(32)
        rank = Signal(16)
        bad = {name: Signal(name=f"bad_{name}") for _, _, name in _FIELDS}
        inactive = ~active

        m.d.comb += [self.bank.eq(active), self.on.eq(on),
                     self.status.bank.eq(active), self.status.on.eq(on),
                     self.status.pending.eq(pending), self.status.locked.eq(locked),
                     self.status.busy.eq(open_), self.status.enabled.eq(enabled),
                     self.status.valid.eq(valid.bit_select(active, 1)),
                     self.status.error.eq(error)]

        # image bytes
        byte = self.i.payload
        m.d.comb += self.i.ready.eq(1)
        m.d.sync += self.wr.en.eq(0)
        with m.If(self.i.valid):
            with m.If(locked):
                m.d.sync += error.eq(LoraError.LOCKED)
            with m.Elif(~open_):
                m.d.sync += error.eq(LoraError.NO_BEGIN)
            with m.Elif(count == n):
                m.d.sync += [overflow.eq(1), error.eq(LoraError.OVERFLOW)]
            with m.Else():
                m.d.sync += count.eq(count + 1)
                with m.If(count < n - _CRC_BYTES):
                    m.d.sync += crc.eq(crc32_next(crc, byte))
                with m.Else():                  # little-endian trailer: last byte on top
                    m.d.sync += trailer.eq(Cat(trailer[8:], byte))
                with m.Switch(count):           # header bytes: compare, keep the rank
                    for lo, hi, name in _FIELDS:
                        for k in range(lo, hi):
                            with m.Case(k), m.If(byte != self._header[k]):
                                m.d.sync += bad[name].eq(1)
                    with m.Case(22):
                        m.d.sync += rank[0:8].eq(byte)
                    with m.Case(23):
                        m.d.sync += rank[8:16].eq(byte)
                with m.If((count >= HEADER_BYTES) & (count < n - _CRC_BYTES)):
                    m.d.sync += [self.wr.en.eq(1), self.wr.bank.eq(inactive),
                                 self.wr.addr.eq(count - HEADER_BYTES), self.wr.data.eq(byte)]

        # commands (never in the cycle of a byte or of a switch)
        switch = self.boundary & pending
        m.d.comb += self.cmd.ready.eq(~self.i.valid & ~switch)
        with m.If(self.cmd.valid & self.cmd.ready):
            code = self.cmd.payload
            with m.If(code > LoraCmd.LOCK):
                m.d.sync += error.eq(LoraError.BAD_CMD)
            with m.Elif(locked):
                m.d.sync += error.eq(LoraError.LOCKED)
            with m.Elif(code == LoraCmd.BEGIN):
                m.d.sync += [open_.eq(1), pending.eq(0), count.eq(0), overflow.eq(0),
                             crc.eq(0xFFFF_FFFF), trailer.eq(0), rank.eq(0),
                             valid.bit_select(inactive, 1).eq(0), error.eq(LoraError.OK)]
                m.d.sync += [b.eq(0) for b in bad.values()]
            with m.Elif(code == LoraCmd.COMMIT):
                checks = [
                    (~open_, LoraError.NO_BEGIN),
                    (count < HEADER_BYTES, LoraError.TRUNCATED),
                    (bad["magic"], LoraError.MAGIC),
                    (bad["version"], LoraError.VERSION),
                    (bad["header"], LoraError.HEADER),
                    (bad["mask"], LoraError.MASK),
                    (bad["r_max"], LoraError.R_MAX),
                    (rank > self._r_max, LoraError.RANK),
                    (count < n, LoraError.TRUNCATED),
                    (overflow, LoraError.OVERFLOW),
                    (trailer != (crc ^ 0xFFFF_FFFF), LoraError.CRC),
                    (bad["digest"], LoraError.DIGEST),
                    (bad["shape"], LoraError.SHAPE),
                ]
                m.d.sync += open_.eq(0)
                with m.If(checks[0][0]):
                    m.d.sync += error.eq(checks[0][1])
                for cond, err in checks[1:]:
                    with m.Elif(cond):
                        m.d.sync += error.eq(err)
                with m.Else():
                    m.d.sync += [valid.bit_select(inactive, 1).eq(1), pending.eq(1),
                                 error.eq(LoraError.OK)]
            with m.Elif(code == LoraCmd.ENABLE):
                m.d.sync += [enabled.eq(1), error.eq(LoraError.OK)]
            with m.Elif(code == LoraCmd.DISABLE):
                m.d.sync += [enabled.eq(0), error.eq(LoraError.OK)]
            with m.Else():
                m.d.sync += [locked.eq(1), error.eq(LoraError.OK)]

        # token boundary: the pending bank becomes active; `on` follows the request
        with m.If(self.boundary):
            new = Signal()
            m.d.comb += new.eq(Cat(active, ~active).bit_select(switch, 1))
            m.d.sync += [active.eq(new), on.eq(enabled & valid.bit_select(new, 1))]
            with m.If(switch):
                m.d.sync += pending.eq(0)
        return m
