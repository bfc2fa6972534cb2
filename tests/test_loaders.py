"""Loaders: llama2.c (legacy, v1, v2), GGUF, Hugging Face, random models, and bad input."""

import dataclasses
import json
import math

import gguf
import numpy as np
import pytest

from conftest import assert_one_line_error
from hardwire.compiler.errors import HardwireError, ModelFormatError, UnsupportedConfigError
from hardwire.compiler.loaders import (detect_format, load_gguf, load_hf, load_llama2c,
                                       load_model, random_model, save_hf, save_llama2c)
from hardwire.compiler.loaders.hf import permute, unpermute
from hardwire.compiler.loaders.llama2c import AK42_MAGIC
from hardwire.compiler.model import LlamaConfig

SMALL = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, vocab_size=32,
             seq_len=8)


def small(seed=0, **kw):
    return random_model(**{**SMALL, **kw}, seed=seed)


def assert_same_tensors(a, b):
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert np.array_equal(a.tensors[name], b.tensors[name]), name


def write_gguf(model, path, *, dtype="F32", context=None):
    """A minimal llama GGUF as llama.cpp's converters write it (llama2.c row order)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context or c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_size)
    w.add_layer_norm_rms_eps(c.norm_eps)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
             "attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
             "w3": "ffn_up"}
    for name, t in model.tensors.items():
        parts = name.split(".")
        gname = (f"blk.{parts[1]}.{names[parts[2]]}" if parts[0] == "layers"
                 else names[name]) + ".weight"
        if dtype == "F16":
            w.add_tensor(gname, t.astype(np.float16))
        elif dtype == "Q8_0" and t.ndim == 2:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------- real files


def test_stories_bin_config(stories, models_dir):
    assert stories.config == LlamaConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4,
                                         hidden_dim=172, vocab_size=512, seq_len=512)
    assert stories.name == "stories260K"
    assert stories.source == str(models_dir / "stories260K.bin")
    assert stories.n_params == 260032  # the file holds these plus the RoPE tables


def test_gguf_matches_bin_exactly(stories, models_dir):
    g = load_gguf(models_dir / "stories260K.gguf")
    # The GGUF metadata claims a 2048 context; the model was trained with 512.
    assert g.config.seq_len == 2048
    assert dataclasses.replace(g.config, seq_len=512) == stories.config
    # Same tensors bit for bit, Q/K included: GGUF keeps llama2.c's adjacent-pair row order.
    # Its separate output.weight equals the embedding, so the classifier counts as shared.
    assert_same_tensors(g, stories)
    capped = load_gguf(models_dir / "stories260K.gguf", seq_len=512)
    assert capped.config == stories.config
    assert len(g.vocab) == 512 and g.vocab[1] == b"<s>" and g.vocab[259] == "\u2581t".encode()


def test_legacy_save_reproduces_weights(stories, tmp_path, models_dir):
    out = tmp_path / "copy.bin"
    save_llama2c(stories, out)
    ours = out.read_bytes()
    theirs = (models_dir / "stories260K.bin").read_bytes()
    assert len(ours) == len(theirs)
    rope_bytes = 2 * 4 * stories.config.seq_len * stories.config.head_size // 2
    # Header and every weight are identical; only the unused RoPE tables may differ by an ulp.
    assert ours[:-rope_bytes] == theirs[:-rope_bytes]
    a = np.frombuffer(ours[-rope_bytes:], "<f4")
    b = np.frombuffer(theirs[-rope_bytes:], "<f4")
    assert np.allclose(a, b, rtol=0, atol=1e-6)


def test_hf_round_trip(stories, tmp_path):
    d = tmp_path / "hf"
    save_hf(stories, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 4
    back = load_hf(d)
    assert back.config == stories.config
    assert_same_tensors(back, stories)
    assert back.name == "hf"
    # The stored Q/K really are in HF's rotate-half order.
    from safetensors.numpy import load_file
    raw = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in raw
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    k = raw["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(q, stories.tensors["layers.0.wq"])
    hs = stories.config.head_size
    # HF row j of head 0 (first half) is llama2.c row 2j; row j + hs/2 is llama2.c row 2j+1.
    assert np.array_equal(q[1], stories.tensors["layers.0.wq"][2])
    assert np.array_equal(k[hs // 2 + 1], stories.tensors["layers.0.wk"][3])
    assert load_model(d).config == stories.config


def test_permute_is_inverted():
    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute(permute(w, heads), heads), w)
    # one head of size 4: llama2.c rows (0,1),(2,3) -> HF rows 0,2 | 1,3
    w4 = np.arange(4, dtype=np.float32)[:, None]
    assert permute(w4, 1)[:, 0].tolist() == [0, 2, 1, 3]


def test_hf_round_trip_unshared_gqa(tmp_path):
    m = small(seed=3, shared_classifier=False)
    save_hf(m, tmp_path / "m")
    back = load_hf(tmp_path / "m")
    assert back.config == m.config and not back.config.shared_classifier
    assert_same_tensors(back, m)


def test_llama2c_v1_round_trip(stories, tmp_path):
    p = tmp_path / "v1.bin"
    save_llama2c(stories, p, version=1)
    data = p.read_bytes()
    assert np.frombuffer(data[:8], "<i4").tolist() == [AK42_MAGIC, 1]
    assert data[36] == 1 and len(data) == 256 + 4 * stories.n_params
    back = load_llama2c(p)
    assert back.config == stories.config
    assert_same_tensors(back, stories)
    assert detect_format(p) == "ak42" and load_model(p).config == stories.config


def test_llama2c_unshared_round_trips(tmp_path):
    m = small(seed=5, shared_classifier=False)
    for version in (0, 1):
        p = tmp_path / f"v{version}.bin"
        save_llama2c(m, p, version=version)
        back = load_llama2c(p)
        assert back.config == m.config
        assert_same_tensors(back, m)
    assert np.frombuffer((tmp_path / "v0.bin").read_bytes()[:28], "<i4")[5] == -32


def test_llama2c_v2_q8_0(tmp_path):
    m = small(seed=1, shared_classifier=False)
    p = tmp_path / "q8.bin"
    save_llama2c(m, p, version=2, group_size=64)
    data = p.read_bytes()
    gs = int(np.frombuffer(data[37:41], "<i4")[0])
    assert gs == 16  # backed off from 64 until it divides dim, as export.py does
    back = load_llama2c(p)
    assert back.config == m.config
    for name, t in m.tensors.items():
        if t.ndim == 1:
            assert np.array_equal(back.tensors[name], t), name  # norms stay float32
        else:
            groups = t.reshape(-1, gs)
            scale = np.abs(groups).max(axis=1) / np.float32(127)
            expect = (np.round(groups / scale[:, None]) * scale[:, None]).reshape(t.shape)
            assert np.array_equal(back.tensors[name], expect.astype(np.float32)), name
            assert np.abs(back.tensors[name] - t).max() <= scale.max() / 2 * 1.0001


def test_gguf_f16_and_unshared(tmp_path):
    m = small(seed=2, shared_classifier=False)
    write_gguf(m, tmp_path / "m.gguf", dtype="F16")
    g = load_model(tmp_path / "m.gguf")
    assert g.config == m.config and g.name == "m"
    for name, t in m.tensors.items():
        assert np.array_equal(g.tensors[name], t.astype(np.float16).astype(np.float32)), name
    assert g.vocab is None


def test_load_model_dispatch_and_seq_len(models_dir, stories):
    assert detect_format(models_dir / "stories260K.bin") == "llama2c"
    assert detect_format(models_dir / "stories260K.gguf") == "gguf"
    m = load_model(models_dir / "stories260K.bin", seq_len=128)
    assert m.config.seq_len == 128
    assert_same_tensors(m, stories)
    g = load_model(models_dir / "stories260K.gguf", seq_len=512)
    assert g.config == stories.config
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(models_dir / "stories260K.bin", seq_len=513)
    assert_one_line_error(e, models_dir / "stories260K.bin")


def test_random_model_deterministic_and_realistic():
    a, b, c = small(seed=7), small(seed=7), small(seed=8)
    assert_same_tensors(a, b)
    assert not np.array_equal(a.tensors["layers.0.wq"], c.tensors["layers.0.wq"])
    assert a.content_hash() == b.content_hash() != c.content_hash()
    m = random_model(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=172,
                     vocab_size=256, seq_len=32, seed=0)
    t = m.tensors
    assert 0.4 < t["tok_embeddings"].std() < 0.6
    assert abs(t["layers.0.attention_norm"].mean() - 1) < 0.1
    assert abs(t["layers.0.w2"].std() * math.sqrt(172) - 1) < 0.1
    from hardwire.compiler.reference import FloatModel, generate_greedy
    fm = FloatModel(m)
    trace = {}
    for pos, tok in enumerate([1, 50, 100, 150]):
        logits = fm.step(tok, pos, trace)
    # residual stream neither vanishes nor explodes; logits are spread but not saturated
    assert 0.2 < np.sqrt(np.mean(trace["L3.out"] ** 2)) < 20
    assert 0.5 < logits.std() < 50
    # With an independent classifier, greedy decoding does not collapse to one repeated token.
    unshared = random_model(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=172,
                            vocab_size=256, seq_len=32, seed=1, shared_classifier=False)
    out = generate_greedy(unshared, [1], 20)
    assert len(set(out)) > 3


# ---------------------------------------------------------------------------- bad input


def _legacy(tmp_path, header, n_floats=0, name="bad.bin"):
    p = tmp_path / name
    p.write_bytes(np.array(header, "<i4").tobytes() + np.zeros(n_floats, "<f4").tobytes())
    return p


def test_bad_file_too_short_for_header(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "too short" in assert_one_line_error(e, p)


def test_bad_truncated_bin(tmp_path, models_dir):
    p = tmp_path / "trunc.bin"
    p.write_bytes((models_dir / "stories260K.bin").read_bytes()[:500_000])
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "truncated" in assert_one_line_error(e, p)


def test_bad_header_size_mismatch(tmp_path):
    p = tmp_path / "long.bin"
    save_llama2c(small(), p)
    p.write_bytes(p.read_bytes() + b"\0" * 12)
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "12 trailing bytes" in assert_one_line_error(e, p)


def test_bad_nonsense_header(tmp_path):
    p = _legacy(tmp_path, [64, 172, -5, 8, 4, 512, 512], 1000)
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "n_layers=-5" in assert_one_line_error(e, p)


def test_bad_nan_weight(tmp_path):
    p = tmp_path / "nan.bin"
    save_llama2c(small(), p)
    data = bytearray(p.read_bytes())
    data[28 + 4 * 40: 28 + 4 * 41] = np.array([np.nan], "<f4").tobytes()  # in the embedding
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "NaN" in assert_one_line_error(e, p)


def test_bad_dim_not_divisible_by_heads(tmp_path):
    p = _legacy(tmp_path, [60, 172, 2, 8, 4, 512, 64], 100)
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(p)
    assert "not divisible by n_heads" in assert_one_line_error(e, p)


def test_bad_heads_not_divisible_by_kv_heads(tmp_path):
    p = _legacy(tmp_path, [64, 172, 2, 8, 3, 512, 64], 100)
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(p)
    assert "n_kv_heads" in assert_one_line_error(e, p)


def test_bad_odd_head_size(tmp_path):
    p = _legacy(tmp_path, [24, 64, 2, 8, 8, 512, 64], 100)
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(p)
    assert "odd" in assert_one_line_error(e, p)


def test_bad_too_large_config(tmp_path):
    p = _legacy(tmp_path, [8192, 22016, 2, 64, 64, 32000, 2048], 100)
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(p)
    assert "exceeds the supported maximum" in assert_one_line_error(e, p)


def test_bad_corrupt_gguf(tmp_path, models_dir):
    p = tmp_path / "corrupt.gguf"
    data = bytearray((models_dir / "stories260K.gguf").read_bytes()[:5000])
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as e:
        load_model(p)
    assert "not a valid GGUF file" in assert_one_line_error(e, p)


def test_bad_quantized_gguf(tmp_path):
    p = tmp_path / "q8.gguf"
    write_gguf(random_model(**{**SMALL, "dim": 32, "hidden_dim": 64}, seed=0), p, dtype="Q8_0")
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(p)
    assert "Q8_0" in assert_one_line_error(e, p)


def test_bad_missing_file(tmp_path):
    p = tmp_path / "nope.bin"
    with pytest.raises(HardwireError) as e:
        load_model(p)
    assert str(e.value) == f"{p}: no such file"


def test_bad_hf_directory(tmp_path):
    d = tmp_path / "hfdir"
    save_hf(small(), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError) as e:
        load_model(d)
    assert_one_line_error(e, d)
    (d / "config.json").unlink()
    with pytest.raises(ModelFormatError) as e:
        load_model(d)
    assert_one_line_error(e, d)
