"""Integer arithmetic building blocks shared by the hardware blocks.

These mirror the primitive operations of the golden model's numerics (rounding right shift,
saturation) as Amaranth expressions, so each block spells the arithmetic the same way.
"""

import operator

from amaranth.hdl import Cat, Const, Mux, Shape, Signal, signed, unsigned, Value
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["rshift_round", "rshift_round_var", "saturate", "signed_range", "bits_for",
           "tree_sum", "vector_layout", "exp_vector_layout", "pos_shape", "rom_read_signature",
           "per_layer", "layer_select"]


def signed_range(bits):
    """``(lo, hi)`` of a two's complement integer of ``bits`` bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def bits_for(lo, hi):
    """Smallest signed width holding every integer in ``[lo, hi]``."""
    return Shape.cast(range(min(lo, -1), max(hi, 0) + 1)).width


def rshift_round(v, shift):
    """``(v + 2**(shift-1)) >> shift`` for a constant ``shift`` (arithmetic shift if signed)."""
    v = Value.cast(v)
    if shift < 0:
        raise ValueError(f"shift must be non-negative, not {shift}")
    if shift == 0:
        return v
    return (v + (1 << (shift - 1))) >> shift


def rshift_round_var(v, shift):
    """Rounding right shift by a run-time amount: ``(v + ((1 << shift) >> 1)) >> shift``."""
    v = Value.cast(v)
    shift = Value.cast(shift)
    half = (Const(1, unsigned(1)) << shift) >> 1
    return (v + half) >> shift


def saturate(v, bits):
    """Clamp a signed value to ``bits`` bits; the result has shape ``signed(bits)``."""
    v = Value.cast(v)
    lo, hi = signed_range(bits)
    if v.shape().signed and v.shape().width <= bits:
        return v.as_signed() if v.shape().width == bits else v
    return Mux(v > hi, hi, Mux(v < lo, lo, v))[:bits].as_signed()


def tree_sum(values):
    """Sum of ``values`` as a balanced tree of two-input adds (depth ``ceil(log2(n))``;
    Amaranth widens each sum by one bit, so nothing overflows)."""
    values = list(values)
    while len(values) > 1:
        values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i]
                  for i in range(0, len(values), 2)]
    return values[0]


def vector_layout(bits, length, *, is_signed=True):
    """Payload layout of a whole vector: element 0 in the least significant bits."""
    return data.ArrayLayout(signed(bits) if is_signed else unsigned(bits), length)


def exp_vector_layout(bits, length, exp_max):
    """Payload of a whole vector with a power-of-two exponent ``k`` in ``0..exp_max`` (the
    SwiGLU output / W2 input, ``numerics.swiglu_exp``): a struct of ``vec``
    (``vector_layout(bits, length)``, the low bits) and ``k`` (unsigned) above it; with
    ``exp_max = 0`` just ``vector_layout(bits, length)``."""
    if exp_max == 0:
        return vector_layout(bits, length)
    return data.StructLayout({"vec": vector_layout(bits, length),
                              "k": unsigned(exp_max.bit_length())})


def pos_shape(n_pos):
    """Shape of a ``pos`` field for a context of ``n_pos`` positions: it holds ``0..n_pos``,
    so a position counter that reached the end of the context is seen, not wrapped to 0."""
    return Shape.cast(range(max(2, n_pos + 1)))


def xor_terms(inputs, terms):
    """``Cat`` of one bit per entry of ``terms``: the XOR of the ``inputs`` bits whose indices
    the entry holds (an empty entry is 0). How the CRC updates turn bit equations derived in
    Python on symbolic bits into logic."""
    out = []
    for entry in terms:
        v = Const(0, 1)
        for t in sorted(entry):
            v = v ^ inputs[t]
        out.append(v)
    return Cat(*out)


def rom_read_signature(*, depth, width):
    """A synchronous ROM read port seen from its reader: ``addr`` and ``en`` out, ``data``
    (the word at the ``addr`` of the last cycle ``en`` was high) in."""
    return wiring.Signature({"addr": Out(range(depth)), "en": Out(1),
                             "data": In(unsigned(width))})


def per_layer(name, value, n_layers):
    """A per-layer scalar constant as a list of ``n_layers`` ints (a plain int when there is
    one layer, else a sequence of ``n_layers`` ints)."""
    if n_layers == 1:
        return [operator.index(value)]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a sequence of n_layers = {n_layers} ints, not "
                         f"{value!r}")
    if len(value) != n_layers:
        raise ValueError(f"{name} has {len(value)} entries, expected n_layers = {n_layers}")
    return [operator.index(v) for v in value]


def layer_select(m, layer, values, name):
    """``values[layer]``: a plain int when every layer has the same value, else a signal
    driven by a ``Switch`` on ``layer``."""
    if len(set(values)) == 1:
        return values[0]
    sel = Signal(range(min(values), max(values) + 1), name=name)
    with m.Switch(layer):
        for l, v in enumerate(values):
            with m.Case(l):
                m.d.comb += sel.eq(v)
    return sel
