"""Quantization-aware fine-tuning by distillation from the float model.

The float weights are trained through a fake quantizer (round to the integer grid of the
per-row scales the ordinary quantizer chose, straight-through gradient) so that the
*quantized* model reproduces the float model's next-token distributions: the loss is
``KL(float teacher || fake-quantized student)`` on sequences the float model itself
generates from seeded random start tokens. The result is an ordinary float model; the normal
quantization path turns it into integers, so the golden model and the hardware are unchanged.

Gradients come from the ``autograd`` package (numpy only); everything is seeded.
"""

from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd import grad
from autograd.extend import defvjp, primitive

from .reference import FloatModel, rope_cos_sin

__all__ = [
    "MATRICES",
    "QatConfig",
    "act_scales",
    "distill_loss",
    "distill_tokens",
    "fake_quant",
    "finetune",
    "forward",
]

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


@dataclass(frozen=True)
class QatConfig:
    """Knobs of the distillation fine-tuning (defaults measured on stories260K)."""

    steps: int = 80
    lr: float = 1e-3
    batch: int = 8            # sequences per step
    n_seqs: int = 32          # training sequences (the float model's own samples)
    seq_len: int = 128        # tokens per training sequence
    seed: int = 4242          # start tokens and sampling (not the report's or held-out seeds)
    temperature: float = 1.0  # 0: greedy continuations
    act_quant: bool = True    # also fake-quantize the matmul inputs (int8, measured better)
    train_norms: bool = True

    def __post_init__(self):
        ints = {"steps": 1, "batch": 1, "n_seqs": 1, "seq_len": 2, "seed": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"QatConfig.{name} must be an integer >= {low}, not {v!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
                    or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"QatConfig.{name} must be a finite number "
                                 f"{'> 0' if name == 'lr' else '>= 0'}, not {v!r}")


@primitive
def fake_quant(w, scale, qmax):
    """``scale * clip(round(w / scale), -qmax, qmax)`` per row; gradient: straight through
    inside the range, zero where the value saturates."""
    return scale * np.clip(np.round(w / scale), -qmax, qmax)


defvjp(fake_quant,
       lambda ans, w, scale, qmax: lambda g: g * (np.abs(w / scale) <= qmax + 0.5))


def distill_tokens(model, cfg):
    """Training sequences: the float model's samples from ``[BOS, t]`` with seeded random
    ``t`` (temperature ``cfg.temperature``; 0 = greedy). Returns an int array (n, seq_len)."""
    c = model.config
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.seq_len, c.seq_len)
    fm = FloatModel(model)
    out = np.zeros((cfg.n_seqs, n), dtype=np.int64)
    for s in range(cfg.n_seqs):
        fm.reset()
        # ids 0-2 are special, unless the vocabulary is that small
        seq = [1, int(rng.integers(3 if c.vocab_size > 3 else 0, c.vocab_size))]
        for pos in range(n - 1):
            logits = fm.step(seq[pos], pos).astype(np.float64)
            if pos + 1 < len(seq):
                continue
            if cfg.temperature > 0:
                p = np.exp((logits - logits.max()) / cfg.temperature)
                seq.append(int(rng.choice(c.vocab_size, p=p / p.sum())))
            else:
                seq.append(int(np.argmax(logits)))
        out[s] = seq[:n]
    return out


def act_scales(qm):
    """``(scale, qmax)`` of every matmul input of a quantized model, for ``act_quant``; the
    SwiGLU output gets its finest step (exponent ``k = 0``) and the full range."""
    nc = qm.numerics
    amax = (1 << (nc.act_bits - 1)) - 1
    out = {"final_norm": (qm.scales["final_norm"], amax)}
    for i, L in enumerate(qm.layers):
        e = nc.hid_exp_max
        out[f"L{i}.attn_norm"] = (L.scales["attn_norm"], amax)
        out[f"L{i}.ffn_norm"] = (L.scales["ffn_norm"], amax)
        out[f"L{i}.att_out"] = (L.scales["v"] * 2.0 ** (nc.qkv_bits - nc.act_bits), amax)
        out[f"L{i}.hidden"] = (L.scales["hidden"] * 2.0 ** -e, amax << e)
    return out


def _rmsnorm(x, g, eps):
    return x / anp.sqrt(anp.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _rope(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    return anp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)


def forward(params, tokens, config, *, wq=None, aq=None):
    """Teacher-forced logits ``(B, T, vocab)`` for token array ``tokens`` ``(B, T)``.

    ``wq(tensor_name, w)`` transforms every weight matrix before use (fake quantization), ``aq(site,
    a)`` every matmul input (activation fake quantization); both default to identity.
    """
    c = config
    wq = wq or (lambda n, w: w)
    aq = aq or (lambda s, a: a)
    B, T = tokens.shape
    hs, kvh, grp = c.head_size, c.n_kv_heads, c.kv_group
    emb = wq("tok_embeddings", params["tok_embeddings"])
    cls = emb if c.shared_classifier else wq("output", params["output"])
    cs = [rope_cos_sin(p, c.dim, hs, c.rope_theta) for p in range(T)]
    cos = np.stack([a for a, _ in cs]).astype(np.float64)
    sin = np.stack([b for _, b in cs]).astype(np.float64)
    kh = c.kv_dim // 2
    mask = np.tril(np.ones((T, T), dtype=bool))
    cos, sin = np.tile(cos, (B, 1)), np.tile(sin, (B, 1))   # rows are (b, t), b-major
    x = emb[tokens.reshape(-1)]                              # (B*T, dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        W = lambda n, p=p: wq(p + n, params[p + n])
        xn = aq(f"L{i}.attn_norm", _rmsnorm(x, params[p + "attention_norm"], c.norm_eps))
        q = _rope(anp.matmul(xn, W("wq").T), cos, sin)
        k = _rope(anp.matmul(xn, W("wk").T), cos[:, :kh], sin[:, :kh])
        v = anp.matmul(xn, W("wv").T)
        # (B, kv head, group, T, hs); keys and values broadcast over the group
        q = anp.transpose(anp.reshape(q, (B, T, kvh, grp, hs)), (0, 2, 3, 1, 4))
        k = anp.transpose(anp.reshape(k, (B, T, kvh, 1, hs)), (0, 2, 3, 4, 1))
        v = anp.transpose(anp.reshape(v, (B, T, kvh, 1, hs)), (0, 2, 3, 1, 4))
        s = anp.matmul(q, k) / np.sqrt(hs)
        s = anp.where(mask, s, -1e30)
        s = s - anp.max(s, axis=-1, keepdims=True)
        e = anp.exp(s)
        a = e / anp.sum(e, axis=-1, keepdims=True)
        att = anp.reshape(anp.transpose(anp.matmul(a, v), (0, 3, 1, 2, 4)), (B * T, c.dim))
        x = x + anp.matmul(aq(f"L{i}.att_out", att), W("wo").T)
        xn = aq(f"L{i}.ffn_norm", _rmsnorm(x, params[p + "ffn_norm"], c.norm_eps))
        h1 = anp.matmul(xn, W("w1").T)
        h3 = anp.matmul(xn, W("w3").T)
        hid = aq(f"L{i}.hidden", h1 / (1.0 + anp.exp(-h1)) * h3)
        x = x + anp.matmul(hid, W("w2").T)
    xn = aq("final_norm", _rmsnorm(x, params["norm"], c.norm_eps))
    return anp.reshape(anp.matmul(xn, cls.T), (B, T, -1))


def _log_softmax(z):
    z = z - anp.max(z, axis=-1, keepdims=True)
    return z - anp.log(anp.sum(anp.exp(z), axis=-1, keepdims=True))


def distill_loss(params, tokens, teacher_logp, config, **kw):
    """Mean over positions of ``KL(teacher || student)``."""
    ls = _log_softmax(forward(params, tokens, config, **kw))
    pt = np.exp(teacher_logp)
    return anp.sum(pt * (teacher_logp - ls)) / (tokens.shape[0] * tokens.shape[1])


def finetune(model, scales, qmax, cfg, *, act_scales=None, tokens=None, log=None):
    """Fine-tune ``model`` through the fake quantizer; returns new float tensors (dict).

    ``scales[name]`` / ``qmax[name]``: per-row scale ``(rows, 1)`` and integer limit of every
    matrix (``tok_embeddings``/``output`` and ``layers.{i}.{w}``). ``act_scales[site]``
    (with ``cfg.act_quant``): ``(scale, qmax)`` of every matmul input (:func:`act_scales`).
    """
    c = model.config
    if tokens is None:
        tokens = distill_tokens(model, cfg)
    params0 = {k: np.asarray(v, dtype=np.float64) for k, v in model.tensors.items()}
    train = [k for k in params0 if params0[k].ndim == 2 or cfg.train_norms]
    teacher = np.asarray(_log_softmax(forward(params0, tokens, c)))

    def wq(n, w):
        return fake_quant(w, scales[n], qmax[n])

    aq = None
    if cfg.act_quant and act_scales is not None:
        def aq(site, a):
            return fake_quant(a, *act_scales[site])

    def loss_fn(tp, idx):
        params = dict(params0)
        params.update(tp)
        return distill_loss(params, tokens[idx], teacher[idx], c,
                            wq=wq, aq=aq)

    g_fn = grad(loss_fn)
    tp = {k: params0[k].copy() for k in train}
    m1 = {k: np.zeros_like(v) for k, v in tp.items()}
    m2 = {k: np.zeros_like(v) for k, v in tp.items()}
    rng = np.random.default_rng(cfg.seed + 1)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(cfg.steps):
        idx = rng.choice(tokens.shape[0], size=min(cfg.batch, tokens.shape[0]), replace=False)
        g = g_fn(tp, idx)
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for k in tp:
            m1[k] = b1 * m1[k] + (1 - b1) * g[k]
            m2[k] = b2 * m2[k] + (1 - b2) * g[k] ** 2
            mh = m1[k] / (1 - b1 ** (step + 1))
            vh = m2[k] / (1 - b2 ** (step + 1))
            tp[k] = tp[k] - lr * mh / (np.sqrt(vh) + eps)
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(step, float(loss_fn(tp, np.arange(tokens.shape[0]))))
    out = dict(params0)
    out.update(tp)
    return {k: v.astype(np.float32) for k, v in out.items()}

