"""cocotb bench of ``MatVecUnit``: whole input vectors in, ``rows/pe`` output chunks out.

Vectors (``$HARDWIRE_VECTORS``): ``x`` (N, cols) inputs; optional ``k`` (N,) the inputs'
exponents (a unit with ``exp_max > 0``: ``k`` sits above the vector in the payload);
``expect`` (N, rows) golden outputs;
``in_bits``, ``out_bits``, ``pe``; ``valid_prob``/``ready_prob`` for the ``backpressure``
test; the unit's cycle formulas ``latency``, ``cycles_per_vector``, ``interval`` and
``chunk_interval``, which ``full_rate`` checks against the measured transfer cycles.

Tests: ``full_rate`` (inputs always valid, output always ready: values and cycles) and
``backpressure`` (random input gaps and output ready: values only).
"""

import itertools

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from hardwire.sim.cocotb_helpers import (
    load_vectors,
    pack_signed,
    reset,
    start_clock,
    stream_recv,
    stream_send,
    unpack_signed,
)


async def _transfers(dut, log):
    """Append the cycle number of every transfer on each port (sampled before the edge)."""
    cycle = 0
    while True:
        await FallingEdge(dut.clk)
        await ReadOnly()
        cycle += 1
        for name in log:
            if int(getattr(dut, f"{name}__valid").value) and \
                    int(getattr(dut, f"{name}__ready").value):
                log[name].append(cycle)


async def _run(dut, v, valid_prob, ready_prob):
    """Stream every input vector through the unit; return the transfer log."""
    in_bits, out_bits, pe = int(v["in_bits"]), int(v["out_bits"]), int(v["pe"])
    n, rows = v["expect"].shape
    groups = rows // pe
    start_clock(dut)
    await reset(dut)
    log = {"i": [], "o": []}
    cocotb.start_soon(_transfers(dut, log))
    words = [pack_signed(x, in_bits) for x in v["x"]]
    if "k" in v:
        words = [w | (int(k) << (len(x) * in_bits)) for w, x, k in zip(words, v["x"], v["k"])]
    send = cocotb.start_soon(stream_send(dut, "i", words, valid_prob=valid_prob, rng=1))
    got = await stream_recv(dut, "o", n * groups, ready_prob=ready_prob, rng=2)
    await send
    for k, word in enumerate(got):
        vec, grp = divmod(k, groups)
        out = unpack_signed(word, pe, out_bits)
        want = [int(e) for e in v["expect"][vec, grp * pe:(grp + 1) * pe]]
        bad = [j for j in range(pe) if out[j] != want[j]]
        assert not bad, (f"vector {vec}, row {grp * pe + bad[0]}: got {out[bad[0]]}, expected "
                         f"{want[bad[0]]} ({len(bad)} mismatches in chunk {grp})")
    return log, groups


@cocotb.test()
async def full_rate(dut):
    v = load_vectors()
    log, groups = await _run(dut, v, 1.0, 1.0)
    i, o = log["i"], log["o"]
    n = len(i)
    measured = {
        "latency": {o[k * groups] - i[k] for k in range(n)},
        "cycles_per_vector": {o[k * groups + groups - 1] - i[k] for k in range(n)},
        "interval": {b - a for a, b in itertools.pairwise(i)},
        "chunk_interval": {o[k * groups + j + 1] - o[k * groups + j]
                           for k in range(n) for j in range(groups - 1)},
    }
    for name, got in measured.items():
        want = int(v[name])
        if name == "chunk_interval" and groups == 1:
            continue
        assert got == {want}, f"{name}: measured {sorted(got)}, formula {want}"
    dut._log.info("cycles ok: " + ", ".join(f"{k}={int(v[k])}" for k in measured))


@cocotb.test()
async def backpressure(dut):
    v = load_vectors()
    await _run(dut, v, float(v["valid_prob"]), float(v["ready_prob"]))
