"""The llama2.c BPE tokenizer (``tokenizer.bin``), bit-for-bit like ``run.c``.

Tokens are kept as ``bytes``: a token may be a fragment of a UTF-8 character, and the
``<0xNN>`` byte-fallback tokens decode to single raw bytes.

``tokenizer.bin`` layout (little-endian): ``int32 max_token_length``, then for every token
``float32 score``, ``int32 length``, ``length`` bytes; the vocabulary runs to the end of the file.
llama2.c's exporter writes spaces for sentencepiece's U+2581 and ``"\\n<s>\\n"``/``"\\n</s>\\n"``
for BOS/EOS; :meth:`Tokenizer.from_gguf_vocab` applies the same mapping, so a GGUF vocabulary
and its ``tokenizer.bin`` give identical tokenizers.
"""

import re
import struct
from pathlib import Path

import numpy as np

from .errors import HardwireError, ModelFormatError, UnsupportedConfigError

__all__ = ["Tokenizer", "load_tokenizer", "BOS", "EOS"]

UNK, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # <0x00> is token 3: ids 0..2 are <unk>, <s>, </s>
_SP_SPACE = "\u2581".encode()
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")
_MAX_TOKEN_LENGTH = 1 << 16


class Tokenizer:
    """A llama2.c BPE tokenizer.

    Parameters
    ----------
    vocab : list of bytes
        Token strings, index = token id.
    scores : list of float
        Merge priority of each token (higher merges first).
    max_token_length : int, optional
        As stored in ``tokenizer.bin``; defaults to the longest token.
    source : str
        Where the vocabulary came from (for messages).
    """

    def __init__(self, vocab, scores, *, max_token_length=None, source=""):
        if len(vocab) != len(scores):
            raise ModelFormatError(f"{len(vocab)} tokens but {len(scores)} scores",
                                   path=source or None)
        self.vocab = [bytes(t) for t in vocab]
        self.scores = np.asarray(scores, dtype=np.float32)
        self.max_token_length = (max(map(len, self.vocab), default=0)
                                 if max_token_length is None else int(max_token_length))
        self.source = str(source)
        # run.c binary-searches a sorted copy; with duplicate strings, we take the lowest id.
        self._lookup = {}
        for i, t in enumerate(self.vocab):
            self._lookup.setdefault(t, i)

    @property
    def vocab_size(self):
        return len(self.vocab)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path):
        """Read a llama2.c ``tokenizer.bin``.

        Raises
        ------
        ModelFormatError
            Truncated file, impossible lengths, NaN/Inf scores, or an empty vocabulary.
        """
        path = str(path)
        data = _read(path)
        if len(data) < 4:
            raise ModelFormatError(
                f"file too short for a llama2.c tokenizer ({len(data)} bytes)", path=path)
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= _MAX_TOKEN_LENGTH:
            raise ModelFormatError(
                f"not a llama2.c tokenizer: max_token_length {max_len} is implausible",
                path=path)
        vocab, scores, off = [], [], 4
        while off < len(data):
            if off + 8 > len(data):
                raise ModelFormatError(f"truncated tokenizer: token {len(vocab)} header is cut "
                                       f"off at byte {off}", path=path)
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if not 0 <= n <= max_len:
                raise ModelFormatError(
                    f"token {len(vocab)} has length {n}, outside 0..max_token_length {max_len}",
                    path=path)
            if off + n > len(data):
                raise ModelFormatError(f"truncated tokenizer: token {len(vocab)} text is cut "
                                       f"off at byte {off}", path=path)
            if not np.isfinite(score):
                raise ModelFormatError(f"token {len(vocab)} has a NaN/Inf score", path=path)
            vocab.append(data[off:off + n])
            scores.append(score)
            off += n
        if not vocab:
            raise ModelFormatError("tokenizer has no tokens", path=path)
        return cls(vocab, scores, max_token_length=max_len, source=path)

    @classmethod
    def from_gguf_vocab(cls, tokens, scores, *, bos_id=BOS, eos_id=EOS, source=""):
        """Build from a GGUF ``tokenizer.ggml.tokens``/``scores`` pair (sentencepiece form).

        Applies llama2.c's export mapping: U+2581 becomes a space, BOS/EOS become
        ``"\\n<s>\\n"``/``"\\n</s>\\n"``. Tokens may be ``str`` or ``bytes``.
        """
        vocab = []
        for i, t in enumerate(tokens):
            t = t.encode() if isinstance(t, str) else bytes(t)
            if i == bos_id:
                t = b"\n<s>\n"
            elif i == eos_id:
                t = b"\n</s>\n"
            vocab.append(t.replace(_SP_SPACE, b" "))
        return cls(vocab, [float(s) for s in scores], source=source)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text, bos=True, eos=False):
        """Encode ``text`` exactly like llama2.c ``run.c`` ``encode()``.

        BOS (1) first if ``bos``; a "dummy prefix" space token if ``text`` is non-empty (skipped
        if the vocabulary has no ``" "`` token, where run.c would emit -1); each UTF-8 code point
        (at most 4 bytes) as its token, or its bytes as ``<0xNN>`` tokens (id = byte + 3) when the
        code point is not in the vocabulary; then repeatedly merge the adjacent pair whose
        concatenation is the highest-scoring token (leftmost on ties); EOS (2) if ``eos``.

        Parameters
        ----------
        text : str or bytes
            ``str`` is encoded as UTF-8. Like C strings, the text ends at a NUL byte.
        """
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        raw = raw.split(b"\0", 1)[0]
        tokens = [BOS] if bos else []
        if raw and b" " in self._lookup:
            tokens.append(self._lookup[b" "])
        tokens.extend(self._codepoint_tokens(raw))
        self._merge(tokens)
        if eos:
            tokens.append(EOS)
        return tokens

    def _codepoint_tokens(self, raw):
        out = []
        buf = b""
        for i, c in enumerate(raw):
            if c & 0xC0 != 0x80:
                buf = b""  # ASCII or a leading byte starts a new code point
            buf += bytes((c,))
            nxt = raw[i + 1] if i + 1 < len(raw) else 0
            if nxt & 0xC0 == 0x80 and len(buf) < 4:
                continue
            tid = self._lookup.get(buf)
            if tid is not None:
                out.append(tid)
            else:
                for b in buf:
                    if b + BYTE_OFFSET >= self.vocab_size:
                        raise HardwireError(
                            f"cannot encode byte 0x{b:02X}: the vocabulary has no byte tokens",
                            path=self.source or None)
                    out.append(b + BYTE_OFFSET)
            buf = b""
        return out

    def _merge(self, tokens):
        vocab, lookup, scores = self.vocab, self._lookup, self.scores
        while True:
            best_score, best_id, best_idx = np.float32(-1e10), -1, -1
            for i in range(len(tokens) - 1):
                tid = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
                if tid is not None and scores[tid] > best_score:
                    best_score, best_id, best_idx = scores[tid], tid, i
            if best_idx == -1:
                return
            tokens[best_idx:best_idx + 2] = [best_id]

    def decode(self, prev, token):
        """The bytes ``run.c`` prints for ``token`` following ``prev``.

        After BOS a leading space is stripped; ``<0xNN>`` tokens become the raw byte.
        """
        piece = self.vocab[token]
        if prev == BOS and piece[:1] == b" ":
            piece = piece[1:]
        m = _BYTE_TOKEN.match(piece)
        if m:
            return bytes((int(m.group(1), 16),))
        return piece

    def decode_all(self, ids, *, prev=None):
        """Decode a token sequence to text (UTF-8, invalid bytes replaced).

        BOS and EOS tokens produce no text (they only affect the next token's leading space).
        ``prev`` is the token before ``ids[0]``, if any.
        """
        out = bytearray()
        for tok in ids:
            tok = int(tok)
            if tok not in (BOS, EOS):
                out += self.decode(prev, tok)
            prev = tok
        return out.decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise HardwireError("no such file", path=path) from None
    except IsADirectoryError:
        raise ModelFormatError("is a directory, not a tokenizer file", path=path) from None
    except OSError as e:
        raise HardwireError(f"cannot read: {e.strerror}", path=path) from None


def _looks_like_sentencepiece(data):
    # A ModelProto starts with field 1 (pieces, length-delimited: 0x0a), whose first field is
    # the piece string (0x0a again) -- e.g. b"\n\x0e\n\x05<unk>".
    return len(data) > 4 and data[0] == 0x0A and data[2] == 0x0A


def load_tokenizer(path):
    """Load a tokenizer, choosing the reader from the file's content.

    Supports llama2.c ``tokenizer.bin`` and the vocabulary embedded in a ``.gguf`` model.

    Raises
    ------
    HardwireError
        ``PATH: no such file``.
    UnsupportedConfigError
        A sentencepiece ``.model`` file.
    ModelFormatError
        Anything else that is not a valid tokenizer.
    """
    path = str(path)
    data = _read(path)
    if Path(path).suffix == ".model" or _looks_like_sentencepiece(data):
        raise UnsupportedConfigError(
            "sentencepiece .model files are not supported; use tok512.bin (llama2.c "
            "tokenizer.bin, made by llama2.c's tokenizer.py)", path=path)
    if data[:4] == b"GGUF":
        from .loaders.gguf import load_gguf
        model = load_gguf(path)
        if model.vocab is None:
            raise ModelFormatError("GGUF file has no embedded vocabulary", path=path)
        return Tokenizer.from_gguf_vocab(model.vocab, model.vocab_scores, source=path)
    try:
        return Tokenizer.from_file(path)
    except ModelFormatError as e:
        detail = str(e)[len(path) + 2:] if str(e).startswith(path) else str(e)
        raise ModelFormatError(
            f"unknown tokenizer format (not a llama2.c tokenizer.bin: {detail})",
            path=path) from None
