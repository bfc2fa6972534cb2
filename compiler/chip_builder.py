# amaranth: UnusedElaboratable=no
"""QuantizedModel + ChipPlan -> LlamaChip: every block gets the golden model's own arrays.

Nothing is re-derived here: weights, requantizer multipliers and shifts, norm gains, tables
and SiLU tables are handed to the hardware blocks exactly as :class:`~.golden.GoldenModel`
uses them, with the widths of :class:`~.quantize.NumericsConfig` (q/k/v and the KV cache at
``qkv_bits``, attention output at ``act_bits`` with ``out_shift = qkv_bits - act_bits``, the
gate at ``silu_bits``, the residual stream at ``resid_bits``, logits at ``logit_bits``).

(The first line tells Amaranth not to warn about chips that are built only to read their
cycle formulas and never elaborated.)
"""

import re

from hardwire.hdl.attention import Attention
from hardwire.hdl.chip import LlamaChip, id_rom_words
from hardwire.hdl.decoder import DecoderLayer
from hardwire.hdl.embedding import EmbeddingROM
from hardwire.hdl.matvec import MatVecUnit
from hardwire.hdl.rmsnorm import RMSNorm
from hardwire.hdl.rope import RoPE
from hardwire.hdl.swiglu import SwiGLU

from .plan import MATRIX_NAMES, plan_chip
from .quantize import wbits_label

__all__ = ["build_chip", "chip_name"]


def chip_name(qm):
    """Verilog-safe top-level name: model name, weight widths and datapath digest, e.g.
    ``stories260K_w8_96f813fb``."""
    label = wbits_label(qm.wbits).replace("/", "_")
    name = f"{qm.name}_w{label}_{qm.digest()[:8]}"
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if name[0].isalpha() else f"m_{name}"


def _check_plan(qm, plan):
    c = qm.config
    want = {f"L{i}.{n}" for i in range(c.n_layers) for n in MATRIX_NAMES} | {"classifier"}
    if set(plan.matrices) != want:
        raise ValueError(f"plan has matrices for {plan.n_layers} layers, the model has "
                         f"{c.n_layers}")
    for i, L in enumerate(qm.layers):
        for n in MATRIX_NAMES:
            f, q = plan.matrices[f"L{i}.{n}"], getattr(L, n).q
            if (f.rows, f.cols) != q.shape:
                raise ValueError(f"plan L{i}.{n} is {f.rows}x{f.cols}, the matrix is "
                                 f"{q.shape[0]}x{q.shape[1]}")


def build_chip(qm, plan=None):
    """Build the :class:`~hardwire.hdl.chip.LlamaChip` of ``qm`` folded by ``plan`` (default:
    :func:`~.plan.plan_chip` of ``qm``)."""
    plan = plan_chip(qm) if plan is None else plan
    _check_plan(qm, plan)
    c, nc, tb = qm.config, qm.numerics, qm.tables
    tc = tb.config

    def norm(qn):
        return RMSNorm(dim=c.dim, in_bits=nc.resid_bits, gain=qn.gain,
                       gain_shift=qn.gain_shift, eps=qn.eps, rsqrt_table=tb.rsqrt,
                       rsqrt_frac=tc.rsqrt_frac, out_bits=nc.act_bits, lanes=plan.norm_lanes)

    def matvec(m, key, in_bits):
        f, r = plan.matrices[key], m.requant
        return MatVecUnit(weights=m.q, weight_bits=m.bits, in_bits=in_bits, mult=r.mult,
                          shift=r.shift, out_bits=r.out_bits, pe=f.pe, simd=f.simd,
                          form=f.form)

    def rope(n):
        return RoPE(n=n, head_size=c.head_size, cos_table=tb.rope_cos, sin_table=tb.rope_sin,
                    frac=tc.rope_frac, bits=nc.qkv_bits, lanes=plan.rope_lanes)

    e = qm.embed
    embedding = EmbeddingROM(table=e.q, weight_bits=e.bits, mult=e.requant.mult,
                             shift=e.requant.shift, out_bits=e.requant.out_bits,
                             lanes=plan.embed_lanes)
    layers = []
    for i, L in enumerate(qm.layers):
        mv = {n: matvec(getattr(L, n), f"L{i}.{n}", nc.act_bits) for n in MATRIX_NAMES}
        attention = Attention(
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_size=c.head_size,
            n_pos=c.seq_len, exp_table=tb.exp, exp_mult=L.exp_mult, exp_shift=L.exp_shift,
            recip_table=tb.recip, recip_bits=tc.recip_bits, recip_frac=tc.recip_frac,
            exp_len=tc.exp_len, bits=nc.qkv_bits, out_bits=nc.act_bits,
            out_shift=nc.qkv_bits - nc.act_bits, head_lanes=plan.head_lanes)
        swiglu = SwiGLU(n=c.hidden_dim, in_bits=L.w1.requant.out_bits,
                        up_bits=L.w3.requant.out_bits, silu_table=L.silu_table,
                        silu_offset=L.silu_offset, mult=L.hid_mult, shift=L.hid_shift,
                        out_bits=nc.act_bits, lanes=plan.swiglu_lanes)
        layers.append(DecoderLayer(attn_norm=norm(L.attn_norm), rope_q=rope(c.dim),
                                   rope_k=rope(c.kv_dim), attention=attention,
                                   ffn_norm=norm(L.ffn_norm), swiglu=swiglu, **mv))
    words = id_rom_words(model_hash=qm.model_hash, dim=c.dim, n_layers=c.n_layers,
                         n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, hidden_dim=c.hidden_dim,
                         vocab_size=c.vocab_size, seq_len=c.seq_len, weight_bits=qm.wbits,
                         digest=qm.digest())
    return LlamaChip(embedding=embedding, layers=layers, final_norm=norm(qm.final_norm),
                     classifier=matvec(qm.classifier, "classifier", nc.act_bits),
                     id_words=words)
