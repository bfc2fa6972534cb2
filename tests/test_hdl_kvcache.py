"""KVCache: writes and reads against a numpy model, bounds checks, stories260K rows, configs."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable

from hardwire.hdl.kvcache import KVCache
from hardwire.sim.cocotb_runner import run_cocotb

from golden_vectors import rng, stories_qmodel, stories_trace

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"


def pack(dut, pos, k, v):
    layout = dut.w.payload.shape()
    word = layout.const({"pos": int(pos), "k": [int(x) for x in k], "v": [int(x) for x in v]})
    return format(word.as_value().value, "x")


def run(dut, writes, reads, *, valid_prob=1.0, expect_failure=False, perturb=False):
    """Write ``(pos, k, v)`` triples, then read ``reads`` back; the expected rows come from a
    numpy model of the cache that ignores writes at ``pos >= n_pos``."""
    k_mem = np.zeros((dut.n_pos, dut.kv_dim), dtype=np.int64)
    v_mem = np.zeros_like(k_mem)
    for pos, k, v in writes:
        if pos < dut.n_pos:
            k_mem[pos], v_mem[pos] = k, v
    reads = np.asarray(reads)
    assert (k_mem[reads[0]] != k_mem[reads[-1]]).any()
    expect_k, expect_v = k_mem[reads], v_mem[reads]
    if perturb:
        expect_k[len(reads) // 2, 1] += 1
    r = rng(99)
    rw_k = r.integers(-(1 << (dut.bits - 1)), 1 << (dut.bits - 1), dut.kv_dim)
    rw_v = r.integers(-(1 << (dut.bits - 1)), 1 << (dut.bits - 1), dut.kv_dim)
    vectors = dict(
        writes=np.array([pack(dut, *w) for w in writes]), valid_prob=valid_prob, reads=reads,
        expect_k=expect_k, expect_v=expect_v, kv_dim=dut.kv_dim, bits=dut.bits,
        expect_error=int(any(w[0] >= dut.n_pos for w in writes)),
        interval=dut.initiation_interval(), read_latency=dut.read_latency(),
        rw_write=pack(dut, reads[0], rw_k, rw_v), rw_addr=reads[0], rw_k=rw_k, rw_v=rw_v)
    return run_cocotb(component_or_verilog=dut, toplevel="kvcache", test_module="kvcache_bench",
                      test_dir=TESTS / "benches", build_root=BUILD_ROOT, vectors=vectors,
                      expect_failure=expect_failure, timeout_s=120)


def random_writes(seed, dut, count, *, bad=()):
    r = rng(seed)
    lo, hi = -(1 << (dut.bits - 1)), 1 << (dut.bits - 1)
    writes = [(int(p), r.integers(lo, hi, dut.kv_dim), r.integers(lo, hi, dut.kv_dim))
              for p in r.integers(0, dut.n_pos, count)]
    for index, pos in bad:      # out of range: must not land anywhere
        writes.insert(index, (pos, np.full(dut.kv_dim, hi - 1), np.full(dut.kv_dim, lo)))
    return writes


def test_random():
    dut = KVCache(n_pos=6, kv_dim=8, bits=10)
    writes = random_writes(1, dut, 30)
    run(dut, writes, rng(2).permutation(np.repeat(np.arange(6), 2)))


def test_out_of_range_writes():
    """n_pos = 4: ``pos`` holds 0..7 and the row address 2 bits; pos 4..7 would wrap onto rows
    0..3 if not refused."""
    dut = KVCache(n_pos=4, kv_dim=8, bits=10)
    writes = random_writes(3, dut, 16, bad=[(0, 4), (5, 7), (9, 5), (16, 6)])
    run(dut, writes, [0, 1, 2, 3, 2, 1, 0, 3], valid_prob=0.6)


def stories_case():
    qm = stories_qmodel()
    dut = KVCache(n_pos=qm.config.seq_len, kv_dim=qm.config.kv_dim, bits=qm.numerics.qkv_bits)
    trace = stories_trace()
    writes = [(t["pos"], t["L0.k_rope"], t["L0.v"]) for t in trace]
    return dut, writes, rng(4).permutation(len(trace))


def test_stories260k():
    """The first layer's rotated keys and values of a real run, read back from block RAM."""
    dut, writes, reads = stories_case()
    run(dut, writes, reads)


def test_negative_control():
    dut, writes, reads = stories_case()
    run(dut, writes, reads, perturb=True, expect_failure=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_pos=0), r"^n_pos must be at least 1, not 0$"),
    (dict(kv_dim=0), r"^kv_dim must be at least 1, not 0$"),
    (dict(bits=1), r"^bits must be at least 2 for signed elements, not 1$"),
])
def test_bad_config(kwargs, message):
    with warnings.catch_warnings():
        # the half-constructed component is dropped here, unused on purpose
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            KVCache(**{"n_pos": 8, "kv_dim": 4, **kwargs})
        del info
        gc.collect()
