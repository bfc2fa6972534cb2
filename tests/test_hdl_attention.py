"""Attention: random q/k/v sequences and stories260K vs ``numerics.attention_head``, cycles
growing with the position, context-full errors, configs."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.compiler import numerics as nx
from hardwire.hdl.attention import Attention
from hardwire.sim.cocotb_runner import run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"


def make(tables, **kwargs):
    c = tables.config
    return Attention(exp_table=tables.exp, recip_table=tables.recip, recip_bits=c.recip_bits,
                     recip_frac=c.recip_frac, exp_len=c.exp_len, **kwargs)


def golden(dut, tables, q, keys, values):
    """Every head of one position over the cache rows ``keys``/``values`` (0..pos)."""
    hs, group = dut.head_size, dut.n_heads // dut.n_kv_heads
    out = np.empty(dut.dim, dtype=np.int64)
    for h in range(dut.n_heads):
        kv = slice(h // group * hs, (h // group + 1) * hs)
        out[h * hs:(h + 1) * hs] = nx.attention_head(
            q[h * hs:(h + 1) * hs], keys[:, kv], values[:, kv], exp_mult=dut.exp_mult,
            exp_shift=dut.exp_shift, tables=tables, out_bits=dut.out_bits,
            out_shift=dut.out_shift)
    return out


def exp_indices(dut, tables, q, keys):
    """Unclamped exp-table indices of every head (to show the clamp is exercised)."""
    hs, group = dut.head_size, dut.n_heads // dut.n_kv_heads
    idx = []
    for h in range(dut.n_heads):
        kv = slice(h // group * hs, (h // group + 1) * hs)
        s = keys[:, kv] @ q[h * hs:(h + 1) * hs]
        idx.extend(nx.rshift_round((s.max() - s) * dut.exp_mult, dut.exp_shift))
    return np.array(idx)


def run(dut, pos, q, k, v, expect, *, valid_prob=1.0, ready_prob=1.0, expect_error=0,
        expect_failure=False):
    layout = dut.i.payload.shape()
    inputs = [format(layout.const({"pos": int(p), "q": [int(x) for x in qq],
                                   "k": [int(x) for x in kk], "v": [int(x) for x in vv]})
                     .as_value().value, "x") for p, qq, kk, vv in zip(pos, q, k, v)]
    return run_bench(dut, dut, "attention", inputs, pos, expect, valid_prob=valid_prob,
                     ready_prob=ready_prob, expect_error=expect_error,
                     expect_failure=expect_failure)


def run_bench(dut, top, toplevel, inputs, pos, expect, *, valid_prob, ready_prob, expect_error,
              expect_failure):
    """The attention bench on ``top`` (``dut`` or a wrapper of it): packed ``inputs`` at
    positions ``pos`` (those past the context are refused), latency and interval per
    accepted position from ``dut``."""
    ok = [int(p) for p in pos if p < dut.n_pos]
    vectors = dict(inputs=np.array(inputs), expect=np.asarray(expect).reshape(-1, dut.dim),
                   out_bits=dut.out_bits, valid_prob=valid_prob, ready_prob=ready_prob,
                   latency=np.array([dut.latency(p) for p in ok]),
                   interval=np.array([dut.initiation_interval(p) for p in ok[:-1]]),
                   expect_error=expect_error, quiet=2 * dut.latency(dut.n_pos - 1))
    return run_cocotb(component_or_verilog=top, toplevel=toplevel,
                      test_module="attention_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=120)


# n_heads = 4, head_size = 4; q/k/v of 10 bits, output of 8 (out_shift 2) as in the real chip
CONFIGS = {
    # GQA ratio 1, two lanes, default tables
    "gqa1": dict(n_kv_heads=4, n_pos=6, head_lanes=2, exp_mult=1800, exp_shift=16,
                 tables=nx.TableConfig()),
    # GQA ratio 2, one lane (four head groups), n_pos = 4: pos 4..7 would wrap onto rows 0..3
    "gqa2": dict(n_kv_heads=2, n_pos=4, head_lanes=1, exp_mult=1300, exp_shift=15,
                 tables=nx.TableConfig()),
    # GQA ratio 4, every head at once, small tables (6-bit mantissa, 40 exp entries)
    "gqa4": dict(n_kv_heads=1, n_pos=5, head_lanes=4, exp_mult=20000, exp_shift=24,
                 tables=nx.TableConfig(recip_bits=6, exp_len=40, exp_step_log2=3,
                                       exp_frac=12)),
}


def random_case(name, seed=0, *, count=None, clamps=True):
    cfg = dict(CONFIGS[name])
    tables = nx.make_tables(head_size=4, seq_len=cfg["n_pos"], config=cfg.pop("tables"))
    dut = make(tables, n_heads=4, head_size=4, bits=10, out_bits=8, out_shift=2, **cfg)
    r = rng(seed)
    count = dut.n_pos if count is None else count
    # magnitudes vary per position, so score gaps range from tiny to far beyond the table
    scale = 1 << r.integers(3, 10, (count, 1))
    q = np.clip(r.integers(-512, 512, (count, dut.dim)) * scale // 512, -512, 511)
    k = np.clip(r.integers(-512, 512, (count, dut.kv_dim)) * scale // 512, -512, 511)
    v = r.integers(-512, 512, (count, dut.kv_dim))
    v[0] = 511          # a saturating output at pos 0 (out = v >> 2 would be 127.75)
    expect = np.array([golden(dut, tables, q[p], k[:p + 1], v[:p + 1]) for p in range(count)])
    idx = np.concatenate([exp_indices(dut, tables, q[p], k[:p + 1]) for p in range(count)])
    assert not clamps or (idx > tables.config.exp_len - 1).any(), "no exp index is clamped"
    assert ((idx > 0) & (idx < tables.config.exp_len - 1)).any()
    return dut, tables, np.arange(count), q, k, v, expect


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random(name):
    """Positions 0..n_pos-1 in order, each output vs the golden heads on the cache so far;
    latency and interval measured at every position."""
    dut, _, pos, q, k, v, expect = random_case(name)
    run(dut, pos, q, k, v, expect)


def test_random_backpressure():
    dut, _, pos, q, k, v, expect = random_case("gqa1", seed=1)
    run(dut, pos, q, k, v, expect, valid_prob=0.3, ready_prob=0.2)


def test_context_full():
    """After positions 0..3 of a 4-position context, pos 4 and 7 are consumed with no output
    and set the sticky error; the cache is unchanged (a wrapped write would have replaced
    row 0 or 3), as a repeat of pos 3 with a new query shows."""
    dut, tables, pos, q, k, v, expect = random_case("gqa2", seed=2, clamps=False)
    r = rng(3)
    q_new = r.integers(-512, 512, dut.dim)
    junk = np.full(dut.kv_dim, 511)
    pos = np.concatenate([pos, [4, 7, 3]])
    q = np.concatenate([q, [q_new, q_new, q_new]])
    k = np.concatenate([k, [junk, -junk - 1, k[3]]])
    v = np.concatenate([v, [-junk - 1, junk, v[3]]])
    expect = np.concatenate([expect, [golden(dut, tables, q_new, k[:4], v[:4])]])
    run(dut, pos, q, k, v, expect, expect_error=1)


def stories_case(head_lanes=2):
    qm = stories_qmodel()
    c, tables, layer, nc = qm.config, qm.tables, qm.layers[0], qm.numerics
    dut = make(tables, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_size=c.head_size,
               n_pos=c.seq_len, exp_mult=layer.exp_mult, exp_shift=layer.exp_shift,
               bits=nc.qkv_bits, out_bits=nc.act_bits, out_shift=nc.qkv_bits - nc.act_bits,
               head_lanes=head_lanes)
    trace = stories_trace()
    pos = np.array([t["pos"] for t in trace])
    q, k, v = (np.array([t[f"L0.{x}"] for t in trace]) for x in ("q_rope", "k_rope", "v"))
    return dut, pos, q, k, v, np.array([t["L0.att"] for t in trace])


def test_stories260k():
    """Layer 0 of a real run, positions 0..11: the golden trace's own q/k/v in, its ``L0.att``
    out, with the real shapes (8 heads on 4 kv heads, 512 positions)."""
    dut, pos, q, k, v, expect = stories_case()
    assert (pos == np.arange(len(pos))).all()
    run(dut, pos, q, k, v, expect)


def test_negative_control():
    dut, pos, q, k, v, expect = stories_case()
    expect[7, 42] += 1
    run(dut, pos, q, k, v, expect, expect_failure=True)


def test_cycle_formula():
    """Two sweeps of pos + 1 rows per head group plus a fixed 16; the benches measure it."""
    dut, *_ = stories_case()
    assert dut.head_groups == 4
    assert [dut.latency(p) for p in (0, 1, 11, 511)] == [24, 32, 112, 4112]
    assert dut.initiation_interval(11) == dut.latency(11)
    with pytest.raises(ValueError, match=r"^pos \(512\) must lie in \[0, n_pos = 512\)$"):
        dut.latency(512)
    dut, *_ = stories_case(head_lanes=8)
    assert [dut.latency(p) for p in (0, 511)] == [18, 1040]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        del dut
        gc.collect()


TABLES = nx.make_tables(head_size=4, seq_len=8)
GOOD = dict(n_heads=4, n_kv_heads=2, head_size=4, n_pos=8, exp_mult=1000, exp_shift=18,
            bits=10, out_bits=8, out_shift=2)


@pytest.mark.parametrize("over, message", [
    (dict(n_kv_heads=3), r"^n_heads \(4\) must be a multiple of n_kv_heads \(3\)$"),
    (dict(head_lanes=3), r"^head_lanes \(3\) must divide n_heads \(4\)$"),
    (dict(n_pos=0), r"^n_pos must be at least 1, not 0$"),
    (dict(exp_table=TABLES.exp[:500]), r"^exp_table has 500 entries, fewer than exp_len "
                                       r"\(512\)$"),
    (dict(recip_table=TABLES.recip[:256]), r"^recip_table has 256 entries; recip_bits \(10\) "
                                           r"needs 2\*\*9 = 512$"),
    (dict(exp_table=TABLES.exp // 256), r"^exp_table\[0\] \(256\) is below 2\*\*9: the "
                                        r"softmax sum would have fewer than recip_bits \(10\) "
                                        r"mantissa bits$"),
    (dict(exp_table=TABLES.exp * 4), r"^exp_table entries up to 262144 need 20 bits as a signed "
                                     r"multiplier operand; the multipliers take at most 18$"),
    (dict(exp_table=-TABLES.exp), r"^exp_table entries must be non-negative, not -65536$"),
    (dict(exp_mult=1 << 17), r"^exp_mult \(131072\) must lie in \[0, 2\*\*17\) to be a "
                             r"multiplier operand$"),
    (dict(exp_shift=-1), r"^exp_shift must be non-negative, not -1$"),
    (dict(out_shift=-2), r"^out_shift must be non-negative, not -2$"),
    (dict(bits=1), r"^bits \(1\) and out_bits \(8\) must be at least 2 for signed elements$"),
    (dict(n_pos=1 << 24), r"^acc \* recip needs 66 bits, more than the golden model's 64$"),
])
def test_bad_config(over, message):
    kwargs = dict(exp_table=TABLES.exp, recip_table=TABLES.recip, recip_bits=10,
                  recip_frac=25, exp_len=512, **GOOD)
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            Attention(**{**kwargs, **over})
        del info
        gc.collect()
