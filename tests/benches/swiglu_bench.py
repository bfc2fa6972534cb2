"""cocotb bench of ``SwiGLU``: joined gate/up streams against ``numerics.swiglu``.

Vectors (``$HARDWIRE_VECTORS``): ``gate``, ``up``, ``expect`` (N, n); ``in_bits``,
``up_bits``, ``out_bits``; ``valid_prob`` and ``ready_prob`` (1.0 = no bubbles / no
backpressure); ``latency`` and ``interval`` (checked when both probabilities are 1); optional
``expect_k`` (N,): the exponents of a SwiGLU with ``exp_max > 0`` (``k`` sits above the vector
in the payload).
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
    out_bits, n = int(v["out_bits"]), v["gate"].shape[1]
    vp, rp = float(v["valid_prob"]), float(v["ready_prob"])
    start_clock(dut)
    await reset(dut)
    log = {"gate": [], "up": [], "o": [], "held": []}
    cocotb.start_soon(log_transfers(dut, log, held="o"))
    sends = [cocotb.start_soon(stream_send(
        dut, name, [pack_signed(x, int(v[bits])) for x in v[name]], valid_prob=vp, rng=seed))
        for name, bits, seed in (("gate", "in_bits", 1), ("up", "up_bits", 2))]
    got = await stream_recv(dut, "o", len(v["expect"]), ready_prob=rp, rng=3)
    for send in sends:
        await send
    for k, (word, want) in enumerate(zip(got, v["expect"])):
        out = unpack_signed(word, n, out_bits)
        if "expect_k" in v:
            got_k, want_k = word >> (n * out_bits), int(v["expect_k"][k])
            assert got_k == want_k, f"vector {k}: k is {got_k}, expected {want_k}"
        bad = [j for j in range(n) if out[j] != int(want[j])]
        assert not bad, (f"vector {k}: element {bad[0]} is {out[bad[0]]}, expected "
                         f"{int(want[bad[0]])} ({len(bad)} mismatches)")
    assert log["gate"] == log["up"], "gate and up did not transfer together"
    assert not log["held"], f"o changed while waiting for ready in cycles {log['held'][:5]}"
    if vp == 1.0 and rp == 1.0:
        lat = {o - i for i, o in zip(log["gate"], log["o"])}
        assert lat == {int(v["latency"])}, f"latency {lat}, formula {int(v['latency'])}"
        ii = {b - a for a, b in zip(log["gate"], log["gate"][1:])}
        assert ii == {int(v["interval"])}, f"interval {ii}, formula {int(v['interval'])}"
