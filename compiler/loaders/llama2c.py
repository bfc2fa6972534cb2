"""Read and write llama2.c checkpoints (``.bin``).

Three layouts exist, all little-endian:

* **legacy** (version 0, what ``run.c`` reads): a header of 7 ``int32`` -- dim, hidden_dim,
  n_layers, n_heads, n_kv_heads, vocab_size, seq_len -- where a *negative* vocab_size means the
  classifier is not shared with the token embedding. Then ``float32`` weights grouped by kind over
  all layers: token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the old
  RoPE tables ``freq_cis_real``/``freq_cis_imag`` (``seq_len * head_size / 2`` each, skipped on
  load), and the classifier if it is not shared.
* **version 1** (``export.py --version 1``): a 256-byte header -- ``uint32`` magic ``0x616b3432``
  ("ak42"), ``int32`` version, the 7 ``int32`` params (vocab_size positive), ``uint8``
  shared_classifier, zero padding. Then ``float32``: rms_att (all layers), rms_ffn, rms_final,
  token embedding, wq, wk, wv, wo, w1, w2, w3, and the classifier if not shared. No RoPE tables.
* **version 2** (``export.py --version 2``, read by ``runq.c``): as version 1 plus an ``int32``
  group_size right after the flag byte (offset 37). The norms are ``float32``; every other matrix
  (embedding, wq, wk, wv, wo, w1, w2, w3, classifier) is Q8_0: for each tensor its ``int8`` values
  then its ``float32`` per-group scales. Loading dequantizes to ``float32`` (``q * scale``).
"""

from pathlib import Path

import numpy as np

from ..errors import HardwireError, ModelFormatError, UnsupportedConfigError
from ..model import LlamaConfig, LlamaModel

__all__ = ["load_llama2c", "save_llama2c", "AK42_MAGIC", "rope_tables"]

AK42_MAGIC = 0x616B3432
HEADER_V0 = 7 * 4
HEADER_V1 = 256
# Any header value beyond this is not a model anyone could mean: the file is not a checkpoint.
_SANE_MAX = 1 << 24
_PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def rope_tables(config):
    """The legacy ``freq_cis_real``/``freq_cis_imag`` tables, as ``model.py`` computed them.

    Returns two ``float32`` arrays of shape ``(seq_len, head_size // 2)``.
    """
    hs = config.head_size
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, hs, 2)[: hs // 2].astype(np.float32) / hs))
    angles = np.outer(np.arange(config.seq_len, dtype=np.float32), freqs.astype(np.float32))
    a64 = angles.astype(np.float64)  # correctly rounded cos/sin, like torch on CPU
    return np.cos(a64).astype(np.float32), np.sin(a64).astype(np.float32)


def _config_from_header(vals, path, *, shared):
    """Check the 7 header ints for sanity and build (and validate) a :class:`LlamaConfig`."""
    named = dict(zip(_PARAMS, (int(v) for v in vals)))
    for name, v in named.items():
        if not 0 < v <= _SANE_MAX:
            raise ModelFormatError(
                f"not a llama2.c checkpoint: header {name}={v} is not a plausible value",
                path=path)
    config = LlamaConfig(
        dim=named["dim"], n_layers=named["n_layers"], n_heads=named["n_heads"],
        n_kv_heads=named["n_kv_heads"], hidden_dim=named["hidden_dim"],
        vocab_size=named["vocab_size"], seq_len=named["seq_len"], shared_classifier=shared)
    config.validate(path=path)
    return config


def _check_size(actual, expected, path, what):
    if actual < expected:
        raise ModelFormatError(
            f"truncated {what}: header implies {expected} bytes but the file has {actual}",
            path=path)
    if actual > expected:
        raise ModelFormatError(
            f"{what} size mismatch: header implies {expected} bytes but the file has {actual} "
            f"({actual - expected} trailing bytes)", path=path)


def _layer_groups(config, kinds):
    """(name, shape) for each kind over all layers, in llama2.c's grouped order."""
    shapes = config.tensor_shapes()
    out = []
    for kind in kinds:
        if kind in ("tok_embeddings", "norm", "output"):
            out.append((kind, shapes[kind]))
        else:
            out.extend((f"layers.{i}.{kind}", shapes[f"layers.{i}.{kind}"])
                       for i in range(config.n_layers))
    return out


def _v0_layout(config):
    """Tensor order of the legacy format; ``None`` marks the skipped RoPE tables."""
    c = config
    order = _layer_groups(c, ("tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo",
                              "ffn_norm", "w1", "w2", "w3", "norm"))
    order.append((None, (2, c.seq_len, c.head_size // 2)))
    if not c.shared_classifier:
        order.append(("output", (c.vocab_size, c.dim)))
    return order


def _v1_layout(config):
    order = _layer_groups(config, ("attention_norm", "ffn_norm", "norm", "tok_embeddings",
                                   "wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    if not config.shared_classifier:
        order.append(("output", (config.vocab_size, config.dim)))
    return order


def _v2_layouts(config):
    """(float32 norms, Q8_0 matrices) of the version-2 format."""
    norms = _layer_groups(config, ("attention_norm", "ffn_norm", "norm"))
    quant = _layer_groups(config, ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    if not config.shared_classifier:
        quant.append(("output", (config.vocab_size, config.dim)))
    return norms, quant


def _n(shape):
    return int(np.prod(shape, dtype=np.int64))


def _read_float32(data, offset, layout):
    """Copy the float32 tensors of ``layout`` out of ``data`` starting at byte ``offset``."""
    tensors = {}
    for name, shape in layout:
        count = _n(shape)
        if name is not None:
            arr = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
            tensors[name] = arr.astype(np.float32).reshape(shape)
        offset += 4 * count
    return tensors


def _name_of(path):
    return Path(path).stem or "model"


def _load_legacy(data, path):
    if len(data) < HEADER_V0:
        raise ModelFormatError(
            f"file too short for a llama2.c header ({len(data)} bytes, need {HEADER_V0})",
            path=path)
    vals = np.frombuffer(data, dtype="<i4", count=7).tolist()
    shared = vals[5] > 0
    vals[5] = abs(vals[5])
    config = _config_from_header(vals, path, shared=shared)
    layout = _v0_layout(config)
    _check_size(len(data), HEADER_V0 + 4 * sum(_n(s) for _, s in layout), path,
                "llama2.c checkpoint")
    return config, _read_float32(data, HEADER_V0, layout)


def _load_versioned(data, path):
    if len(data) < HEADER_V1:
        raise ModelFormatError(
            f"file too short for an ak42 llama2.c header ({len(data)} bytes, need {HEADER_V1})",
            path=path)
    version = int(np.frombuffer(data, dtype="<i4", count=1, offset=4)[0])
    if version not in (1, 2):
        raise ModelFormatError(
            f"unsupported llama2.c checkpoint version {version} (supported: legacy, 1, 2)",
            path=path)
    vals = np.frombuffer(data, dtype="<i4", count=7, offset=8).tolist()
    flag = data[36]
    if flag not in (0, 1):
        raise ModelFormatError(f"shared_classifier flag is {flag}, expected 0 or 1", path=path)
    config = _config_from_header(vals, path, shared=bool(flag))
    what = f"llama2.c v{version} checkpoint"
    if version == 1:
        layout = _v1_layout(config)
        _check_size(len(data), HEADER_V1 + 4 * sum(_n(s) for _, s in layout), path, what)
        return config, _read_float32(data, HEADER_V1, layout)

    gs = int(np.frombuffer(data, dtype="<i4", count=1, offset=37)[0])
    norms, quant = _v2_layouts(config)
    for name, shape in quant:
        if gs <= 0 or _n(shape) % gs:
            raise ModelFormatError(
                f"Q8_0 group size {gs} does not divide tensor {name} of shape {shape}", path=path)
    size = HEADER_V1 + 4 * sum(_n(s) for _, s in norms)
    size += sum(_n(s) + 4 * (_n(s) // gs) for _, s in quant)
    _check_size(len(data), size, path, what)
    tensors = _read_float32(data, HEADER_V1, norms)
    offset = HEADER_V1 + 4 * sum(_n(s) for _, s in norms)
    for name, shape in quant:
        count = _n(shape)
        q = np.frombuffer(data, dtype=np.int8, count=count, offset=offset)
        offset += count
        s = np.frombuffer(data, dtype="<f4", count=count // gs, offset=offset)
        offset += 4 * (count // gs)
        w = q.reshape(-1, gs).astype(np.float32) * s.astype(np.float32)[:, None]
        tensors[name] = w.reshape(shape)
    return config, tensors


def load_llama2c(path):
    """Load a llama2.c checkpoint (legacy, version 1 or version 2 Q8_0).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.bin`` file.

    Returns
    -------
    LlamaModel
        Named after the file's stem. Version-2 weights are dequantized to ``float32``.

    Raises
    ------
    ModelFormatError
        The file is too short, its header is implausible, its size does not match the header,
        or a weight is NaN/Inf.
    UnsupportedConfigError
        The header is a valid Llama shape that hardwire cannot build.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise HardwireError("no such file", path=path) from None
    except OSError as e:
        raise HardwireError(f"cannot read: {e.strerror}", path=path) from None
    if len(data) >= 4 and int(np.frombuffer(data, dtype="<u4", count=1)[0]) == AK42_MAGIC:
        config, tensors = _load_versioned(data, path)
    else:
        config, tensors = _load_legacy(data, path)
    return LlamaModel(config=config, tensors=tensors, name=_name_of(path), source=path)


def _quantize_q80(w, gs):
    """Q8_0 as llama2.c ``export.py``: symmetric int8 in [-127, 127], float32 scale per group."""
    w = w.astype(np.float32).reshape(-1, gs)
    scale = (np.abs(w).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.round(w / safe[:, None]).astype(np.int8)
    return q, scale


def save_llama2c(model, path, *, version=0, group_size=64):
    """Write ``model`` as a llama2.c checkpoint.

    Parameters
    ----------
    model : LlamaModel
    path : str or os.PathLike
    version : {0, 1, 2}
        0 is the legacy format ``run.c`` reads (with the RoPE tables), 1 the ak42 float32
        format, 2 the ak42 Q8_0 format (lossy).
    group_size : int
        Q8_0 group size for version 2; halved until it divides ``dim``, as ``export.py`` does.
    """
    c = model.config
    t = model.tensors
    if c.norm_eps != 1e-5 or c.rope_theta != 10000.0:
        raise UnsupportedConfigError(
            "llama2.c checkpoints cannot record norm_eps/rope_theta other than 1e-5/10000",
            path=path)
    params = [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len]

    def f32(name):
        return np.ascontiguousarray(t[name], dtype="<f4").tobytes()

    parts = []
    if version == 0:
        if not c.shared_classifier:
            params[5] = -params[5]
        parts.append(np.array(params, dtype="<i4").tobytes())
        for name, _ in _v0_layout(c):
            if name is None:
                parts.extend(a.astype("<f4").tobytes() for a in rope_tables(c))
            else:
                parts.append(f32(name))
    elif version in (1, 2):
        header = bytearray(HEADER_V1)
        header[0:4] = np.array([AK42_MAGIC], dtype="<u4").tobytes()
        header[4:8] = np.array([version], dtype="<i4").tobytes()
        header[8:36] = np.array(params, dtype="<i4").tobytes()
        header[36] = int(c.shared_classifier)
        if version == 1:
            parts.append(bytes(header))
            parts.extend(f32(name) for name, _ in _v1_layout(c))
        else:
            gs = group_size
            while c.dim % gs:
                gs //= 2
            header[37:41] = np.array([gs], dtype="<i4").tobytes()
            parts.append(bytes(header))
            norms, quant = _v2_layouts(c)
            parts.extend(f32(name) for name, _ in norms)
            for name, shape in quant:
                if _n(shape) % gs:
                    raise ModelFormatError(
                        f"Q8_0 group size {gs} does not divide tensor {name}", path=path)
                q, s = _quantize_q80(t[name], gs)
                parts.append(q.tobytes())
                parts.append(s.astype("<f4").tobytes())
    else:
        raise ValueError(f"unknown llama2.c checkpoint version {version}")
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)

