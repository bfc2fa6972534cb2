"""The layer-serial chip (fold ``layers=shared``: one decoder unit holding every layer's
constants, the residual vector looped through it) against the golden model: stories260K
generation (every token, every layer output through the debug tap, every cycle count), tiny
random configurations with kv-head ratios 1, 2 and 4 and the error and context cases, a quick
Amaranth simulation, negative controls and the construction errors.

The benches are ``test_chip``'s (``chip_bench``); only the plans differ.
"""

import gc

import numpy as np
import pytest
from amaranth.sim import Simulator

from hardwire.compiler.chip_builder import LoraSpec, build_chip
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import plan_chip, predict_cycles
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.tokenizer import load_tokenizer
from hardwire.hdl.chip import LlamaChip
from hardwire.hdl.decoder import DecoderLayer

from golden_vectors import models_dir, stories_qmodel
from test_chip import FEED_OWN, Script, chip_verilog, run

SHARED = {
    # MHA (kv ratio 1), odd hidden size, non-power-of-two vocab, separate classifier, 3 layers
    "mha3": (dict(dim=24, n_layers=3, n_heads=3, n_kv_heads=3, hidden_dim=43, vocab_size=37,
                  seq_len=8, shared_classifier=False), "swiglu=1"),
    # GQA ratio 2, shared classifier, attention one head at a time, 2 layers
    "gqa2": (dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40,
                  seq_len=8), "attn=1,w2=2x8"),
    # GQA ratio 4, power-of-two vocab, a single row group for wk/wv, 4 layers
    "gqa4": (dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=1, hidden_dim=40, vocab_size=64,
                  seq_len=8, shared_classifier=False), "target=64,wk=8x4,wv=8x4,attn=2"),
}


def shared_qmodel(name):
    cfg, _ = SHARED[name]
    model = random_model(seed=11, **cfg)
    calib = [1] + [int(t) for t in np.random.default_rng(2).integers(3, cfg["vocab_size"], 7)]
    return quantize_model(model, wbits=8, calib_tokens=calib)


def shared_plan(qm, name):
    return plan_chip(qm, fold=SHARED[name][1] + ",layers=shared")


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_tiny(name):
    """A few positions; an out-of-range token dropped (``err_token``); the context filled and
    one more token dropped (``err_context``); ``reset_ctx``; generation again. Every token,
    every layer's output (in layer order) and every cycle count."""
    qm = shared_qmodel(name)
    c = qm.config
    chip, verilog = chip_verilog(qm, shared_plan(qm, name))
    assert chip.layer_serial and chip.n_layers == c.n_layers and len(chip.layers) == 1
    bad = (1 << chip.token_bits) - 1
    script = Script(qm, chip).feed(1, 5).drop(bad).feed(3)
    script.feed_own(c.seq_len - script.pos)
    script.drop(2).reset_ctx().feed(1).feed_own(2)
    run(chip, verilog, script)


def test_shared_negative_control():
    qm = shared_qmodel("gqa2")
    chip, verilog = chip_verilog(qm, shared_plan(qm, "gqa2"))
    run(chip, verilog, Script(qm, chip).feed(1).feed_own(2), perturb="tap",
        expect_failure=True)


def test_shared_amaranth_sim():
    """Without Verilator: three tokens of the 4-layer GQA-4 chip through ``amaranth.sim``:
    tokens, the four layer taps (values and ``tap_layer`` order) and cycles."""
    qm = shared_qmodel("gqa4")
    amaranth_sim(qm, build_chip(qm, shared_plan(qm, "gqa4")))


def test_tied_classifier_reads_embedding_rom():
    """Most folded, a tied classifier (1 x 1, embedding lanes 1) reads the embedding's ROM:
    no classifier weight ROM in the RTLIL, one table in ``rom_bits``, golden tokens, taps and
    cycles through ``amaranth.sim``; folded otherwise it keeps its own ROM."""
    from amaranth.back import rtlil

    from hardwire.compiler.plan import classifier_reads_embedding, rom_bits
    qm = shared_qmodel("gqa2")
    assert qm.config.shared_classifier
    plan = plan_chip(qm, fold="target=1000000000,layers=shared")
    assert classifier_reads_embedding(qm, plan) and rom_bits(qm, plan)["classifier"] == 0
    chip = build_chip(qm, plan)
    assert chip.classifier.rom_port and chip.embedding.shared_reader
    text = rtlil.convert(chip, name="top")
    assert "weight_rom" not in text.split("module \\top.classifier")[-1].split("\nend\n")[0]
    amaranth_sim(qm, chip, tokens=2)
    other = plan_chip(qm, fold="target=1000000000,cls=2x1")
    assert not classifier_reads_embedding(qm, other) and rom_bits(qm, other)["classifier"] > 0
    assert not build_chip(qm, other).classifier.rom_port
    gc.collect()


def amaranth_sim(qm, chip, *, tokens=3):
    """Feed ``tokens`` tokens (1, 9, then greedy) through ``amaranth.sim``: every token, layer
    tap (values and ``tap_layer`` order) and cycle count against the golden model."""
    script = Script(qm, chip).feed(1, 9)
    script.feed_own(tokens - 2)
    seen = []

    async def bench(ctx):
        ctx.set(chip.token_out.ready, 1)
        for kind, token, *_ in script.ops:
            token = seen[-1][0] if kind == FEED_OWN else token
            ctx.set(chip.token_in.payload, token)
            ctx.set(chip.token_in.valid, 1)
            await ctx.tick().until(chip.token_in.ready)
            ctx.set(chip.token_in.valid, 0)
            cycles, taps, order = 1, [], []
            while not ctx.get(chip.token_out.valid):
                if ctx.get(chip.tap_valid):
                    taps.append([int(x) for x in ctx.get(chip.tap_data)])
                    order.append(ctx.get(chip.tap_layer))
                await ctx.tick()
                cycles += 1
            seen.append((ctx.get(chip.token_out.payload), taps, order, cycles))
            await ctx.tick()

    sim = Simulator(chip)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert len(seen) == len(script.feeds) == tokens
    for (token, taps, order, cycles), (want, want_taps, want_cycles) in zip(seen, script.feeds):
        assert (token, cycles) == (want, want_cycles)
        assert order == list(range(qm.config.n_layers))
        assert taps == [list(t) for t in want_taps]


def test_shared_cycles():
    """The layer-serial chip's cycles are the dedicated chip's plus one per loop, and its
    formula equals the planner's, stage by stage."""
    qm = shared_qmodel("gqa4")
    fold = SHARED["gqa4"][1]
    shared = build_chip(qm, plan_chip(qm, fold=fold + ",layers=shared"))
    dedicated = build_chip(qm, plan_chip(qm, fold=fold))
    plan = plan_chip(qm, fold=fold + ",layers=shared")
    for pos in range(qm.config.seq_len):
        want = predict_cycles(qm, plan, pos)
        assert shared.cycle_breakdown(pos) == {k: v for k, v in want.items() if k != "total"}
        assert shared.cycles_per_token(pos) == want["total"] == \
            dedicated.cycles_per_token(pos) + qm.config.n_layers - 1
    assert shared.mac_units == dedicated.mac_units - \
        (qm.config.n_layers - 1) * dedicated.layers[0].mac_units
    gc.collect()


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_shared_errors():
    """LoRA needs dedicated layers; a layer-serial chip has exactly one decoder unit; the
    blocks of a unit hold the same layers."""
    qm = shared_qmodel("mha3")
    plan = shared_plan(qm, "mha3")
    with pytest.raises(ValueError, match=r"^LoRA needs dedicated layers"):
        build_chip(qm, plan, lora=LoraSpec())
    chip = build_chip(qm, plan)
    layer = chip.layers[0]
    with pytest.raises(ValueError, match=r"^layers\[0\] holds 3 layers: a layer-serial chip "
                                         r"has exactly one \(shared\) DecoderLayer$"):
        LlamaChip(embedding=chip.embedding, layers=[layer, layer],
                  final_norm=chip.final_norm, classifier=chip.classifier, id_words=[])
    single = build_chip(qm, plan_chip(qm, fold=SHARED["mha3"][1])).layers[0].blocks
    with pytest.raises(ValueError, match=r"^ffn_norm\.n_layers is 1, expected 3"):
        DecoderLayer(**{**layer.blocks, "ffn_norm": single["ffn_norm"]})
    gc.collect()


# ---------------------------------------------------------------------------- stories260K

STORIES_GENERATED = 24


@pytest.fixture(scope="module")
def stories_shared():
    qm = stories_qmodel()
    plan = plan_chip(qm, fold="layers=shared")
    chip, verilog = chip_verilog(qm, plan)
    return qm, chip, verilog


def test_stories260k_shared_generation(stories_shared):
    """stories260K on one shared decoder unit: a prompt and 24 greedy tokens fed back from
    the chip's own output: every token, all five layer outputs and every cycle count."""
    qm, chip, verilog = stories_shared
    assert chip.layer_serial and chip.n_layers == 5
    tok = load_tokenizer(models_dir() / "tok512.bin")
    script = Script(qm, chip).feed(*tok.encode("Once upon a time")).feed_own(STORIES_GENERATED)
    run(chip, verilog, script)


def test_stories260k_shared_negative_control(stories_shared):
    qm, chip, verilog = stories_shared
    run(chip, verilog, Script(qm, chip).feed(1).feed_own(2), perturb="token",
        expect_failure=True)
