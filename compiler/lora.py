"""LoRA adapters: fine-tunes that live in SRAM beside the etched weights.

A target matrix ``W`` (etched ROM) gets a low-rank correction ``s * B @ A`` at run time. This
module is the compiler half (``docs/lora.md`` explains it in prose):

* :func:`load_peft_adapter` reads a Hugging Face PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) onto llama2.c names and row order (:class:`LoraAdapter`);
* :func:`apply_lora_float` merges it into a float model, the behavioural reference;
* :func:`quantize_lora` turns it into the integers the chip holds (:class:`QuantizedLora`),
  calibrated on the float model *with* the adapter;
* :func:`lora_delta` is the integer arithmetic, one target matrix at a time, and
  :class:`LoraGoldenModel` the golden model with it: the bit-exact spec for the LoRA block.

The binary image the host uploads is :mod:`.lora_image`.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import numerics as nx
from .errors import HardwireError, ModelFormatError, UnsupportedConfigError
from .golden import GoldenModel, generate_golden
from .model import LlamaModel
from .quantize import MULT_LIMIT, default_calibration_tokens, quantize_rows

__all__ = [
    "LORA_TARGETS", "HF_TARGETS", "MAX_RANK", "ACC_BITS", "LoraFormatError", "LoraAdapter",
    "load_peft_adapter", "apply_lora_float", "QLoraMatrix", "QuantizedLora", "quantize_lora",
    "lora_project", "lora_delta", "lora_accumulate", "LoraGoldenModel", "generate_golden_lora",
    "base_digest8", "input_scale", "lora_input_ranges", "SHIFT_MAX",
]

# Matrices a LoRA may target, in image order (bit i of the image's target mask).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Hugging Face module -> (sub-module, llama2.c name).
HF_TARGETS = {"q_proj": ("self_attn", "wq"), "k_proj": ("self_attn", "wk"),
              "v_proj": ("self_attn", "wv"), "o_proj": ("self_attn", "wo"),
              "gate_proj": ("mlp", "w1"), "down_proj": ("mlp", "w2"),
              "up_proj": ("mlp", "w3")}
_LLAMA_TO_HF = {v[1]: k for k, v in HF_TARGETS.items()}
# Modules of a Llama that PEFT can target but the chip cannot (etched, no LoRA datapath).
_UNSUPPORTED_MODULES = ("embed_tokens", "lm_head")
# Largest rank an image may declare (its header field is 16 bits; SRAM is the real limit).
MAX_RANK = 256
# Width of the matmul accumulator the LoRA correction is added to.
ACC_BITS = 32
U_BITS = 8          # width of the rank-space vector u_q
LORA_WBITS = 8      # width of A_q and B_q
_SHIFT_LIMIT = 48

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])\.weight")


class LoraFormatError(ModelFormatError):
    """A LoRA adapter directory is missing a file, malformed, or does not fit its base model."""


# ---------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------

@dataclass
class LoraAdapter:
    """A float LoRA adapter in llama2.c names and row order.

    ``W' = W + scale * B @ A`` for every ``(layer, name)`` key of ``A``/``B``; matrices of
    ``targets`` that a layer does not adapt (PEFT ``layers_to_transform``) are absent.
    """

    A: dict            # (layer, name) -> float32 (rank, in_features)
    B: dict            # (layer, name) -> float32 (out_features, rank), llama2.c row order
    scale: float       # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    rank: int
    targets: tuple     # llama2.c names, in LORA_TARGETS order
    name: str = "adapter"
    source: str = ""
    config: dict = field(default_factory=dict, repr=False)

    def delta(self, layer, name):
        """``scale * B @ A`` as float32, or ``None`` if this matrix is not adapted."""
        if (layer, name) not in self.A:
            return None
        d = self.scale * (self.B[layer, name].astype(np.float64)
                          @ self.A[layer, name].astype(np.float64))
        return d.astype(np.float32)


def _read_adapter_config(path):
    file = path / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise LoraFormatError(f"no {CONFIG_FILE} in this directory", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = " ".join(str(e).split())
        raise LoraFormatError(f"{CONFIG_FILE} is not valid JSON ({msg})", path=path) from None
    if not isinstance(cfg, dict):
        raise LoraFormatError(f"{CONFIG_FILE} is not a JSON object", path=path)
    return cfg


def _number(cfg, key, path, *, integer=False, default=None):
    v = cfg.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v):
        kind = "an integer" if integer else "a number"
        raise LoraFormatError(f"{CONFIG_FILE}: {key} must be {kind}, not {v!r}", path=path)
    return v


def _check_options(cfg, path):
    """Reject PEFT options whose arithmetic the chip does not implement."""
    def unsupported(msg):
        raise UnsupportedConfigError(f"{CONFIG_FILE}: {msg}", path=path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        unsupported(f"peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("fan_in_fan_out"):
        unsupported("fan_in_fan_out must be false (Llama uses nn.Linear)")
    if cfg.get("bias", "none") != "none":
        unsupported(f"bias {cfg['bias']!r} is not supported (only 'none')")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            unsupported(f"{flag} is not supported")
    # options that add weights or change the forward pass (LoRA variants); empty is fine
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "exclude_modules", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
                "velora_config", "use_qalora", "use_bdlora"):
        if cfg.get(key):
            unsupported(f"{key} is not supported (must be empty)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # these initialisations also rewrite the base weights, which are etched
        unsupported(f"init_lora_weights {init!r} modifies the base weights; convert the "
                    "adapter to plain LoRA first")
    for key in ("use_rslora",):
        if not isinstance(cfg.get(key, False), bool):
            raise LoraFormatError(f"{CONFIG_FILE}: {key} must be true or false", path=path)


def _module_names(n_layers):
    """Every module PEFT could match in a Llama, by its full name -> (layer, HF short name)."""
    names = {"model.embed_tokens": (None, "embed_tokens"), "lm_head": (None, "lm_head")}
    for i in range(n_layers):
        for short, (sub, _) in HF_TARGETS.items():
            names[f"model.layers.{i}.{sub}.{short}"] = (i, short)
    return names


def _resolve_targets(cfg, n_layers, path):
    """The set of ``(layer, HF short name)`` the config adapts, matched as PEFT does."""
    spec = cfg.get("target_modules")
    modules = _module_names(n_layers)
    supported = ", ".join(HF_TARGETS)
    if isinstance(spec, str):
        if spec == "all-linear":
            hit = [k for k, (i, _) in modules.items() if i is not None]
        else:
            try:
                rx = re.compile(spec)
            except re.error as e:
                raise LoraFormatError(f"{CONFIG_FILE}: target_modules regex {spec!r} is "
                                      f"invalid ({e})", path=path) from None
            hit = [k for k in modules if rx.fullmatch(k)]
            if not hit:
                raise LoraFormatError(f"{CONFIG_FILE}: target_modules {spec!r} matches no "
                                      "module of the base model", path=path)
    elif isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
        hit = []
        for s in spec:
            found = [k for k in modules if k == s or k.endswith("." + s)]
            if not found:
                raise LoraFormatError(f"{CONFIG_FILE}: unknown target module {s!r} "
                                      f"(supported: {supported})", path=path)
            hit += found
    else:
        raise LoraFormatError(f"{CONFIG_FILE}: target_modules must be a non-empty list of "
                              f"module names or a regex, not {spec!r}", path=path)
    for k in hit:
        layer, short = modules[k]
        if layer is None:
            raise UnsupportedConfigError(f"{CONFIG_FILE}: target module {short} is not "
                                         f"supported (supported: {supported})", path=path)
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        if (not isinstance(layers, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise LoraFormatError(f"{CONFIG_FILE}: layers_to_transform must be an integer or a "
                                  "list of integers", path=path)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise LoraFormatError(f"{CONFIG_FILE}: layers_to_transform names layer {bad[0]}, "
                                  f"but the base model has {n_layers} layers", path=path)
    return {modules[k] for k in hit if layers is None or modules[k][0] in layers}


def _read_weights(path):
    from .loaders.hf import _read_tensors
    file = path / WEIGHTS_FILE
    if not file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UnsupportedConfigError("adapter_model.bin (pickle) is not supported; save the "
                                         "adapter with safe_serialization=True", path=path)
        raise LoraFormatError(f"no {WEIGHTS_FILE} in this directory", path=path)
    try:
        return _read_tensors([file], path)
    except LoraFormatError:
        raise
    except ModelFormatError as e:   # re-raise as the adapter's own error class
        raise LoraFormatError(str(e)) from None


def load_peft_adapter(path, model, *, max_rank=MAX_RANK):
    """Load a Hugging Face PEFT LoRA adapter for ``model`` (a :class:`~.model.LlamaModel`).

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``adapter_config.json`` and ``adapter_model.safetensors`` as
        ``peft``'s ``save_pretrained`` writes them.
    model : LlamaModel
        The base model: tensor shapes are checked against it.
    max_rank : int
        The chip's largest rank (``r_max``); a larger ``r`` is rejected.

    Returns
    -------
    LoraAdapter
        Hugging Face module names mapped to llama2.c names (``q_proj`` -> ``wq``, ``k_proj`` ->
        ``wk``, ``v_proj`` -> ``wv``, ``o_proj`` -> ``wo``, ``gate_proj`` -> ``w1``,
        ``up_proj`` -> ``w3``, ``down_proj`` -> ``w2``); ``lora_B`` of ``q_proj``/``k_proj``
        un-permuted from rotate-half row order (``lora_A`` acts on the input side and keeps its
        order).

    Raises
    ------
    LoraFormatError
        Missing files, bad JSON, unknown target modules, missing/extra tensors, shapes that do
        not fit the base model, NaN or Inf.
    UnsupportedConfigError
        PEFT options the chip does not implement (DoRA, biases, ``fan_in_fan_out``, rank or
        alpha patterns, embedding/classifier targets) and ranks above ``max_rank``.
    """
    from .loaders.hf import unpermute
    path = Path(path)
    if not path.exists():
        raise HardwireError("no such file", path=path)
    if not path.is_dir():
        raise LoraFormatError("a PEFT adapter must be a directory", path=path)
    cfg = _read_adapter_config(path)
    _check_options(cfg, path)
    r = _number(cfg, "r", path, integer=True)
    if r <= 0:
        raise LoraFormatError(f"{CONFIG_FILE}: r must be positive, not {r}", path=path)
    if r > max_rank:
        raise UnsupportedConfigError(f"rank r={r} exceeds the chip's maximum rank {max_rank}",
                                     path=path)
    alpha = _number(cfg, "lora_alpha", path, default=8)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
    c = model.config
    wanted = _resolve_targets(cfg, c.n_layers, path)
    tensors = _read_weights(path)
    shapes = c.tensor_shapes()
    A, B = {}, {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m.group(3) not in HF_TARGETS or HF_TARGETS[m.group(3)][0] != m.group(2):
            raise LoraFormatError(f"unexpected tensor {key}", path=path)
        layer, short, side = int(m.group(1)), m.group(3), m.group(4)
        if layer >= c.n_layers:
            raise LoraFormatError(f"tensor {key} is for layer {layer}, but the base model has "
                                  f"{c.n_layers} layers", path=path)
        if (layer, short) not in wanted:
            raise LoraFormatError(f"unexpected tensor {key} (not in target_modules)", path=path)
        name = HF_TARGETS[short][1]
        rows, cols = shapes[f"layers.{layer}.{name}"]
        expected = (r, cols) if side == "A" else (rows, r)
        if tuple(t.shape) != expected:
            raise LoraFormatError(f"tensor {key} has shape {tuple(t.shape)}, expected "
                                  f"{expected} (r={r}, {name} is {rows}x{cols})", path=path)
        if not np.all(np.isfinite(t)):
            raise LoraFormatError(f"tensor {key} contains NaN or Inf", path=path)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if side == "B" and name in ("wq", "wk"):
            t = np.ascontiguousarray(unpermute(t, c.n_heads if name == "wq" else c.n_kv_heads))
        (A if side == "A" else B)[layer, name] = t
    for layer, short in sorted(wanted):
        for side, d in (("A", A), ("B", B)):
            if (layer, HF_TARGETS[short][1]) not in d:
                sub = HF_TARGETS[short][0]
                raise LoraFormatError(f"missing tensor base_model.model.model.layers.{layer}."
                                      f"{sub}.{short}.lora_{side}.weight", path=path)
    names = {HF_TARGETS[s][1] for _, s in wanted}
    targets = tuple(n for n in LORA_TARGETS if n in names)
    return LoraAdapter(A, B, float(scale), r, targets, name=path.name or "adapter",
                       source=str(path), config=cfg)


def apply_lora_float(model, adapter):
    """The float reference with an adapter: a new :class:`~.model.LlamaModel` whose target
    matrices are ``W + scale * B @ A`` (computed in float64, stored float32).

    ``FloatModel``, ``generate_greedy`` and ``quantize_model`` work on it unchanged.
    """
    c = model.config
    tensors = dict(model.tensors)
    for (layer, name) in adapter.A:
        key = f"layers.{layer}.{name}"
        if layer >= c.n_layers or adapter.B[layer, name].shape[0] != tensors[key].shape[0] \
                or adapter.A[layer, name].shape[1] != tensors[key].shape[1]:
            raise LoraFormatError(f"adapter does not fit {key} of {model.name}",
                                  path=adapter.source or None)
        merged = tensors[key].astype(np.float64) + adapter.delta(layer, name).astype(np.float64)
        tensors[key] = merged.astype(np.float32)
    return LlamaModel(config=c, tensors=tensors, name=f"{model.name}+{adapter.name}",
                      source=model.source, vocab=model.vocab, vocab_scores=model.vocab_scores)


# ---------------------------------------------------------------------------------------------
# Integer arithmetic (the spec the LoRA hardware block is tested against)
# ---------------------------------------------------------------------------------------------

def lora_project(x, a_q, mult_u, shift_u, *, bits=U_BITS):
    """Rank-space projection ``u_q = requantize(A_q @ x, mult_u[j], shift_u, bits)``.

    ``x`` is the int8 input of the target matrix (the same vector the base matvec gets);
    ``A_q @ x`` is accumulated exactly.
    """
    return nx.requantize(nx.matvec(a_q, x), mult_u, shift_u, bits)


#: Largest effective rounding shift of the LoRA requantizers (the chip's shift registers are 6
#: bits; an exponent-adjusted shift above it is clamped: the result is 0 or -1 either way for
#: products below 2**62).
SHIFT_MAX = 63


def lora_delta(x, a_q, mult_u, shift_u, b_q, mult_b, shift_b, *, bits=U_BITS, trace=None, k=0,
               exp_max=0):
    """The LoRA correction of one target matrix, in the base accumulator's units.

    ``u_q = requantize(A_q @ x, mult_u, min(shift_u + exp_max - k, 63), bits)``;
    ``v = B_q @ u_q`` (exact); ``delta[row] = rshift_round(v[row] * mult_b[row],
    min(shift_b + k, 63))``. ``mult_b`` converts a unit of ``v`` (``S_b[row]``) into a unit of
    the base accumulator (``S_in * S_w[row]``).

    ``k``/``exp_max``: the input's per-vector exponent (W2 behind a SwiGLU with
    ``hid_exp_max = E``: ``x`` is in units of ``S_hid * 2**(k - E)``). ``mult_u``/``shift_u``
    are calibrated for the input unit ``S_hid`` (``k = E``) and ``mult_b``/``shift_b`` for the
    accumulator unit at ``k = 0`` (``S_hid * 2**-E * S_w``), so ``u_q`` has one scale whatever
    ``k`` is and ``delta`` lands in the accumulator's units of this vector. ``k = exp_max = 0``
    is the plain correction.
    """
    if not 0 <= k <= exp_max:
        raise ValueError(f"k ({k}) must lie in 0..exp_max ({exp_max})")
    u = nx.requantize(nx.matvec(a_q, x), mult_u, min(int(shift_u) + exp_max - k, SHIFT_MAX),
                      bits)
    v = nx.matvec(b_q, u)
    d = nx.rshift_round(v * np.asarray(mult_b, dtype=np.int64), min(int(shift_b) + k, SHIFT_MAX))
    if trace is not None:
        trace.update(u=u, v=v, delta=d)
    return d


def lora_accumulate(acc_w, x, a_q, mult_u, shift_u, b_q, mult_b, shift_b, *, bits=U_BITS, k=0,
                    exp_max=0):
    """``acc_total = acc_w + lora_delta(x, ...)``: what the base requantizer then consumes."""
    return (np.asarray(acc_w, dtype=np.int64)
            + lora_delta(x, a_q, mult_u, shift_u, b_q, mult_b, shift_b, bits=bits, k=k,
                         exp_max=exp_max))


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------

@dataclass
class QLoraMatrix:
    """The integers of one adapted matrix, zero-padded to ``r_max`` (see :func:`lora_delta`)."""

    name: str
    a_q: np.ndarray          # (r_max, cols) int8 values
    mult_u: np.ndarray       # (r_max,) unsigned, < 2**17
    shift_u: int
    b_q: np.ndarray          # (rows, r_max) int8 values
    mult_b: np.ndarray       # (rows,) unsigned, < 2**17
    shift_b: int

    @property
    def rows(self):
        return self.b_q.shape[0]

    @property
    def cols(self):
        return self.a_q.shape[1]

    @property
    def r_max(self):
        return self.a_q.shape[0]

    def delta(self, x, trace=None, *, k=0, exp_max=0):
        return lora_delta(x, self.a_q, self.mult_u, self.shift_u, self.b_q, self.mult_b,
                          self.shift_b, trace=trace, k=k, exp_max=exp_max)

    def acc_bound(self):
        """Largest ``|delta|`` any int8 input can produce (for accumulator sizing)."""
        umax = (1 << (U_BITS - 1))
        vmax = np.abs(self.b_q).sum(axis=1) * umax
        return int(nx.rshift_round(vmax * self.mult_b, self.shift_b).max(initial=0))


@dataclass
class QuantizedLora:
    """An adapter as the chip's LoRA SRAM holds it: per layer, one :class:`QLoraMatrix` for
    every target of the chip (all-zero where the adapter does not adapt that matrix)."""

    digest8: bytes           # first 8 bytes of the base QuantizedModel.digest()
    targets: tuple           # LORA_TARGETS order
    r_max: int
    rank: int
    layers: list             # per layer: {name: QLoraMatrix}
    name: str = "adapter"
    scales: dict = field(default_factory=dict, repr=False)   # float scales, for reports

    @property
    def n_layers(self):
        return len(self.layers)

    def get(self, layer, name):
        return self.layers[layer].get(name)


def base_digest8(qm):
    """The 8 bytes an image carries to name its base datapath."""
    return bytes.fromhex(qm.digest()[:16])


def input_scale(qm, layer, name):
    """Scale ``S_in`` of the int8 input of ``layers.{layer}.{name}``."""
    s, nc = qm.layers[layer].scales, qm.numerics
    if name in ("wq", "wk", "wv"):
        return s["attn_norm"]
    if name == "wo":
        return s["v"] * 2.0 ** (nc.qkv_bits - nc.act_bits)
    if name in ("w1", "w3"):
        return s["ffn_norm"]
    return s["hidden"]


# FloatModel trace name of each target's input
_INPUT_SITE = {"wq": "attn_norm", "wk": "attn_norm", "wv": "attn_norm", "wo": "att_out",
               "w1": "ffn_norm", "w3": "ffn_norm", "w2": "hidden"}


def _mult_shift(ratio, what):
    """Per-row multipliers and one shift: ``mult / 2**shift ~= ratio``; zero ratios stay 0."""
    ratio = np.asarray(ratio, dtype=np.float64)
    top = float(ratio.max(initial=0.0))
    if top == 0.0:
        return np.zeros(ratio.shape, dtype=np.int64), 0
    if not np.isfinite(top):
        raise UnsupportedConfigError(f"{what}: non-finite scale")
    shift = int(math.floor(math.log2(MULT_LIMIT / top)))
    if shift < 0:
        raise UnsupportedConfigError(f"{what}: scale ratio {top:.3g} too large for the integer "
                                     "requantizer")
    shift = min(shift, _SHIFT_LIMIT)
    return np.round(ratio * 2.0 ** shift).astype(np.int64), shift


def lora_input_ranges(merged, adapter, tokens):
    """``max_t |A_j x_t|`` per ``(layer, name)`` and rank row ``j``, with ``x_t`` the target's
    float input while ``merged`` (the model with the adapter) runs over ``tokens``."""
    from .reference import FloatModel
    fm = FloatModel(merged)
    umax = {k: np.zeros(a.shape[0]) for k, a in adapter.A.items()}
    for pos, tok in enumerate(tokens[: merged.config.seq_len]):
        tr = {}
        fm.step(tok, pos, trace=tr)
        for (layer, name), a in adapter.A.items():
            x = tr[f"L{layer}.{_INPUT_SITE[name]}"].astype(np.float64)
            np.maximum(umax[layer, name], np.abs(a.astype(np.float64) @ x), out=umax[layer, name])
    return umax


def quantize_lora(adapter, model, qm, *, targets=None, r_max=None, calib_tokens=None):
    """Quantize ``adapter`` for the chip compiled from ``model`` as ``qm``.

    Parameters
    ----------
    adapter : LoraAdapter
    model : LlamaModel
        The base model ``qm`` was quantized from.
    qm : QuantizedModel
        The etched datapath: input scales, weight row scales and its digest come from here.
    targets : sequence of str, optional
        The chip's LoRA-capable matrices (default: the adapter's); must include the adapter's.
    r_max : int, optional
        The chip's rank (default: the adapter's); smaller adapters are zero-padded.
    calib_tokens : sequence of int, optional
        Calibration sequence for the ranges of ``u`` (default: the greedy run from BOS of the
        model with the adapter, as :func:`~.quantize.default_calibration_tokens`).

    Returns
    -------
    QuantizedLora
    """
    c = model.config
    if qm.model_hash != model.content_hash():
        raise HardwireError(f"the quantized model was not made from {model.name}",
                            path=adapter.source or None)
    where = adapter.source or None
    targets = adapter.targets if targets is None else tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise HardwireError(f"unknown LoRA target {bad[0]!r} (targets: "
                            f"{', '.join(LORA_TARGETS)})", path=where)
    missing = [t for t in adapter.targets if t not in targets]
    if missing:
        raise UnsupportedConfigError(f"the adapter adapts {missing[0]} ({_LLAMA_TO_HF[missing[0]]})"
                                     f" but the chip's LoRA targets are {', '.join(targets)}",
                                     path=where)
    targets = tuple(t for t in LORA_TARGETS if t in targets)
    r_max = adapter.rank if r_max is None else int(r_max)
    if not 0 < r_max <= MAX_RANK:
        raise UnsupportedConfigError(f"r_max {r_max} must be between 1 and {MAX_RANK}",
                                     path=where)
    if adapter.rank > r_max:
        raise UnsupportedConfigError(f"rank r={adapter.rank} exceeds the chip's maximum rank "
                                     f"{r_max}", path=where)
    merged = apply_lora_float(model, adapter)
    if calib_tokens is None:
        calib_tokens = default_calibration_tokens(merged, starts=0)[0]
    umax = lora_input_ranges(merged, adapter, calib_tokens)
    shapes = c.tensor_shapes()
    qmax_u = (1 << (U_BITS - 1)) - 1
    layers, scales = [], {}
    for i in range(c.n_layers):
        mats = {}
        for name in targets:
            rows, cols = shapes[f"layers.{i}.{name}"]
            what = f"layers.{i}.{name} LoRA"
            a_q = np.zeros((r_max, cols), dtype=np.int64)
            b_q = np.zeros((rows, r_max), dtype=np.int64)
            mult_u, shift_u = np.zeros(r_max, dtype=np.int64), 0
            mult_b, shift_b = np.zeros(rows, dtype=np.int64), 0
            if (i, name) in adapter.A:
                A = adapter.A[i, name].astype(np.float64)
                B = adapter.B[i, name].astype(np.float64)
                s_in = input_scale(qm, i, name)
                s_w = getattr(qm.layers[i], name).scale
                aq, s_a = quantize_rows(A, LORA_WBITS)
                live = (np.abs(aq).max(axis=1) > 0) & (umax[i, name] > 0)
                s_u = np.where(live, umax[i, name] / qmax_u, 1.0)
                mu, shift_u = _mult_shift(np.where(live, s_a * s_in / s_u, 0.0), what)
                # B acting on integer u_q: fold the u scales (and the LoRA scale) into B
                bq, s_b = quantize_rows(adapter.scale * B * np.where(live, s_u, 0.0)[None, :],
                                        LORA_WBITS)
                brow = np.abs(bq).max(axis=1) > 0
                # W2's input has a per-vector exponent: delta is calibrated for the
                # accumulator unit at k = 0 (lora_delta adds k to shift_b)
                s_acc = s_in * s_w * (2.0 ** -qm.numerics.hid_exp_max if name == "w2" else 1.0)
                mb, shift_b = _mult_shift(np.where(brow, s_b / s_acc, 0.0), what)
                a_q[:adapter.rank] = np.where(live[:, None], aq, 0)
                mult_u[:adapter.rank] = mu
                b_q[:, :adapter.rank] = bq
                mult_b = mb
                scales[i, name] = {"s_in": s_in, "s_a": s_a, "s_u": s_u, "s_b": s_b}
            qlm = QLoraMatrix(name, a_q, mult_u, shift_u, b_q, mult_b, shift_b)
            acc_w = (1 << (qm.numerics.act_bits - 1)) * np.abs(getattr(qm.layers[i], name).q)
            if int(acc_w.sum(axis=1).max()) + qlm.acc_bound() >= 1 << (ACC_BITS - 1):
                raise UnsupportedConfigError(f"{what}: the corrected accumulator may overflow "
                                             f"{ACC_BITS} bits", path=where)
            mats[name] = qlm
        layers.append(mats)
    return QuantizedLora(base_digest8(qm), targets, r_max, adapter.rank, layers,
                         name=adapter.name, scales=scales)


# ---------------------------------------------------------------------------------------------
# Golden model with an adapter
# ---------------------------------------------------------------------------------------------

def _check_compatible(qm, qlora):
    if qlora.digest8 != base_digest8(qm):
        raise HardwireError(f"adapter {qlora.name} was packed for another base model or weight "
                            "width (digest mismatch)")
    if qlora.n_layers != qm.config.n_layers:
        raise HardwireError(f"adapter {qlora.name} has {qlora.n_layers} layers, the model "
                            f"{qm.config.n_layers}")


class LoraGoldenModel(GoldenModel):
    """The golden model with a LoRA adapter in the chip's SRAM.

    Each target matrix's accumulator gets :func:`lora_delta` of the same int8 input before the
    base requantization; every other operation is :class:`~.golden.GoldenModel`'s. The trace
    additionally names ``L{i}.{name}.lora_u`` and ``L{i}.{name}.lora_delta``. With an all-zero
    adapter the outputs are bit for bit the base model's.
    """

    def __init__(self, qm, qlora):
        _check_compatible(qm, qlora)
        super().__init__(qm)
        self.qlora = qlora
        self._trace = None

    def _accumulate(self, layer, m, a, trace=None, *, k=0, exp_max=0):
        """``m @ a`` plus the LoRA correction of ``layers.{layer}.{m.name}`` (``k``,
        ``exp_max``: the input's exponent, see :func:`lora_delta`); the base model
        requantizes it."""
        acc = nx.matvec(m.q, a)
        lm = self.qlora.get(layer, m.name)
        if lm is not None:
            t = {}
            acc = acc + lm.delta(a, trace=t, k=k, exp_max=exp_max)
            trace = self._trace if trace is None else trace
            if trace is not None:
                trace[f"L{layer}.{m.name}.lora_u"] = t["u"]
                trace[f"L{layer}.{m.name}.lora_delta"] = t["delta"]
        return acc

    def step(self, token, pos=None, *, trace=None):
        self._trace = trace
        try:
            return super().step(token, pos, trace=trace)
        finally:
            self._trace = None


def generate_golden_lora(qm, qlora, prompt_tokens, n, *, stop_on_bos=True):
    """Greedy generation with the golden model and an adapter (as ``generate_golden``)."""
    return generate_golden(qm, prompt_tokens, n, stop_on_bos=stop_on_bos,
                           golden=LoraGoldenModel(qm, qlora))