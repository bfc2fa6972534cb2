"""Model loaders: every supported checkpoint format becomes a :class:`LlamaModel`.

:func:`load_model` picks the format from the file's content, not its name:

* a directory with ``config.json`` -> Hugging Face (:func:`load_hf`)
* ``GGUF`` magic -> GGUF (:func:`load_gguf`)
* ``ak42`` magic -> llama2.c version 1/2 (:func:`load_llama2c`)
* anything else -> llama2.c legacy ``.bin`` (:func:`load_llama2c`)
"""

import dataclasses
import os
from pathlib import Path

from ..errors import HardwireError, ModelFormatError
from ..model import LlamaModel
from ._common import cap_seq_len
from .gguf import GGUF_MAGIC_BYTES, load_gguf
from .hf import load_hf, save_hf
from .llama2c import AK42_MAGIC, load_llama2c, save_llama2c
from .random import random_model

__all__ = ["load_model", "detect_format", "with_seq_len", "load_llama2c", "save_llama2c",
           "load_gguf", "load_hf", "save_hf", "random_model"]

_AK42_BYTES = AK42_MAGIC.to_bytes(4, "little")  # b"24ka" on disk


def detect_format(path):
    """Return ``"hf"``, ``"gguf"``, ``"ak42"`` (llama2.c v1/v2) or ``"llama2c"`` (legacy).

    Raises
    ------
    HardwireError
        ``PATH: no such file`` if nothing exists at ``path``.
    ModelFormatError
        A directory without ``config.json``.
    """
    p = Path(path)
    if not p.exists():
        raise HardwireError("no such file", path=path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        raise ModelFormatError("directory has no config.json (not a Hugging Face checkpoint)",
                               path=path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise HardwireError(f"cannot read: {e.strerror}", path=path) from None
    if magic == GGUF_MAGIC_BYTES:
        return "gguf"
    if magic == _AK42_BYTES:
        return "ak42"
    return "llama2c"  # no magic: the legacy format, checked by its header and size


def with_seq_len(model, seq_len):
    """Return ``model`` with its context capped to ``seq_len`` (tensors shared, not copied).

    Raises
    ------
    UnsupportedConfigError
        ``seq_len`` is not a positive integer no larger than the model's declared context.
    """
    if seq_len is None or seq_len == model.config.seq_len:
        return model
    seq_len = cap_seq_len(seq_len, model.config.seq_len, model.source or None)
    config = dataclasses.replace(model.config, seq_len=seq_len)
    return LlamaModel(config=config, tensors=dict(model.tensors), name=model.name,
                      source=model.source, vocab=model.vocab, vocab_scores=model.vocab_scores)


def load_model(path, *, seq_len=None):
    """Load a checkpoint in any supported format.

    Parameters
    ----------
    path : str or os.PathLike
        A llama2.c ``.bin``, a ``.gguf`` file, or a Hugging Face checkpoint directory.
    seq_len : int, optional
        Cap the context length; must not exceed the trained/declared context.

    Returns
    -------
    LlamaModel

    Raises
    ------
    HardwireError
        ``PATH: no such file``; subclasses :class:`ModelFormatError` and
        :class:`UnsupportedConfigError` for malformed or unsupported checkpoints.
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "hf":
        return load_hf(path, seq_len=seq_len)
    if kind == "gguf":
        return load_gguf(path, seq_len=seq_len)
    return with_seq_len(load_llama2c(path), seq_len)
