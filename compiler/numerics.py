"""The chip's arithmetic, one integer operation at a time (numpy ``int64``, no floats).

This module *is* the arithmetic spec (``docs/numerics.md`` explains it in prose). The golden
model (:mod:`.golden`) is a sequence of these operations; the HDL blocks implement them
bit for bit and their testbenches compare against them. Tables are built here once
(:func:`make_tables`) and the same arrays go to the golden model and to ``Memory(init=...)``.

Conventions
-----------
* Rounding right shift: ``rshift_round(v, s) = (v + 2**(s-1)) >> s`` (arithmetic shift, ties
  towards +inf); ``s == 0`` leaves ``v`` unchanged.
* Saturation: ``sat(v, bits)`` clamps to ``[-2**(bits-1), 2**(bits-1) - 1]``.
* Every multiplication has operands of at most 18 bits on one side, so it maps to one or two
  ECP5 ``MULT18X18D``; no general division anywhere (reciprocal and rsqrt are tables on a
  normalised mantissa).
"""

from dataclasses import dataclass

import numpy as np

__all__ = [
    "TableConfig", "Tables", "make_tables",
    "rshift_round", "sat", "bit_length",
    "requantize", "matvec", "rmsnorm", "rsqrt_lookup", "rope", "softmax_weights",
    "attention_head", "swiglu", "swiglu_wide", "vector_exponent", "swiglu_exp",
    "residual_add", "argmax",
]


# ---------------------------------------------------------------------------------------------
# Primitive integer operations
# ---------------------------------------------------------------------------------------------

def rshift_round(v, s):
    """Arithmetic right shift by ``s`` with round-half-up; ``s`` may be an array."""
    v = np.asarray(v, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    if np.any(s < 0):
        raise ValueError("negative shift")
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(v + half, s)


def sat(v, bits):
    """Clamp to the two's complement range of ``bits`` bits."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi)


def bit_length(v):
    """Number of bits of a non-negative integer (scalar), like ``int.bit_length``."""
    return int(v).bit_length()


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableConfig:
    """Sizes and fixed-point formats of the shared lookup tables."""

    rsqrt_bits: int = 10      # rsqrt table index width (table has 2**rsqrt_bits entries)
    rsqrt_frac: int = 16      # rsqrt values are round(2**rsqrt_frac / sqrt(i))
    recip_bits: int = 10      # reciprocal mantissa width (table has 2**(recip_bits-1) entries)
    exp_len: int = 512        # exp table entries
    exp_step_log2: int = 5    # table step is 2**-exp_step_log2 (natural-log units)
    exp_frac: int = 16        # exp values are round(2**exp_frac * exp(-i * step))
    rope_frac: int = 14       # cos/sin are round(2**rope_frac * cos/sin)

    @property
    def recip_frac(self):
        # reciprocal entries lie in (2**15, 2**16]: 16-bit unsigned
        return self.recip_bits + 15


@dataclass
class Tables:
    """The lookup tables, generated once and shared by the golden model and the HDL."""

    config: TableConfig
    rsqrt: np.ndarray       # (2**rsqrt_bits,) unsigned
    recip: np.ndarray       # (2**(recip_bits-1),) unsigned, index = mantissa - 2**(recip_bits-1)
    exp: np.ndarray         # (exp_len,) unsigned, exp[0] = 2**exp_frac
    rope_cos: np.ndarray    # (seq_len, head_size // 2) signed
    rope_sin: np.ndarray    # (seq_len, head_size // 2) signed

    def as_dict(self):
        return {"rsqrt": self.rsqrt, "recip": self.recip, "exp": self.exp,
                "rope_cos": self.rope_cos, "rope_sin": self.rope_sin}


def make_tables(*, head_size, seq_len, rope_theta=10000.0, config=TableConfig()):
    """Build every shared table for a model shape."""
    c = config
    i = np.arange(1 << c.rsqrt_bits, dtype=np.float64)
    i[0] = 1.0  # never used: the normaliser input is at least 1
    rsqrt = np.round((1 << c.rsqrt_frac) / np.sqrt(i)).astype(np.int64)

    half = 1 << (c.recip_bits - 1)
    mant = np.arange(half, 2 * half, dtype=np.float64)
    # mantissa m stands for the interval [m, m+1): take its midpoint
    recip = np.round((1 << c.recip_frac) / (mant + 0.5)).astype(np.int64)

    steps = np.arange(c.exp_len, dtype=np.float64) * 2.0 ** -c.exp_step_log2
    exp = np.round((1 << c.exp_frac) * np.exp(-steps)).astype(np.int64)

    # RoPE angles exactly as llama2.c computes them (float32), then quantised
    j = np.arange(head_size // 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(rope_theta),
                                       (2 * j).astype(np.float32) / np.float32(head_size)))
    pos = np.arange(seq_len, dtype=np.float32)[:, None]
    ang = (pos * freq[None, :]).astype(np.float32)
    one = 1 << c.rope_frac
    rope_cos = np.round(one * np.cos(ang.astype(np.float64))).astype(np.int64)
    rope_sin = np.round(one * np.sin(ang.astype(np.float64))).astype(np.int64)
    return Tables(c, rsqrt, recip, exp, rope_cos, rope_sin)


# ---------------------------------------------------------------------------------------------
# Datapath operations
# ---------------------------------------------------------------------------------------------

def requantize(acc, mult, shift, bits):
    """``sat(rshift_round(acc * mult, shift), bits)``: integer rescale of an accumulator.

    ``mult`` is a per-element (per output row) multiplier below ``2**17``; ``shift`` is a
    constant of the matrix.
    """
    acc = np.asarray(acc, dtype=np.int64)
    return sat(rshift_round(acc * np.asarray(mult, dtype=np.int64), shift), bits)


def matvec(weights, x):
    """Integer matrix-vector product ``weights @ x`` with exact (int64) accumulation."""
    return np.asarray(weights, dtype=np.int64) @ np.asarray(x, dtype=np.int64)


def rsqrt_lookup(v, tables):
    """Table rsqrt of a positive integer: returns ``(r, s2)`` with
    ``1/sqrt(v) ~= r * 2**-(rsqrt_frac + s2)``."""
    c = tables.config
    v = int(v)
    if v <= 0:
        raise ValueError("rsqrt of a non-positive value")
    s = max(0, v.bit_length() - c.rsqrt_bits)
    s += s & 1                      # even shift: sqrt(2**s) = 2**(s/2)
    return int(tables.rsqrt[v >> s]), s // 2


def rmsnorm(x, *, gain, gain_shift, eps, tables, out_bits=8):
    """RMSNorm of an integer residual vector, quantised to ``out_bits``.

    ``y_i = sat(rshift_round(x_i * gain_i * r, rsqrt_frac + gain_shift + s2), out_bits)``
    where ``(r, s2) = rsqrt_lookup(sum(x*x) + eps)``. ``gain`` folds the float gain,
    ``sqrt(dim)`` and the output scale; ``eps`` is ``dim * norm_eps`` in residual units squared.
    """
    x = np.asarray(x, dtype=np.int64)
    ss = int(np.sum(x * x)) + int(eps)
    r, s2 = rsqrt_lookup(ss, tables)
    prod = x * np.asarray(gain, dtype=np.int64) * r
    return sat(rshift_round(prod, tables.config.rsqrt_frac + gain_shift + s2), out_bits)


def rope(v, pos, tables, *, bits=8):
    """Rotate adjacent pairs of ``v`` (one or more heads, flattened) by position ``pos``."""
    v = np.asarray(v, dtype=np.int64)
    hs2 = tables.rope_cos.shape[1]
    a, b = v[0::2], v[1::2]
    j = np.arange(a.size) % hs2
    cos, sin = tables.rope_cos[pos, j], tables.rope_sin[pos, j]
    f = tables.config.rope_frac
    out = np.empty_like(v)
    out[0::2] = sat(rshift_round(a * cos - b * sin, f), bits)
    out[1::2] = sat(rshift_round(a * sin + b * cos, f), bits)
    return out


def softmax_weights(scores, *, exp_mult, exp_shift, tables):
    """Unnormalised softmax weights ``e_t = exp[min(rshift_round((max - s_t) * exp_mult,
    exp_shift), exp_len - 1)]`` of integer scores."""
    s = np.asarray(scores, dtype=np.int64)
    d = s.max() - s
    idx = np.minimum(rshift_round(d * np.int64(exp_mult), exp_shift), tables.config.exp_len - 1)
    return tables.exp[idx]


def attention_head(q, keys, values, *, exp_mult, exp_shift, tables, out_bits=8, out_shift=0,
                   trace=None):
    """One attention head over positions ``0..len(keys)-1``.

    ``scores_t = q . k_t``; ``e = softmax_weights(scores)``; ``Z = sum(e)``;
    ``acc_d = sum_t e_t v_td``; with ``Z``'s mantissa ``m`` (``recip_bits`` bits, ``n`` its
    bit length) ``out_d = sat(rshift_round(acc_d * recip[m - 2**(recip_bits-1)],
    recip_frac + n - recip_bits + out_shift), out_bits)``. The output is in the values' scale
    times ``2**out_shift``.
    """
    c = tables.config
    q = np.asarray(q, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    scores = keys @ q
    e = softmax_weights(scores, exp_mult=exp_mult, exp_shift=exp_shift, tables=tables)
    z = int(e.sum())
    n = z.bit_length()
    mant = z >> (n - c.recip_bits)            # z >= 2**exp_frac > 2**recip_bits
    rcp = int(tables.recip[mant - (1 << (c.recip_bits - 1))])
    acc = e @ values
    out = sat(rshift_round(acc * rcp, c.recip_frac + n - c.recip_bits + out_shift), out_bits)
    if trace is not None:
        trace.update(scores=scores, weights=e, z=z, acc=acc)
    return out


def swiglu(h1, h3, *, silu_table, silu_offset, mult, shift, out_bits=8):
    """``sat(rshift_round(silu_table[h1 + silu_offset] * h3 * mult, shift), out_bits)``."""
    return sat(swiglu_wide(h1, h3, silu_table=silu_table, silu_offset=silu_offset, mult=mult,
                           shift=shift), out_bits)


def swiglu_wide(h1, h3, *, silu_table, silu_offset, mult, shift):
    """``rshift_round(silu_table[h1 + silu_offset] * h3 * mult, shift)``, not saturated."""
    h1 = np.asarray(h1, dtype=np.int64)
    s = np.asarray(silu_table, dtype=np.int64)[h1 + silu_offset]
    return rshift_round(s * np.asarray(h3, dtype=np.int64) * np.int64(mult), shift)


def vector_exponent(wide, *, exp_max, out_bits=8):
    """The smallest ``k`` in ``0..exp_max`` with ``max|rshift_round(wide, k)| <= 2**(out_bits-1)
    - 1`` over the whole vector; ``exp_max`` when there is none (the output saturates)."""
    wide = np.asarray(wide, dtype=np.int64)
    top = (1 << (out_bits - 1)) - 1
    lo, hi = int(wide.min()), int(wide.max())
    for k in range(exp_max + 1):
        if int(rshift_round(hi, k)) <= top and int(rshift_round(lo, k)) >= -top:
            return k
    return exp_max


def swiglu_exp(h1, h3, *, silu_table, silu_offset, mult, shift, exp_max, out_bits=8):
    """SwiGLU with a per-vector power-of-two exponent (the W2 input): returns ``(hid, k)``.

    ``wide = rshift_round(silu_table[h1 + silu_offset] * h3 * mult, shift - exp_max)`` (``E =
    exp_max`` extra fraction bits); ``k = vector_exponent(wide, exp_max=E)``;
    ``hid = sat(rshift_round(wide, k), out_bits)``. ``hid`` is in units of
    ``S_hid * 2**(k - E)`` (``S_hid`` = the unit of ``mult / 2**shift``), so the W2
    requantizer's shift becomes ``shift_w2 + E - k``. ``exp_max = 0`` is :func:`swiglu` with
    ``k = 0``.
    """
    if not 0 <= exp_max <= shift:
        raise ValueError(f"exp_max ({exp_max}) must lie in 0..shift ({shift})")
    wide = swiglu_wide(h1, h3, silu_table=silu_table, silu_offset=silu_offset, mult=mult,
                       shift=shift - exp_max)
    k = vector_exponent(wide, exp_max=exp_max, out_bits=out_bits)
    return sat(rshift_round(wide, k), out_bits), k


def residual_add(x, y, bits):
    """Saturating add on the residual stream."""
    return sat(np.asarray(x, dtype=np.int64) + np.asarray(y, dtype=np.int64), bits)


def argmax(v):
    """Index of the largest value; the lowest index wins a tie."""
    return int(np.argmax(np.asarray(v, dtype=np.int64)))
