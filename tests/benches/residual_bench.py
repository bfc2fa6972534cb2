"""cocotb bench of ``ResidualAdd``: joined a/b streams against ``numerics.residual_add``.

Vectors (``$HARDWIRE_VECTORS``): ``a``, ``b``, ``expect`` (N, dim); ``bits``; ``valid_prob`` and
``ready_prob`` (1.0 = no bubbles / no backpressure); ``latency`` and ``interval`` (checked
when both probabilities are 1).
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
    unpack_signed,
)


@cocotb.test()
async def vectors(dut):
    v = load_vectors()
    bits, dim = int(v["bits"]), v["a"].shape[1]
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    start_clock(dut)
    await reset(dut)
    log = {"a": [], "b": [], "o": [], "held": []}
    cocotb.start_soon(log_transfers(dut, log, held="o"))
    send_a = cocotb.start_soon(stream_send(dut, "a", [pack_signed(x, bits) for x in v["a"]],
                                           valid_prob=vp, rng=1))
    send_b = cocotb.start_soon(stream_send(dut, "b", [pack_signed(x, bits) for x in v["b"]],
                                           valid_prob=vp, rng=2))
    got = await stream_recv(dut, "o", len(v["expect"]), ready_prob=rp, rng=3)
    await send_a
    await send_b
    for n, (word, want) in enumerate(zip(got, v["expect"])):
        out = unpack_signed(word, dim, bits)
        bad = [k for k in range(dim) if out[k] != int(want[k])]
        assert not bad, (f"vector {n}: element {bad[0]} is {out[bad[0]]}, expected "
                         f"{int(want[bad[0]])} ({len(bad)} mismatches)")
    assert log["a"] == log["b"], "a and b did not transfer together"
    assert not log["held"], f"o changed while waiting for ready in cycles {log['held'][:5]}"
    if vp == 1.0 and rp == 1.0:
        lat = {o - i for i, o in zip(log["a"], log["o"])}
        assert lat == {int(v["latency"])}, f"latency {lat}, formula {int(v['latency'])}"
        ii = {b - a for a, b in zip(log["a"], log["a"][1:])}
        assert ii == {int(v["interval"])}, f"interval {ii}, formula {int(v['interval'])}"
