"""cocotb bench of ``Argmax``: vectors as streams of beats against ``numerics.argmax``.

Vectors (``$HARDWIRE_VECTORS``): ``x`` (N, n) vectors, ``expect`` (N,) indices; ``bits``,
``lanes``; ``valid_prob`` and ``ready_prob`` (1.0 = no bubbles / no backpressure);
``latency`` and ``interval`` (checked when both probabilities are 1).
"""

import cocotb
from hardwire.sim.cocotb_helpers import (
    load_vectors,
    log_transfers,
    pack_signed,
    reset,
    start_clock,
    stream_recv,
    stream_send,
)


@cocotb.test()
async def vectors(dut):
    v = load_vectors()
    bits, lanes = int(v["bits"]), int(v["lanes"])
    x, expect = v["x"], [int(e) for e in v["expect"]]
    beats = x.shape[1] // lanes
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    words = [pack_signed(vec[b * lanes:(b + 1) * lanes], bits)
             for vec in x for b in range(beats)]
    start_clock(dut)
    await reset(dut)
    log = {"i": [], "o": [], "held": []}
    cocotb.start_soon(log_transfers(dut, log, held="o"))
    send = cocotb.start_soon(stream_send(dut, "i", words, valid_prob=vp, rng=1))
    got = await stream_recv(dut, "o", len(expect), ready_prob=rp, rng=2)
    await send
    bad = [k for k in range(len(expect)) if got[k] != expect[k]]
    assert not bad, (f"vector {bad[0]}: index {got[bad[0]]}, expected {expect[bad[0]]} "
                     f"({len(bad)} mismatches)")
    assert not log["held"], f"o changed while waiting for ready in cycles {log['held'][:5]}"
    if vp == 1.0 and rp == 1.0:
        last = log["i"][beats - 1::beats]
        lat = {o - i for i, o in zip(last, log["o"])}
        assert lat == {int(v["latency"])}, f"latency {lat}, formula {int(v['latency'])}"
        first = log["i"][::beats]
        ii = {b - a for a, b in zip(first, first[1:])}
        assert ii == {int(v["interval"])}, f"interval {ii}, formula {int(v['interval'])}"
