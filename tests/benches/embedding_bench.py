"""cocotb bench of ``EmbeddingROM`` against ``GoldenModel.embed`` / ``numerics.requantize``.

Vectors (``$HARDWIRE_VECTORS``): ``tokens`` (N,) ids (some may be out of range),
``expect`` (M, dim) for the in-range ones in order; ``vocab``, ``out_bits``; ``valid_prob``
and ``ready_prob`` (1.0 = no bubbles / no backpressure); ``latency`` and ``interval``
(checked when both probabilities are 1).
"""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly

from hardwire.sim.cocotb_helpers import (load_vectors, reset, start_clock, stream_recv,
                                         stream_send, unpack_signed)


async def _monitor(dut, log):
    """Record per cycle (sampled before the edge): token transfers, output transfers, the
    first cycle ``error`` is high, and cycles where ``o`` dropped or changed an offered
    payload (``log["held"]``)."""
    cycle, offered = 0, None
    while True:
        await FallingEdge(dut.clk)
        await ReadOnly()
        cycle += 1
        if int(dut.i__valid.value) and int(dut.i__ready.value):
            log["i"].append((cycle, int(dut.i__payload.value)))
        if int(dut.o__valid.value) and int(dut.o__ready.value):
            log["o"].append(cycle)
        if int(dut.error.value) and log["error"] is None:
            log["error"] = cycle
        valid, ready = int(dut.o__valid.value), int(dut.o__ready.value)
        payload = dut.o__payload.value.to_unsigned() if valid else None
        if offered is not None and payload != offered:
            log["held"].append(cycle)
        offered = payload if valid and not ready else None


@cocotb.test()
async def vectors(dut):
    v = load_vectors()
    vocab, out_bits, dim = int(v["vocab"]), int(v["out_bits"]), v["expect"].shape[1]
    tokens = [int(t) for t in v["tokens"]]
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    start_clock(dut)
    await reset(dut)
    assert int(dut.error.value) == 0, "error is set after reset"
    log = {"i": [], "o": [], "error": None, "held": []}
    cocotb.start_soon(_monitor(dut, log))
    send = cocotb.start_soon(stream_send(dut, "i", tokens, valid_prob=vp, rng=1))
    got = await stream_recv(dut, "o", len(v["expect"]), ready_prob=rp, rng=2)
    await send
    for _ in range(2 * int(v["latency"])):       # no stray output after the last token
        await FallingEdge(dut.clk)
    assert [t for _, t in log["i"]] == tokens
    assert len(log["o"]) == len(v["expect"]), f"{len(log['o'])} outputs"
    for n, (word, want) in enumerate(zip(got, v["expect"])):
        out = unpack_signed(word, dim, out_bits)
        bad = [k for k in range(dim) if out[k] != int(want[k])]
        assert not bad, (f"vector {n}: element {bad[0]} is {out[bad[0]]}, expected "
                         f"{int(want[bad[0]])} ({len(bad)} mismatches)")
    assert not log["held"], f"o changed while waiting for ready in cycles {log['held'][:5]}"
    bad_in = [c for c, t in log["i"] if t >= vocab]
    want_error = bad_in[0] + 1 if bad_in else None
    assert log["error"] == want_error, f"error rose in cycle {log['error']}, not {want_error}"
    if vp == 1.0 and rp == 1.0:
        good = [c for c, t in log["i"] if t < vocab]
        lat = {o - i for i, o in zip(good, log["o"])}
        assert lat == {int(v["latency"])}, f"latency {lat}, formula {int(v['latency'])}"
        ii = {b[0] - a[0] for a, b in zip(log["i"], log["i"][1:])
              if a[1] < vocab and b[1] < vocab}
        assert ii == {int(v["interval"])}, f"interval {ii}, formula {int(v['interval'])}"
