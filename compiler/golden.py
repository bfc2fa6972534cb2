"""The integer golden model: the chip's arithmetic, token step by token step.

A :class:`GoldenModel` runs a :class:`~.quantize.QuantizedModel` using only the integer
operations of :mod:`.numerics`. Every intermediate tensor can be recorded by name (``trace``);
the whole-chip testbench compares the chip's debug taps against those names.

Trace names (``i`` is the layer): ``embed``, ``L{i}.attn_norm``, ``L{i}.q``, ``L{i}.k``,
``L{i}.v``, ``L{i}.q_rope``, ``L{i}.k_rope``, ``L{i}.att`` (heads concatenated),
``L{i}.wo``, ``L{i}.attn_res``, ``L{i}.ffn_norm``, ``L{i}.h1``, ``L{i}.h3``, ``L{i}.hidden``,
``L{i}.w2``, ``L{i}.out``, ``final_norm``, ``logits``, ``next_token``; ``L{i}.hidden_k`` is
the SwiGLU output's exponent ``k`` (``numerics.swiglu_exp``; always 0 with ``hid_exp_max=0``).
"""

import numpy as np

from .errors import HardwireError
from . import numerics as nx

__all__ = ["GoldenModel", "ContextFullError", "TokenRangeError", "generate_golden"]


class ContextFullError(HardwireError):
    """The position counter reached the chip's context length."""


class TokenRangeError(HardwireError):
    """A token id outside the vocabulary was fed."""


class GoldenModel:
    """Integer-only Llama forward pass with its own KV cache."""

    def __init__(self, qm):
        self.qm = qm
        c = qm.config
        self._k = np.zeros((c.n_layers, c.seq_len, c.kv_dim), dtype=np.int64)
        self._v = np.zeros((c.n_layers, c.seq_len, c.kv_dim), dtype=np.int64)
        self.pos = 0

    def reset(self):
        self._k[:] = 0
        self._v[:] = 0
        self.pos = 0

    def embed(self, token):
        qm = self.qm
        e = qm.embed
        return nx.requantize(e.q[token], e.requant.mult[token], e.requant.shift,
                             e.requant.out_bits)

    def _matmul(self, layer, m, a, trace, *, k=0, exp_max=0):
        """One layer matrix (:class:`~.quantize.QMatrix` ``m``) applied to input ``a``: the
        accumulator of :meth:`_accumulate`, requantized. ``a`` in units of ``S_in * 2**(k -
        exp_max)`` (W2: the SwiGLU exponent) makes the requantizer shift ``shift + exp_max -
        k``."""
        r = m.requant
        acc = self._accumulate(layer, m, a, trace, k=k, exp_max=exp_max)
        return nx.requantize(acc, r.mult, r.shift + exp_max - k, r.out_bits)

    def _accumulate(self, layer, m, a, trace, *, k=0, exp_max=0):
        """The int accumulator ``m.q @ a`` of layer ``layer``'s matrix ``m``: the hook a
        LoRA-extended golden model overrides to add its correction."""
        return nx.matvec(m.q, a)

    def step(self, token, pos=None, *, trace=None):
        """Feed one token at ``pos`` (default: the running position); return int logits."""
        qm, c = self.qm, self.qm.config
        nc, tb = qm.numerics, qm.tables
        pos = self.pos if pos is None else pos
        if not (0 <= int(token) < c.vocab_size):
            raise TokenRangeError(f"token id {token} is outside the vocabulary "
                                  f"(0..{c.vocab_size - 1})")
        if pos >= c.seq_len:
            raise ContextFullError(f"context is full ({c.seq_len} positions)")
        t = trace if trace is not None else {}
        x = self.embed(int(token))
        t["embed"] = x
        hs, grp = c.head_size, c.kv_group
        for i, L in enumerate(qm.layers):
            def mm(m, a, i=i):
                return self._matmul(i, m, a, t)

            xn = nx.rmsnorm(x, gain=L.attn_norm.gain, gain_shift=L.attn_norm.gain_shift,
                            eps=L.attn_norm.eps, tables=tb, out_bits=nc.act_bits)
            q, k, v = mm(L.wq, xn), mm(L.wk, xn), mm(L.wv, xn)
            qr = nx.rope(q, pos, tb, bits=nc.qkv_bits)
            kr = nx.rope(k, pos, tb, bits=nc.qkv_bits)
            self._k[i, pos] = kr
            self._v[i, pos] = v
            att = np.empty(c.dim, dtype=np.int64)
            for h in range(c.n_heads):
                kvh = h // grp
                sl = slice(kvh * hs, (kvh + 1) * hs)
                att[h * hs:(h + 1) * hs] = nx.attention_head(
                    qr[h * hs:(h + 1) * hs], self._k[i, :pos + 1, sl], self._v[i, :pos + 1, sl],
                    exp_mult=L.exp_mult, exp_shift=L.exp_shift, tables=tb,
                    out_bits=nc.act_bits, out_shift=nc.qkv_bits - nc.act_bits)
            wo = mm(L.wo, att)
            x = nx.residual_add(x, wo, nc.resid_bits)
            t.update({f"L{i}.attn_norm": xn, f"L{i}.q": q, f"L{i}.k": k, f"L{i}.v": v,
                      f"L{i}.q_rope": qr, f"L{i}.k_rope": kr, f"L{i}.att": att,
                      f"L{i}.wo": wo, f"L{i}.attn_res": x})
            xn = nx.rmsnorm(x, gain=L.ffn_norm.gain, gain_shift=L.ffn_norm.gain_shift,
                            eps=L.ffn_norm.eps, tables=tb, out_bits=nc.act_bits)
            h1, h3 = mm(L.w1, xn), mm(L.w3, xn)
            e = nc.hid_exp_max
            hid, hk = nx.swiglu_exp(h1, h3, silu_table=L.silu_table,
                                    silu_offset=L.silu_offset, mult=L.hid_mult,
                                    shift=L.hid_shift, exp_max=e, out_bits=nc.act_bits)
            w2 = self._matmul(i, L.w2, hid, t, k=hk, exp_max=e)
            x = nx.residual_add(x, w2, nc.resid_bits)
            t.update({f"L{i}.ffn_norm": xn, f"L{i}.h1": h1, f"L{i}.h3": h3,
                      f"L{i}.hidden": hid, f"L{i}.hidden_k": hk, f"L{i}.w2": w2,
                      f"L{i}.out": x})
        fn = qm.final_norm
        xn = nx.rmsnorm(x, gain=fn.gain, gain_shift=fn.gain_shift, eps=fn.eps, tables=tb,
                        out_bits=nc.act_bits)
        cl = qm.classifier
        logits = nx.requantize(nx.matvec(cl.q, xn), cl.requant.mult, cl.requant.shift,
                               cl.requant.out_bits)
        t["final_norm"] = xn
        t["logits"] = logits
        t["next_token"] = nx.argmax(logits)
        self.pos = pos + 1
        return logits

    def float_logits(self, logits):
        """Integer logits in real units (for cross-entropy reports)."""
        return np.asarray(logits, dtype=np.float64) * self.qm.logit_scale


def generate_golden(qm, prompt_tokens, n, *, stop_on_bos=True, golden=None):
    """Greedy generation with the golden model (or the given ``golden`` instance, e.g. one
    with a LoRA adapter); returns the generated token ids."""
    g = GoldenModel(qm) if golden is None else golden
    c = qm.config
    if not prompt_tokens:
        raise HardwireError("the prompt is empty; start it with BOS (1)")
    if len(prompt_tokens) > c.seq_len:
        raise HardwireError(f"prompt of {len(prompt_tokens)} tokens is longer than the "
                            f"context ({c.seq_len})")
    out = []
    tok = prompt_tokens[0]
    for pos in range(c.seq_len):
        logits = g.step(tok, pos)
        if pos + 1 < len(prompt_tokens):
            tok = prompt_tokens[pos + 1]
            continue
        if len(out) >= n:
            break
        tok = nx.argmax(logits)
        if stop_on_bos and tok == 1:
            break
        out.append(tok)
        if len(out) >= n:
            break
    return out
