"""The LoRA datapath (``hdl/lora.py``) against ``compiler/lora.py``, bit for bit.

``LoraUnit`` (the correction ``delta``) and ``LoraProjection`` (a base ``MatVecUnit`` with
the correction added before requantization) run in cocotb (``benches/lora_bench.py``) with
random matrices and adapters over several foldings, and with the committed stories260K
adapter (``examples/adapters/stories260K-mia``) on real golden-trace inputs; the SRAM is
written through the byte port at the section's real body offset. Each run checks: an
all-zero bank gives the base outputs, the inactive bank can be written during a run without
changing it, ``on`` low gives the base outputs, the measured cycles equal the formulas. A
negative control proves the bench can fail; the MatVecUnit without the hook still emits the
same Verilog as without the parameter.
"""

import functools
import gc
from pathlib import Path

import numpy as np
import pytest
from amaranth.back import verilog
from golden_vectors import REPO, rng, stories_model, stories_qmodel
from hardwire.compiler import numerics as nx
from hardwire.compiler.lora import (LoraGoldenModel, load_peft_adapter, lora_accumulate,
                                    lora_delta, quantize_lora)
from hardwire.compiler.lora_image import image_body, image_bytes, section_offsets
from hardwire.hdl.lora import LoraProjection, LoraUnit, section_layout
from hardwire.hdl.matvec import MatVecUnit
from hardwire.sim.cocotb_runner import run_cocotb

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
MIA = REPO / "examples" / "adapters" / "stories260K-mia"

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


@pytest.fixture(autouse=True)
def _collect_unused():
    yield
    gc.collect()


# ------------------------------------------------------------------------------ vectors

def section_bytes(a_q, mult_u, shift_u, b_q, mult_b, shift_b):
    """One section as the image holds it (docs/lora.md)."""
    return b"".join([np.asarray(a_q, dtype=np.int8).tobytes(),
                     np.asarray(mult_u, dtype="<u4").tobytes(), bytes((shift_u,)),
                     np.asarray(b_q, dtype=np.int8).tobytes(),
                     np.asarray(mult_b, dtype="<u4").tobytes(), bytes((shift_b,))])


def random_adapter(r, rows, cols, r_max, x):
    """Random int8 A/B, multipliers below 2**17 and shifts that saturate some of u_q."""
    a = r.integers(-127, 128, (r_max, cols))
    b = r.integers(-127, 128, (rows, r_max))
    mu = r.integers(0, 1 << 17, r_max)
    mu[0] = (1 << 17) - 1
    mb = r.integers(0, 1 << 17, rows)
    mb[-1] = 0
    u = np.abs((x @ a.T) * mu)
    su = max(0, int(np.percentile(u, 80)).bit_length() - 7)
    uq = nx.requantize(x @ a.T, mu, su, 8)
    v = np.abs(uq @ b.T) * mb
    sb = max(0, int(v.max()).bit_length() - 18)
    return a, mu, su, b, mb, sb


def image_with(section, base):
    return np.frombuffer(bytes(base) + section, dtype=np.uint8)


def run(dut, v, *, testcase=None, expect_failure=False, valid_prob=0.7, ready_prob=0.5):
    return run_cocotb(component_or_verilog=dut, toplevel="lora", test_module="lora_bench",
                      test_dir=TESTS / "benches", build_root=BUILD_ROOT,
                      vectors=dict(v, valid_prob=valid_prob, ready_prob=ready_prob),
                      testcase=testcase, expect_failure=expect_failure, timeout_s=600)


def unit_vectors(unit, x, img1, img0, d1, d0):
    return dict(x=x, img1=img1, img0=img0, expect1=d1, expect0=d0,
                expect_off=np.zeros_like(d1), base=unit.base, in_bits=unit.in_bits,
                out_bits=unit.delta_bits, pe=unit.pe,
                cycles_on=unit.chunk_times()[-1], cycles_off=unit.row_groups,
                first_chunk=unit.first_chunk_latency())


def projection_vectors(dut, x, img1, img0, e1, e0, eoff):
    return dict(x=x, img1=img1, img0=img0, expect1=e1, expect0=e0, expect_off=eoff,
                base=dut.lora.base, in_bits=dut.in_bits, out_bits=dut.out_bits, pe=dut.pe,
                cycles_on=dut.cycles_per_vector(True), cycles_off=dut.cycles_per_vector(False),
                first_chunk=-1)


def random_case(seed, rows, cols, r_max, pe, simd, mv_simd, form, *, base=7, n=5):
    r = rng(seed)
    x = r.integers(-128, 128, (n, cols))
    x[0], x[1] = -128, 127
    ad1 = random_adapter(r, rows, cols, r_max, x)
    ad0 = random_adapter(r, rows, cols, r_max, x)
    w = r.integers(-127, 128, (rows, cols))
    mult = r.integers(0, 1 << 17, rows)
    acc = x @ w.T
    shift = max(0, int(np.percentile(np.abs(acc * mult), 90)).bit_length() - 7)
    mv = MatVecUnit(weights=w, weight_bits=8, mult=mult, shift=shift, out_bits=8, pe=pe,
                    simd=mv_simd, form=form, correction_bits=32)
    lu = LoraUnit(rows=rows, cols=cols, r_max=r_max, pe=pe, simd=simd, base=base,
                  addr_bits=12)
    img1, img0 = (image_with(section_bytes(*ad), base) for ad in (ad1, ad0))
    d1, d0 = (np.array([lora_delta(v, *ad) for v in x]) for ad in (ad1, ad0))
    return mv, lu, x, (img1, img0), (d1, d0), (w, mult, shift), (ad1, ad0)


# rows, cols, r_max, pe, simd (A), simd (base), base form
RANDOM = [
    (8, 16, 4, 2, 4, 4, "rom"),
    (12, 8, 2, 12, 8, 2, "const"),     # one row group, A in one cycle a row
    (6, 8, 8, 1, 1, 2, "rom"),         # a chunk per row, one A MAC a cycle
    (16, 32, 16, 4, 8, 32, "const"),   # one column step: base waits on every chunk
]


@pytest.mark.parametrize("rows, cols, r_max, pe, simd, mv_simd, form", RANDOM)
def test_random_unit(rows, cols, r_max, pe, simd, mv_simd, form):
    _, lu, x, (img1, img0), (d1, d0), _, _ = random_case(rows * 100 + cols, rows, cols, r_max,
                                                         pe, simd, mv_simd, form)
    assert np.any(d1) and np.any(d0)
    run(lu, unit_vectors(lu, x, img1, img0, d1, d0))


@pytest.mark.parametrize("rows, cols, r_max, pe, simd, mv_simd, form", RANDOM)
def test_random_projection(rows, cols, r_max, pe, simd, mv_simd, form):
    mv, lu, x, imgs, _, (w, mult, shift), ads = random_case(rows * 100 + cols + 1, rows, cols,
                                                            r_max, pe, simd, mv_simd, form)
    dut = LoraProjection(base=mv, lora=lu)
    e1, e0 = (np.array([nx.requantize(lora_accumulate(nx.matvec(w, v), v, *ad), mult, shift,
                                      8) for v in x]) for ad in ads)
    eoff = np.array([nx.requantize(nx.matvec(w, v), mult, shift, 8) for v in x])
    assert np.any(e1 != eoff) and np.any(e0 != eoff)
    run(dut, projection_vectors(dut, x, *imgs, e1, e0, eoff))


def exp_case(seed, rows, cols, r_max, pe, simd, mv_simd, form):
    """W2-like: inputs with exponents k = 0, 1, 2, 0, ... (``exp_max = 2``); the LoRA shifts
    become ``shift_u + 2 - k`` and ``shift_b + k``, the base shift ``shift + 2 - k``."""
    mv0, _, x, imgs, _, (w, mult, shift), ads = random_case(seed, rows, cols, r_max, pe, simd,
                                                            mv_simd, form, n=6)
    k = np.arange(len(x)) % 3
    mv = MatVecUnit(weights=w, weight_bits=8, mult=mult, shift=shift, out_bits=8, pe=pe,
                    simd=mv_simd, form=form, correction_bits=32, exp_max=2)
    lu = LoraUnit(rows=rows, cols=cols, r_max=r_max, pe=pe, simd=simd, base=7, addr_bits=12,
                  exp_max=2)
    d1, d0 = (np.array([lora_delta(v, *ad, k=kk, exp_max=2) for v, kk in zip(x, k)])
              for ad in ads)
    # the exponent matters: deltas without it differ
    assert not np.array_equal(d1, np.array([lora_delta(v, *ads[0]) for v in x]))
    del mv0
    return mv, lu, x, k, imgs, (d1, d0), (w, mult, shift)


@pytest.mark.parametrize("rows, cols, r_max, pe, simd, mv_simd, form", RANDOM[:2])
def test_random_exponent(rows, cols, r_max, pe, simd, mv_simd, form):
    mv, lu, x, k, imgs, (d1, d0), (w, mult, shift) = exp_case(rows + cols + 5, rows, cols,
                                                              r_max, pe, simd, mv_simd, form)
    run(lu, dict(unit_vectors(lu, x, *imgs, d1, d0), k=k))
    dut = LoraProjection(base=mv, lora=lu)
    e1, e0 = (np.array([nx.requantize(nx.matvec(w, v) + d[j], mult, shift + 2 - kk, 8)
                        for j, (v, kk) in enumerate(zip(x, k))]) for d in (d1, d0))
    eoff = np.array([nx.requantize(nx.matvec(w, v), mult, shift + 2 - kk, 8)
                     for v, kk in zip(x, k)])
    run(dut, dict(projection_vectors(dut, x, *imgs, e1, e0, eoff), k=k))


def test_exponent_negative_control():
    """The unit fed k = 0 everywhere must fail against the deltas of the true exponents."""
    _, lu, x, k, imgs, (d1, d0), _ = exp_case(30, 8, 16, 4, 2, 4, 4, "rom")
    run(lu, dict(unit_vectors(lu, x, *imgs, d1, d0), k=np.zeros_like(k)), expect_failure=True)


# -------------------------------------------------------------------------- stories260K

@functools.cache
def mia_q():
    return quantize_lora(load_peft_adapter(MIA, stories_model()), stories_model(),
                         stories_qmodel(8), targets=("wq", "wv"), r_max=8)


@functools.cache
def mia_trace(n_tokens=4):
    qm, ql = stories_qmodel(8), mia_q()
    g = LoraGoldenModel(qm, ql)
    out, tok = [], 1
    for pos in range(n_tokens):
        t = {}
        g.step(tok, pos, trace=t)
        out.append(t)
        tok = t["next_token"]
    return out


def stories_case(layer, name, *, pe, simd, mv_simd, form):
    """The real adapter's ``layer``/``name`` section in bank 1 (written as the whole body,
    so every other section's bytes pass the address decoder too), the next layer's section
    in bank 0."""
    qm, ql = stories_qmodel(8), mia_q()
    c = qm.config
    offs = section_offsets(c.n_layers, ql.targets, ql.r_max, c.dim, c.kv_dim, c.hidden_dim)
    body = image_body(image_bytes(ql, c))
    mat = getattr(qm.layers[layer], name)
    rows, cols = mat.q.shape
    end = section_layout(rows, cols, ql.r_max)["end"]
    base = offs[layer, name]
    other = offs[layer + 1, name]
    img1 = np.frombuffer(body, dtype=np.uint8)
    img0 = np.frombuffer(bytes(base) + body[other:other + end], dtype=np.uint8)
    site = {"wq": "attn_norm", "wv": "attn_norm"}[name]
    tr = mia_trace()
    x = np.array([t[f"L{layer}.{site}"] for t in tr])
    r = mat.requant
    mv = MatVecUnit(weights=mat.q, weight_bits=mat.bits, mult=r.mult, shift=r.shift,
                    out_bits=r.out_bits, pe=pe, simd=mv_simd, form=form, correction_bits=32)
    lu = LoraUnit(rows=rows, cols=cols, r_max=ql.r_max, pe=pe, simd=simd, base=base,
                  addr_bits=max(len(body), 2).bit_length())
    l1, l0 = ql.get(layer, name), ql.get(layer + 1, name)
    d1 = np.array([t[f"L{layer}.{name}.lora_delta"] for t in tr])
    d0 = np.array([l0.delta(v) for v in x])
    assert np.array_equal(d1, np.array([l1.delta(v) for v in x]))
    return mv, lu, x, (img1, img0), (d1, d0), mat, (l1, l0), tr


@pytest.mark.parametrize("layer, name, pe, simd, mv_simd, form", [
    (0, "wq", 8, 8, 8, "const"),
    (2, "wv", 4, 16, 8, "rom"),
])
def test_stories260k_unit(layer, name, pe, simd, mv_simd, form):
    _, lu, x, imgs, ds, _, _, _ = stories_case(layer, name, pe=pe, simd=simd, mv_simd=mv_simd,
                                               form=form)
    assert np.any(ds[0]) and np.any(ds[1])
    run(lu, unit_vectors(lu, x, *imgs, *ds))


def projection_case(layer, name, **kw):
    mv, lu, x, imgs, _, mat, (l1, l0), tr = stories_case(layer, name, **kw)
    r = mat.requant
    dut = LoraProjection(base=mv, lora=lu)
    out = {"wq": "q", "wv": "v"}[name]
    e1 = np.array([t[f"L{layer}.{out}"] for t in tr])
    e0 = np.array([nx.requantize(nx.matvec(mat.q, v) + l0.delta(v), r.mult, r.shift,
                                 r.out_bits) for v in x])
    eoff = np.array([nx.requantize(nx.matvec(mat.q, v), r.mult, r.shift, r.out_bits)
                     for v in x])
    assert np.any(e1 != eoff)
    return dut, projection_vectors(dut, x, *imgs, e1, e0, eoff)


def test_stories260k_projection():
    dut, v = projection_case(0, "wq", pe=8, simd=8, mv_simd=8, form="const")
    run(dut, v)


def test_negative_control():
    dut, v = projection_case(0, "wq", pe=8, simd=8, mv_simd=8, form="const")
    v["expect1"] = v["expect1"].copy()
    v["expect1"][2, 5] += 1
    run(dut, v, testcase="banks", expect_failure=True)


# ------------------------------------------------------------------- formulas and errors

def test_cycles_and_storage_stories260k_wq():
    """The figures the report quotes: stories260K wq (64x64), r_max 8, A 8 MACs a cycle."""
    lu = LoraUnit(rows=64, cols=64, r_max=8, pe=8, simd=8)
    assert lu.a_cycles == 64 and lu.first_chunk_latency() == 64 + 8 + 14
    assert lu.macs_per_vector == 8 * 128
    assert lu.sram_bits == 2 * (8 * 64 * 8 + 8 * 24 + 64 * 8 * 8 + 64 * 24 + 12)


def test_hook_absent_keeps_verilog():
    """``correction_bits=None`` builds the very same unit as before the hook existed: no
    ``c`` port, and a different Verilog text only when the hook is on."""
    w = rng(3).integers(-7, 8, (8, 12))
    kw = dict(weights=w, weight_bits=4, mult=np.arange(8) * 5, shift=6, out_bits=8, pe=2,
              simd=3)
    plain = verilog.convert(MatVecUnit(**kw), name="mv", emit_src=False)
    none = verilog.convert(MatVecUnit(**kw, correction_bits=None), name="mv", emit_src=False)
    hooked = verilog.convert(MatVecUnit(**kw, correction_bits=32), name="mv", emit_src=False)
    assert plain == none
    assert "c__payload" not in plain and "c__payload" in hooked


@pytest.mark.parametrize("change, message", [
    (dict(r_max=6), r"^r_max must be a power of two between 1 and 256, not 6$"),
    (dict(simd=3), r"^simd must be a power of two between 1 and 65536, not 3$"),
    (dict(simd=32), r"^simd \(32\) must divide cols \(16\)$"),
    (dict(pe=3), r"^pe \(3\) must divide rows \(8\)$"),
    (dict(base=4000), r"^section 4000..4146 does not fit addr_bits=12$"),
])
def test_bad_config(change, message):
    good = dict(rows=8, cols=16, r_max=4, pe=2, simd=4, base=0, addr_bits=12)
    with pytest.raises(ValueError, match=message):
        LoraUnit(**{**good, **change})


def test_projection_mismatch():
    mv = MatVecUnit(weights=np.ones((8, 16), int), weight_bits=4, mult=np.ones(8, int),
                    shift=2, out_bits=8, pe=2, simd=4)
    lu = LoraUnit(rows=8, cols=16, r_max=4, pe=2, simd=4)
    with pytest.raises(ValueError, match=r"^base must be a MatVecUnit with correction_bits=32$"):
        LoraProjection(base=mv, lora=lu)
    mv = MatVecUnit(weights=np.ones((8, 16), int), weight_bits=4, mult=np.ones(8, int),
                    shift=2, out_bits=8, pe=4, simd=4, correction_bits=32)
    with pytest.raises(ValueError, match=r"^lora.pe is 2, the base unit's 4$"):
        LoraProjection(base=mv, lora=lu)
