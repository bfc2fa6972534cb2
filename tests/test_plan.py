"""Folding planner: fold strings, balanced plans, MAC budgets, and the static cycle formulas
checked against the blocks' own (``LlamaChip.cycle_breakdown``), which the chip bench
measures."""

import numpy as np
import pytest

from hardwire.compiler.chip_builder import build_chip, chip_name
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import (
    MATRIX_NAMES,
    MatrixFold,
    attention_mac_units,
    default_target,
    mac_units,
    parse_fold,
    plan_chip,
    predict_cycles,
    rom_bits,
)
from hardwire.compiler.quantize import quantize_model
from hardwire.hdl.decoder import matvec_cycles

from golden_vectors import stories_qmodel


def tiny(**over):
    cfg = dict(dim=24, n_layers=2, n_heads=3, n_kv_heads=3, hidden_dim=43, vocab_size=37,
               seq_len=8, shared_classifier=False)
    cfg.update(over)
    model = random_model(seed=3, **cfg)
    calib = [1] + [int(t) for t in np.random.default_rng(1).integers(3, cfg["vocab_size"], 7)]
    return quantize_model(model, wbits=8, calib_tokens=calib)


@pytest.fixture(scope="module")
def stories():
    return stories_qmodel()


# ---------------------------------------------------------------------------- fold strings

def test_parse_fold():
    assert parse_fold("pe=4, simd=8") == {"matrices": {}, "pe": 4, "simd": 8}
    assert parse_fold("wq=8x8,L2.w2=4x4:const,cls=2x64,attn=2,form=rom,target=96") == {
        "matrices": {"wq": (8, 8, None), "L2.w2": (4, 4, "const"), "cls": (2, 64, None)},
        "attn": 2, "form": "rom", "target": 96}
    assert parse_fold("macs=500,norm=2,rope=1,swiglu=4,embed=8") == {
        "matrices": {}, "macs": 500, "norm": 2, "rope": 1, "swiglu": 4, "embed": 8}


@pytest.mark.parametrize("text, message", [
    ("", r"^fold: empty fold string$"),
    ("pe", r"^fold: expected KEY=VALUE, got 'pe'$"),
    ("pe=x", r"^fold: pe='x' is not an integer$"),
    ("simd=0", r"^fold: simd must be positive, not 0$"),
    ("form=lut", r"^fold: form must be rom or const, not 'lut'$"),
    ("wq=8", r"^fold: wq='8': expected PExSIMD, e\.g\. 8x4 or 8x4:const$"),
    ("wq=8x4:fast", r"^fold: wq='8x4:fast': expected PExSIMD"),
    ("wq=0x4", r"^fold: wq='0x4': pe and simd must be positive$"),
    ("pe=2,pe=4", r"^fold: pe is given twice$"),
    ("wx=2x2", r"^fold: unknown key 'wx' \(target, macs, pe, simd, form, layers, attn, norm, "
               r"rope, swiglu, embed, a matrix wq/wk/wv/wo/w1/w3/w2/cls or L<i>\.<matrix>\)$"),
])
def test_parse_fold_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fold(text)


@pytest.mark.parametrize("fold, message", [
    ("wq=5x4", r"^fold: wq: pe \(5\) must divide rows \(24\)$"),
    ("L1.w2=4x5", r"^fold: L1\.w2: simd \(5\) must divide cols \(43\)$"),
    ("L2.wq=1x1", r"^fold: L2\.wq: the model has 2 layers$"),
    ("L0.cls=1x1", r"^fold: L0\.cls: the classifier is not in a layer$"),
    ("attn=2", r"^fold: attn=2 must divide n_heads \(3\)$"),
    ("swiglu=2", r"^fold: swiglu=2 must divide hidden_dim \(43\)$"),
    ("rope=5", r"^fold: rope=5 must divide kv_dim / 2 \(12\)$"),
    ("macs=1", r"^mac budget 1 is below the \d+ multipliers of the most folded plan$"),
])
def test_fold_errors(fold, message):
    with pytest.raises(ValueError, match=message):
        plan_chip(tiny(), fold=fold)


def test_matrix_fold_errors():
    with pytest.raises(ValueError, match=r"^pe \(3\) must divide rows \(64\)$"):
        MatrixFold(64, 64, 3, 1)
    with pytest.raises(ValueError, match=r"^form must be 'rom' or 'const', not 'lut'$"):
        MatrixFold(64, 64, 1, 1, "lut")


# -------------------------------------------------------------------------------- planning

def test_default_plan_stories(stories):
    """Every projection meets the target with the cheapest folding; the layers are
    balanced (every matrix within [target/2, target] steps)."""
    plan = plan_chip(stories)
    target = default_target(stories.config)
    assert plan.target == target == 256
    for key, f in plan.matrices.items():
        assert target // 2 <= f.steps <= target, (key, f)
    layer = plan.layer(0)
    assert {n: (f.pe, f.simd) for n, f in layer.items()} == {
        "wq": (1, 16), "wk": (1, 8), "wv": (1, 8), "wo": (1, 16), "w1": (1, 64),
        "w3": (1, 64), "w2": (1, 43)}
    assert all(plan.layer(i) == layer for i in range(stories.config.n_layers))
    assert plan.argmax_lanes == plan.matrices["classifier"].pe
    assert mac_units(plan) == 5 * (16 + 8 + 8 + 16 + 64 + 64 + 43) + 128


def test_targets_and_budget(stories):
    """A smaller target never has fewer multipliers; a MAC budget picks the smallest target
    that fits it."""
    macs = [mac_units(plan_chip(stories, target_cycles=t)) for t in (32, 64, 128, 256, 512)]
    assert macs == sorted(macs, reverse=True)
    for budget in (1000, 2500, 5000):
        plan = plan_chip(stories, mac_budget=budget)
        assert mac_units(plan) <= budget
        assert mac_units(plan_chip(stories, target_cycles=plan.target - 1)) > budget
    assert plan_chip(stories, fold="macs=2500").matrices == \
        plan_chip(stories, mac_budget=2500).matrices


def test_fold_overrides(stories):
    plan = plan_chip(stories, fold="pe=4,simd=8,L2.w2=2x4:const,cls=8x64,attn=2")
    assert (plan.matrices["L0.wq"].pe, plan.matrices["L0.wq"].simd) == (4, 8)
    # 172 rows / columns: the largest divisor not above 4 / 8
    assert (plan.matrices["L0.w1"].pe, plan.matrices["L0.w2"].simd) == (4, 4)
    assert plan.matrices["L2.w2"] == MatrixFold(64, 172, 2, 4, "const")
    assert plan.matrices["L3.w2"].form == "rom"
    assert (plan.matrices["classifier"].pe, plan.argmax_lanes) == (8, 8)
    assert plan.head_lanes == 2
    plan = plan_chip(stories, fold="wq=8x8,form=const")
    assert all(plan.matrices[f"L{i}.wq"] == MatrixFold(64, 64, 8, 8, "const")
               for i in range(5))
    assert all(f.form == "const" for f in plan.matrices.values())


# --------------------------------------------------------------------------------- cycles

PLANS = [
    (dict(), None),
    (dict(), "attn=1,wq=4x4:const,w2=1x43,norm=3,rope=2,swiglu=43,embed=8"),
    (dict(n_heads=4, n_kv_heads=1, dim=32, hidden_dim=40, vocab_size=64), "target=16"),
    (dict(n_heads=4, n_kv_heads=2, dim=32, hidden_dim=48, vocab_size=40,
          shared_classifier=True), "pe=64,simd=64,attn=4"),
]


@pytest.mark.parametrize("over, fold", PLANS)
def test_predict_cycles_matches_blocks(over, fold):
    """The planner's static formulas equal the blocks' own, stage by stage and in total."""
    qm = tiny(**over)
    plan = plan_chip(qm, fold=fold)
    chip = build_chip(qm, plan)
    for pos in range(qm.config.seq_len):
        want = predict_cycles(qm, plan, pos)
        assert chip.cycle_breakdown(pos) == {k: v for k, v in want.items() if k != "total"}
        assert chip.cycles_per_token(pos) == want["total"]
    for i, layer in enumerate(chip.layers):
        for n, unit in layer.matrices.items():
            f = plan.matrices[f"L{i}.{n}"]
            assert (unit.pe, unit.simd, unit.form, unit.mac_units) == \
                (f.pe, f.simd, f.form, f.mac_units)
            assert matvec_cycles(unit) == f.cycles()
    assert chip.mac_units == mac_units(plan)
    assert chip.argmax.lanes == plan.argmax_lanes
    with pytest.raises(ValueError, match=r"^pos \(8\) must lie in \[0, seq_len = 8\)$"):
        predict_cycles(qm, plan, 8)
    with pytest.raises(ValueError, match=r"^pos \(8\) must lie in \[0, seq_len = 8\)$"):
        chip.cycles_per_token(8)


def test_predict_cycles_stories(stories):
    plan = plan_chip(stories)
    chip = build_chip(stories, plan)
    for pos in (0, 64, 255, 511):
        assert chip.cycles_per_token(pos) == predict_cycles(stories, plan, pos)["total"]
    # two sweeps per head group and row: the per-position slope
    slope = (predict_cycles(stories, plan, 65)["total"] -
             predict_cycles(stories, plan, 64)["total"])
    assert slope == 5 * 2 * (8 // plan.head_lanes)
    assert chip_name(stories).startswith("stories260K_w8_")


def test_rom_bits(stories):
    plan = plan_chip(stories)
    bits = rom_bits(stories, plan)
    want = stories.rom_bits()
    assert bits["embed"] == want["embed"]
    for i in range(5):
        for n in MATRIX_NAMES:
            assert bits[f"L{i}.{n}"] == want[f"layers.{i}.{n}"]
    # the shared classifier has its own folded copy of the embedding table
    assert bits["classifier"] == want["embed"]
    assert bits["total"] == sum(want.values()) + want["embed"]
    const = rom_bits(stories, plan_chip(stories, fold="form=const"))
    assert const["total"] == want["embed"]


# ---------------------------------------------------------------------------- shared layers

def test_shared_layers_plan():
    """``layers=shared``: every layer gets the same folds, one unit's multipliers count, and
    the cycles are the dedicated plan's plus one handoff cycle per loop."""
    qm = tiny(n_layers=3)
    ded = plan_chip(qm, fold="target=64")
    sh = plan_chip(qm, fold="target=64,layers=shared")
    assert sh.shared_layers and not ded.shared_layers
    assert sh.matrices == ded.matrices
    layer = sum(f.mac_units for k, f in ded.matrices.items() if k.startswith("L0."))
    assert mac_units(ded) - mac_units(sh) == 2 * layer
    assert attention_mac_units(sh) * 3 == attention_mac_units(ded)
    assert "one shared unit" in sh.summary()
    for pos in (0, 5):
        d, s = predict_cycles(qm, ded, pos), predict_cycles(qm, sh, pos)
        assert {k: v for k, v in s.items() if not k.endswith("handoff")} == \
            {**d, "total": s["total"]}
        assert [k for k in s if k.endswith("handoff")] == ["L0.handoff", "L1.handoff"]
        assert s["total"] == d["total"] + 2


@pytest.mark.parametrize("fold, message", [
    ("layers=serial", r"^fold: layers must be dedicated or shared, not 'serial'$"),
    ("layers=shared,L1.wq=1x1", r"^fold: L1\.wq: with layers=shared every layer has the same "
                                r"folds \(give wq=PxS\)$"),
    ("layers=shared,w1=1x1:const", r"^fold: w1: with layers=shared the layer matrices must "
                                   r"be rom"),
])
def test_shared_layers_plan_errors(fold, message):
    with pytest.raises(ValueError, match=message):
        plan_chip(tiny(), fold=fold)
