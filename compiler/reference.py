"""Float32 reference forward pass with llama2.c ``run.c`` semantics.

This is the behavioural specification the integer golden model and the chip are compared with:
RMSNorm (eps from the config, added to the mean square), RoPE rotating adjacent pairs with
``freq = 1 / theta ** (head_dim / head_size)`` computed in float32, grouped-query attention with a
``1/sqrt(head_size)`` score scale, SwiGLU FFN, and a classifier that may share the embedding.
All arithmetic is float32; matrix products are vectorised, so sums are not in run.c's exact
order and results agree with run.c to float32 rounding, not bit for bit.
"""

import numpy as np

from .errors import HardwireError

__all__ = ["FloatModel", "generate_greedy", "rope_cos_sin", "rmsnorm", "silu", "softmax"]

F32 = np.float32


def rmsnorm(x, weight, eps):
    """``weight * (x / sqrt(mean(x*x) + eps))`` in float32, as run.c."""
    ss = np.dot(x, x).astype(F32) / F32(x.shape[-1]) + F32(eps)
    return (weight * (F32(1.0) / np.sqrt(ss, dtype=F32) * x)).astype(F32)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True), dtype=F32)
    return (e / e.sum(axis=-1, keepdims=True, dtype=F32)).astype(F32)


def silu(x):
    return (x * (F32(1.0) / (F32(1.0) + np.exp(-x, dtype=F32)))).astype(F32)


def rope_cos_sin(pos, dim, head_size, theta):
    """cos/sin for every even index ``i`` of a ``dim``-vector at position ``pos``.

    As run.c: ``head_dim = i % head_size``, ``freq = 1 / powf(theta, head_dim / head_size)``,
    ``val = pos * freq``. Returns two float32 arrays of length ``dim // 2``.
    """
    head_dim = (np.arange(0, dim, 2) % head_size).astype(F32)
    freq = F32(1.0) / np.power(F32(theta), head_dim / F32(head_size), dtype=F32)
    val = (F32(pos) * freq).astype(F32)
    return np.cos(val, dtype=F32), np.sin(val, dtype=F32)


def _rope(x, cos, sin):
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` by the angle whose cos/sin are given."""
    x0, x1 = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = x0 * cos - x1 * sin
    out[1::2] = x0 * sin + x1 * cos
    return out


class FloatModel:
    """Token-at-a-time float32 inference with a KV cache.

    Parameters
    ----------
    model : LlamaModel
    """

    def __init__(self, model):
        self.model = model
        self.config = c = model.config
        t = model.tensors
        self._layers = [{n: t[f"layers.{i}.{n}"] for n in
                         ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")}
                        for i in range(c.n_layers)]
        self._emb = t["tok_embeddings"]
        self._norm = t["norm"]
        self._cls = model.classifier
        self.reset()

    def reset(self):
        """Forget all positions (clear the KV cache)."""
        c = self.config
        shape = (c.n_layers, c.seq_len, c.n_kv_heads, c.head_size)
        self.key_cache = np.zeros(shape, dtype=F32)
        self.value_cache = np.zeros(shape, dtype=F32)

    def _check(self, token, pos):
        c = self.config
        where = self.model.source or None
        if not 0 <= int(token) < c.vocab_size:
            raise HardwireError(f"token {token} is outside the vocabulary 0..{c.vocab_size - 1}",
                                path=where)
        if not 0 <= int(pos) < c.seq_len:
            raise HardwireError(f"position {pos} is outside the context 0..{c.seq_len - 1}",
                                path=where)

    def step(self, token, pos, trace=None):
        """Run one token at position ``pos`` (attending to positions ``0..pos``).

        Parameters
        ----------
        token : int
        pos : int
        trace : dict, optional
            If given, receives copies of the intermediates: per layer ``L{i}.attn_in``,
            ``.attn_norm``, ``.q``, ``.k``, ``.v`` (pre-RoPE), ``.q_rope``, ``.k_rope``,
            ``.att_out`` (heads concatenated, before wo), ``.wo_out``, ``.ffn_in``,
            ``.ffn_norm``, ``.h1``, ``.h3``, ``.hidden`` (silu(h1)*h3), ``.ffn_out``, ``.out``;
            then ``final_norm`` and ``logits``.

        Returns
        -------
        numpy.ndarray
            float32 logits of length ``vocab_size``.
        """
        self._check(token, pos)
        c = self.config
        hs, kvh, group = c.head_size, c.n_kv_heads, c.kv_group
        eps = c.norm_eps
        cos, sin = rope_cos_sin(pos, c.dim, hs, c.rope_theta)
        kv_half = c.kv_dim // 2
        scale = F32(np.sqrt(F32(hs), dtype=F32))

        def rec(name, value):
            if trace is not None:
                trace[name] = np.array(value, dtype=F32, copy=True)

        x = self._emb[int(token)].astype(F32, copy=True)
        for i, w in enumerate(self._layers):
            p = f"L{i}."
            rec(p + "attn_in", x)
            xb = rmsnorm(x, w["attention_norm"], eps)
            rec(p + "attn_norm", xb)
            q = w["wq"] @ xb
            k = w["wk"] @ xb
            v = w["wv"] @ xb
            rec(p + "q", q)
            rec(p + "k", k)
            rec(p + "v", v)
            q = _rope(q, cos, sin)
            k = _rope(k, cos[:kv_half], sin[:kv_half])
            rec(p + "q_rope", q)
            rec(p + "k_rope", k)
            self.key_cache[i, pos] = k.reshape(kvh, hs)
            self.value_cache[i, pos] = v.reshape(kvh, hs)
            keys = self.key_cache[i, :pos + 1]      # (T, kvh, hs)
            values = self.value_cache[i, :pos + 1]  # (T, kvh, hs)
            qh = q.reshape(kvh, group, hs)           # query head h uses kv head h // group
            scores = np.einsum("kgd,tkd->kgt", qh, keys, dtype=F32) / scale
            att = softmax(scores)
            heads = np.einsum("kgt,tkd->kgd", att, values, dtype=F32)
            att_out = heads.reshape(c.dim).astype(F32)
            rec(p + "att_out", att_out)
            wo_out = w["wo"] @ att_out
            rec(p + "wo_out", wo_out)
            x = x + wo_out
            rec(p + "ffn_in", x)
            xb = rmsnorm(x, w["ffn_norm"], eps)
            rec(p + "ffn_norm", xb)
            h1 = w["w1"] @ xb
            h3 = w["w3"] @ xb
            rec(p + "h1", h1)
            rec(p + "h3", h3)
            hidden = silu(h1) * h3
            rec(p + "hidden", hidden)
            ffn_out = w["w2"] @ hidden
            rec(p + "ffn_out", ffn_out)
            x = x + ffn_out
            rec(p + "out", x)
        x = rmsnorm(x, self._norm, eps)
        rec("final_norm", x)
        logits = (self._cls @ x).astype(F32)
        rec("logits", logits)
        return logits


def generate_greedy(model, prompt_tokens, n):
    """Greedy (temperature 0) decoding, as run.c ``generate()``.

    The prompt is fed one token per position; after its last token each argmax becomes the next
    input. Generation stops after ``n`` new tokens, when the model emits BOS (token 1, which
    run.c treats as the end of a story; it is not returned), or when the context is full.

    Parameters
    ----------
    model : LlamaModel or FloatModel
    prompt_tokens : sequence of int
        Normally starts with BOS (1), e.g. ``[1]`` to generate from nothing.
    n : int
        Maximum number of new tokens.

    Returns
    -------
    list of int
        The generated tokens (prompt not included).

    Raises
    ------
    HardwireError
        Empty prompt, or a prompt longer than the model's context.
    """
    fm = model if isinstance(model, FloatModel) else FloatModel(model)
    c = fm.config
    prompt = [int(t) for t in prompt_tokens]
    where = fm.model.source or None
    if not prompt:
        raise HardwireError("the prompt is empty; start it with BOS (1)", path=where)
    if len(prompt) > c.seq_len:
        raise HardwireError(
            f"the prompt has {len(prompt)} tokens but the model's context is {c.seq_len}",
            path=where)
    fm.reset()
    out = []
    token = prompt[0]
    pos = 0
    while pos < c.seq_len:
        prefill = pos < len(prompt) - 1
        if not prefill and len(out) >= n:
            break
        logits = fm.step(token, pos)
        if prefill:
            nxt = prompt[pos + 1]
        else:
            nxt = int(np.argmax(logits))
            if nxt == 1:
                break
            out.append(nxt)
        pos += 1
        token = nxt
    return out
