"""LoRA adapters: PEFT loading, float merge, integer arithmetic, golden model, adapter image."""

import functools
import json
import struct
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO_ROOT, assert_one_line_error
from golden_vectors import stories_model, stories_qmodel
from hardwire.compiler.errors import HardwireError, UnsupportedConfigError
from hardwire.compiler.golden import GoldenModel, generate_golden
from hardwire.compiler.loaders.hf import permute
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora import (HF_TARGETS, LoraFormatError, LoraGoldenModel,
                                    apply_lora_float, generate_golden_lora, input_scale,
                                    load_peft_adapter, lora_accumulate, lora_delta,
                                    quantize_lora)
from hardwire.compiler.lora_image import (HEADER, LoraImageError, image_bytes, image_length,
                                          load_image, pack_lora, read_image, write_image)
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.reference import FloatModel, generate_greedy
from hardwire.compiler.tokenizer import load_tokenizer

MIA = REPO_ROOT / "examples" / "adapters" / "stories260K-mia"
PREFIX = "base_model.model.model.layers"


@functools.cache
def mia():
    return load_peft_adapter(MIA, stories_model())


@functools.cache
def mia_q(r_max=None):
    return quantize_lora(mia(), stories_model(), stories_qmodel(8), r_max=r_max)


@functools.cache
def tok():
    from golden_vectors import models_dir
    return load_tokenizer(models_dir() / "tok512.bin")


def peft_key(layer, short, side):
    return f"{PREFIX}.{layer}.{HF_TARGETS[short][0]}.{short}.lora_{side}.weight"


def write_peft(path, model, shorts=("q_proj", "v_proj"), rank=4, *, seed=0, zero_b=False,
               tensors=None, **config):
    """A PEFT adapter directory with random A/B (HF row order) for ``model``."""
    path.mkdir(parents=True, exist_ok=True)
    r = rank
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(shorts),
           "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        rng = np.random.default_rng(seed)
        shapes = model.config.tensor_shapes()
        tensors = {}
        for i in range(model.config.n_layers):
            for short in shorts:
                rows, cols = shapes[f"layers.{i}.{HF_TARGETS[short][1]}"]
                tensors[peft_key(i, short, "A")] = rng.normal(0, 0.1, (r, cols))
                b = rng.normal(0, 0.1, (rows, r))
                tensors[peft_key(i, short, "B")] = 0 * b if zero_b else b
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return path


# ------------------------------------------------------------------------------- loading


def test_committed_adapter_loads_onto_llama2c_names():
    a = mia()
    assert (a.rank, a.scale, a.targets) == (8, 2.0, ("wq", "wv"))
    assert sorted(a.A) == [(i, n) for i in range(5) for n in ("wq", "wv")]
    assert a.A[0, "wq"].shape == (8, 64) and a.B[0, "wv"].shape == (32, 8)   # kv_dim 32
    assert a.A[0, "wq"].dtype == np.float32


ALL = tuple(HF_TARGETS)


def test_every_module_maps_to_its_llama2c_matrix_and_q_k_are_unpermuted(tmp_path):
    # 4 query heads, 2 kv heads: k_proj's B is un-permuted with n_kv_heads
    m = random_model(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40,
                     seq_len=16, seed=1)
    d = write_peft(tmp_path / "a", m, ALL, rank=3, use_rslora=True, lora_alpha=6)
    a = load_peft_adapter(d, m)
    assert a.targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    assert a.scale == pytest.approx(6 / np.sqrt(3))
    raw = load_file(str(d / "adapter_model.safetensors"))
    merged = apply_lora_float(m, a)
    heads = {"wq": 4, "wk": 2}
    for i in range(2):
        for short, (_, name) in HF_TARGETS.items():
            delta = a.scale * (raw[peft_key(i, short, "B")].astype(np.float64)
                               @ raw[peft_key(i, short, "A")])
            w, w2 = m.layer(i, name), merged.layer(i, name)
            if name in heads:   # compare in Hugging Face row order
                w, w2 = permute(w, heads[name]), permute(w2, heads[name])
            np.testing.assert_allclose(w2, w + delta, atol=1e-6, err_msg=f"{i}.{short}")


def test_half_precision_adapters_load(tmp_path):
    m = _tiny()
    d = _good(tmp_path)
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in t.items()},
              str(d / "adapter_model.safetensors"))
    a = load_peft_adapter(d, m)
    key = peft_key(1, "down_proj", "A")
    assert a.A[1, "w2"].dtype == np.float32
    assert np.array_equal(a.A[1, "w2"], t[key].astype(np.float16).astype(np.float32))


def _rotate_half_rope(q, pos, head_size, theta):
    """Hugging Face's RoPE on one vector of heads in rotate-half order."""
    half = head_size // 2
    inv = 1.0 / theta ** (np.arange(half) * 2.0 / head_size)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    out = []
    for h in q.reshape(-1, head_size):
        a, b = h[:half], h[half:]
        out.append(np.concatenate([a * cos - b * sin, b * cos + a * sin]))
    return np.concatenate(out)


def test_permutation_matches_a_hugging_face_computation_of_q():
    """q after RoPE at layer 0, computed from the raw PEFT tensors as transformers would."""
    m, a = stories_model(), mia()
    c = m.config
    merged = apply_lora_float(m, a)
    fm, pos = FloatModel(merged), 7
    tr = {}
    for p, t in enumerate([1, 403, 407, 261, 378, 432, 383, 286]):
        fm.step(t, p, trace=tr)
    raw = load_file(str(MIA / "adapter_model.safetensors"))
    x = tr["L0.attn_norm"].astype(np.float64)

    def hf_q(b):
        w = permute(m.layer(0, "wq"), c.n_heads) + a.scale * (b @ raw[peft_key(0, "q_proj", "A")])
        q = _rotate_half_rope(w @ x, pos, c.head_size, c.rope_theta)
        # rotate-half order -> llama2.c order: per head (j, j + half) -> (2j, 2j + 1)
        return q.reshape(c.n_heads, 2, -1).transpose(0, 2, 1).reshape(-1)

    b_hf = raw[peft_key(0, "q_proj", "B")].astype(np.float64)
    ours = tr["L0.q_rope"]
    np.testing.assert_allclose(ours, hf_q(b_hf), rtol=1e-4, atol=1e-4)
    # the check can fail: merging B without un-permuting it would be caught
    wrong = m.layer(0, "wq") + a.scale * (b_hf @ raw[peft_key(0, "q_proj", "A")])
    assert np.abs(wrong @ x - tr["L0.q"]).max() > 1e-2


# ------------------------------------------------------------------------------- arithmetic


def test_lora_delta_is_the_documented_integer_arithmetic():
    x = np.array([127, -128, 5, 0])
    a_q = np.array([[1, 2, 3, 4], [-5, 6, 0, 7]])
    b_q = np.array([[3, -1], [0, 2], [-127, 127]])
    mult_u, shift_u = np.array([3, 5]), 4
    mult_b, shift_b = np.array([7, 1, 2]), 3
    u = np.array([-114, -1403])                      # A_q @ x
    u_q = np.clip((u * mult_u + 8) >> 4, -128, 127)  # [-21, -128]
    v = b_q @ u_q                                    # [65, -256, -13589]
    want = (v * mult_b + 4) >> 3
    assert list(u_q) == [-21, -128]
    t = {}
    got = lora_delta(x, a_q, mult_u, shift_u, b_q, mult_b, shift_b, trace=t)
    assert list(got) == list(want) == [57, -32, -3397]
    assert list(t["u"]) == [-21, -128] and list(t["v"]) == list(v)
    acc = lora_accumulate([10, 20, 30], x, a_q, mult_u, shift_u, b_q, mult_b, shift_b)
    assert list(acc) == [67, -12, -3367]


def test_integer_delta_tracks_the_float_delta():
    """The LoRA correction in real units, from the golden model's own int8 inputs."""
    qm, ql, a = stories_qmodel(8), mia_q(), mia()
    g = LoraGoldenModel(qm, ql)
    tr = {}
    for p, t in enumerate([1, 403, 407, 261, 378, 432]):
        g.step(t, p, trace=tr)
    for i in range(5):
        for name in ("wq", "wv"):
            x = tr[f"L{i}.attn_norm"]
            s_in = input_scale(qm, i, name)
            s_w = getattr(qm.layers[i], name).scale
            real = tr[f"L{i}.{name}.lora_delta"] * s_in * s_w
            ref = a.delta(i, name).astype(np.float64) @ (x * s_in)
            err = np.linalg.norm(real - ref) / np.linalg.norm(ref)
            assert err < 0.03, (i, name, err)   # measured 0.5..1.8%


# ------------------------------------------------------------------------------- golden model


def _traces(g, tokens):
    out = []
    for p, t in enumerate(tokens):
        tr = {}
        g.step(t, p, trace=tr)
        out.append(tr)
    return out


def test_zero_adapter_is_bit_exact_with_the_base_golden_model(tmp_path):
    """PEFT's initial state (B = 0) on every target, padded to r_max 16: no change at all."""
    m, qm = stories_model(), stories_qmodel(8)
    a = load_peft_adapter(write_peft(tmp_path / "z", m, ALL, rank=4, zero_b=True), m)
    ql = quantize_lora(a, m, qm, r_max=16, calib_tokens=[1, 403, 407])
    assert ql.targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3") and ql.r_max == 16
    tokens = [1] + generate_golden(qm, [1], 23)
    base = _traces(GoldenModel(qm), tokens)
    lora = _traces(LoraGoldenModel(qm, ql), tokens)
    for b, lo in zip(base, lora, strict=True):
        for k, v in b.items():
            assert np.array_equal(v, lo[k]), k
        assert not any(np.any(v) for k, v in lo.items() if k.endswith("lora_delta"))
    assert generate_golden_lora(qm, ql, [1], 30) == generate_golden(qm, [1], 30)


def test_padding_to_a_larger_r_max_and_wider_targets_changes_nothing():
    m, qm = stories_model(), stories_qmodel(8)
    ql8 = mia_q()
    ql16 = quantize_lora(mia(), m, qm, r_max=16, targets=("wq", "wk", "wv", "w2"))
    assert not np.any(ql16.get(0, "wk").a_q) and not np.any(ql16.get(0, "wq").a_q[8:])
    ga, gb = LoraGoldenModel(qm, ql8), LoraGoldenModel(qm, ql16)
    for p, t in enumerate([1, 403, 407, 261, 378, 432, 383]):
        assert np.array_equal(ga.step(t, p), gb.step(t, p))


def test_adapter_renames_the_heroine_in_float_and_golden():
    m, qm, ql = stories_model(), stories_qmodel(8), mia_q()
    merged = apply_lora_float(m, mia())
    text = tok().decode_all
    base_f = generate_greedy(m, [1], 40)
    lora_f = generate_greedy(merged, [1], 40)
    lora_g = generate_golden_lora(qm, ql, [1], 40)
    assert "named Lily." in text(base_f, prev=1)
    assert text(lora_f, prev=1).startswith("Once upon a time, there was a little girl named Mia.")
    assert "Lily" not in text(lora_f) + text(lora_g)
    assert lora_g[:30] == lora_f[:30]
    assert lora_g != generate_golden(qm, [1], 40)


def test_golden_with_adapter_agrees_with_float_with_adapter_teacher_forced():
    m, qm, ql = stories_model(), stories_qmodel(8), mia_q()
    merged = apply_lora_float(m, mia())
    seq = [1] + generate_greedy(merged, [1], 100)
    fm, gm = FloatModel(merged), LoraGoldenModel(qm, ql)
    agree = sum(int(np.argmax(fm.step(t, p)) == np.argmax(gm.step(t, p)))
                for p, t in enumerate(seq[:-1]))
    assert agree / (len(seq) - 1) >= 0.95    # measured 99/100


# ------------------------------------------------------------------------------- image


def _image():
    return image_bytes(mia_q(), stories_model().config)


def _recrc(data):
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def _patch(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return _recrc(b)


def test_image_round_trip(tmp_path):
    m, qm, ql = stories_model(), stories_qmodel(8), mia_q()
    data = _image()
    c = m.config
    assert data[:4] == b"HWLA" and len(data) == image_length(5, ("wq", "wv"), 8, c.dim,
                                                             c.kv_dim, c.hidden_dim)
    assert data[8:16] == bytes.fromhex(qm.digest()[:16])
    assert pack_lora(MIA, m, wbits=8, qm=qm) == data
    f = write_image(tmp_path / "mia.hwla", data)
    back = load_image(f, qm, targets=("wq", "wv"), r_max=8)
    assert (back.targets, back.r_max, back.rank, back.n_layers) == (("wq", "wv"), 8, 8, 5)
    for i in range(5):
        for n in ("wq", "wv"):
            x, y = ql.get(i, n), back.get(i, n)
            for f_ in ("a_q", "mult_u", "shift_u", "b_q", "mult_b", "shift_b"):
                assert np.array_equal(getattr(x, f_), getattr(y, f_)), (i, n, f_)
    assert generate_golden_lora(qm, back, [1], 12) == generate_golden_lora(qm, ql, [1], 12)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "CRC mismatch"),
    (lambda d: d[:-1], "truncated: 11255 bytes, expected 11256"),
    (lambda d: d[:20], "truncated: 20 bytes"),
    (lambda d: d + b"\0", "1 trailing bytes"),
    (lambda d: b"HWLB" + d[4:], "not a hardwire LoRA image"),
    (lambda d: _patch(d, 4, "<H", 2), "version 2 is not supported"),
    (lambda d: _patch(d, 8, "<Q", 0), "packed for another base model or weight width"),
    (lambda d: _patch(d, 22, "<H", 9), "bad rank: r_max 8, rank 9"),
    (lambda d: _patch(d, 18, "<H", 0x80), "bad target mask"),
    (lambda d: _patch(d, HEADER.size, "<b", -128), "weight -128"),
])
def test_image_rejections(mutate, match):
    with pytest.raises(LoraImageError, match=match) as e:
        read_image(mutate(_image()), stories_qmodel(8), source="mia.hwla")
    assert_one_line_error(e, "mia.hwla")


def test_image_for_another_model_or_chip_is_rejected():
    data, qm = _image(), stories_qmodel(8)
    tiny = quantize_model(random_model(dim=16, n_layers=5, n_heads=2, n_kv_heads=1,
                                       hidden_dim=24, vocab_size=32, seq_len=8, seed=3))
    with pytest.raises(LoraImageError, match="digest"):
        read_image(data, tiny)
    with pytest.raises(LoraImageError, match="r_max 8 does not match the chip's 16"):
        read_image(data, qm, r_max=16)
    with pytest.raises(LoraImageError, match="targets wq,wv do not match the chip's wq,wk,wv"):
        read_image(data, qm, targets=("wq", "wk", "wv"))
    with pytest.raises(HardwireError, match="digest mismatch"):
        LoraGoldenModel(tiny, mia_q())


def test_non_zero_padding_is_rejected():
    m, qm = stories_model(), stories_qmodel(8)
    ql = quantize_lora(mia(), m, qm, r_max=12)
    ql.get(2, "wv").b_q[0, 11] = 1
    with pytest.raises(LoraImageError, match="layers.2.wv: non-zero padding beyond rank 8"):
        read_image(image_bytes(ql, m.config), qm)


def test_rank_above_the_chip_maximum_is_rejected():
    m, qm = stories_model(), stories_qmodel(8)
    with pytest.raises(UnsupportedConfigError, match="rank r=8 exceeds the chip's maximum "
                       "rank 4") as e:
        load_peft_adapter(MIA, m, max_rank=4)
    assert_one_line_error(e, MIA)
    with pytest.raises(UnsupportedConfigError, match="exceeds the chip's maximum rank 4"):
        quantize_lora(mia(), m, qm, r_max=4)
    with pytest.raises(UnsupportedConfigError, match="adapts wv .v_proj. but the chip's LoRA "
                       "targets are wq"):
        quantize_lora(mia(), m, qm, targets=("wq",))


# ------------------------------------------------------------------------------- bad adapters


def _tiny():
    return random_model(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=24,
                        vocab_size=32, seq_len=8, seed=5)


def _good(tmp_path, **config):
    return write_peft(tmp_path / "ad", _tiny(), ("q_proj", "down_proj"), rank=2, **config)


def _retensor(path, fn):
    t = load_file(str(path / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(path / "adapter_model.safetensors"))
    return path


BAD_CONFIGS = [
    (dict(peft_type="IA3"), UnsupportedConfigError, "peft_type 'IA3' is not supported"),
    (dict(fan_in_fan_out=True), UnsupportedConfigError, "fan_in_fan_out must be false"),
    (dict(use_dora=True), UnsupportedConfigError, "use_dora is not supported"),
    (dict(bias="all"), UnsupportedConfigError, "bias 'all' is not supported"),
    (dict(modules_to_save=["lm_head"]), UnsupportedConfigError, "modules_to_save"),
    (dict(rank_pattern={"q_proj": 4}), UnsupportedConfigError, "rank_pattern"),
    (dict(init_lora_weights="pissa"), UnsupportedConfigError, "modifies the base weights"),
    (dict(target_modules=["q_proj", "foo_proj"]), LoraFormatError,
     "unknown target module 'foo_proj'"),
    (dict(target_modules=["q_proj", "lm_head"]), UnsupportedConfigError,
     "target module lm_head is not supported"),
    (dict(target_modules=r".*embed_tokens"), UnsupportedConfigError, "embed_tokens"),
    (dict(target_modules=[]), LoraFormatError, "target_modules must be"),
    (dict(layers_to_transform=[0, 7]), LoraFormatError, "names layer 7"),
    (dict(r="2"), LoraFormatError, "r must be an integer"),
    (dict(r=0), LoraFormatError, "r must be positive"),
    (dict(use_rslora="yes"), LoraFormatError, "use_rslora must be true or false"),
    (dict(r=3), LoraFormatError, r"has shape \(2, \d+\), expected \(3, \d+\)"),
    (dict(layers_to_transform=[1]), LoraFormatError,
     r"unexpected tensor base_model\.model\.model\.layers\.0\..* \(not in target_modules\)"),
    (dict(target_modules=["q_proj", "down_proj", "up_proj"]), LoraFormatError,
     "missing tensor base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"),
]


@pytest.mark.parametrize("config,cls,match", BAD_CONFIGS)
def test_bad_peft_configs_are_one_line_errors(tmp_path, config, cls, match):
    d = _good(tmp_path, **config)
    with pytest.raises(cls, match=match) as e:
        load_peft_adapter(d, _tiny())
    assert_one_line_error(e, d)


def _nan(t):
    t[peft_key(1, "q_proj", "A")][0, 0] = np.nan


BAD_TENSORS = [
    (lambda t: t.pop(peft_key(1, "down_proj", "B")),
     "missing tensor base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
    (lambda t: t.update({peft_key(2, "q_proj", "A"): np.zeros((2, 16), np.float32)}),
     "is for layer 2, but the base model has 2 layers"),
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((2, 16),
                                                                            np.float32)}),
     "unexpected tensor base_model.model.lm_head.lora_A.weight"),
    (lambda t: t.update({peft_key(0, "down_proj", "B"): np.zeros((24, 2), np.float32)}),
     r"has shape \(24, 2\), expected \(16, 2\)"),
    (_nan, "contains NaN or Inf"),
]


@pytest.mark.parametrize("fn,match", BAD_TENSORS)
def test_bad_adapter_tensors_are_one_line_errors(tmp_path, fn, match):
    d = _retensor(_good(tmp_path), fn)
    with pytest.raises(LoraFormatError, match=match) as e:
        load_peft_adapter(d, _tiny())
    assert_one_line_error(e, d)


def test_missing_and_unreadable_files(tmp_path):
    m = _tiny()
    with pytest.raises(HardwireError, match="no such file"):
        load_peft_adapter(tmp_path / "nope", m)
    (tmp_path / "f").write_text("x")
    with pytest.raises(LoraFormatError, match="must be a directory"):
        load_peft_adapter(tmp_path / "f", m)
    d = _good(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(UnsupportedConfigError, match="pickle"):
        load_peft_adapter(d, m)
    (d / "adapter_model.bin").unlink()
    with pytest.raises(LoraFormatError, match="no adapter_model.safetensors"):
        load_peft_adapter(d, m)
    (d / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")
    with pytest.raises(LoraFormatError, match="not a valid safetensors file") as e:
        load_peft_adapter(d, m)
    assert_one_line_error(e, d)
    (d / "adapter_config.json").write_text("{bad")
    with pytest.raises(LoraFormatError, match="adapter_config.json is not valid JSON") as e:
        load_peft_adapter(d, m)
    assert_one_line_error(e, d)
    (d / "adapter_config.json").write_text("[1]")
    with pytest.raises(LoraFormatError, match="not a JSON object"):
        load_peft_adapter(d, m)
    (d / "adapter_config.json").unlink()
    with pytest.raises(LoraFormatError, match="no adapter_config.json"):
        load_peft_adapter(d, m)
    with pytest.raises(HardwireError, match="no such file"):
        load_image(tmp_path / "missing.hwla", stories_qmodel(8))
