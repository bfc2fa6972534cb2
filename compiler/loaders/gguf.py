"""Read Llama models from GGUF files (llama.cpp's format) with the ``gguf`` package.

Only ``general.architecture == "llama"`` with ``F32`` or ``F16`` tensors is supported; quantized
tensors are rejected rather than silently dequantized.

Row order: GGUF's ``llama`` architecture uses llama.cpp's "normal" RoPE, which rotates adjacent
pairs exactly like llama2.c, and llama.cpp's converters store Q/K in that order (its Hugging Face
converter undoes HF's rotate-half permutation). So the tensors are taken as they are; for
``stories260K.gguf`` this is checked against the llama2.c ``.bin`` by the tests.

Context length: converters write ``llama.context_length`` from their own defaults; e.g.
``stories260K.gguf`` claims 2048 although the model was trained with 512 positions. The loader
reports the declared value; pass ``seq_len=`` to cap it.
"""

from pathlib import Path

import numpy as np

from ..errors import HardwireError, ModelFormatError, UnsupportedConfigError
from ..model import LlamaConfig, LlamaModel
from ._common import cap_seq_len

__all__ = ["load_gguf", "GGUF_MAGIC_BYTES", "TENSOR_NAMES"]

GGUF_MAGIC_BYTES = b"GGUF"

# GGUF tensor name -> hardwire tensor name (per layer names use {i}).
TENSOR_NAMES = {
    "token_embd.weight": "tok_embeddings",
    "output_norm.weight": "norm",
    "output.weight": "output",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm",
    "blk.{i}.attn_q.weight": "layers.{i}.wq",
    "blk.{i}.attn_k.weight": "layers.{i}.wk",
    "blk.{i}.attn_v.weight": "layers.{i}.wv",
    "blk.{i}.attn_output.weight": "layers.{i}.wo",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm",
    "blk.{i}.ffn_gate.weight": "layers.{i}.w1",
    "blk.{i}.ffn_down.weight": "layers.{i}.w2",
    "blk.{i}.ffn_up.weight": "layers.{i}.w3",
}


def _one_line(e):
    text = " ".join(str(e).split()) or "no detail"
    return f"{type(e).__name__}: {text}"


def _open(path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise HardwireError("no such file", path=path) from None
    except IsADirectoryError:
        raise ModelFormatError("is a directory, not a GGUF file", path=path) from None
    except PermissionError as e:
        raise HardwireError(f"cannot read: {e.strerror}", path=path) from None
    except Exception as e:  # the gguf library raises ValueError, IndexError, KeyError, ...
        raise ModelFormatError(f"not a valid GGUF file ({_one_line(e)})", path=path) from None


def _scalar(field):
    """The value of a scalar GGUF metadata field (number or str)."""
    part = field.parts[field.data[0]]
    if len(field.types) == 1 and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item()


def _metadata(reader, path):
    """Scalar metadata as a dict (arrays other than the vocabulary are skipped)."""
    meta = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0].name == "ARRAY" or not field.data:
            continue
        try:
            meta[name] = _scalar(field)
        except Exception as e:
            raise ModelFormatError(f"bad metadata field {name} ({_one_line(e)})",
                                   path=path) from None
    return meta


def _string_array(field):
    return [bytes(field.parts[i]) for i in field.data]


def _number_array(field):
    return [field.parts[i][0].item() for i in field.data]


def _f32_round(x):
    """Undo float32 storage of a decimal constant: float32(1e-5) -> 1e-05."""
    return float(str(np.float32(x)))


def _config(meta, path, seq_len):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedConfigError(
            f"GGUF architecture {arch!r} is not supported (only 'llama')", path=path)

    def get(key, default=None):
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise ModelFormatError(f"GGUF metadata lacks llama.{key}", path=path)
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    declared = int(get("context_length"))
    declared = cap_seq_len(seq_len, declared, path)
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and n_heads and rope_dims != dim // n_heads:
        raise UnsupportedConfigError(
            f"partial RoPE ({rope_dims} of {dim // n_heads} head dims) is not supported",
            path=path)
    if meta.get("llama.rope.scaling.type", "none") not in ("none", ""):
        raise UnsupportedConfigError("RoPE scaling is not supported", path=path)
    return LlamaConfig(
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        vocab_size=0,  # filled in from the embedding
        seq_len=declared,
        norm_eps=_f32_round(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_round(get("rope.freq_base", 10000.0)),
    )


def _our_name(gguf_name):
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        key = f"blk.{{i}}.{parts[2]}.{parts[3]}"
        if key in TENSOR_NAMES:
            return TENSOR_NAMES[key].format(i=int(parts[1]))
        return None
    return TENSOR_NAMES.get(gguf_name)


def _tensor_data(t, path):
    kind = t.tensor_type.name
    if kind not in ("F32", "F16"):
        raise UnsupportedConfigError(
            f"tensor {t.name} is {kind}; only F32 and F16 GGUF tensors are supported "
            "(convert with a float outfile type)", path=path)
    data = np.asarray(t.data)
    rows_cols = tuple(int(d) for d in reversed(list(t.shape)))
    if data.size != int(np.prod(rows_cols)):
        raise ModelFormatError(f"tensor {t.name} data is truncated", path=path)
    return np.array(data, dtype=np.float32).reshape(rows_cols)


def load_gguf(path, *, seq_len=None):
    """Load a Llama model from a GGUF file.

    Parameters
    ----------
    path : str or os.PathLike
    seq_len : int, optional
        Cap the context to this many positions (must not exceed ``llama.context_length``).

    Returns
    -------
    LlamaModel
        Named after the file's stem. ``vocab`` holds the raw GGUF token strings as bytes
        (sentencepiece form, with U+2581 for space) and ``vocab_scores`` their scores; build a
        tokenizer with :meth:`hardwire.compiler.tokenizer.Tokenizer.from_gguf_vocab`. The
        classifier counts as shared when ``output.weight`` is absent or equals the embedding.

    Raises
    ------
    ModelFormatError
        The file is not a readable GGUF file or lacks required metadata/tensors.
    UnsupportedConfigError
        Not a llama model, quantized tensors, partial RoPE, or a shape hardwire cannot build.
    """
    path = str(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    config = _config(meta, path, seq_len)
    tensors = {}
    for t in reader.tensors:
        name = _our_name(t.name)
        if name is None:
            raise UnsupportedConfigError(f"unsupported tensor {t.name}", path=path)
        tensors[name] = _tensor_data(t, path)
    if "tok_embeddings" not in tensors:
        raise ModelFormatError("missing tensor token_embd.weight", path=path)
    shared = "output" not in tensors or np.array_equal(tensors["output"],
                                                      tensors["tok_embeddings"])
    if shared:
        tensors.pop("output", None)
    vocab_size = tensors["tok_embeddings"].shape[0]
    config = LlamaConfig(**{**config.to_dict(), "vocab_size": vocab_size,
                            "shared_classifier": shared})

    vocab = scores = None
    if "tokenizer.ggml.tokens" in reader.fields:
        vocab = _string_array(reader.fields["tokenizer.ggml.tokens"])
        if "tokenizer.ggml.scores" in reader.fields:
            scores = [float(s) for s in _number_array(reader.fields["tokenizer.ggml.scores"])]
        else:
            scores = [0.0] * len(vocab)
        if len(vocab) != vocab_size or len(scores) != vocab_size:
            raise ModelFormatError(
                f"vocabulary has {len(vocab)} tokens/{len(scores)} scores but the embedding "
                f"has {vocab_size} rows", path=path)
    del reader
    return LlamaModel(config=config, tensors=tensors, name=Path(path).stem or "model",
                      source=path, vocab=vocab, vocab_scores=scores)
