"""Folding plan of a chip: how many multipliers each unit gets, and the cycles that follow.

Every projection is a FINN-style folded matrix-vector unit: ``pe`` rows in parallel, ``simd``
input elements per row and cycle, so a vector takes ``steps = (rows/pe) * (cols/simd)``
cycles of its multipliers. :func:`plan_chip` picks, for every matrix, the cheapest divisors
(multipliers, plus :data:`LANE_COST` per output lane) that meet a common step target, so the
units of a layer are balanced (each takes about the same time, the heaviest bounds the layer).
The element-serial blocks (norms, RoPE, SwiGLU, embedding) get the fewest lanes that keep each
within a quarter of that bound, and attention the fewest parallel heads that sweep the first
32 cached positions within about one target.

:func:`predict_cycles` gives the cycles of one token at a position, stage by stage, with the
blocks' own cycle formulas written out here (``tests/test_plan.py`` checks them against the
blocks); :class:`hardwire.hdl.chip.LlamaChip.cycles_per_token` is the same sum taken from the
blocks themselves, and the chip testbench measures it.

Fold strings (``parse_fold``), comma-separated ``key=value`` items:

==========================  =====================================================================
item                        meaning
==========================  =====================================================================
``target=T``                step target of every matrix (cycles per vector, before pipeline)
``macs=N``                  multiplier budget: the smallest target whose matrices fit ``N``
``pe=P`` / ``simd=S``       every matrix: the largest divisor of its rows / cols not above P / S
                            (one given alone leaves the other unlimited)
``form=rom|const``          weights in block-RAM ROMs (default) or constant logic
``NAME=PxS[:FORM]``         one matrix in every layer, exact divisors; NAME is one of
                            ``wq wk wv wo w1 w3 w2`` or ``cls`` (the classifier)
``L<i>.NAME=PxS[:FORM]``    one matrix of layer ``i``
``attn=H``                  attention heads computed in parallel (divides n_heads)
``norm=N`` ``rope=N``       lanes of the RMSNorms, RoPEs (pairs per cycle),
``swiglu=N`` ``embed=N``    SwiGLU and embedding (each must divide its vector length)
``layers=dedicated|shared`` one decoder unit per layer (default), or one unit that holds every
                            layer's constants and computes the layers one after another
                            ("layer-serial": same cycles per token, about 1/n_layers of the
                            layer logic and flip-flops; every layer gets the same folds)
==========================  =====================================================================

For example ``"pe=4,simd=8"``, ``"target=128,attn=4"``, ``"wq=8x8,w2=4x4:const,attn=2"`` or
``"layers=shared,target=1000000000"``.
"""

import re
from dataclasses import dataclass, field

__all__ = [
    "MATRIX_NAMES",
    "ChipPlan",
    "MatrixFold",
    "attention_mac_units",
    "classifier_reads_embedding",
    "default_target",
    "mac_units",
    "parse_fold",
    "plan_chip",
    "predict_cycles",
    "rom_bits",
]

MATRIX_NAMES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
FORMS = ("rom", "const")
LANE_KEYS = ("attn", "norm", "rope", "swiglu", "embed")
LAYER_MODES = ("dedicated", "shared")
# cost of one MatVecUnit output lane (accumulator, requantizer multiply) in multipliers
LANE_COST = 4
# pipeline registers of a MatVecUnit between a row group's last step and its chunk
_MATVEC_DEPTH = {"rom": 6, "const": 5}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MatrixFold:
    """Folding of one ``rows x cols`` matrix: ``pe`` rows by ``simd`` columns per cycle."""

    rows: int
    cols: int
    pe: int
    simd: int
    form: str = "rom"

    def __post_init__(self):
        if self.pe < 1 or self.rows % self.pe:
            raise ValueError(f"pe ({self.pe}) must divide rows ({self.rows})")
        if self.simd < 1 or self.cols % self.simd:
            raise ValueError(f"simd ({self.simd}) must divide cols ({self.cols})")
        if self.form not in FORMS:
            raise ValueError(f"form must be 'rom' or 'const', not {self.form!r}")

    @property
    def steps(self):
        """Cycles of the multipliers per vector: ``(rows/pe) * (cols/simd)``."""
        return (self.rows // self.pe) * (self.cols // self.simd)

    @property
    def mac_units(self):
        return self.pe * self.simd

    def cycles(self):
        """Input transfer to the whole output vector's ``valid``: the unit's
        ``cycles_per_vector()`` (``steps`` + pipeline) plus 1 for the chunk gather when
        there is more than one row group."""
        return self.steps + _MATVEC_DEPTH[self.form] + (1 if self.rows > self.pe else 0)

    def label(self):
        return f"{self.pe}x{self.simd}" + ("" if self.form == "rom" else ":const")


@dataclass
class ChipPlan:
    """Folding of every unit of a chip.

    ``matrices`` maps ``"L{i}.{name}"`` (name in :data:`MATRIX_NAMES`) and ``"classifier"``
    to a :class:`MatrixFold`. ``head_lanes``: attention heads in parallel; ``norm_lanes``,
    ``rope_lanes`` (pairs per cycle, q and k), ``swiglu_lanes``, ``embed_lanes``: elements per
    cycle of those blocks. The argmax takes the classifier's chunks, so its lanes are the
    classifier's ``pe``. ``target`` is the step target the plan was made for (informative).
    ``shared_layers``: one decoder unit computes every layer in turn (``layers=shared``); the
    layers' folds are then identical, and ``matrices`` still lists them per layer.
    """

    matrices: dict
    head_lanes: int
    norm_lanes: int
    rope_lanes: int
    swiglu_lanes: int
    embed_lanes: int
    target: int | None = None
    shared_layers: bool = False
    n_heads: int = field(default=0, repr=False)
    head_size: int = field(default=0, repr=False)

    @property
    def argmax_lanes(self):
        return self.matrices["classifier"].pe

    @property
    def n_layers(self):
        return sum(1 for k in self.matrices if k.endswith(".wq"))

    def layer(self, i):
        """``{name: MatrixFold}`` of layer ``i``."""
        return {n: self.matrices[f"L{i}.{n}"] for n in MATRIX_NAMES}

    def summary(self):
        """One line per distinct layer folding, plus the other units."""
        lines = []
        layers = [tuple(self.layer(i)[n] for n in MATRIX_NAMES) for i in range(self.n_layers)]
        for i, folds in enumerate(layers):
            if i and folds == layers[i - 1]:
                continue
            same = [j for j, f in enumerate(layers) if f == folds]
            which = f"L{i}" if len(same) == 1 else f"L{same[0]}..L{same[-1]}"
            if self.shared_layers:
                which = f"L0..L{self.n_layers - 1} (one shared unit)"
            lines.append(f"{which}: " + ", ".join(
                f"{n} {f.label()} ({f.steps} steps)" for n, f in zip(MATRIX_NAMES, folds)))
        cls = self.matrices["classifier"]
        lines.append(f"classifier {cls.label()} ({cls.steps} steps); attention "
                     f"{self.head_lanes} head lanes; lanes: norm {self.norm_lanes}, rope "
                     f"{self.rope_lanes}, swiglu {self.swiglu_lanes}, embed {self.embed_lanes}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- fold strings

_FOLD_RE = re.compile(r"^(\d+)x(\d+)(?::(rom|const))?$")
_NAME_RE = re.compile(r"^(?:L(\d+)\.)?(wq|wk|wv|wo|w1|w3|w2|cls)$")


def _positive(key, text):
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"fold: {key}={text!r} is not an integer") from None
    if v < 1:
        raise ValueError(f"fold: {key} must be positive, not {v}")
    return v


def parse_fold(text):
    """Parse a fold string (syntax in the module docstring) into a dict.

    Keys of the result: ``target``, ``macs``, ``pe``, ``simd``, ``form``, ``layers``, the lane keys
    ``attn norm rope swiglu embed`` (ints), and ``matrices``: ``{"wq" | "L2.wq" | "cls":
    (pe, simd, form or None)}``. Raises ``ValueError`` with a one-line message.
    """
    out = {"matrices": {}}
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise ValueError("fold: empty fold string")
    for item in items:
        if "=" not in item:
            raise ValueError(f"fold: expected KEY=VALUE, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in out or key in out["matrices"]:
            raise ValueError(f"fold: {key} is given twice")
        if key in ("target", "macs", "pe", "simd", *LANE_KEYS):
            out[key] = _positive(key, value)
        elif key == "form":
            if value not in FORMS:
                raise ValueError(f"fold: form must be rom or const, not {value!r}")
            out[key] = value
        elif key == "layers":
            if value not in LAYER_MODES:
                raise ValueError(f"fold: layers must be dedicated or shared, not {value!r}")
            out[key] = value
        elif _NAME_RE.match(key):
            m = _FOLD_RE.match(value)
            if not m:
                raise ValueError(f"fold: {key}={value!r}: expected PExSIMD, e.g. 8x4 or "
                                 "8x4:const")
            pe, simd = int(m.group(1)), int(m.group(2))
            if pe < 1 or simd < 1:
                raise ValueError(f"fold: {key}={value!r}: pe and simd must be positive")
            out["matrices"][key] = (pe, simd, m.group(3))
        else:
            raise ValueError(f"fold: unknown key {key!r} (target, macs, pe, simd, form, layers, "
                             f"{', '.join(LANE_KEYS)}, a matrix {'/'.join(MATRIX_NAMES)}/cls "
                             "or L<i>.<matrix>)")
    return out


# ----------------------------------------------------------------------------------- planning

def _shapes(config):
    c = config
    return {"wq": (c.dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
            "wo": (c.dim, c.dim), "w1": (c.hidden_dim, c.dim), "w3": (c.hidden_dim, c.dim),
            "w2": (c.dim, c.hidden_dim)}


def _fit(rows, cols, target, form):
    """The cheapest ``(pe, simd)`` with ``steps <= target``: cost ``pe * simd`` multipliers
    plus :data:`LANE_COST` per output lane ``pe`` (each lane has its own accumulator and
    requantizer multiply), so columns are preferred to rows; ties go to fewer steps."""
    best = None
    for pe in _divisors(rows):
        for simd in _divisors(cols):
            steps = (rows // pe) * (cols // simd)
            if steps > target:
                continue
            key = (pe * simd + LANE_COST * pe, steps)
            if best is None or key < best[0]:
                best = (key, pe, simd)
    return MatrixFold(rows, cols, best[1], best[2], form)


def _cap(rows, cols, pe, simd, form):
    """Largest divisors not above ``pe`` / ``simd``."""
    return MatrixFold(rows, cols, max(d for d in _divisors(rows) if d <= pe),
                      max(d for d in _divisors(cols) if d <= simd), form)


def _lanes(n, budget):
    """Fewest lanes that pass ``n`` elements in at most ``budget`` cycles."""
    return min(d for d in _divisors(n) if n // d <= max(1, budget))


def _head_lanes(n_heads, target):
    """Fewest heads in parallel whose cache sweeps cost at most ``target / 64`` cycles per
    row (two sweeps per head group), so attention over the first 32 positions takes about
    one target."""
    return min(h for h in _divisors(n_heads) if 2 * (n_heads // h) <= max(2, target // 64))


def default_target(config):
    """Step target of the default plan: ``4 * dim`` cycles per matrix (a ``dim x dim``
    matrix gets ``dim / 4`` multipliers)."""
    return 4 * config.dim


def _plan_for_target(qm, target, spec):
    c = qm.config
    form = spec.get("form", "rom")
    shared = spec.get("layers", "dedicated") == "shared"
    shapes = dict(_shapes(c), cls=(c.vocab_size, c.dim))
    mats = spec["matrices"]

    def fold(name, key):
        rows, cols = shapes[name]
        for k in (key, name):
            if k in mats:
                pe, simd, f = mats[k]
                try:
                    return MatrixFold(rows, cols, pe, simd, f or form)
                except ValueError as e:
                    raise ValueError(f"fold: {k}: {e}") from None
        if "pe" in spec or "simd" in spec:
            return _cap(rows, cols, spec.get("pe", rows), spec.get("simd", cols), form)
        return _fit(rows, cols, target, form)

    for k in mats:
        m = _NAME_RE.match(k)
        if m.group(1) is not None and int(m.group(1)) >= c.n_layers:
            raise ValueError(f"fold: {k}: the model has {c.n_layers} layers")
        if m.group(1) is not None and m.group(2) == "cls":
            raise ValueError(f"fold: {k}: the classifier is not in a layer")
        if shared and m.group(1) is not None:
            raise ValueError(f"fold: {k}: with layers=shared every layer has the same folds "
                             f"(give {m.group(2)}=PxS)")
    matrices = {}
    for i in range(c.n_layers):
        for n in MATRIX_NAMES:
            matrices[f"L{i}.{n}"] = fold(n, f"L{i}.{n}")
    matrices["classifier"] = fold("cls", "cls")
    if shared:
        const = [n for n in MATRIX_NAMES if matrices[f"L0.{n}"].form != "rom"]
        if const:
            raise ValueError(f"fold: {const[0]}: with layers=shared the layer matrices must be "
                             "rom (the shared unit reads each layer's weights from one ROM)")
    bound = max(f.steps for k, f in matrices.items() if k != "classifier")

    def lanes(key, n, what, default):
        if key in spec:
            if n % spec[key]:
                raise ValueError(f"fold: {key}={spec[key]} must divide {what} ({n})")
            return spec[key]
        return default

    # element-serial blocks take at most a quarter of the bound (RMSNorm reads twice)
    kv_pairs, quarter = c.kv_dim // 2, bound // 4
    return ChipPlan(
        matrices=matrices,
        head_lanes=lanes("attn", c.n_heads, "n_heads", _head_lanes(c.n_heads, bound)),
        norm_lanes=lanes("norm", c.dim, "dim", _lanes(c.dim, quarter // 2)),
        rope_lanes=lanes("rope", kv_pairs, "kv_dim / 2",
                         min(d for d in _divisors(kv_pairs)
                             if c.dim // 2 // d <= max(1, quarter) or d == kv_pairs)),
        swiglu_lanes=lanes("swiglu", c.hidden_dim, "hidden_dim", _lanes(c.hidden_dim, quarter)),
        embed_lanes=lanes("embed", c.dim, "dim", _lanes(c.dim, quarter)),
        target=target, shared_layers=shared, n_heads=c.n_heads, head_size=c.head_size)


def plan_chip(qm, *, target_cycles=None, mac_budget=None, fold=None):
    """Folding plan for a :class:`~.quantize.QuantizedModel`.

    Each matrix gets the ``(pe, simd)`` (divisors of its rows and columns) with the fewest
    multipliers whose ``steps`` stay within the target, so every unit of a layer takes about
    the same time. The target is ``target_cycles``; else the smallest one whose projection and
    classifier multipliers fit ``mac_budget``; else the fold string's ``target``/``macs``;
    else :func:`default_target`. ``fold`` (a string or :func:`parse_fold` dict) overrides
    single matrices and lanes. Raises ``ValueError`` for folds that do not fit the model.
    """
    c = qm.config
    spec = parse_fold(fold) if isinstance(fold, str) else dict(fold or {"matrices": {}})
    spec.setdefault("matrices", {})
    if target_cycles is not None and target_cycles < 1:
        raise ValueError(f"target_cycles must be positive, not {target_cycles}")
    if mac_budget is not None and mac_budget < 1:
        raise ValueError(f"mac_budget must be positive, not {mac_budget}")
    target = target_cycles if target_cycles is not None else spec.get("target")
    budget = mac_budget if mac_budget is not None else spec.get("macs")
    if target is None and budget is not None:
        shapes = list(_shapes(c).values()) + [(c.vocab_size, c.dim)]
        candidates = sorted({(r // p) * (k // s) for r, k in shapes
                             for p in _divisors(r) for s in _divisors(k)})
        for t in candidates:
            plan = _plan_for_target(qm, t, spec)
            if mac_units(plan) <= budget:
                return plan
        least = mac_units(_plan_for_target(qm, candidates[-1], spec))
        raise ValueError(f"mac budget {budget} is below the {least} multipliers of the "
                         "most folded plan")
    return _plan_for_target(qm, default_target(c) if target is None else target, spec)


# ------------------------------------------------------------------------------------- cycles

def predict_cycles(qm, plan, pos):
    """Cycles of one token at ``pos``, stage by stage on the critical path: ``embed``,
    ``L{i}.attn_norm``, ``L{i}.qkv`` (slowest of q+RoPE, k+RoPE, v), ``L{i}.attention``,
    ``L{i}.wo``, ``L{i}.attn_res``, ``L{i}.ffn_norm``, ``L{i}.w1w3``, ``L{i}.swiglu``,
    ``L{i}.w2``, ``L{i}.ffn_res`` (a layer-serial plan also ``L{i}.handoff``, 1, for every
    layer but the last), ``final_norm``, ``classifier``, ``argmax``, and ``total``
    (= ``LlamaChip.cycles_per_token(pos)``)."""
    c = qm.config
    if not 0 <= pos < c.seq_len:
        raise ValueError(f"pos ({pos}) must lie in [0, seq_len = {c.seq_len})")
    norm = 2 * (c.dim // plan.norm_lanes) + 9
    rope = {n: n // (2 * plan.rope_lanes) + 4 for n in (c.dim, c.kv_dim)}
    out = {"embed": c.dim // plan.embed_lanes + 3}
    for i in range(c.n_layers):
        f = plan.layer(i)
        out.update({
            f"L{i}.attn_norm": norm,
            f"L{i}.qkv": max(f["wq"].cycles() + rope[c.dim], f["wk"].cycles() + rope[c.kv_dim],
                             f["wv"].cycles()),
            f"L{i}.attention": 2 * (c.n_heads // plan.head_lanes) * (pos + 1) + 16,
            f"L{i}.wo": f["wo"].cycles(),
            f"L{i}.attn_res": 1,
            f"L{i}.ffn_norm": norm,
            f"L{i}.w1w3": max(f["w1"].cycles(), f["w3"].cycles()),
            # + 2 with a per-vector exponent (the max/min stage and the exponent register)
            f"L{i}.swiglu": (c.hidden_dim // plan.swiglu_lanes + 4
                             + (2 if qm.numerics.hid_exp_max else 0)),
            f"L{i}.w2": f["w2"].cycles(),
            f"L{i}.ffn_res": 1,
        })
        if plan.shared_layers and i < c.n_layers - 1:
            # the shared unit's output goes back to its input a cycle after the layer
            # counter moved on (LlamaChip's layer-serial loop)
            out[f"L{i}.handoff"] = 1
    cls = plan.matrices["classifier"]
    out["final_norm"] = norm
    out["classifier"] = cls.steps + _MATVEC_DEPTH[cls.form]
    out["argmax"] = 1
    out["total"] = sum(out.values())
    return out


def mac_units(plan):
    """Multipliers of the projections and the classifier: ``sum(pe * simd)`` (one layer's
    units when the layers share one, :attr:`ChipPlan.shared_layers`)."""
    return sum(f.mac_units for k, f in plan.matrices.items()
               if not (plan.shared_layers and k.startswith("L") and not k.startswith("L0.")))


def attention_mac_units(plan):
    """Multipliers of the attention lanes: a ``head_size`` dot product and a ``head_size``
    row update per head lane and decoder unit (one unit when the layers share one)."""
    units = 1 if plan.shared_layers else plan.n_layers
    return units * plan.head_lanes * 2 * plan.head_size


def classifier_reads_embedding(qm, plan):
    """Whether the chip's classifier reads the embedding table's ROM instead of its own copy:
    a tied classifier (the same integer table, the same width) folded ``1 x embed_lanes`` in
    a ROM, whose words are then exactly the embedding ROM's rows."""
    import numpy as np
    f = plan.matrices["classifier"]
    return bool(qm.config.shared_classifier and f.form == "rom" and f.pe == 1
                and f.simd == plan.embed_lanes and qm.classifier.bits == qm.embed.bits
                and np.array_equal(qm.classifier.q, qm.embed.q))


def rom_bits(qm, plan):
    """Weight bits held in block-RAM ROMs, by unit (``embed``, ``L{i}.{name}``,
    ``classifier``) plus ``total``. Matrices of form ``const`` are logic and count 0. With a
    shared classifier its table is the embedding's; it counts twice unless the classifier
    reads the embedding's ROM (:func:`classifier_reads_embedding`)."""
    out = {"embed": qm.embed.q.size * qm.embed.bits}
    for i, L in enumerate(qm.layers):
        for n in MATRIX_NAMES:
            m = getattr(L, n)
            out[f"L{i}.{n}"] = m.q.size * m.bits if plan.matrices[f"L{i}.{n}"].form == "rom" \
                else 0
    cl = qm.classifier
    own = plan.matrices["classifier"].form == "rom" and not classifier_reads_embedding(qm, plan)
    out["classifier"] = cl.q.size * cl.bits if own else 0
    out["total"] = sum(out.values())
    return out

