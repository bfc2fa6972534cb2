"""The in-memory model every loader produces: a config plus named float32 tensors.

Tensor names follow llama2.c, weights stored ``[out_features, in_features]``:

=============================  ======================  ===================================
name                           shape                   meaning
=============================  ======================  ===================================
``tok_embeddings``             (vocab, dim)            token embedding
``layers.{i}.attention_norm``  (dim,)                  RMSNorm gain before attention
``layers.{i}.wq``              (dim, dim)              query projection
``layers.{i}.wk``              (kv_dim, dim)           key projection
``layers.{i}.wv``              (kv_dim, dim)           value projection
``layers.{i}.wo``              (dim, dim)              attention output projection
``layers.{i}.ffn_norm``        (dim,)                  RMSNorm gain before the FFN
``layers.{i}.w1``              (hidden, dim)           gate projection (SiLU side)
``layers.{i}.w2``              (dim, hidden)           down projection
``layers.{i}.w3``              (hidden, dim)           up projection
``norm``                       (dim,)                  final RMSNorm gain
``output``                     (vocab, dim)            classifier, only if not shared
=============================  ======================  ===================================

Q/K rows are in llama2.c order (RoPE rotates adjacent pairs), not Hugging Face's rotate-half order.
"""

import hashlib
from dataclasses import dataclass, field, asdict

import numpy as np

from .errors import UnsupportedConfigError

__all__ = ["LlamaConfig", "LlamaModel", "LAYER_TENSORS", "MAX_DIM", "MAX_VOCAB", "MAX_SEQ_LEN"]

LAYER_TENSORS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")

# Limits of the integer numerics (see docs/numerics.md): accumulators are 32-bit and the
# attention/normalisation tables are sized for these.
MAX_DIM = 4096
MAX_HIDDEN = 16384
MAX_VOCAB = 65536
MAX_SEQ_LEN = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama model (llama2.c semantics)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_size(self):
        return self.dim // self.n_heads

    @property
    def kv_dim(self):
        return self.head_size * self.n_kv_heads

    @property
    def kv_group(self):
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def validate(self, *, path=None):
        """Raise :class:`UnsupportedConfigError` unless hardwire can build this model."""
        def bad(msg):
            raise UnsupportedConfigError(msg, path=path)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                     "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(f"config {name} must be a positive integer, not {v!r}")
        if self.dim % self.n_heads:
            bad(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_size % 2:
            bad(f"head size {self.head_size} is odd; RoPE rotates pairs")
        if self.dim > MAX_DIM:
            bad(f"dim {self.dim} exceeds the supported maximum {MAX_DIM}")
        if self.hidden_dim > MAX_HIDDEN:
            bad(f"hidden_dim {self.hidden_dim} exceeds the supported maximum {MAX_HIDDEN}")
        if self.vocab_size > MAX_VOCAB:
            bad(f"vocab_size {self.vocab_size} exceeds the supported maximum {MAX_VOCAB}")
        if self.seq_len > MAX_SEQ_LEN:
            bad(f"seq_len {self.seq_len} exceeds the supported maximum {MAX_SEQ_LEN}")
        if not (0 < self.norm_eps < 1):
            bad(f"norm_eps {self.norm_eps} is out of range")

    def tensor_shapes(self):
        """Expected shape of every tensor, in canonical order."""
        c = self
        shapes = {"tok_embeddings": (c.vocab_size, c.dim)}
        per_layer = {
            "attention_norm": (c.dim,), "wq": (c.dim, c.dim), "wk": (c.kv_dim, c.dim),
            "wv": (c.kv_dim, c.dim), "wo": (c.dim, c.dim), "ffn_norm": (c.dim,),
            "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim),
        }
        for i in range(c.n_layers):
            for n in LAYER_TENSORS:
                shapes[f"layers.{i}.{n}"] = per_layer[n]
        shapes["norm"] = (c.dim,)
        if not c.shared_classifier:
            shapes["output"] = (c.vocab_size, c.dim)
        return shapes

    def to_dict(self):
        return asdict(self)


@dataclass
class LlamaModel:
    """A loaded model: config, float32 tensors by name, and where it came from."""

    config: LlamaConfig
    tensors: dict = field(repr=False)
    name: str = "model"
    source: str = ""
    # Token strings (bytes) and scores when the file carries a vocabulary (GGUF does).
    vocab: list | None = field(default=None, repr=False)
    vocab_scores: list | None = field(default=None, repr=False)

    def __post_init__(self):
        self.check()

    def check(self):
        """Validate config, tensor names, shapes and values; raise a one-line error if wrong."""
        from .errors import ModelFormatError
        path = self.source or None
        self.config.validate(path=path)
        expected = self.config.tensor_shapes()
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise ModelFormatError(f"missing tensor {missing[0]}", path=path)
        extra = [n for n in self.tensors if n not in expected]
        if extra:
            raise ModelFormatError(f"unexpected tensor {extra[0]}", path=path)
        for n, shape in expected.items():
            t = np.asarray(self.tensors[n], dtype=np.float32)
            if t.shape != shape:
                raise ModelFormatError(f"tensor {n} has shape {t.shape}, expected {shape}",
                                       path=path)
            if not np.all(np.isfinite(t)):
                raise ModelFormatError(f"tensor {n} contains NaN or Inf", path=path)
            self.tensors[n] = np.ascontiguousarray(t)

    def layer(self, i, name):
        return self.tensors[f"layers.{i}.{name}"]

    @property
    def classifier(self):
        c = self.config
        return self.tensors["tok_embeddings"] if c.shared_classifier else self.tensors["output"]

    @property
    def n_params(self):
        return int(sum(t.size for t in self.tensors.values()))

    def content_hash(self):
        """sha256 over the config and every tensor in canonical order (hex)."""
        h = hashlib.sha256()
        h.update(repr(sorted(self.config.to_dict().items())).encode())
        for n in self.config.tensor_shapes():
            h.update(n.encode())
            h.update(self.tensors[n].astype("<f4").tobytes())
        return h.hexdigest()
