"""The whole chip against the golden model: stories260K greedy generation (every token, every
layer output, every cycle count), tiny random configurations with error and context cases,
negative controls, the ID ROM, and the stream adapters the chip is wired with.

The Verilog is prepared by the shared fast-build helper (``hardwire.sim.verilated``: registered
reset, ROMs in ``$readmemh`` files, only the ports public) and cached by a key over the model
digest, the plan and the HDL sources, so a re-run skips Amaranth's elaboration of the large
design; the Verilator model is cached by design hash (``run_cocotb``).
"""

import contextlib
import gc
import os
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import unsigned
from amaranth.lib import data
from amaranth.sim import Simulator

from hardwire.compiler.chip_builder import build_chip, chip_name
from hardwire.compiler.golden import GoldenModel
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import plan_chip, predict_cycles
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.tokenizer import load_tokenizer
from hardwire.hdl.chip import ID_MAGIC, LlamaChip
from hardwire.hdl.decoder import DecoderLayer
from hardwire.hdl.stream_util import Fork, Join
from hardwire.sim.chip_sim import chip_key
from hardwire.sim.cocotb_runner import run_cocotb
from hardwire.sim.verilated import COCOTB_BUILD_ARGS, MAKEFLAGS, cached_export

from golden_vectors import models_dir, stories_qmodel

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BUILD_ROOT = REPO / "build" / "cocotb"
VERILOG_CACHE = BUILD_ROOT / "_chip_verilog"
PERIOD_NS = 10
FEED, FEED_OWN, DROP, RESET_CTX = 0, 1, 2, 3
PROMPTS = ("Once upon a time", "Tom and his dog")
GENERATED = 64


# ---------------------------------------------------------------------------------- helpers

def chip_verilog(qm, plan):
    """``(chip, verilog_path)``: ``SimTop(build_chip(qm, plan))`` prepared for Verilator with
    the shared fast-build helper (registered reset, ROMs in files, only the ports public),
    cached by model digest, plan and sources."""
    chip = build_chip(qm, plan)
    path = cached_export(lambda: chip, name=chip_name(qm), key=chip_key(qm, plan),
                         cache_dir=VERILOG_CACHE, public=True)
    return chip, path


class Script:
    """Operations for ``chip_bench`` with the golden model's expectations alongside."""

    def __init__(self, qm, chip):
        self.qm, self.chip, self.golden = qm, chip, GoldenModel(qm)
        self.ops, self.feeds = [], []
        self.pos, self.err_token, self.err_context, self.last = 0, 0, 0, None

    def _op(self, kind, token=0):
        self.ops.append((kind, token, self.pos, self.err_token, self.err_context))

    def feed(self, *tokens):
        for token in tokens:
            self._step(FEED, token)
        return self

    def feed_own(self, n):
        """Greedy: feed back the previous output ``n`` times."""
        for _ in range(n):
            self._step(FEED_OWN, self.last)
        return self

    def _step(self, kind, token):
        c = self.qm.config
        trace = {}
        self.golden.step(int(token), self.pos, trace=trace)
        self.feeds.append((trace["next_token"],
                           [trace[f"L{i}.out"] for i in range(c.n_layers)],
                           self.chip.cycles_per_token(self.pos)))
        self.last = trace["next_token"]
        self.pos += 1
        self._op(kind, token)

    def drop(self, token):
        """A token the chip must consume and drop (out of range, or the context is full)."""
        c = self.qm.config
        assert token >= c.vocab_size or self.pos == c.seq_len
        self.err_token |= int(token >= c.vocab_size)
        self.err_context |= int(self.pos == c.seq_len)
        self._op(DROP, token)
        return self

    def reset_ctx(self):
        self.pos, self.err_token, self.err_context = 0, 0, 0
        self._op(RESET_CTX)
        return self

    def vectors(self, *, perturb=None):
        kind, token, pos, et, ec = (np.array(x) for x in zip(*self.ops))
        exp_token = np.array([f[0] for f in self.feeds])
        exp_taps = np.array([np.stack(f[1]) for f in self.feeds])
        if perturb == "token":
            exp_token[len(exp_token) // 2] ^= 1
        elif perturb == "tap":
            exp_taps[len(exp_taps) // 2, -1, 3] += 1
        return dict(op_kind=kind, op_token=token, op_pos=pos, op_err_token=et,
                    op_err_context=ec, exp_token=exp_token, exp_taps=exp_taps,
                    exp_cycles=np.array([f[2] for f in self.feeds]),
                    resid_bits=self.chip.resid_bits, period_ns=PERIOD_NS,
                    quiet=self.chip.cycles_per_token(0) + 20,
                    id_words=np.array(self.chip.id_words, dtype=np.uint64))


@contextlib.contextmanager
def _makeflags(value):
    old = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAKEFLAGS"]
        else:
            os.environ["MAKEFLAGS"] = old


def run(chip, verilog, script, *, perturb=None, expect_failure=False, timeout_s=600):
    # the per-cycle C++ at MAKEFLAGS's -O1 (sim/verilated.py); run_cocotb hashes it into its key
    with _makeflags(MAKEFLAGS):
        return run_cocotb(component_or_verilog=verilog, toplevel=chip_name(script.qm),
                          test_module="chip_bench", test_dir=TESTS / "benches",
                          build_root=BUILD_ROOT, vectors=script.vectors(perturb=perturb),
                          expect_failure=expect_failure, timeout_s=timeout_s,
                          build_args=COCOTB_BUILD_ARGS)


# ---------------------------------------------------------------------------- stories260K

@pytest.fixture(scope="module")
def stories_chip():
    qm = stories_qmodel()
    chip, verilog = chip_verilog(qm, plan_chip(qm))
    return qm, chip, verilog


def test_stories260k_generation(stories_chip):
    """Two prompts, each followed by 64 greedy tokens fed back from the chip's own output,
    with ``reset_ctx`` between them: every ``token_out``, every layer output (debug tap) and
    every token's cycle count against the golden model and the cycle formula."""
    qm, chip, verilog = stories_chip
    tok = load_tokenizer(models_dir() / "tok512.bin")
    script = Script(qm, chip)
    for k, prompt in enumerate(PROMPTS):
        if k:
            script.reset_ctx()
        ids = tok.encode(prompt)
        assert ids[0] == 1 and len(ids) > 2
        script.feed(*ids).feed_own(GENERATED)
    run(chip, verilog, script)


@pytest.mark.parametrize("perturb", ["token", "tap"])
def test_stories260k_negative_control(stories_chip, perturb):
    """The same bench with one golden token, or one element of one layer output, changed."""
    qm, chip, verilog = stories_chip
    script = Script(qm, chip).feed(1).feed_own(3)
    run(chip, verilog, script, perturb=perturb, expect_failure=True)


def test_stories260k_cycle_formula(stories_chip):
    """The chip's cycle formula equals the planner's prediction, stage by stage."""
    qm, chip, _ = stories_chip
    plan = plan_chip(qm)
    for pos in (0, 1, 64, 255, qm.config.seq_len - 1):
        want = predict_cycles(qm, plan, pos)
        assert chip.cycle_breakdown(pos) == {k: v for k, v in want.items() if k != "total"}
        assert chip.cycles_per_token(pos) == want["total"]


# -------------------------------------------------------------------------- tiny configs

TINY = {
    # MHA (kv ratio 1), odd hidden size, non-power-of-two vocab, separate classifier
    "mha": (dict(dim=24, n_layers=2, n_heads=3, n_kv_heads=3, hidden_dim=43, vocab_size=37,
                 seq_len=8, shared_classifier=False), "swiglu=1"),
    # GQA ratio 2, shared classifier, attention one head at a time, a constant-logic matrix
    "gqa2": (dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40,
                  seq_len=8), "attn=1,wq=4x4:const,w2=2x8"),
    # GQA ratio 4, power-of-two vocab (the spare token bit), a single row group for wk/wv
    "gqa4": (dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=1, hidden_dim=40, vocab_size=64,
                  seq_len=8, shared_classifier=False), "target=64,wk=8x4,wv=8x4,attn=2"),
}


def tiny_qmodel(name):
    cfg, _ = TINY[name]
    model = random_model(seed=7, **cfg)
    calib = [1] + [int(t) for t in np.random.default_rng(1).integers(3, cfg["vocab_size"], 7)]
    return quantize_model(model, wbits=8, calib_tokens=calib)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny(name):
    """A few positions; an out-of-range token (dropped, ``err_token``) and the next token
    still golden; the context filled, one more token dropped (``err_context``); ``reset_ctx``
    clears both and generation works again."""
    qm = tiny_qmodel(name)
    c = qm.config
    chip, verilog = chip_verilog(qm, plan_chip(qm, fold=TINY[name][1]))
    assert chip.token_bits == (c.vocab_size - 1).bit_length() + 1
    bad = (1 << chip.token_bits) - 1
    script = Script(qm, chip).feed(1, 5).drop(bad).drop(c.vocab_size).feed(3)
    script.feed_own(c.seq_len - script.pos)
    script.drop(2).drop(bad).reset_ctx().feed(1).feed_own(2)
    run(chip, verilog, script)


def test_tiny_amaranth_sim():
    """A quick check without Verilator: three tokens through ``amaranth.sim``, outputs, layer
    taps and cycles against the golden model and the formula."""
    qm = tiny_qmodel("gqa4")
    chip = build_chip(qm, plan_chip(qm, fold=TINY["gqa4"][1]))
    script = Script(qm, chip).feed(1, 9).feed_own(1)
    seen = []

    async def bench(ctx):
        ctx.set(chip.token_out.ready, 1)
        for kind, token, *_ in script.ops:
            token = seen[-1][0] if kind == FEED_OWN else token
            ctx.set(chip.token_in.payload, token)
            ctx.set(chip.token_in.valid, 1)
            await ctx.tick().until(chip.token_in.ready)
            ctx.set(chip.token_in.valid, 0)
            cycles, taps = 1, []
            while not ctx.get(chip.token_out.valid):
                if ctx.get(chip.tap_valid):
                    taps.append([int(x) for x in ctx.get(chip.tap_data)])
                await ctx.tick()
                cycles += 1
            seen.append((ctx.get(chip.token_out.payload), taps, cycles))
            await ctx.tick()

    sim = Simulator(chip)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    for (token, taps, cycles), (want, want_taps, want_cycles) in zip(seen, script.feeds):
        assert (token, cycles) == (want, want_cycles)
        assert taps == [list(t) for t in want_taps]


def test_tiny_negative_control():
    qm = tiny_qmodel("mha")
    chip, verilog = chip_verilog(qm, plan_chip(qm, fold=TINY["mha"][1]))
    run(chip, verilog, Script(qm, chip).feed(1).feed_own(2), perturb="tap",
        expect_failure=True)


# ------------------------------------------------------------------------------- ID ROM

def test_id_rom_words():
    qm = tiny_qmodel("mha")
    c = qm.config
    words = build_chip(qm, plan_chip(qm)).id_words
    assert len(words) == 64 and words[0] == ID_MAGIC == int.from_bytes(b"HWR1", "big")
    assert words[1] == 1
    assert b"".join(w.to_bytes(4, "big") for w in words[2:10]) == bytes.fromhex(qm.model_hash)
    assert words[10:17] == [c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim,
                            c.vocab_size, c.seq_len]
    assert words[17] == 0x88888
    assert words[18] == int(qm.digest()[:8], 16)
    assert not any(words[19:])


# -------------------------------------------------------------------- construction errors

@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_bad_composition():
    """Blocks that do not fit together are refused with a message naming the mismatch (the
    refused, half-built components are collected here, unused on purpose)."""
    qm = tiny_qmodel("mha")
    chip = build_chip(qm, plan_chip(qm))
    layer = chip.layers[0]
    blocks = layer.blocks
    with pytest.raises(ValueError, match=r"^rope_q must be a RoPE, not MatVecUnit$"):
        DecoderLayer(**{**blocks, "rope_q": blocks["wq"]})
    with pytest.raises(ValueError, match=r"^wo shape is \(43, 24\), expected \(24, 24\) "
                                         r"\(dim, kv_dim, hidden\)$"):
        DecoderLayer(**{**blocks, "wo": blocks["w1"]})
    with pytest.raises(ValueError, match=r"^classifier shape is \(24, 43\), expected "
                                         r"\(37, 24\) \(vocab_size x dim\)$"):
        LlamaChip(embedding=chip.embedding, layers=chip.layers, final_norm=chip.final_norm,
                  classifier=blocks["w2"], id_words=[])
    with pytest.raises(ValueError, match=r"^id_words must be 32-bit unsigned words, not -1$"):
        LlamaChip(embedding=chip.embedding, layers=chip.layers, final_norm=chip.final_norm,
                  classifier=chip.classifier, id_words=[-1])
    gc.collect()


# -------------------------------------------------------------------------- stream adapters

def test_fork_join():
    """Fork: each consumer takes the item in its own cycle, the producer is released with the
    last; Join: every input transfers together, side fields ride along."""
    fork = Fork(shape=unsigned(8), n=2)
    layout = data.StructLayout({"pos": unsigned(3), "a": unsigned(8), "b": unsigned(8)})
    join = Join(layout=layout, streams=("a", "b"))
    log = []

    async def fork_bench(ctx):
        ctx.set(fork.i.payload, 42)
        ctx.set(fork.i.valid, 1)
        ctx.set(fork.o[1].ready, 1)
        await ctx.delay(0)
        assert ctx.get(fork.o[0].valid) and ctx.get(fork.o[1].valid)
        assert not ctx.get(fork.i.ready)
        await ctx.tick()                       # o[1] took it
        assert ctx.get(fork.o[0].valid) and not ctx.get(fork.o[1].valid)
        for _ in range(3):
            await ctx.tick()                   # o[0] waits: the producer holds the item
            assert not ctx.get(fork.i.ready)
        ctx.set(fork.o[0].ready, 1)
        await ctx.delay(0)
        assert ctx.get(fork.i.ready) and ctx.get(fork.o[0].payload) == 42
        await ctx.tick()
        ctx.set(fork.i.valid, 0)
        await ctx.tick()
        ctx.set(fork.i.valid, 1)               # a new item goes to both again
        await ctx.delay(0)
        assert ctx.get(fork.o[0].valid) and ctx.get(fork.o[1].valid) and ctx.get(fork.i.ready)
        log.append("fork")

    sim = Simulator(fork)
    sim.add_clock(1e-6)
    sim.add_testbench(fork_bench)
    sim.run()

    async def join_bench(ctx):
        ctx.set(join.pos, 5)
        ctx.set(join.i_a.payload, 1)
        ctx.set(join.i_b.payload, 2)
        ctx.set(join.o.ready, 1)
        ctx.set(join.i_a.valid, 1)
        await ctx.delay(0)
        assert not ctx.get(join.o.valid) and not ctx.get(join.i_a.ready)
        ctx.set(join.i_b.valid, 1)
        await ctx.delay(0)
        assert ctx.get(join.o.valid) and ctx.get(join.i_a.ready) and ctx.get(join.i_b.ready)
        p = ctx.get(join.o.payload)
        assert (p.pos, p.a, p.b) == (5, 1, 2)
        log.append("join")

    sim = Simulator(join)
    sim.add_testbench(join_bench)
    sim.run()
    assert log == ["fork", "join"]
