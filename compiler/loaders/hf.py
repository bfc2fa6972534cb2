"""Read and write Hugging Face ``LlamaForCausalLM`` checkpoints (``config.json`` + safetensors).

Hugging Face stores Q/K rows permuted for its rotate-half RoPE: within each head, the rows that
llama2.c keeps as adjacent pairs ``(2j, 2j+1)`` are moved to ``(j, j + head_size/2)``. Loading
undoes this (``unpermute``), saving applies it (``permute``), exactly as llama2.c's
``export.py`` / transformers' ``convert_llama_weights_to_hf.py`` do; K uses ``n_kv_heads``.
"""

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import HardwireError, ModelFormatError, UnsupportedConfigError
from ..model import LlamaConfig, LlamaModel
from ._common import cap_seq_len

__all__ = ["load_hf", "save_hf", "permute", "unpermute", "HF_LAYER_NAMES"]

# hardwire per-layer name -> HF name suffix under model.layers.{i}.
HF_LAYER_NAMES = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}
_GLOBAL_NAMES = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight",
                 "output": "lm_head.weight"}


def permute(w, n_heads):
    """llama2.c row order -> Hugging Face rotate-half row order (per head)."""
    rows, cols = w.shape
    return (w.reshape(n_heads, rows // n_heads // 2, 2, cols)
            .transpose(0, 2, 1, 3).reshape(rows, cols))


def unpermute(w, n_heads):
    """Hugging Face rotate-half row order -> llama2.c row order; inverse of :func:`permute`."""
    rows, cols = w.shape
    return (w.reshape(n_heads, 2, rows // n_heads // 2, cols)
            .transpose(0, 2, 1, 3).reshape(rows, cols))


def _hf_name(name):
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, i, kind = name.split(".")
    return f"model.layers.{i}.{HF_LAYER_NAMES[kind]}"


def _read_config(path):
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelFormatError("no config.json in this directory", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = " ".join(str(e).split())
        raise ModelFormatError(f"config.json is not valid JSON ({msg})", path=path) from None
    if not isinstance(cfg, dict):
        raise ModelFormatError("config.json is not a JSON object", path=path)
    return cfg


def _config(cfg, path, seq_len):
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
        raise UnsupportedConfigError(
            f"only LlamaForCausalLM is supported, not {cfg.get('model_type')!r} {arch}",
            path=path)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"hidden_act {cfg['hidden_act']!r} is not silu", path=path)
    if cfg.get("rope_scaling"):
        raise UnsupportedConfigError("RoPE scaling is not supported", path=path)
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UnsupportedConfigError(f"{flag} is not supported", path=path)
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        declared = int(cfg["max_position_embeddings"])
        head_dim = cfg.get("head_dim")
        if head_dim is not None and n_heads and int(head_dim) != dim // n_heads:
            raise UnsupportedConfigError(
                f"head_dim {head_dim} != hidden_size / num_attention_heads", path=path)
        declared = cap_seq_len(seq_len, declared, path)
        config = LlamaConfig(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            seq_len=declared,
            shared_classifier=bool(cfg.get("tie_word_embeddings", True)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
        )
    except KeyError as e:
        raise ModelFormatError(f"config.json lacks {e.args[0]}", path=path) from None
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"config.json has a bad value ({e})", path=path) from None
    config.validate(path=path)
    return config


def _safetensors_files(path):
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"bad model.safetensors.index.json ({e})", path=path) from None
        return [path / f for f in sorted(set(weight_map.values()))]
    raise ModelFormatError("no model.safetensors (or index) in this directory", path=path)


def _read_bf16(file, names):
    """Read BF16 tensors straight from the safetensors layout (numpy has no bfloat16)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name in names:
            info = header[name]
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def _read_tensors(files, path):
    from safetensors import safe_open
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as f:
                for name in f.keys():
                    try:
                        tensors[name] = np.array(f.get_tensor(name), dtype=np.float32)
                    except (TypeError, ValueError):
                        tensors.update(_read_bf16(file, [name]))
        except FileNotFoundError:
            raise ModelFormatError(f"missing weight file {file.name}", path=path) from None
        except HardwireError:
            raise
        except Exception as e:  # safetensors raises SafetensorError and others
            msg = " ".join(str(e).split())
            raise ModelFormatError(f"{file.name} is not a valid safetensors file ({msg})",
                                   path=path) from None
    return tensors


def load_hf(path, *, seq_len=None):
    """Load a Hugging Face Llama checkpoint directory.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
    seq_len : int, optional
        Cap the context (must not exceed ``max_position_embeddings``).

    Returns
    -------
    LlamaModel
        Named after the directory; Q/K rows converted to llama2.c order.
    """
    path = Path(path)
    if not path.exists():
        raise HardwireError("no such file", path=path)
    if not path.is_dir():
        raise ModelFormatError("a Hugging Face checkpoint must be a directory", path=path)
    config = _config(_read_config(path), path, seq_len)
    hf = _read_tensors(_safetensors_files(path), path)
    if config.shared_classifier:
        hf.pop("lm_head.weight", None)  # tied: transformers ignores a stored lm_head
    tensors = {}
    for name in config.tensor_shapes():
        key = _hf_name(name)
        if key not in hf:
            raise ModelFormatError(f"missing tensor {key}", path=path)
        tensors[name] = hf.pop(key)
    extra = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise UnsupportedConfigError(f"unexpected tensor {extra[0]}", path=path)
    c = config
    for i in range(c.n_layers):
        for kind, heads in (("wq", c.n_heads), ("wk", c.n_kv_heads)):
            w = tensors[f"layers.{i}.{kind}"]
            if w.ndim == 2 and w.shape[0] % (2 * heads) == 0:
                tensors[f"layers.{i}.{kind}"] = unpermute(w, heads)
    return LlamaModel(config=config, tensors=tensors, name=path.name or "model",
                      source=str(path))


def save_hf(model, path):
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` directory (float32).

    Creates ``path`` if needed and writes ``config.json`` and ``model.safetensors``; Q/K rows
    are permuted to Hugging Face order. A shared classifier is written as
    ``tie_word_embeddings: true`` without ``lm_head.weight``.
    """
    from safetensors.numpy import save_file
    c = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in c.tensor_shapes():
        w = np.ascontiguousarray(model.tensors[name], dtype=np.float32)
        kind = name.rsplit(".", 1)[-1]
        if kind == "wq":
            w = permute(w, c.n_heads)
        elif kind == "wk":
            w = permute(w, c.n_kv_heads)
        out[_hf_name(name)] = np.ascontiguousarray(w)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.shared_classifier,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
