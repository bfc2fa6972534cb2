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
from dataclasses import dataclass

import numpy as np

from hardwire.hdl.attention import Attention
from hardwire.hdl.chip import LlamaChip, id_rom_words
from hardwire.hdl.decoder import DecoderLayer
from hardwire.hdl.embedding import EmbeddingROM
from hardwire.hdl.lora import LoraProjection, LoraUnit
from hardwire.hdl.lora_loader import LoraLoader
from hardwire.hdl.matvec import MatVecUnit
from hardwire.hdl.rmsnorm import RMSNorm
from hardwire.hdl.rope import RoPE
from hardwire.hdl.swiglu import SwiGLU

from .lora import LORA_TARGETS, MAX_RANK
from .lora_image import build_header, image_length, section_offsets, target_mask
from .plan import MATRIX_NAMES, classifier_reads_embedding, plan_chip
from .quantize import wbits_label

__all__ = ["LoraSpec", "build_chip", "chip_name"]


@dataclass(frozen=True)
class LoraSpec:
    """A chip's LoRA configuration: the adaptable ``targets`` (llama2.c names, any of
    ``wq wk wv wo w1 w2 w3``), the SRAM's rank ``r_max`` (a power of two), and ``simd``, the
    ``A``-pass MACs a cycle of each LoRA unit (default: the largest power of two up to 16
    dividing the matrix's columns)."""

    targets: tuple = ("wq", "wv")
    r_max: int = 8
    simd: int = 16

    def __post_init__(self):
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(f"LoRA targets must be some of {', '.join(LORA_TARGETS)}, not "
                             f"{', '.join(targets) or 'none'}")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))
        r = self.r_max
        if not (isinstance(r, int) and 1 <= r <= MAX_RANK and r & (r - 1) == 0):
            raise ValueError(f"LoRA rank must be a power of two from 1 to {MAX_RANK}, not {r}")
        s = self.simd
        if not (isinstance(s, int) and s >= 1 and s & (s - 1) == 0):
            raise ValueError(f"LoRA simd must be a power of two, not {s}")

    def unit_simd(self, cols):
        """``A``-pass lanes for a matrix of ``cols`` columns."""
        s = self.simd
        while cols % s:
            s //= 2
        return s


def chip_name(qm, *, lora=None):
    """Verilog-safe top-level name: model name, weight widths and datapath digest, e.g.
    ``stories260K_w8_96f813fb``; with a :class:`LoraSpec`, ``..._lora_wq_wv_r8``."""
    label = wbits_label(qm.wbits).replace("/", "_")
    name = f"{qm.name}_w{label}_{qm.digest()[:8]}"
    if lora is not None:
        name += f"_lora_{'_'.join(lora.targets)}_r{lora.r_max}"
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


def build_chip(qm, plan=None, *, lora=None):
    """Build the :class:`~hardwire.hdl.chip.LlamaChip` of ``qm`` folded by ``plan`` (default:
    :func:`~.plan.plan_chip` of ``qm``); with ``lora`` (a :class:`LoraSpec`), each target
    matrix of every layer gets a LoRA path (:class:`~hardwire.hdl.lora.LoraProjection`) and
    the chip a :class:`~hardwire.hdl.lora_loader.LoraLoader`."""
    plan = plan_chip(qm) if plan is None else plan
    _check_plan(qm, plan)
    c, nc, tb = qm.config, qm.numerics, qm.tables
    tc = tb.config
    loader, offsets = None, {}
    if lora is not None:
        if not isinstance(lora, LoraSpec):
            raise ValueError(f"lora must be a LoraSpec, not {type(lora).__name__}")
        loader = LoraLoader(header=build_header(qm, lora.targets, lora.r_max),
                            image_length=image_length(c.n_layers, lora.targets, lora.r_max,
                                                      c.dim, c.kv_dim, c.hidden_dim))
        offsets = section_offsets(c.n_layers, lora.targets, lora.r_max, c.dim, c.kv_dim,
                                  c.hidden_dim)

    def per_layer(group, what, get):
        """``get(L)`` of one layer, or stacked over the group of a shared unit."""
        vals = [get(L) for L in group]
        if len(group) == 1:
            return vals[0]
        if isinstance(vals[0], np.ndarray):
            return np.stack(vals)
        return [int(v) for v in vals]

    def same(group, what, get):
        vals = {get(L) for L in group}
        if len(vals) > 1:
            raise ValueError(f"a shared layer unit needs the same {what} in every layer, not "
                             f"{sorted(vals)}")
        return vals.pop()

    def banked(group):
        return {} if len(group) == 1 else {"n_layers": len(group)}

    def norm(qns):
        return RMSNorm(dim=c.dim, in_bits=nc.resid_bits,
                       gain=per_layer(qns, "gain", lambda n: n.gain),
                       gain_shift=per_layer(qns, "gain_shift", lambda n: n.gain_shift),
                       eps=per_layer(qns, "eps", lambda n: n.eps), rsqrt_table=tb.rsqrt,
                       rsqrt_frac=tc.rsqrt_frac, out_bits=nc.act_bits, lanes=plan.norm_lanes,
                       **banked(qns))

    def matvec(ms, key, in_bits, layer=None, **kw):
        f = plan.matrices[key]
        name = ms[0].name
        adapt = layer is not None and (layer, name) in offsets
        # w2 takes the SwiGLU output's per-vector exponent
        ek = {"exp_max": nc.hid_exp_max} if layer is not None and name == "w2" else {}
        unit = MatVecUnit(weights=per_layer(ms, "weights", lambda m: m.q),
                          weight_bits=same(ms, f"{name} weight width", lambda m: m.bits),
                          in_bits=in_bits,
                          mult=per_layer(ms, "mult", lambda m: m.requant.mult),
                          shift=per_layer(ms, "shift", lambda m: m.requant.shift),
                          out_bits=same(ms, f"{name} output width", lambda m: m.requant.out_bits),
                          pe=f.pe, simd=f.simd, form=f.form,
                          **({"correction_bits": 32} if adapt else {}), **ek, **banked(ms),
                          **kw)
        if not adapt:
            return unit
        side = LoraUnit(rows=f.rows, cols=f.cols, r_max=lora.r_max, pe=f.pe,
                        simd=lora.unit_simd(f.cols), base=offsets[layer, name],
                        addr_bits=loader.addr_bits, in_bits=in_bits, **ek)
        return LoraProjection(base=unit, lora=side)

    def rope(n):
        return RoPE(n=n, head_size=c.head_size, cos_table=tb.rope_cos, sin_table=tb.rope_sin,
                    frac=tc.rope_frac, bits=nc.qkv_bits, lanes=plan.rope_lanes,
                    shared_table=True)      # one table for the chip (LlamaChip.rope_table)

    def decoder(i, group):
        """The decoder unit of layer ``i`` (``group = [qm.layers[i]]``), or the shared unit
        of every layer (``i = 0``, ``group = qm.layers``)."""
        mv = {n: matvec([getattr(L, n) for L in group], f"L{i}.{n}", nc.act_bits, i)
              for n in MATRIX_NAMES}
        attention = Attention(
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_size=c.head_size,
            n_pos=c.seq_len, exp_table=tb.exp,
            exp_mult=per_layer(group, "exp_mult", lambda L: L.exp_mult),
            exp_shift=per_layer(group, "exp_shift", lambda L: L.exp_shift),
            recip_table=tb.recip, recip_bits=tc.recip_bits, recip_frac=tc.recip_frac,
            exp_len=tc.exp_len, bits=nc.qkv_bits, out_bits=nc.act_bits,
            out_shift=nc.qkv_bits - nc.act_bits, head_lanes=plan.head_lanes, **banked(group))
        swiglu = SwiGLU(n=c.hidden_dim,
                        in_bits=same(group, "w1 output width", lambda L: L.w1.requant.out_bits),
                        up_bits=same(group, "w3 output width", lambda L: L.w3.requant.out_bits),
                        silu_table=per_layer(group, "silu_table", lambda L: L.silu_table),
                        silu_offset=per_layer(group, "silu_offset", lambda L: L.silu_offset),
                        mult=per_layer(group, "hid_mult", lambda L: L.hid_mult),
                        shift=per_layer(group, "hid_shift", lambda L: L.hid_shift),
                        out_bits=nc.act_bits, lanes=plan.swiglu_lanes,
                        exp_max=nc.hid_exp_max, **banked(group))
        return DecoderLayer(attn_norm=norm([L.attn_norm for L in group]), rope_q=rope(c.dim),
                            rope_k=rope(c.kv_dim), attention=attention,
                            ffn_norm=norm([L.ffn_norm for L in group]), swiglu=swiglu, **mv)

    # a tied classifier folded 1 x embed_lanes reads the embedding's ROM (one table)
    tied = classifier_reads_embedding(qm, plan)
    e = qm.embed
    embedding = EmbeddingROM(table=e.q, weight_bits=e.bits, mult=e.requant.mult,
                             shift=e.requant.shift, out_bits=e.requant.out_bits,
                             lanes=plan.embed_lanes, shared_reader=tied)
    if plan.shared_layers and c.n_layers > 1:
        if lora is not None:
            raise ValueError("LoRA needs dedicated layers: a layer-serial chip (fold "
                             "layers=shared) has no LoRA path")
        layers = [decoder(0, list(qm.layers))]
    else:
        layers = [decoder(i, [L]) for i, L in enumerate(qm.layers)]
    words = id_rom_words(model_hash=qm.model_hash, dim=c.dim, n_layers=c.n_layers,
                         n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, hidden_dim=c.hidden_dim,
                         vocab_size=c.vocab_size, seq_len=c.seq_len, weight_bits=qm.wbits,
                         digest=qm.digest(),
                         **({} if lora is None else dict(
                             lora_mask=target_mask(lora.targets), lora_r_max=lora.r_max,
                             lora_image_length=loader.image_length)))
    return LlamaChip(embedding=embedding, layers=layers, final_norm=norm([qm.final_norm]),
                     classifier=matvec([qm.classifier], "classifier", nc.act_bits,
                                       rom_port=tied),
                     id_words=words, **({} if loader is None else {"lora_loader": loader}))
