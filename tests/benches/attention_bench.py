"""cocotb bench of ``Attention`` against ``numerics.attention_head`` over a growing cache.

Vectors (``$HARDWIRE_VECTORS``): ``inputs`` (hex strings: ``{pos, q, k, v}`` payloads packed
with the DUT's own ``StructLayout``), ``expect`` (M, dim) outputs of the inputs that have one
(``pos < n_pos``), ``out_bits``; ``valid_prob`` and ``ready_prob`` (1.0 = no bubbles / no
backpressure); ``latency`` (per input) and ``interval`` (per input but the last), checked
when both probabilities are 1 and every input has an output; ``expect_error`` (final sticky
``error``) and ``quiet`` (cycles without any further output after the last expected one).
"""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from hardwire.sim.cocotb_helpers import (
    load_vectors,
    log_transfers,
    reset,
    start_clock,
    stream_recv,
    stream_send,
    unpack_signed,
)


@cocotb.test()
async def vectors(dut):
    v = load_vectors()
    bits, (count, dim) = int(v["out_bits"]), v["expect"].shape
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    start_clock(dut)
    dut.i__valid.value = 0
    dut.o__ready.value = 0
    await reset(dut)
    log = {"i": [], "o": []}
    cocotb.start_soon(log_transfers(dut, log))
    words = [int(str(x), 16) for x in v["inputs"]]
    send = cocotb.start_soon(stream_send(dut, "i", words, valid_prob=vp, rng=1))
    got = await stream_recv(dut, "o", count, ready_prob=rp, rng=2)
    await send
    for k, (word, want) in enumerate(zip(got, v["expect"])):
        out = unpack_signed(word, dim, bits)
        bad = [j for j in range(dim) if out[j] != int(want[j])]
        assert not bad, (f"output {k}: element {bad[0]} is "
                         f"{out[bad[0]]}, expected {int(want[bad[0]])} ({len(bad)} mismatches)")
    dut.o__ready.value = 1
    for _ in range(int(v["quiet"])):
        await FallingEdge(dut.clk)
        await ReadOnly()
        assert not int(dut.o__valid.value), "an output appeared for a full context"
    assert int(dut.error.value) == int(v["expect_error"]), \
        f"error is {int(dut.error.value)}, expected {int(v['expect_error'])}"
    if vp == 1.0 and rp == 1.0 and len(words) == count:
        lat = [o - i for i, o in zip(log["i"], log["o"])]
        want = [int(x) for x in v["latency"]]
        assert lat == want, f"latency {lat}, formula {want}"
        ii = [b - a for a, b in zip(log["i"], log["i"][1:])]
        want = [int(x) for x in v["interval"]]
        assert ii == want, f"interval {ii}, formula {want}"
        dut._log.info("latencies %s match the formula", lat)
