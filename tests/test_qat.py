"""Distillation fine-tuning through the fake quantizer (compiler/qat.py)."""

import json

import numpy as np
import pytest
from autograd import grad
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.qat import (
    QatConfig,
    act_scales,
    distill_loss,
    distill_tokens,
    fake_quant,
    finetune,
    forward,
)
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.reference import FloatModel

from hardwire.cli import main

QUICK = QatConfig(steps=30, lr=3e-3, batch=4, n_seqs=8, seq_len=16, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
                        vocab_size=40, seq_len=16, seed=5)


def _params(m):
    return {k: np.asarray(v, dtype=np.float64) for k, v in m.tensors.items()}


def test_fake_quant_values_and_straight_through_gradient():
    w = np.array([[0.26, -0.74, 2.0, -0.05]])
    s = np.array([[0.25]])
    assert fake_quant(w, s, 3).tolist() == [[0.25, -0.75, 0.75, -0.0]]
    g = grad(lambda x: np.sum(fake_quant(x, s, 3) * np.array([[1.0, 2.0, 3.0, 4.0]])))(w)
    # passes through inside the range, zero where the value saturates (2.0 > 3.5 steps)
    assert g.tolist() == [[1.0, 2.0, 0.0, 4.0]]


def test_forward_matches_float_reference(tiny):
    toks = np.random.default_rng(1).integers(0, 40, (2, 12))
    lg = forward(_params(tiny), toks, tiny.config)
    for b in range(2):
        fm = FloatModel(tiny)
        ref = np.stack([fm.step(int(t), p) for p, t in enumerate(toks[b])])
        assert np.abs(lg[b] - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_gradient_matches_finite_differences(tiny):
    c = tiny.config
    p = _params(tiny)
    toks = np.random.default_rng(2).integers(0, 40, (2, 8))
    other = dict(p, **{"layers.1.w2": p["layers.1.w2"] * 0.5})
    teacher = _log_softmax(forward(other, toks, c))
    key = "layers.0.wq"

    def loss(w):
        return distill_loss(dict(p, **{key: w}), toks, teacher, c)

    g = grad(loss)(p[key])
    rng = np.random.default_rng(3)
    for _ in range(5):
        i, j = rng.integers(0, p[key].shape[0]), rng.integers(0, p[key].shape[1])
        e = np.zeros_like(p[key])
        e[i, j] = 1e-5
        fd = (loss(p[key] + e) - loss(p[key] - e)) / 2e-5
        assert fd == pytest.approx(g[i, j], rel=1e-4, abs=1e-9)


def test_finetune_lowers_distillation_loss(tiny):
    base = quantize_model(tiny, wbits=3)
    scales = {"tok_embeddings": base.classifier.scale[:, None]}
    qmax = {"tok_embeddings": 3}
    for i, L in enumerate(base.layers):
        for n in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
            scales[f"layers.{i}.{n}"] = getattr(L, n).scale[:, None]
            qmax[f"layers.{i}.{n}"] = 3
    toks = distill_tokens(tiny, QUICK)
    p0 = _params(tiny)
    teacher = _log_softmax(forward(p0, toks, tiny.config))

    def quant_loss(params):
        return distill_loss(params, toks, teacher, tiny.config,
                            wq=lambda n, w: fake_quant(w, scales[n], qmax[n]))

    before = quant_loss(p0)
    tuned = finetune(tiny, scales, qmax, QUICK, tokens=toks)
    after = quant_loss(_params_from(tuned))
    assert after < 0.8 * before
    # with activation fake quantization as well
    tuned_a = finetune(tiny, scales, qmax, QatConfig(**{**QUICK.__dict__, "act_quant": True}),
                       act_scales=act_scales(base), tokens=toks)
    assert quant_loss(_params_from(tuned_a)) < before


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _params_from(tensors):
    return {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}


def test_distill_tokens_seeded_and_in_vocabulary(tiny):
    a, b = distill_tokens(tiny, QUICK), distill_tokens(tiny, QUICK)
    assert a.shape == (8, 16) and np.array_equal(a, b)
    assert a[:, 0].tolist() == [1] * 8 and a.min() >= 0 and a.max() < 40
    other = distill_tokens(tiny, QatConfig(**{**QUICK.__dict__, "seed": 4}))
    assert not np.array_equal(a, other)


def test_quantize_model_qat_deterministic_same_scales(tiny):
    plain = quantize_model(tiny, wbits=4)
    q1 = quantize_model(tiny, wbits=4, qat=QUICK)
    q2 = quantize_model(tiny, wbits=4, qat=QUICK)
    assert q1.digest() == q2.digest() != plain.digest()
    assert q1.method == "gptq-clip+qat" and q1.model_hash == plain.model_hash
    # same row scales as the ordinary quantizer, only the integer values move
    for L, P in zip(q1.layers, plain.layers):
        assert np.array_equal(L.w2.scale, P.w2.scale)
        assert np.abs(L.w2.q).max() <= 7


def test_cli_quantize_qat(tmp_path, capsys):
    m = random_model(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=24,
                     vocab_size=40, seq_len=16, seed=6)
    path = tmp_path / "t.bin"
    save_llama2c(m, path)
    assert main(["quantize", str(path), "--wbits", "4", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["quantize", str(path), "--wbits", "4", "--qat", "--json"]) == 0
    qat = json.loads(capsys.readouterr().out)
    assert qat["digest"] != plain["digest"] and qat["rom_bits"] == plain["rom_bits"]
    assert main(["quantize", str(path), "--wbits", "4", "--qat", "--report", "--json",
                 "-n", "6"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "gptq-clip+qat" and rep["positions"] > 0


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.5), dict(batch=True), dict(seq_len=1),
                                 dict(seed=-1), dict(lr=0.0), dict(lr=float("nan")),
                                 dict(temperature=-1.0), dict(lr="1e-3")])
def test_config_rejects_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"QatConfig.{name} must be"):
        QatConfig(**bad)


def test_quantize_model_rejects_a_non_config(tiny):
    with pytest.raises(TypeError, match="qat must be True or a QatConfig"):
        quantize_model(tiny, wbits=4, qat={"steps": 3})


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    m = random_model(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=24,
                     vocab_size=40, seq_len=16, seed=6)
    path = tmp_path_factory.mktemp("qat") / "t.bin"
    save_llama2c(m, path)
    return m, path


def test_cli_run_golden_qat_is_the_qat_datapath(tiny_file, capsys):
    from hardwire.compiler.golden import generate_golden
    m, path = tiny_file
    assert main(["run", str(path), "--engine", "golden", "--wbits", "4", "--qat", "-n", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    qm = quantize_model(m, wbits=4, qat=True)
    assert out["quantization"] == "gptq-clip+qat"
    assert out["tokens"] == [int(t) for t in generate_golden(qm, out["prompt_tokens"], 8)]


def test_cli_run_float_rejects_qat(tiny_file, capsys):
    _, path = tiny_file
    assert main(["run", str(path), "--engine", "float", "--qat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--qat" in err[0] and "Traceback" not in err[0]


def test_cli_compile_qat_recorded(tiny_file, tmp_path, capsys):
    # (the same QAT datapath twice is test_quantize_model_qat_deterministic_same_scales; the
    # same datapath gives the same Verilog is test_compile's determinism test)
    m, path = tiny_file
    assert main(["compile", str(path), "--wbits", "4", "--qat", "-o", str(tmp_path),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["quantization"] == "gptq-clip+qat"
    assert rep["datapath_digest"] == quantize_model(m, wbits=4, qat=True).digest()
    assert rep["datapath_digest"] != quantize_model(m, wbits=4).digest()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["quantization"] == "gptq-clip+qat"
    assert saved["datapath_digest"] == rep["datapath_digest"]
