"""Quantization: float model -> every integer constant the chip needs.

Weights are quantized symmetric per output row at a bit width chosen per tensor class.
Activation scales are calibrated once from the float reference on a fixed token sequence, then
folded into integer multipliers and shifts (:class:`Requant`). The result, a
:class:`QuantizedModel`, holds only integers, tables and the float scales they came from
(kept for reports); the golden model and the HDL consume it.
"""

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import HardwireError, UnsupportedConfigError
from .numerics import TableConfig, Tables, make_tables

__all__ = [
    "WEIGHT_CLASSES", "WBITS_PRESETS", "parse_wbits", "NumericsConfig", "Requant", "QMatrix",
    "QNorm", "QLayer", "QuantizedModel", "quantize_rows", "quantize_rows_gptq",
    "quantize_rows_gptq_clip", "CLIP_RATIOS", "CLIP_MAX_BITS", "METHODS", "Calibration",
    "calibrate", "quantize_model",
    "default_calibration_tokens",
]

# Tensor classes that get their own weight width.
WEIGHT_CLASSES = ("embed", "attn_qkv", "attn_out", "ffn_gate_up", "ffn_down")
CLASS_OF = {"wq": "attn_qkv", "wk": "attn_qkv", "wv": "attn_qkv", "wo": "attn_out",
            "w1": "ffn_gate_up", "w3": "ffn_gate_up", "w2": "ffn_down"}
# Named mixes. "3/6": a 3-bit base with 6-bit parameters where they matter most.
WBITS_PRESETS = {
    "3/6": {"embed": 6, "attn_qkv": 6, "attn_out": 3, "ffn_gate_up": 3, "ffn_down": 3},
}
SUPPORTED_WBITS = (3, 4, 5, 6, 7, 8)
# Weight rounding methods of quantize_model (all give per-row scales: same hardware).
METHODS = ("gptq-clip", "gptq", "rtn")
MULT_LIMIT = (1 << 17) - 1     # requant multipliers fit an 18-bit signed operand


def parse_wbits(spec):
    """Parse a weight-width spec: ``8``, ``"4"``, ``"3/6"`` or ``"4,embed=8,ffn_down=6"``."""
    if isinstance(spec, dict):
        out = dict(spec)
    elif isinstance(spec, int):
        out = {c: spec for c in WEIGHT_CLASSES}
    else:
        spec = str(spec).strip()
        if spec in WBITS_PRESETS:
            return dict(WBITS_PRESETS[spec])
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise HardwireError("empty --wbits spec")
        out = {}
        for i, p in enumerate(parts):
            if "=" in p:
                k, v = (s.strip() for s in p.split("=", 1))
                if k not in WEIGHT_CLASSES:
                    raise HardwireError(f"--wbits: unknown tensor class {k!r} "
                                        f"(classes: {', '.join(WEIGHT_CLASSES)})")
                classes = [k]
            elif i == 0:
                v, classes = p, WEIGHT_CLASSES
            else:
                raise HardwireError(f"--wbits: expected CLASS=BITS, got {p!r}")
            try:
                bits = int(v)
            except ValueError:
                raise HardwireError(f"--wbits: {v!r} is not a bit width") from None
            for c in classes:
                out[c] = bits
    missing = [c for c in WEIGHT_CLASSES if c not in out]
    if missing:
        raise HardwireError(f"--wbits: no width for {missing[0]}")
    for c, b in out.items():
        if b not in SUPPORTED_WBITS:
            raise HardwireError(f"--wbits: {c}={b} is not supported (use 3..8)")
    return out


def wbits_label(wbits):
    """Short text for a width assignment: ``"8"`` or ``"embed=6,attn_qkv=6,...=3"``."""
    vals = set(wbits.values())
    if len(vals) == 1:
        return str(vals.pop())
    for name, preset in WBITS_PRESETS.items():
        if preset == wbits:
            return name
    return ",".join(f"{c}={wbits[c]}" for c in WEIGHT_CLASSES)


@dataclass(frozen=True)
class NumericsConfig:
    """Widths of the integer datapath (see docs/numerics.md)."""

    act_bits: int = 8          # matmul inputs (norm outputs, attention output, SwiGLU output)
    qkv_bits: int = 10         # q/k/v projections, RoPE, KV cache entries
    resid_bits: int = 18       # residual stream (fits one 18x18 multiplier for x*x)
    silu_bits: int = 10        # gate projection output = SiLU table index width
    silu_out_bits: int = 16    # SiLU table values
    logit_bits: int = 32
    resid_headroom: float = 2.0   # residual range = headroom x calibrated max
    tables: TableConfig = TableConfig()
    # E: extra fraction bits of the SwiGLU output (the W2 input); each vector gets a
    # power-of-two exponent k in 0..E (numerics.swiglu_exp); 0 = a fixed int8 scale
    hid_exp_max: int = 2

    def __post_init__(self):
        if not isinstance(self.hid_exp_max, int) or not 0 <= self.hid_exp_max <= 7:
            raise UnsupportedConfigError(f"hid_exp_max must be an integer in 0..7, not "
                                         f"{self.hid_exp_max!r}")


@dataclass
class Requant:
    """``out = sat(rshift_round(acc * mult[row], shift), out_bits)``."""

    mult: np.ndarray
    shift: int
    out_bits: int

    @classmethod
    def from_ratio(cls, ratio, out_bits, *, what):
        ratio = np.atleast_1d(np.asarray(ratio, dtype=np.float64))
        top = float(ratio.max())
        if not np.isfinite(top) or top <= 0:
            raise UnsupportedConfigError(f"{what}: degenerate scale (all-zero tensor?)")
        shift = int(math.floor(math.log2(MULT_LIMIT / top)))
        if shift < 0:
            raise UnsupportedConfigError(f"{what}: scale ratio {top:.3g} too large for the "
                                         "integer requantizer")
        shift = min(shift, 48)
        mult = np.round(ratio * 2.0 ** shift).astype(np.int64)
        return cls(mult, shift, out_bits)


@dataclass
class QMatrix:
    """A quantized weight matrix: integer values, per-row scale and output requantization."""

    name: str
    q: np.ndarray           # (rows, cols) int64, |q| <= 2**(bits-1) - 1
    bits: int
    scale: np.ndarray       # (rows,) float64: W ~= q * scale[:, None]
    requant: Requant

    @property
    def rows(self):
        return self.q.shape[0]

    @property
    def cols(self):
        return self.q.shape[1]


@dataclass
class QNorm:
    """RMSNorm constants: integer gain (folds gain, sqrt(dim), output scale) and eps."""

    gain: np.ndarray
    gain_shift: int
    eps: int
    out_scale: float


@dataclass
class QLayer:
    attn_norm: QNorm
    wq: QMatrix
    wk: QMatrix
    wv: QMatrix
    wo: QMatrix
    ffn_norm: QNorm
    w1: QMatrix
    w3: QMatrix
    w2: QMatrix
    exp_mult: int
    exp_shift: int
    silu_table: np.ndarray
    silu_offset: int
    hid_mult: int
    hid_shift: int
    scales: dict = field(default_factory=dict)


@dataclass
class QuantizedModel:
    """Everything the golden model and the chip need, as integers and tables."""

    config: object
    name: str
    model_hash: str
    wbits: dict
    numerics: NumericsConfig
    tables: Tables
    resid_frac: int
    embed: QMatrix              # q: (vocab, dim); requant maps a row to the residual format
    layers: list
    final_norm: QNorm
    classifier: QMatrix         # requant maps the accumulator to common-scale logits
    logit_scale: float
    scales: dict = field(default_factory=dict)
    method: str = "gptq-clip"

    @property
    def eps_int(self):
        return self.final_norm.eps

    def rom_bits(self):
        """Weight ROM bits by matrix name (embedding counted once when shared)."""
        out = {"embed": self.embed.q.size * self.embed.bits}
        for i, L in enumerate(self.layers):
            for m in (L.wq, L.wk, L.wv, L.wo, L.w1, L.w3, L.w2):
                out[f"layers.{i}.{m.name}"] = m.q.size * m.bits
        if not self.config.shared_classifier:
            out["output"] = self.classifier.q.size * self.classifier.bits
        return out

    def digest(self):
        """sha256 of every integer constant: equal digests mean an identical chip datapath."""
        h = hashlib.sha256()

        def add(a):
            a = np.ascontiguousarray(np.asarray(a, dtype=np.int64))
            h.update(str(a.shape).encode())
            h.update(a.tobytes())

        for t in self.tables.as_dict().values():
            add(t)
        if self.numerics.hid_exp_max:
            # E changes the SwiGLU and W2 arithmetic, not any table or constant
            add([self.numerics.hid_exp_max])
        add([self.resid_frac, self.final_norm.gain_shift, self.final_norm.eps])
        for m in (self.embed, self.classifier):
            add(m.q), add(m.requant.mult), add([m.requant.shift, m.bits])
        add(self.final_norm.gain)
        for L in self.layers:
            for n in (L.attn_norm, L.ffn_norm):
                add(n.gain), add([n.gain_shift, n.eps])
            for m in (L.wq, L.wk, L.wv, L.wo, L.w1, L.w3, L.w2):
                add(m.q), add(m.requant.mult), add([m.requant.shift, m.bits])
            add([L.exp_mult, L.exp_shift, L.silu_offset, L.hid_mult, L.hid_shift])
            add(L.silu_table)
        return h.hexdigest()


def quantize_rows(w, bits, scale=None):
    """Symmetric per-row quantization: returns ``(q, scale)`` with ``w ~= q * scale[:, None]``
    (``scale``: the rows' scales, default max-abs)."""
    w = np.asarray(w, dtype=np.float64)
    qmax = (1 << (bits - 1)) - 1
    if scale is None:
        amax = np.abs(w).max(axis=1)
        scale = np.where(amax > 0, amax / qmax, 1.0)
    else:
        scale = np.asarray(scale, dtype=np.float64)
    q = np.clip(np.round(w / scale[:, None]), -qmax, qmax).astype(np.int64)
    return q, scale


def _gptq_round(w, bits, gram, scale, damp):
    """GPTQ integer values of ``w`` (rows, cols) for given per-row ``scale`` (rows,)."""
    w = np.array(w, dtype=np.float64)
    qmax = (1 << (bits - 1)) - 1
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(h.shape[0])
    # "act order": quantize the columns with the largest input energy first
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    # upper Cholesky factor of H^-1
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros(w.shape, dtype=np.int64)
    for j in range(w.shape[1]):
        col = w[:, j]
        qj = np.clip(np.round(col / scale), -qmax, qmax)
        q[:, j] = qj.astype(np.int64)
        err = (col - qj * scale) / hinv[j, j]
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    out = np.empty_like(q)
    out[:, order] = q
    return out


def quantize_rows_gptq(w, bits, gram, *, damp=0.01):
    """Per-row symmetric quantization with GPTQ error compensation.

    Row scales are those of :func:`quantize_rows`; the integer values are chosen column by
    column, pushing each column's rounding error onto the columns not yet quantized in
    proportion to the inverse of ``gram`` (``X^T X`` of calibration inputs), which minimises
    the output error ``||(W - Q) X||`` rather than the weight error.
    """
    _, scale = quantize_rows(w, bits)
    return _gptq_round(w, bits, gram, scale, damp), scale


#: Widest weight width that gets the clipping search under ``method="gptq-clip"``: measured on
#: stories260K it lifts W3 from 40% to 67% top-1 agreement and W4 from 84% to 85%, while at
#: 6 and 8 bits it only moves agreement within noise (+-1%) and raises cross-entropy.
CLIP_MAX_BITS = 4
#: Clipping ratios tried per row by :func:`quantize_rows_gptq_clip` (1.0 = no clipping).
CLIP_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.5, 26))


def quantize_rows_gptq_clip(w, bits, gram, *, damp=0.01, ratios=CLIP_RATIOS):
    """GPTQ with a per-row scale search (clipping) that minimises the output error.

    For every ratio ``c`` in ``ratios`` each row gets the scale ``c * max|W_r| / qmax`` and
    GPTQ integer values; each row keeps the ratio with the smallest calibration output error
    ``(W_r - Q_r s_r) G (W_r - Q_r s_r)^T`` (``G`` = ``gram``). Rows are independent given
    ``G``, so all candidates run as one stacked GPTQ pass. The result is an ordinary per-row
    quantization (integers + one scale per row): the hardware is unchanged.

    Returns ``(q, scale)`` like :func:`quantize_rows`.
    """
    w = np.asarray(w, dtype=np.float64)
    rows = w.shape[0]
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.ndim != 1 or ratios.size == 0 or np.any(ratios <= 0) or np.any(ratios > 1):
        raise HardwireError("clip ratios must be a non-empty list of numbers in (0, 1]")
    _, base = quantize_rows(w, bits)
    scales = (ratios[:, None] * base[None, :]).reshape(-1)
    q = _gptq_round(np.tile(w, (ratios.size, 1)), bits, gram, scales, damp)
    d = np.tile(w, (ratios.size, 1)) - q * scales[:, None]
    g = np.asarray(gram, dtype=np.float64)
    err = np.einsum("ij,jk,ik->i", d, g, d).reshape(ratios.size, rows)
    # the first minimum wins, so a tie keeps the larger ratio (less clipping)
    best = np.argmin(err, axis=0)
    pick = best * rows + np.arange(rows)
    return q[pick], scales[pick]


def default_calibration_tokens(model, n=160, starts=6, seed=0):
    """Deterministic calibration sequences: the float model's greedy runs from BOS and from
    BOS followed by ``starts`` seeded random tokens (no tokenizer needed)."""
    from .reference import generate_greedy
    n = min(n, model.config.seq_len - 2)
    rng = np.random.default_rng(seed)
    # a tiny vocabulary has fewer than ``starts`` ordinary tokens (ids 0-2 are special)
    starts = max(0, min(starts, model.config.vocab_size - 3))
    firsts = rng.choice(np.arange(3, model.config.vocab_size), size=starts, replace=False)
    seqs = [[1]] + [[1, int(t)] for t in firsts]
    return [s + generate_greedy(model, s, n) for s in seqs]


# activation site -> trace names whose max |x| sets its range
RANGE_SITES = {
    "attn_norm": ("attn_norm",), "q": ("q", "q_rope"), "k": ("k", "k_rope"), "v": ("v",),
    "ffn_norm": ("ffn_norm",), "h1": ("h1",), "h3": ("h3",), "hidden": ("hidden",),
}
# inputs of the matrices (Gram matrices for GPTQ)
MATMUL_INPUTS = ("attn_norm", "att_out", "ffn_norm", "hidden")


def calibrate(model, tokens):
    """Activation statistics over a token sequence, from the float reference."""
    from .reference import FloatModel
    fm = FloatModel(model)
    c = model.config
    rows = {}
    for pos, tok in enumerate(tokens[: c.seq_len]):
        tr = {}
        fm.step(tok, pos, trace=tr)
        for k, v in tr.items():
            rows.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    x = {k: np.stack(v) for k, v in rows.items()}
    amax = {k: float(np.abs(v).max()) for k, v in x.items()}
    stats = {"resid": max(amax[f"L{i}.{s}"] for i in range(c.n_layers)
                          for s in ("attn_in", "ffn_in", "out")),
             "final_norm": amax["final_norm"]}
    grams = {"final_norm": x["final_norm"].T @ x["final_norm"]}
    for i in range(c.n_layers):
        for site, names in RANGE_SITES.items():
            stats[f"L{i}.{site}"] = max(amax[f"L{i}.{n}"] for n in names)
        for site in MATMUL_INPUTS:
            v = x[f"L{i}.{site}"]
            grams[f"L{i}.{site}"] = v.T @ v
    stats = {k: (v if v > 0 else 1.0) for k, v in stats.items()}
    return Calibration(stats, grams)


@dataclass
class Calibration:
    """Activation ranges (max |x| per site) and Gram matrices of every matmul input."""

    stats: dict
    grams: dict

    def merge(self, other):
        """Combine with the calibration of another token sequence."""
        for k, v in other.stats.items():
            self.stats[k] = max(self.stats.get(k, 0.0), v)
        for k, v in other.grams.items():
            self.grams[k] = self.grams[k] + v if k in self.grams else v
        return self


def _qnorm(gain, dim, out_scale, resid_frac, norm_eps, *, what):
    g = np.asarray(gain, dtype=np.float64) * math.sqrt(dim) / out_scale
    top = float(np.abs(g).max())
    if top == 0:
        raise UnsupportedConfigError(f"{what}: all-zero RMSNorm gain")
    gshift = int(math.floor(math.log2(((1 << 15) - 1) / top)))
    if gshift < -16:
        raise UnsupportedConfigError(f"{what}: RMSNorm gain range too large")
    gi = np.round(g * 2.0 ** gshift).astype(np.int64)
    eps = max(1, int(round(dim * norm_eps * 4.0 ** resid_frac)))
    return QNorm(gi, gshift, eps, out_scale)


def quantize_model(model, *, wbits=8, numerics=None, calib_tokens=None, calibration=None,
                   method="gptq-clip", qat=None, row_scales=None):
    """Quantize a :class:`~.model.LlamaModel` into a :class:`QuantizedModel`.

    ``method`` chooses the weight rounding: ``"gptq-clip"`` (the default: GPTQ with a per-row
    clipping search that minimises the calibration output error,
    :func:`quantize_rows_gptq_clip`, for widths up to :data:`CLIP_MAX_BITS`; wider tensor
    classes get plain ``"gptq"``), ``"gptq"`` (GPTQ with max-abs row scales) or ``"rtn"``
    (plain round-to-nearest, max-abs row scales). All give integers with one scale per output
    row, so the hardware is the same; only the integer values (and the chip digest) differ.

    ``qat`` (a :class:`~.qat.QatConfig`, or ``True`` for the defaults) first quantizes as
    above, then fine-tunes the float weights through a fake quantizer with those row scales
    (distillation from the float model, :mod:`.qat`) and rounds the fine-tuned weights to the
    same scales; activation ranges are calibrated again on the fine-tuned model.
    ``row_scales`` (tensor name -> per-row scale) replaces the weight rounding by plain
    rounding to the given scales.
    """
    if qat:
        return _quantize_qat(model, wbits=wbits, numerics=numerics, calib_tokens=calib_tokens,
                             method=method, qat=qat)
    wb = parse_wbits(wbits)
    c = model.config
    nc = NumericsConfig() if numerics is None else numerics
    if method not in METHODS:
        raise HardwireError(f"unknown quantization method {method!r} "
                            f"({', '.join(METHODS)})")
    if calibration is None:
        if calib_tokens is None:
            calib_tokens = default_calibration_tokens(model)
        if calib_tokens and isinstance(calib_tokens[0], (int, np.integer)):
            calib_tokens = [calib_tokens]
        # Activation ranges come from the first (natural, BOS-started) sequence; the others
        # only enrich the GPTQ input statistics (random starts inflate ranges: measured
        # 96.3% vs 93.7% W8 top-1 agreement on stories260K).
        calibration = calibrate(model, calib_tokens[0])
        ranges = dict(calibration.stats)
        for seq in calib_tokens[1:]:
            calibration.merge(calibrate(model, seq))
        calibration.stats = ranges
    stats = calibration.stats

    def qrows(w, bits, gram, key):
        if row_scales is not None:
            return quantize_rows(w, bits, row_scales[key])
        if method == "rtn":
            return quantize_rows(w, bits)
        if method == "gptq" or bits > CLIP_MAX_BITS:
            return quantize_rows_gptq(w, bits, gram)
        return quantize_rows_gptq_clip(w, bits, gram)

    def act_scale(key, bits=nc.act_bits):
        return stats[key] / ((1 << (bits - 1)) - 1)

    # residual stream: fixed point with resid_frac fractional bits
    rmax = stats["resid"] * nc.resid_headroom
    resid_frac = int(math.floor(math.log2(((1 << (nc.resid_bits - 1)) - 1) / rmax)))
    s_x = 2.0 ** -resid_frac
    tables = make_tables(head_size=c.head_size, seq_len=c.seq_len, rope_theta=c.rope_theta,
                         config=nc.tables)
    tc = nc.tables

    def qmat(name, w, bits, s_in, s_out, out_bits, *, site, layer):
        q, scale = qrows(w, bits, calibration.grams[site], f"layers.{layer}.{name}")
        ratio = s_in * scale / s_out
        return QMatrix(name, q, bits, scale,
                       Requant.from_ratio(ratio, out_bits, what=f"{model.source or name}:{name}"))

    # Classifier first: with a shared classifier the embedding lookup reads the very same ROM,
    # so both use one integer table.
    cq, cscale = qrows(model.classifier, wb["embed"], calibration.grams["final_norm"],
                       "tok_embeddings" if c.shared_classifier else "output")
    if c.shared_classifier:
        eq, escale = cq, cscale
    else:
        eq, escale = quantize_rows(model.tensors["tok_embeddings"], wb["embed"],
                                   None if row_scales is None else row_scales["tok_embeddings"])
    # embedding rows -> residual format (the "input" scale of a lookup is 1)
    embed = QMatrix("tok_embeddings", eq, wb["embed"], escale,
                    Requant.from_ratio(escale / s_x, nc.resid_bits, what="tok_embeddings"))

    layers = []
    for i in range(c.n_layers):
        W = lambda n: model.tensors[f"layers.{i}.{n}"]  # noqa: E731
        s_an, s_fn = act_scale(f"L{i}.attn_norm"), act_scale(f"L{i}.ffn_norm")
        kb = nc.qkv_bits
        s_q, s_k = act_scale(f"L{i}.q", kb), act_scale(f"L{i}.k", kb)
        s_v = act_scale(f"L{i}.v", kb)
        s_h1 = act_scale(f"L{i}.h1", nc.silu_bits)
        s_h3 = act_scale(f"L{i}.h3")
        s_hid = act_scale(f"L{i}.hidden")
        ab = nc.act_bits
        attn_norm = _qnorm(W("attention_norm"), c.dim, s_an, resid_frac, c.norm_eps,
                           what=f"layers.{i}.attention_norm")
        ffn_norm = _qnorm(W("ffn_norm"), c.dim, s_fn, resid_frac, c.norm_eps,
                          what=f"layers.{i}.ffn_norm")
        wq = qmat("wq", W("wq"), wb["attn_qkv"], s_an, s_q, kb,
                  site=f"L{i}.attn_norm", layer=i)
        wk = qmat("wk", W("wk"), wb["attn_qkv"], s_an, s_k, kb,
                  site=f"L{i}.attn_norm", layer=i)
        wv = qmat("wv", W("wv"), wb["attn_qkv"], s_an, s_v, kb,
                  site=f"L{i}.attn_norm", layer=i)
        # attention output: the values' scale, narrowed from qkv_bits to act_bits by a shift
        s_att = s_v * 2.0 ** (kb - ab)
        wo = qmat("wo", W("wo"), wb["attn_out"], s_att, s_x, nc.resid_bits,
                  site=f"L{i}.att_out", layer=i)
        w1 = qmat("w1", W("w1"), wb["ffn_gate_up"], s_fn, s_h1, nc.silu_bits,
                  site=f"L{i}.ffn_norm", layer=i)
        w3 = qmat("w3", W("w3"), wb["ffn_gate_up"], s_fn, s_h3, ab,
                  site=f"L{i}.ffn_norm", layer=i)
        w2 = qmat("w2", W("w2"), wb["ffn_down"], s_hid, s_x, nc.resid_bits,
                  site=f"L{i}.hidden", layer=i)
        # softmax: table index = (max - score) * S_q * S_k / sqrt(hs) / step
        ratio = s_q * s_k / math.sqrt(c.head_size) * 2.0 ** tc.exp_step_log2
        er = Requant.from_ratio(ratio, 0, what=f"layers.{i} softmax scale")
        # SiLU table over the gate's integer range
        off = 1 << (nc.silu_bits - 1)
        xs = (np.arange(1 << nc.silu_bits, dtype=np.float64) - off) * s_h1
        silu = xs / (1.0 + np.exp(-xs))
        s_silu = float(np.abs(silu).max()) / ((1 << (nc.silu_out_bits - 1)) - 1)
        silu_table = np.round(silu / s_silu).astype(np.int64)
        hr = Requant.from_ratio(s_silu * s_h3 / s_hid, ab, what=f"layers.{i} SwiGLU scale")
        if hr.shift < nc.hid_exp_max:
            # the SwiGLU's wide output is rounded at shift - E (numerics.swiglu_exp)
            raise UnsupportedConfigError(f"layers.{i} SwiGLU scale: requantizer shift "
                                         f"{hr.shift} leaves no room for hid_exp_max="
                                         f"{nc.hid_exp_max}")
        layers.append(QLayer(attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2,
                             int(er.mult[0]), er.shift, silu_table, off,
                             int(hr.mult[0]), hr.shift,
                             scales=dict(attn_norm=s_an, ffn_norm=s_fn, q=s_q, k=s_k, v=s_v,
                                         h1=s_h1, h3=s_h3, hidden=s_hid, silu=s_silu)))

    s_fin = act_scale("final_norm")
    final_norm = _qnorm(model.tensors["norm"], c.dim, s_fin, resid_frac, c.norm_eps,
                        what="norm")
    logit_scale = s_fin * float(cscale.max()) / 16.0
    classifier = QMatrix("output" if not c.shared_classifier else "tok_embeddings",
                         cq, wb["embed"], cscale,
                         Requant.from_ratio(s_fin * cscale / logit_scale, nc.logit_bits,
                                            what="classifier"))
    return QuantizedModel(c, model.name, model.content_hash(), wb, nc, tables, resid_frac,
                          embed, layers, final_norm, classifier, logit_scale,
                          scales=dict(stats=stats, resid=s_x, final_norm=s_fin), method=method)


def _quantize_qat(model, *, wbits, numerics, calib_tokens, method, qat):
    """quantize_model with distillation fine-tuning (see :mod:`.qat`)."""
    from .model import LlamaModel
    from .qat import MATRICES, QatConfig, act_scales, finetune
    cfg = QatConfig() if qat is True else qat
    if not isinstance(cfg, QatConfig):
        raise TypeError(f"qat must be True or a QatConfig, not {type(qat).__name__}")
    if calib_tokens is None:
        calib_tokens = default_calibration_tokens(model)
    base = quantize_model(model, wbits=wbits, numerics=numerics, calib_tokens=calib_tokens,
                          method=method)
    cls_name = "tok_embeddings" if model.config.shared_classifier else "output"
    scales = {cls_name: base.classifier.scale}
    bits = {cls_name: base.classifier.bits}
    if not model.config.shared_classifier:
        # the separate embedding table keeps plain max-abs rounding (quantize_model)
        scales["tok_embeddings"] = base.embed.scale
        bits["tok_embeddings"] = base.embed.bits
    for i, L in enumerate(base.layers):
        for n in MATRICES:
            scales[f"layers.{i}.{n}"] = getattr(L, n).scale
            bits[f"layers.{i}.{n}"] = getattr(L, n).bits
    qmax = {k: (1 << (b - 1)) - 1 for k, b in bits.items()}
    tensors = finetune(model, {k: v[:, None] for k, v in scales.items()}, qmax, cfg,
                       act_scales=act_scales(base))
    tuned = LlamaModel(model.config, tensors, name=model.name, source=model.source,
                       vocab=model.vocab, vocab_scores=model.vocab_scores)
    qm = quantize_model(tuned, wbits=wbits, numerics=numerics, calib_tokens=calib_tokens,
                        row_scales=scales)
    # the chip is described by the checkpoint it came from, not the tuned intermediate
    qm.model_hash = base.model_hash
    qm.method = f"{method}+qat"
    return qm
