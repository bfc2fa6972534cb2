"""Quantization and the integer golden model."""

import numpy as np
import pytest

from golden_vectors import stories_model, stories_qmodel
from hardwire.compiler.errors import HardwireError
from hardwire.compiler.golden import (ContextFullError, GoldenModel, TokenRangeError,
                                      generate_golden)
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.quantize import parse_wbits, quantize_model
from hardwire.compiler.reference import FloatModel, generate_greedy


def test_quantization_is_deterministic():
    m = stories_model()
    a = quantize_model(m, wbits=8)
    assert a.digest() == stories_qmodel(8).digest()


def test_shared_classifier_uses_one_integer_table():
    qm = stories_qmodel(8)
    assert qm.embed.q is qm.classifier.q


def test_weights_fit_their_widths():
    qm = quantize_model(stories_model(), wbits="3/6")
    for L in qm.layers:
        for m in (L.wq, L.wk, L.wv):
            assert m.bits == 6 and np.abs(m.q).max() <= 31
        for m in (L.wo, L.w1, L.w3, L.w2):
            assert m.bits == 3 and np.abs(m.q).max() <= 3
        for m in (L.wq, L.wo, L.w1, L.w2):
            assert np.all(m.requant.mult < 2**17)


def test_golden_story_from_bos_starts_like_the_float_model():
    qm = stories_qmodel(8)
    g = generate_golden(qm, [1], 24)
    f = generate_greedy(stories_model(), [1], 24)
    # "Once upon a time, there was a little girl named Lily. She loved to play"
    assert g[:17] == f[:17]


def test_golden_w8_agrees_with_float_teacher_forced():
    m = stories_model()
    qm = stories_qmodel(8)
    seq = [1] + generate_greedy(m, [1], 120)
    fm, gm = FloatModel(m), GoldenModel(qm)
    agree = sum(int(np.argmax(fm.step(t, p)) == np.argmax(gm.step(t, p)))
                for p, t in enumerate(seq[:-1]))
    assert agree / (len(seq) - 1) >= 0.94


def test_trace_names_every_intermediate():
    qm = stories_qmodel(8)
    t = {}
    GoldenModel(qm).step(1, 0, trace=t)
    for i in range(5):
        for n in ("attn_norm", "q", "k", "v", "q_rope", "k_rope", "att", "wo", "attn_res",
                  "ffn_norm", "h1", "h3", "hidden", "w2", "out"):
            assert f"L{i}.{n}" in t
    assert t["L0.q"].max() < 512 and t["L0.att"].max() < 128
    assert t["next_token"] == int(np.argmax(t["logits"]))


def test_out_of_range_token_and_full_context_are_errors():
    m = random_model(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=24, vocab_size=32,
                     seq_len=4, seed=3)
    g = GoldenModel(quantize_model(m, wbits=8))
    with pytest.raises(TokenRangeError):
        g.step(32, 0)
    for p in range(4):
        g.step(5, p)
    with pytest.raises(ContextFullError, match="context is full"):
        g.step(5, 4)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_random_tiny_models_quantize_and_track_float(heads, kv):
    m = random_model(dim=32, n_layers=2, n_heads=heads, n_kv_heads=kv, hidden_dim=43,
                     vocab_size=64, seq_len=32, seed=heads * 10 + kv, shared_classifier=False)
    qm = quantize_model(m, wbits=8)
    seq = [1] + generate_greedy(m, [1], 20)
    fm, gm = FloatModel(m), GoldenModel(qm)
    agree = sum(int(np.argmax(fm.step(t, p)) == np.argmax(gm.step(t, p)))
                for p, t in enumerate(seq[:-1]))
    assert agree / (len(seq) - 1) >= 0.8


@pytest.mark.parametrize("spec,msg", [("9", "not supported"), ("4,foo=3", "unknown tensor class"),
                                      ("x", "not a bit width"), ("", "empty")])
def test_bad_wbits_specs(spec, msg):
    with pytest.raises(HardwireError, match=msg):
        parse_wbits(spec)


def test_wbits_spec_forms():
    assert set(parse_wbits("4").values()) == {4}
    assert parse_wbits("4,embed=8")["embed"] == 8
    assert parse_wbits("3/6")["attn_out"] == 3
