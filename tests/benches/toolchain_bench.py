"""cocotb bench for the toolchain toy (tests/test_toolchain.py): y = 3*x + 1 over streams.

Vectors (``$HARDWIRE_VECTORS``): ``x`` (int8 inputs), ``expected`` (int16 outputs),
``valid_prob`` and ``ready_prob`` (scalars, random bubbles / backpressure), ``seed``.
"""

import random

import cocotb

from hardwire.sim.cocotb_helpers import (
    CycleCounter, load_vectors, reset, start_clock, stream_recv, stream_send,
)


@cocotb.test()
async def toy_matches_numpy(dut):
    """Random inputs with random valid bubbles and ready backpressure match the golden model."""
    vec = load_vectors()
    xs = [int(v) for v in vec["x"]]
    expected = [int(v) for v in vec["expected"]]
    seed = int(vec["seed"])
    start_clock(dut)
    dut.i__valid.value = 0
    dut.o__ready.value = 0
    await reset(dut, 2)
    counter = CycleCounter(dut).start()
    sender = cocotb.start_soon(stream_send(dut, "i", xs, valid_prob=float(vec["valid_prob"]),
                                           rng=random.Random(seed)))
    got = await stream_recv(dut, "o", len(expected), signed=True,
                            ready_prob=float(vec["ready_prob"]), rng=random.Random(seed + 1))
    await sender
    cycles = counter.stop()
    dut._log.info("%d items in %d cycles", len(got), cycles)
    mismatches = [(i, x, g, e) for i, (x, g, e) in enumerate(zip(xs, got, expected)) if g != e]
    assert not mismatches, (f"{len(mismatches)} mismatches (index, x, got, expected): "
                            f"{mismatches[:5]}")
