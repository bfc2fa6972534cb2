"""The host link's wire format, shared by the gateware (:mod:`.hostlink`) and the host
(:mod:`.host`): constants, CRC, frame encoding and an incremental decoder.

A frame, in either direction (multi-byte fields big-endian)::

    offset  size  field
    0       1     SYNC     0xA5
    1       1     VERSION  1
    2       1     CMD      request: 0x00..0x7F; reply: request | 0x80; ERROR: 0xFF
    3       2     LEN      payload bytes
    5       LEN   PAYLOAD
    5+LEN   2     CRC      CRC-16/CCITT-FALSE over VERSION..PAYLOAD (not SYNC)

CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR
(``crc16(b"123456789") == 0x29B1``). See ``docs/host_link.md`` for the commands. The LoRA
command and error codes come from ``hdl/lora_loader.py`` (one table for both sides).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hardwire.hdl.lora_loader import LoraCmd, LoraError

__all__ = [
    "CRC_BYTES",
    "ERROR_REPLY",
    "HEADER_BYTES",
    "ID_WORDS",
    "INFO_HEADER_WORDS",
    "LAST_FLAG",
    "LORA_COMMANDS",
    "LORA_ERROR_TEXT",
    "LORA_STATUS_BITS",
    "REPLY",
    "RESERVED_LORA",
    "STATUS_BUSY",
    "STATUS_ERR_CONTEXT",
    "STATUS_ERR_TOKEN",
    "STATUS_PENDING",
    "SYNC",
    "VERSION",
    "Cmd",
    "Err",
    "Frame",
    "FrameDecoder",
    "crc16",
    "crc16_update",
    "encode_frame",
    "length_rule",
    "lora_status",
]

SYNC = 0xA5
VERSION = 1
#: A reply's command byte is the request's with this bit set.
REPLY = 0x80
HEADER_BYTES = 5
CRC_BYTES = 2
#: Command numbers reserved for LoRA adapter upload (0x10..0x16 used; a chip built without
#: LoRA answers all of them with UNKNOWN_CMD).
RESERVED_LORA = range(0x10, 0x20)


class Cmd(enum.IntEnum):
    """Request commands (the reply to ``c`` has command byte ``c | 0x80``)."""
    INFO = 0x01       #: -> build id, clock, link parameters, the chip's 64 ID ROM words
    RESET = 0x02      #: new context (position 0, chip error flags cleared)
    FEED = 0x03       #: payload: token ids (u16 each); reply: the next token after the last
    GENERATE = 0x04   #: payload: n (u16) [, stop token (u16)]; replies: one TOKEN frame each
    STATUS = 0x05     #: -> pos, flags, pending token, error frame count
    LORA_BEGIN = 0x10    #: open an upload into the inactive LoRA bank; -> LoRA status (u16)
    LORA_DATA = 0x11     #: payload: the next image bytes (1..max_payload); -> LoRA status
    LORA_COMMIT = 0x12   #: check the upload; the bank becomes active at the next token boundary
    LORA_ENABLE = 0x13   #: adapter on (from the next token boundary)
    LORA_DISABLE = 0x14  #: adapter off (from the next token boundary)
    LORA_LOCK = 0x15     #: refuse further uploads and switches until reset
    LORA_STATUS = 0x16   #: -> LoRA status (u16)


#: Command byte of the ERROR reply.
ERROR_REPLY = 0xFF


class Err(enum.IntEnum):
    """Error codes carried by an ERROR frame (payload: code, command, detail u16)."""
    BAD_SYNC = 0x01       #: bytes outside a frame (detail: how many, saturating)
    BAD_VERSION = 0x02    #: detail: the version byte received
    UNKNOWN_CMD = 0x03    #: detail: 0
    BAD_LENGTH = 0x04     #: length not allowed for the command (detail: the length)
    BAD_CRC = 0x05        #: detail: the CRC received
    TIMEOUT = 0x06        #: frame truncated: the line went idle mid-frame (detail: bytes got)
    BAD_ARG = 0x07        #: e.g. GENERATE 0 tokens
    NO_TOKEN = 0x08       #: GENERATE with no pending token (FEED first)
    TOKEN_RANGE = 0x10    #: a FEED token >= vocab_size (detail: its index; earlier ones fed)
    CONTEXT_FULL = 0x11   #: pos == seq_len (detail: tokens processed by this command)
    CHIP_TIMEOUT = 0x12   #: the chip did not answer within the watchdog (detail: index)
    LORA_REJECTED = 0x13  #: the LoRA loader refused the command (detail: its LoraError code)


#: LoRA link command -> the loader command it forwards (None: LORA_DATA, LORA_STATUS).
LORA_COMMANDS = {Cmd.LORA_BEGIN: LoraCmd.BEGIN, Cmd.LORA_DATA: None,
                 Cmd.LORA_COMMIT: LoraCmd.COMMIT, Cmd.LORA_ENABLE: LoraCmd.ENABLE,
                 Cmd.LORA_DISABLE: LoraCmd.DISABLE, Cmd.LORA_LOCK: LoraCmd.LOCK,
                 Cmd.LORA_STATUS: None}
#: Bits of the LoRA status word (``hdl.lora_loader.STATUS_LAYOUT``), bit 0 first; bits 8..15
#: are the loader's last error code (:class:`~hardwire.hdl.lora_loader.LoraError`).
LORA_STATUS_BITS = ("bank", "on", "pending", "locked", "busy", "enabled", "valid")
#: What each loader error means, for messages.
LORA_ERROR_TEXT = {
    LoraError.OK: "no error",
    LoraError.LOCKED: "the adapter is locked until the chip is reset",
    LoraError.NO_BEGIN: "no upload in progress",
    LoraError.OVERFLOW: "more bytes than the image length the chip expects",
    LoraError.TRUNCATED: "the image is shorter than the chip expects",
    LoraError.MAGIC: "not a hardwire LoRA image (magic)",
    LoraError.VERSION: "image version not supported by the chip",
    LoraError.HEADER: "bad header size or reserved field",
    LoraError.MASK: "target matrices differ from the chip's",
    LoraError.R_MAX: "r_max differs from the chip's",
    LoraError.RANK: "rank above r_max",
    LoraError.CRC: "CRC mismatch: the image is corrupt",
    LoraError.DIGEST: "packed for another base model or datapath (digest)",
    LoraError.SHAPE: "layer count or dimensions differ from the chip's",
    LoraError.BAD_CMD: "unknown loader command",
}


#: Flag bit of a GENERATE TOKEN frame's third byte: this is the last token of the command.
LAST_FLAG = 0x01
#: STATUS flag bits.
STATUS_BUSY, STATUS_ERR_TOKEN, STATUS_ERR_CONTEXT, STATUS_PENDING = 0x01, 0x02, 0x04, 0x08

#: INFO payload: these words (build id, clock Hz, clocks per bit, max payload) precede the
#: chip's ID ROM words.
INFO_HEADER_WORDS = ("build_id", "clock_hz", "clocks_per_bit", "max_payload")
ID_WORDS = 64


def length_rule(cmd: int, max_payload: int):
    """``(min, max, multiple_of)`` of a request's payload length, or ``None`` if ``cmd`` is
    not a known command. One table for the gateware's checks and the documentation."""
    rules = {
        Cmd.INFO: (0, 0, 1),
        Cmd.RESET: (0, 0, 1),
        Cmd.FEED: (2, max_payload - max_payload % 2, 2),
        Cmd.GENERATE: (2, 4, 2),
        Cmd.STATUS: (0, 0, 1),
        Cmd.LORA_DATA: (1, max_payload, 1),
    }
    if cmd in LORA_COMMANDS and cmd != Cmd.LORA_DATA:
        return (0, 0, 1)
    return rules.get(cmd)


def lora_status(word: int) -> dict:
    """Decode a LoRA status word: the flags of :data:`LORA_STATUS_BITS` and ``error`` (a
    :class:`~hardwire.hdl.lora_loader.LoraError`, or the raw code if unknown)."""
    out = {name: bool(word >> k & 1) for k, name in enumerate(LORA_STATUS_BITS)}
    out["bank"] = word & 1
    code = word >> 8 & 0xFF
    try:
        out["error"] = LoraError(code)
    except ValueError:
        out["error"] = code
    return out


def crc16_update(crc: int, byte: int) -> int:
    """One byte of CRC-16/CCITT-FALSE (MSB first)."""
    crc ^= byte << 8
    for _ in range(8):
        crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
    return crc & 0xFFFF


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    for b in data:
        crc = crc16_update(crc, b)
    return crc


def encode_frame(cmd: int, payload: bytes = b"", *, version: int = VERSION) -> bytes:
    """A complete frame (sync, header, payload, CRC)."""
    if not 0 <= cmd <= 0xFF:
        raise ValueError(f"command byte {cmd} out of range")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes exceeds 65535")
    body = struct.pack(">BBH", version, cmd, len(payload)) + bytes(payload)
    return bytes([SYNC]) + body + struct.pack(">H", crc16(body))


@dataclass(frozen=True)
class Frame:
    """A decoded frame; ``ok`` is False if its CRC did not match."""
    version: int
    cmd: int
    payload: bytes
    ok: bool = True

    @property
    def is_error(self) -> bool:
        return self.cmd == ERROR_REPLY

    def error(self):
        """``(Err or int code, command, detail)`` of an ERROR frame."""
        code, cmd, detail = struct.unpack(">BBH", self.payload[:4])
        try:
            code = Err(code)
        except ValueError:
            pass
        return code, cmd, detail


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get complete frames. Bytes before a sync byte
    are counted in :attr:`skipped`. Frames longer than ``max_len`` are not trusted: the
    decoder skips their sync byte and resynchronizes."""

    def __init__(self, max_len: int = 4096):
        self._buf = bytearray()
        self._max_len = max_len
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while True:
            start = self._buf.find(bytes([SYNC]))
            if start < 0:
                self.skipped += len(self._buf)
                self._buf.clear()
                return frames
            if start:
                self.skipped += start
                del self._buf[:start]
            if len(self._buf) < HEADER_BYTES:
                return frames
            version, cmd, length = struct.unpack(">BBH", self._buf[1:HEADER_BYTES])
            if length > self._max_len:
                self.skipped += 1
                del self._buf[:1]
                continue
            total = HEADER_BYTES + length + CRC_BYTES
            if len(self._buf) < total:
                return frames
            body = bytes(self._buf[1:HEADER_BYTES + length])
            (crc,) = struct.unpack(">H", self._buf[HEADER_BYTES + length:total])
            frames.append(Frame(version, cmd, body[4:], ok=crc == crc16(body)))
            del self._buf[:total]

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)
