"""Seeded random Llama models with trained-like weight statistics, for tests and demos.

Scales follow what small trained checkpoints look like (stories260K: embedding std ~0.3, norm
gains ~1.2 +- 0.3, projections ~1.9/sqrt(fan_in)): projections are ``normal / sqrt(fan_in)`` so
every matmul keeps activations at unit scale, norm gains are ``1 + 0.1 * normal``, and the
embedding has std 0.5 so the residual stream starts at a realistic magnitude. Activations are
therefore neither vanishing nor saturating (residual RMS ~1-3, logit std ~4).

A random model with a *shared* classifier tends to predict its current input token again (the
token's own embedding dominates the residual stream and matches itself best), so its greedy
output repeats. With ``shared_classifier=False`` the classifier is an independent matrix with the
embedding's scale and greedy sequences vary.
"""

import numpy as np

from ..model import LlamaConfig, LlamaModel

__all__ = ["random_model"]

EMBED_STD = 0.5
NORM_NOISE = 0.1


def random_model(*, dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, seq_len, seed,
                 shared_classifier=True):
    """Build a random :class:`LlamaModel`; the same arguments always give the same weights.

    Parameters
    ----------
    dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, seq_len : int
        The shape (see :class:`LlamaConfig`); validated like any loaded model.
    seed : int
        Seed for :func:`numpy.random.default_rng`.
    shared_classifier : bool
        If False, an independent ``output`` matrix (same scale as the embedding) is added.

    Returns
    -------
    LlamaModel
        Named ``random-s{seed}``, ``source`` empty.
    """
    config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         hidden_dim=hidden_dim, vocab_size=vocab_size, seq_len=seq_len,
                         shared_classifier=shared_classifier)
    config.validate()
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in config.tensor_shapes().items():
        if len(shape) == 1:
            w = 1.0 + NORM_NOISE * rng.standard_normal(shape)
        elif name in ("tok_embeddings", "output"):
            w = EMBED_STD * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        tensors[name] = w.astype(np.float32)
    return LlamaModel(config=config, tensors=tensors, name=f"random-s{seed}")
