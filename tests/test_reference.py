"""Float32 reference: the published stories260K story, format agreement, run.c semantics."""

import math

import numpy as np
import pytest

from conftest import STORY, assert_one_line_error
from hardwire.compiler.errors import HardwireError
from hardwire.compiler.loaders import load_gguf, load_hf, random_model, save_hf
from hardwire.compiler.reference import FloatModel, generate_greedy

LAYER_KEYS = ("attn_in", "attn_norm", "q", "k", "v", "q_rope", "k_rope", "att_out", "wo_out",
              "ffn_in", "ffn_norm", "h1", "h3", "hidden", "ffn_out", "out")


@pytest.fixture(scope="module")
def story_tokens(stories):
    return generate_greedy(stories, [1], 100)


def test_greedy_story_is_exact(story_tokens, tok512):
    text = tok512.decode_all([1] + story_tokens)
    assert text.startswith(STORY), text
    assert len(story_tokens) == 100  # no BOS (end of story) this early


def test_formats_agree(stories, story_tokens, models_dir, tmp_path):
    save_hf(stories, tmp_path / "hf")
    others = [load_gguf(models_dir / "stories260K.gguf", seq_len=512), load_hf(tmp_path / "hf")]
    ref = FloatModel(stories).step(1, 0)
    for m in others:
        for name, t in stories.tensors.items():
            assert np.array_equal(m.tensors[name], t), (m.source, name)
        assert np.array_equal(FloatModel(m).step(1, 0), ref)
        assert generate_greedy(m, [1], 100) == story_tokens


def test_prompt_prefill_continues_the_story(stories, story_tokens):
    prompt = [1] + story_tokens[:10]
    assert generate_greedy(stories, prompt, 20) == story_tokens[10:30]


def _run_c_forward(model, tokens):
    """A literal, loop-by-loop transcription of llama2.c run.c forward() (float32 scalars)."""
    c = model.config
    f = np.float32
    hs, kv_dim, kv_mul = c.head_size, c.kv_dim, c.kv_group
    t = model.tensors
    kcache = np.zeros((c.n_layers, c.seq_len, kv_dim), f)
    vcache = np.zeros((c.n_layers, c.seq_len, kv_dim), f)

    def rmsnorm(x, w):
        ss = f(0)
        for v in x:
            ss += v * v
        ss = f(1) / f(math.sqrt(ss / f(len(x)) + f(1e-5)))
        return np.array([w[j] * (ss * x[j]) for j in range(len(x))], f)

    def matmul(w, x):
        return np.array([sum((w[i, j] * x[j] for j in range(len(x))), f(0))
                         for i in range(w.shape[0])], f)

    all_logits = []
    for pos, token in enumerate(tokens):
        x = t["tok_embeddings"][token].copy()
        for layer in range(c.n_layers):
            w = {n: t[f"layers.{layer}.{n}"] for n in ("attention_norm", "wq", "wk", "wv", "wo",
                                                       "ffn_norm", "w1", "w2", "w3")}
            xb = rmsnorm(x, w["attention_norm"])
            q, k, v = matmul(w["wq"], xb), matmul(w["wk"], xb), matmul(w["wv"], xb)
            for i in range(0, c.dim, 2):
                head_dim = i % hs
                freq = f(1) / f(math.pow(10000.0, f(head_dim) / f(hs)))
                val = f(pos) * freq
                fcr, fci = f(math.cos(val)), f(math.sin(val))
                for vec in ((q, k) if i < kv_dim else (q,)):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i] = v0 * fcr - v1 * fci
                    vec[i + 1] = v0 * fci + v1 * fcr
            kcache[layer, pos], vcache[layer, pos] = k, v
            xb = np.zeros(c.dim, f)
            for h in range(c.n_heads):
                qh = q[h * hs:(h + 1) * hs]
                kvo = (h // kv_mul) * hs
                att = np.array([sum((qh[i] * kcache[layer, tt, kvo + i] for i in range(hs)),
                                    f(0)) / f(math.sqrt(hs)) for tt in range(pos + 1)], f)
                att = np.exp(att - att.max()).astype(f)
                att = att / att.sum(dtype=f)
                for tt in range(pos + 1):
                    xb[h * hs:(h + 1) * hs] += att[tt] * vcache[layer, tt, kvo:kvo + hs]
            x = x + matmul(w["wo"], xb)
            xb = rmsnorm(x, w["ffn_norm"])
            h1, h3 = matmul(w["w1"], xb), matmul(w["w3"], xb)
            hb = np.array([h1[i] * (f(1) / (f(1) + f(math.exp(-h1[i])))) * h3[i]
                           for i in range(len(h1))], f)
            x = x + matmul(w["w2"], hb)
        x = rmsnorm(x, t["norm"])
        all_logits.append(matmul(model.classifier, x))
    return all_logits


def test_matches_literal_run_c_loops():
    m = random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
                     vocab_size=20, seq_len=6, seed=11, shared_classifier=False)
    tokens = [1, 7, 3, 19, 3, 12]
    expect = _run_c_forward(m, tokens)
    fm = FloatModel(m)
    for pos, (tok, want) in enumerate(zip(tokens, expect)):
        got = fm.step(tok, pos)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_trace_names_and_consistency(stories):
    fm = FloatModel(stories)
    fm.step(1, 0)
    trace = {}
    logits = fm.step(403, 1, trace)
    names = [f"L{i}.{k}" for i in range(5) for k in LAYER_KEYS] + ["final_norm", "logits"]
    assert sorted(trace) == sorted(names)
    assert all(v.dtype == np.float32 for v in trace.values())
    assert np.array_equal(trace["logits"], logits)
    assert np.array_equal(trace["L0.attn_in"], stories.tensors["tok_embeddings"][403])
    for i in range(4):
        assert np.array_equal(trace[f"L{i}.out"], trace[f"L{i + 1}.attn_in"])
    for i in range(5):
        p = f"L{i}."
        assert trace[p + "q"].shape == (64,) and trace[p + "k"].shape == (32,)
        assert trace[p + "h1"].shape == (172,)
        np.testing.assert_allclose(trace[p + "ffn_in"], trace[p + "attn_in"] + trace[p + "wo_out"],
                                   rtol=0, atol=0)
        h1 = trace[p + "h1"]
        np.testing.assert_allclose(trace[p + "hidden"], h1 / (1 + np.exp(-h1)) * trace[p + "h3"],
                                   rtol=1e-6, atol=1e-7)
        # RoPE is a rotation of adjacent pairs: it preserves each pair's length
        for a, b in (("q", "q_rope"), ("k", "k_rope")):
            pa = trace[p + a].reshape(-1, 2)
            pb = trace[p + b].reshape(-1, 2)
            np.testing.assert_allclose(np.hypot(*pa.T), np.hypot(*pb.T), rtol=1e-5)
    # at position 0 RoPE is the identity
    t0 = {}
    FloatModel(stories).step(1, 0, t0)
    assert np.array_equal(t0["L0.q"], t0["L0.q_rope"]) and np.array_equal(t0["L0.k"],
                                                                           t0["L0.k_rope"])


class Scripted(FloatModel):
    """A FloatModel whose argmax at each position is dictated by ``script``."""

    def __init__(self, model, script):
        super().__init__(model)
        self.script = script
        self.fed = []

    def step(self, token, pos, trace=None):
        logits = super().step(token, pos, trace)
        self.fed.append((token, pos))
        scripted = np.zeros_like(logits)
        scripted[self.script[pos]] = 1
        return scripted


def test_generation_control_flow():
    m = random_model(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=24,
                     vocab_size=20, seq_len=8, seed=0)
    # stops when the model emits BOS (1), which is not returned
    assert generate_greedy(Scripted(m, [5, 6, 1, 7]), [1], 100) == [5, 6]
    # the prompt is fed as is (model outputs during prefill are ignored)
    s = Scripted(m, [5, 6, 1, 7])
    assert generate_greedy(s, [1, 9], 100) == [6]
    assert s.fed == [(1, 0), (9, 1), (6, 2)]
    # stops at the context: each of the 8 positions yields one token
    assert generate_greedy(Scripted(m, [4] * 8), [1], 100) == [4] * 8
    assert generate_greedy(Scripted(m, [4] * 8), [1, 2, 3], 100) == [4] * 6
    # stops after n new tokens without an extra forward step
    s = Scripted(m, [3, 4, 5, 6, 7, 8, 9, 10])
    assert generate_greedy(s, [1, 2], 3) == [4, 5, 6]
    assert len(s.fed) == 4
    assert generate_greedy(Scripted(m, [3] * 8), [1], 0) == []


def test_bad_prompt_longer_than_context(stories):
    with pytest.raises(HardwireError) as e:
        generate_greedy(stories, [1] * 513, 1)
    assert "context is 512" in assert_one_line_error(e, stories.source)


def test_bad_token_and_position(stories):
    fm = FloatModel(stories)
    with pytest.raises(HardwireError):
        fm.step(512, 0)
    with pytest.raises(HardwireError):
        fm.step(1, 512)
