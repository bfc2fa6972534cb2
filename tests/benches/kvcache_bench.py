"""cocotb bench of ``KVCache``: writes through the stream, reads through the read port.

Vectors (``$HARDWIRE_VECTORS``): ``writes`` (hex strings: ``w`` payloads packed with the DUT's
own ``StructLayout``), ``valid_prob`` (1.0 = a write every cycle, then the write interval is
checked), ``reads`` (addresses read back afterwards, one per cycle), ``expect_k`` and
``expect_v`` (rows read), ``kv_dim``, ``bits``, ``expect_error`` (final sticky ``error``),
``interval`` (cycles per write) and ``read_latency``; for the read-during-write test
``rw_write`` (one payload), ``rw_addr``, ``rw_k``, ``rw_v`` (the row read in the cycle of the
write, which must be the new one).
"""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from hardwire.sim.cocotb_helpers import (load_vectors, reset, start_clock, stream_send,
                                         unpack_signed)


def _rows(dut, kv_dim, bits):
    return (unpack_signed(dut.read__k.value.to_unsigned(), kv_dim, bits),
            unpack_signed(dut.read__v.value.to_unsigned(), kv_dim, bits))


async def _start(dut):
    start_clock(dut)
    dut.w__valid.value = 0
    dut.read__en.value = 0
    dut.read__addr.value = 0
    await reset(dut)


@cocotb.test()
async def write_then_read(dut):
    v = load_vectors()
    kv_dim, bits = int(v["kv_dim"]), int(v["bits"])
    await _start(dut)
    writes = [int(str(x), 16) for x in v["writes"]]
    vp = float(v["valid_prob"])
    cycles = await stream_send(dut, "w", writes, valid_prob=vp, rng=1)
    if vp == 1.0:
        assert cycles == len(writes) * int(v["interval"]), \
            f"{len(writes)} writes took {cycles} cycles, formula {int(v['interval'])} each"
    assert int(v["read_latency"]) == 1
    previous = None
    for n, (addr, want_k, want_v) in enumerate(zip(v["reads"], v["expect_k"], v["expect_v"])):
        await FallingEdge(dut.clk)
        dut.read__addr.value = int(addr)
        dut.read__en.value = 1
        await ReadOnly()
        if previous is not None:   # the new address shows only after the clock edge
            assert _rows(dut, kv_dim, bits) == previous, f"read {n}: data changed early"
        await RisingEdge(dut.clk)
        await ReadOnly()
        got_k, got_v = _rows(dut, kv_dim, bits)
        for name, got, want in (("k", got_k, want_k), ("v", got_v, want_v)):
            bad = [j for j in range(kv_dim) if got[j] != int(want[j])]
            assert not bad, (f"read {n} (row {int(addr)}): {name}[{bad[0]}] is {got[bad[0]]}, "
                             f"expected {int(want[bad[0]])} ({len(bad)} mismatches)")
        previous = (got_k, got_v)
    # en low: the outputs hold whatever the address does
    await FallingEdge(dut.clk)
    dut.read__en.value = 0
    dut.read__addr.value = int(v["reads"][0])      # a row that differs from the last one
    await RisingEdge(dut.clk)
    await ReadOnly()
    assert _rows(dut, kv_dim, bits) == previous, "read port changed with en low"
    assert int(dut.error.value) == int(v["expect_error"]), \
        f"error is {int(dut.error.value)}, expected {int(v['expect_error'])}"


@cocotb.test()
async def read_during_write(dut):
    v = load_vectors()
    kv_dim, bits = int(v["kv_dim"]), int(v["bits"])
    await _start(dut)
    await FallingEdge(dut.clk)
    dut.w__valid.value = 1
    dut.w__payload.value = int(str(v["rw_write"]), 16)
    dut.read__addr.value = int(v["rw_addr"])
    dut.read__en.value = 1
    await ReadOnly()
    assert int(dut.w__ready.value), "the cache refused a write"
    await RisingEdge(dut.clk)
    await ReadOnly()
    got_k, got_v = _rows(dut, kv_dim, bits)
    assert got_k == [int(x) for x in v["rw_k"]], "k read in the cycle of its write is stale"
    assert got_v == [int(x) for x in v["rw_v"]], "v read in the cycle of its write is stale"
    await FallingEdge(dut.clk)
    dut.w__valid.value = 0
    dut.read__en.value = 0
