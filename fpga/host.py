"""Host side of the host link (pyserial): talk to a board or to its simulation's pty.

:class:`HostLink` sends request frames and decodes replies (:mod:`.protocol`);
:func:`chat` is ``hardwire chat``: encode a prompt, FEED it, GENERATE, decode the text.
"""

from __future__ import annotations

import codecs
import struct
import time

from hardwire.compiler.errors import HardwireError

from . import protocol as P

__all__ = ["BOS", "HostLink", "LinkError", "chat", "parse_info"]

BOS = 1
_WEIGHT_CLASSES = ("embed", "attn_qkv", "attn_out", "ffn_gate_up", "ffn_down")
_CONFIG_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                "seq_len")
_ID_MAGIC = 0x48575231


class LinkError(HardwireError):
    """The board answered with an ERROR frame, or did not answer properly."""

    def __init__(self, message, *, code=None, cmd=None, detail=None):
        self.code, self.cmd, self.detail = code, cmd, detail
        super().__init__(message)


def parse_info(payload: bytes) -> dict:
    """Decode an INFO payload: link words, the raw ID ROM words and their fields."""
    n_head = len(P.INFO_HEADER_WORDS)
    if len(payload) < 4 * (n_head + 19):
        raise LinkError(f"INFO payload of {len(payload)} bytes is too short")
    words = list(struct.unpack(f">{len(payload) // 4}I", payload[:len(payload) // 4 * 4]))
    info = dict(zip(P.INFO_HEADER_WORDS, words[:n_head]))
    rom = words[n_head:]
    info["id_words"] = rom
    info["magic_ok"] = rom[0] == _ID_MAGIC
    info["id_version"] = rom[1]
    info["model_hash"] = b"".join(w.to_bytes(4, "big") for w in rom[2:10]).hex()
    info["config"] = dict(zip(_CONFIG_KEYS, rom[10:17]))
    info["weight_bits"] = {c: (rom[17] >> (4 * k)) & 0xF for k, c in enumerate(_WEIGHT_CLASSES)}
    info["digest"] = f"{rom[18]:08x}"
    return info


class HostLink:
    """A connection to a board's host link.

    Parameters
    ----------
    port : str or serial-like object
        A serial port path (``/dev/ttyUSB0``, a board simulation's pty) or an open object
        with ``read``/``write``/``reset_input_buffer``.
    baud : int
        Baud rate (must match the bitstream's; irrelevant for a simulation's pty).
    timeout : float
        Seconds to wait for each reply frame (a token of a large model at a slow clock can
        take a while; see :meth:`info` ``clock_hz``).
    """

    def __init__(self, port, *, baud=115200, timeout=10.0):
        if isinstance(port, str):
            import serial
            try:
                self._ser = serial.Serial(port, baudrate=baud, timeout=0.05)
            except (serial.SerialException, OSError) as e:
                raise HardwireError(f"cannot open {port}: {e}") from None
            self._owned = True
        else:
            self._ser, self._owned = port, False
        self.port = port if isinstance(port, str) else getattr(port, "name", "?")
        self.timeout = timeout
        self._dec = P.FrameDecoder()
        self._frames = []
        self._max_payload = None
        try:
            self._ser.reset_input_buffer()
        except (AttributeError, OSError):
            pass

    # ------------------------------------------------------------------------ transport

    def write_raw(self, data: bytes):
        """Send bytes as they are (tests: garbage, truncated frames)."""
        self._ser.write(bytes(data))
        try:
            self._ser.flush()
        except (AttributeError, OSError):
            pass

    def send(self, cmd: int, payload: bytes = b""):
        self.write_raw(P.encode_frame(cmd, payload))

    def read_frame(self, timeout=None) -> P.Frame:
        """The next frame (bad-CRC frames raise :class:`LinkError`)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._frames:
            if time.monotonic() > deadline:
                raise LinkError(f"{self.port}: no reply within "
                                f"{self.timeout if timeout is None else timeout:g} s")
            data = self._ser.read(4096)
            if data:
                self._frames += self._dec.feed(data)
        frame = self._frames.pop(0)
        if not frame.ok:
            raise LinkError(f"{self.port}: reply frame with a bad CRC")
        if frame.version != P.VERSION:
            raise LinkError(f"{self.port}: reply frame of protocol version {frame.version}, "
                            f"expected {P.VERSION}")
        return frame

    def read_frames(self, quiet=0.3, limit=10.0):
        """Every frame that arrives until the line has been quiet for ``quiet`` seconds."""
        frames, end = [], time.monotonic() + limit
        while time.monotonic() < end:
            try:
                frames.append(self.read_frame(timeout=quiet))
            except LinkError as e:
                if "no reply" in str(e):
                    break
                raise
        return frames

    def _expect(self, cmd, frame):
        if frame.is_error:
            code, ecmd, detail = frame.error()
            name = code.name if isinstance(code, P.Err) else f"0x{code:02x}"
            raise LinkError(f"{self.port}: {name} (command 0x{ecmd:02x}, detail {detail})",
                            code=code, cmd=ecmd, detail=detail)
        if frame.cmd != (cmd | P.REPLY):
            raise LinkError(f"{self.port}: expected a reply to 0x{cmd:02x}, got frame "
                            f"0x{frame.cmd:02x}")
        return frame.payload

    def request(self, cmd, payload=b""):
        self.send(cmd, payload)
        return self._expect(cmd, self.read_frame())

    # ------------------------------------------------------------------------- commands

    def info(self) -> dict:
        """Build id, clock, link parameters and the chip's ID ROM (:func:`parse_info`)."""
        info = parse_info(self.request(P.Cmd.INFO))
        self._max_payload = info["max_payload"]
        return info

    def reset(self):
        """New context: position 0, chip error flags cleared, no pending token."""
        self.request(P.Cmd.RESET)

    def feed(self, tokens) -> int:
        """Feed tokens at the current position; returns the chip's next token after the
        last one (sent in frames of at most ``max_payload / 2`` tokens)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed() needs at least one token")
        if any(not 0 <= t <= 0xFFFF for t in tokens):
            raise ValueError("token ids travel as 16-bit words")
        if self._max_payload is None:
            self.info()
        per = self._max_payload // 2
        nxt = None
        for k in range(0, len(tokens), per):
            chunk = tokens[k:k + per]
            payload = self.request(P.Cmd.FEED, struct.pack(f">{len(chunk)}H", *chunk))
            (nxt,) = struct.unpack(">H", payload)
        return nxt

    def iter_generate(self, n, *, stop=None):
        """Yield up to ``n`` tokens: each feeds the previous output back (the first feeds
        the token :meth:`feed` returned). Ends early after ``stop`` (which is yielded)."""
        left = int(n)
        while left > 0:
            k = min(left, 0xFFFF)
            payload = struct.pack(">H", k) + (b"" if stop is None else struct.pack(">H", stop))
            self.send(P.Cmd.GENERATE, payload)
            while True:
                tok, flags = struct.unpack(">HB", self._expect(P.Cmd.GENERATE,
                                                               self.read_frame()))
                yield tok
                left -= 1
                if flags & P.LAST_FLAG:
                    break
            if stop is not None and tok == stop:
                return

    def generate(self, n, *, stop=None) -> list:
        return list(self.iter_generate(n, stop=stop))

    def status(self) -> dict:
        pos, flags, pending, errors = struct.unpack(">HBHH", self.request(P.Cmd.STATUS))
        return {"pos": pos, "busy": bool(flags & P.STATUS_BUSY),
                "err_token": bool(flags & P.STATUS_ERR_TOKEN),
                "err_context": bool(flags & P.STATUS_ERR_CONTEXT),
                "pending": pending if flags & P.STATUS_PENDING else None,
                "error_frames": errors}

    def close(self):
        if self._owned:
            self._ser.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chat(port, *, tokenizer=None, prompt="", n=64, baud=115200, timeout=10.0,
         on_text=None):
    """``hardwire chat``: greedy generation on a board (or a board simulation).

    Resets the context, feeds the prompt (``tokenizer`` encodes it with BOS; without a
    tokenizer the prompt must be empty and generation starts from BOS), then generates up to
    ``n`` tokens, stopping before BOS and at the end of the context (as
    ``hardwire run``). ``on_text(piece)`` is called as tokens arrive. Returns a dict with
    ``prompt_tokens``, ``tokens``, ``text`` and timing.
    """
    from hardwire.compiler.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is None and prompt:
        raise HardwireError("--prompt needs --tokenizer (the board only knows token ids)")
    t0 = time.perf_counter()
    with HostLink(port, baud=baud, timeout=timeout) as link:
        info = link.info()
        if not info["magic_ok"]:
            raise HardwireError(f"{port}: not a hardwire chip (ID ROM magic "
                                f"0x{info['id_words'][0]:08x})")
        cfg = info["config"]
        if tok is not None and tok.vocab_size != cfg["vocab_size"]:
            raise HardwireError(f"tokenizer has {tok.vocab_size} tokens, the chip "
                                f"{cfg['vocab_size']}")
        pt = tok.encode(prompt, bos=True) if tok is not None else [BOS]
        if len(pt) > cfg["seq_len"]:
            raise HardwireError(f"prompt of {len(pt)} tokens is longer than the context "
                                f"({cfg['seq_len']})")
        n = min(int(n), cfg["seq_len"] - len(pt) + 1)
        link.reset()
        out, prev = [], pt[-1]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if on_text is not None and tok is not None and len(pt) > 1:
            on_text(tok.decode_all(list(pt[1:]), prev=BOS))

        def emit(t):
            nonlocal prev
            out.append(t)
            if on_text is not None:
                if tok is None:
                    on_text(f"{t} ")
                else:
                    piece = tok.decode(prev, t)
                    on_text(utf8.decode(piece) if isinstance(piece, bytes) else piece)
            prev = t

        t1 = time.perf_counter()
        first = link.feed(pt)
        if n > 0 and first != BOS:
            emit(first)
            for t in link.iter_generate(n - 1, stop=BOS):
                if t == BOS:
                    break
                emit(t)
        gen_s = time.perf_counter() - t1
    text = (tok.decode_all(list(pt[1:]) + out, prev=BOS) if tok is not None
            else " ".join(str(t) for t in out))
    return {"engine": "board", "port": str(port), "model_hash": info["model_hash"],
            "build_id": f"{info['build_id']:08x}", "clock_mhz": info["clock_hz"] / 1e6,
            "prompt_tokens": pt, "tokens": out, "text": text,
            "seconds": round(time.perf_counter() - t0, 3),
            "tokens_per_s": round(len(out) / gen_s, 2) if gen_s > 0 and out else 0.0}
