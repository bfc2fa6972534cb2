"""The llama2.c tokenizer: file format, run.c-exact encode/decode, GGUF vocab, bad input."""

import struct

import pytest

from conftest import STORY, assert_one_line_error
from hardwire.compiler.errors import HardwireError, ModelFormatError, UnsupportedConfigError
from hardwire.compiler.tokenizer import BOS, EOS, Tokenizer, load_tokenizer


def test_tok512_layout(tok512):
    assert tok512.vocab_size == 512 and tok512.max_token_length == 7
    assert tok512.vocab[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    assert tok512.vocab[3] == b"<0x00>" and tok512.vocab[258] == b"<0xFF>"
    assert tok512.vocab[259] == b" t" and tok512.scores[259] == 0.0
    assert tok512.scores[260] == -1.0  # merges ranked by descending score


def test_known_ids(tok512):
    # BOS, then the dummy-prefix space merged into the first word
    assert tok512.encode("Once upon a time") == [BOS, 403, 407, 261, 378]
    assert [tok512.vocab[i] for i in (403, 407, 261, 378)] == [b" Once", b" upon", b" a",
                                                              b" time"]
    assert tok512.encode("Lily", bos=False) == [317]
    assert tok512.encode("Lily", bos=False, eos=True) == [317, EOS]
    assert tok512.encode("") == [BOS]  # no dummy prefix for empty text
    assert tok512.encode("", bos=False) == []


def test_byte_fallback(tok512):
    # U+65E5 is not in the vocabulary: its three UTF-8 bytes become <0xNN> tokens (byte + 3)
    ids = tok512.encode("\u65e5", bos=False)
    assert ids[1:] == [0xE6 + 3, 0x97 + 3, 0xA5 + 3]
    assert tok512.vocab[ids[0]] == b" "
    # "é" is a whole code point in the vocabulary
    assert b"\xc3\xa9" in [tok512.vocab[i] for i in tok512.encode("caf\u00e9", bos=False)]


@pytest.mark.parametrize("text", [
    "Once upon a time",
    STORY,
    "Hello, world!\nTwo  spaces and\ttabs.",
    "na\u00efve caf\u00e9 \u65e5\u672c \U0001f642",
    " leading space",
])
def test_encode_decode_round_trip(tok512, text):
    ids = tok512.encode(text)
    assert ids[0] == BOS
    assert tok512.decode_all(ids) == text


def test_decode_like_run_c(tok512):
    space_t = 259  # " t"
    assert tok512.decode(BOS, space_t) == b"t"  # leading space stripped after BOS only
    assert tok512.decode(5, space_t) == b" t"
    assert tok512.decode(5, 0x0A + 3) == b"\n"  # <0x0A> is a raw newline byte
    assert tok512.decode(5, 0xE6 + 3) == b"\xe6"
    assert tok512.decode_all([403, 407], prev=BOS) == "Once upon"
    assert tok512.decode_all([403, 407]) == " Once upon"


def test_merge_picks_best_score_not_leftmost():
    vocab = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    vocab += [b" ", b"a", b"b", b"c", b"ab", b"bc", b" a"]
    scores = [0.0] * 259 + [-1.0, -1.0, -1.0, -1.0, -5.0, -2.0, -9.0]
    tok = Tokenizer(vocab, scores)
    space, c, ab, bc, sp_a = 259, 262, 263, 264, 265
    # [" ", a, b, c]: "bc" (-2) beats "ab" (-5) and " a" (-9); then only " a" is left
    assert tok.encode("abc", bos=False) == [sp_a, bc]
    # [" ", a, b]: "ab" (-5) beats " a" (-9), and " ab" is not a token
    assert tok.encode("ab", bos=False) == [space, ab]
    assert tok.encode("c", bos=False) == [space, c]


def test_gguf_vocab_matches_tokenizer_bin(tok512, models_dir):
    g = load_tokenizer(models_dir / "stories260K.gguf")
    assert g.vocab == tok512.vocab
    assert (g.scores == tok512.scores).all()
    assert g.encode(STORY) == tok512.encode(STORY)


# ---------------------------------------------------------------------------- bad input


def test_bad_sentencepiece_model(models_dir):
    p = models_dir / "tok512.model"
    with pytest.raises(UnsupportedConfigError) as e:
        load_tokenizer(p)
    assert "use tok512.bin" in assert_one_line_error(e, p)


def test_bad_unknown_tokenizer_format(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text('{"model": {"type": "BPE", "vocab": {}}}\n')
    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(p)
    assert "unknown tokenizer format" in assert_one_line_error(e, p)


def test_bad_truncated_tokenizer(tmp_path, models_dir):
    p = tmp_path / "tok.bin"
    p.write_bytes((models_dir / "tok512.bin").read_bytes()[:-3])
    with pytest.raises(ModelFormatError) as e:
        Tokenizer.from_file(p)
    assert "truncated" in assert_one_line_error(e, p)


def test_bad_token_length(tmp_path):
    p = tmp_path / "tok.bin"
    p.write_bytes(struct.pack("<ifi", 4, 0.0, 9) + b"123456789")
    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(p)
    assert "length 9" in assert_one_line_error(e, p)


def test_bad_missing_tokenizer(tmp_path):
    p = tmp_path / "missing.bin"
    with pytest.raises(HardwireError) as e:
        load_tokenizer(p)
    assert str(e.value) == f"{p}: no such file"
