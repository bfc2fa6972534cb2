"""Host side of the host link (pyserial): talk to a board or to its simulation's pty.

:class:`HostLink` sends request frames and decodes replies (:mod:`.protocol`);
:func:`chat` is ``hardwire chat``: encode a prompt, FEED it, GENERATE, decode the text;
:func:`lora_load` is ``hardwire lora load``: check an adapter image, upload it, commit it.
"""

from __future__ import annotations

import codecs
import struct
import time

from hardwire.compiler.errors import HardwireError

from . import protocol as P

__all__ = ["BOS", "HostLink", "LinkError", "LoraRejected", "chat", "check_lora_image",
           "lora_load", "parse_info"]

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


class LoraRejected(LinkError):
    """The chip's LoRA loader refused a command (``code``: a ``LoraError``); the adapter that
    was active keeps serving."""


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

    # ---------------------------------------------------------------------------- LoRA

    def _lora(self, cmd, payload=b""):
        try:
            return P.lora_status(struct.unpack(">H", self.request(cmd, payload))[0])
        except LinkError as e:
            if e.code == P.Err.UNKNOWN_CMD:
                raise LinkError(f"{self.port}: this chip was built without LoRA",
                                code=e.code, cmd=e.cmd, detail=e.detail) from None
            if e.code != P.Err.LORA_REJECTED:
                raise
            try:
                err = P.LoraError(e.detail)
            except ValueError:
                err = e.detail
            what = P.LORA_ERROR_TEXT.get(err, f"error {e.detail}")
            name = err.name if isinstance(err, P.LoraError) else str(err)
            raise LoraRejected(f"{self.port}: the chip refused {P.Cmd(cmd).name}: {what} "
                               f"({name}); the active adapter is unchanged",
                               code=err, cmd=e.cmd, detail=e.detail) from None

    def lora_status(self) -> dict:
        """The LoRA loader's status (:func:`.protocol.lora_status`)."""
        return self._lora(P.Cmd.LORA_STATUS)

    def lora_enable(self, on=True) -> dict:
        """Adapter on (or off), from the next token."""
        return self._lora(P.Cmd.LORA_ENABLE if on else P.Cmd.LORA_DISABLE)

    def lora_lock(self) -> dict:
        """Refuse further uploads and switches until the chip is reset."""
        return self._lora(P.Cmd.LORA_LOCK)

    def lora_upload(self, image: bytes, *, commit=True, progress=None) -> dict:
        """BEGIN, the image in ``max_payload`` chunks, then (``commit``) COMMIT: the bank
        becomes active at the next token. ``progress(sent, total)`` after each chunk. Raises
        :class:`LoraRejected` naming the chip's reason if it refuses."""
        image = bytes(image)
        if self._max_payload is None:
            self.info()
        status = self._lora(P.Cmd.LORA_BEGIN)
        per = self._max_payload
        for k in range(0, len(image), per):
            status = self._lora(P.Cmd.LORA_DATA, image[k:k + per])
            if progress is not None:
                progress(min(k + per, len(image)), len(image))
        if commit:
            status = self._lora(P.Cmd.LORA_COMMIT)
        return status

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


class _ChipView:
    """What :func:`~hardwire.compiler.lora_image.read_image` needs of a quantized model, for a
    chip known only by its header fields (the digest is compared separately)."""

    def __init__(self, digest8, n_layers, dim, kv_dim, hidden_dim):
        from types import SimpleNamespace
        self._digest = digest8.hex()
        self.config = SimpleNamespace(n_layers=n_layers, dim=dim, kv_dim=kv_dim,
                                      hidden_dim=hidden_dim)

    def digest(self):
        return self._digest


def check_lora_image(data: bytes, *, info=None, source="adapter image"):
    """Check an image without the model: every :func:`read_image` check (format, CRC, field
    ranges, padding) against the image's own header, then, with ``info`` (a chip's INFO),
    the base digest (the 4 bytes the ID ROM carries) and the shape. Returns the header
    fields. Raises ``LoraImageError`` (one line, ``SOURCE: problem``)."""
    from hardwire.compiler.lora_image import HEADER, LoraImageError, read_image
    data = bytes(data)
    if len(data) >= HEADER.size:
        h = HEADER.unpack_from(data)
        view = _ChipView(h[3], h[4], h[8], h[9], h[10])
    else:
        view = _ChipView(bytes(8), 0, 0, 0, 0)
    ql = read_image(data, view, source=source)
    fields = {"digest8": h[3].hex(), "n_layers": h[4], "targets": list(ql.targets),
              "r_max": h[6], "rank": h[7], "dim": h[8], "kv_dim": h[9], "hidden_dim": h[10],
              "bytes": len(data)}
    if info is not None:
        cfg = info["config"]
        if h[3][:4].hex() != info["digest"]:
            raise LoraImageError(f"packed for another base model or weight width (digest "
                                 f"{h[3][:4].hex()}..., the chip's {info['digest']})",
                                 path=source)
        kv_dim = cfg["dim"] * cfg["n_kv_heads"] // max(cfg["n_heads"], 1)
        want = (cfg["n_layers"], cfg["dim"], kv_dim, cfg["hidden_dim"])
        if (h[4], h[8], h[9], h[10]) != want:
            raise LoraImageError(f"shape {h[4]} layers, dim {h[8]}, kv_dim {h[9]}, hidden "
                                 f"{h[10]} does not match the chip's {want}", path=source)
    return fields


def lora_load(port, image, *, baud=115200, timeout=10.0, commit=True, enable=True,
              lock=False, progress=None, source=None):
    """``hardwire lora load``: check ``image`` (bytes, or a path), compare it with the chip's
    ID ROM, upload it into the inactive bank and (``commit``) commit it; then (``enable``)
    switch the adapter on and (``lock``) lock the loader. The new adapter serves from the
    next token. Returns a dict: the image's header fields, the chip's LoRA status, timing."""
    from pathlib import Path
    if isinstance(image, (str, Path)):
        source = str(image) if source is None else source
        try:
            image = Path(image).read_bytes()
        except FileNotFoundError:
            raise HardwireError("no such file", path=source) from None
        except OSError as e:
            raise HardwireError(f"cannot read: {e.strerror}", path=source) from None
    source = "adapter image" if source is None else source
    fields = check_lora_image(image, source=source)
    t0 = time.perf_counter()
    with HostLink(port, baud=baud, timeout=timeout) as link:
        info = link.info()
        if not info["magic_ok"]:
            raise HardwireError(f"{link.port}: not a hardwire chip (ID ROM magic "
                                f"0x{info['id_words'][0]:08x})")
        check_lora_image(image, info=info, source=source)
        status = link.lora_upload(image, commit=commit, progress=progress)
        if commit and enable:
            status = link.lora_enable(True)
        if lock:
            status = link.lora_lock()
        seconds = time.perf_counter() - t0
    return {"port": str(port), "image": source, "header": fields, "committed": commit,
            "status": {k: (v.name if isinstance(v, P.LoraError) else v)
                       for k, v in status.items()},
            "seconds": round(seconds, 3),
            "bytes_per_s": round(len(image) / seconds, 1) if seconds > 0 else 0.0}
