"""cocotb bench of ``LoraLoader``: a script of commands, image bytes and token boundaries.

Vectors (``$HARDWIRE_VECTORS``): ``data`` (uint8, every byte the script sends), ``ops``
(K, 4): kind (0 command ``arg``, 1 bytes ``data[start:stop]``, 2 ``arg`` cycles with
``boundary`` high, 3 ``arg`` idle cycles), ``arg``, ``start``, ``stop``; ``expect_status``
(K,) the status word after each op; ``expect_banks`` (2, body) the bytes each bank holds at
the end (-1: never written); ``valid_prob``.

Checked every cycle: no write goes to the active bank, ``bank`` and ``on`` change only after
a cycle with ``boundary`` high, ``bank``/``on`` equal their status bits.
"""

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly
from hardwire.sim.cocotb_helpers import load_vectors, reset, start_clock, stream_send

STATUS_FIELDS = ("bank", "on", "pending", "locked", "busy", "enabled", "valid")


def describe(word):
    bits = [f for k, f in enumerate(STATUS_FIELDS) if word >> k & 1]
    return f"0x{word:04x} ({','.join(bits) or '-'}; error {word >> 8})"


@cocotb.test()
async def script(dut):
    v = load_vectors()
    data, ops = [int(b) for b in v["data"]], v["ops"]
    expect_status = [int(s) for s in v["expect_status"]]
    expect_banks = v["expect_banks"]
    vp = float(v["valid_prob"])
    banks = np.full(expect_banks.shape, -1, dtype=np.int64)
    problems = []
    start_clock(dut)
    dut.boundary.value = 0
    dut.i__valid.value = 0
    dut.cmd__valid.value = 0
    await reset(dut)

    async def monitor():
        prev = None
        while True:
            await FallingEdge(dut.clk)
            await ReadOnly()                    # after the drivers' writes of this edge
            bank, on, status = int(dut.bank.value), int(dut.on.value), int(dut.status.value)
            boundary = int(dut.boundary.value)
            if (bank, on) != (status & 1, status >> 1 & 1):
                problems.append(f"bank/on {bank},{on} differ from status {describe(status)}")
            if int(dut.wr__en.value):
                wb, addr = int(dut.wr__bank.value), int(dut.wr__addr.value)
                if wb == bank:
                    problems.append(f"write to the active bank {bank} at {addr}")
                if addr >= banks.shape[1]:
                    problems.append(f"write address {addr} beyond the bank")
                else:
                    banks[wb, addr] = int(dut.wr__data.value)
            if prev is not None and (bank, on) != prev[:2] and not prev[2]:
                problems.append(f"bank/on changed to {bank},{on} without a token boundary")
            prev = (bank, on, boundary)
    cocotb.start_soon(monitor())

    got = []
    for k, (kind, arg, start, stop) in enumerate(ops):
        if kind == 0:
            await stream_send(dut, "cmd", [int(arg)], valid_prob=vp, rng=k)
        elif kind == 1:
            await stream_send(dut, "i", data[start:stop], valid_prob=vp, rng=k)
        else:
            await FallingEdge(dut.clk)
            dut.boundary.value = int(kind == 2)
            for _ in range(int(arg)):
                await FallingEdge(dut.clk)
            dut.boundary.value = 0
        for _ in range(2):
            await FallingEdge(dut.clk)
        got.append(int(dut.status.value))
    assert not problems, f"{len(problems)} problems, first: {problems[0]}"
    for k, (g, e) in enumerate(zip(got, expect_status)):
        assert g == e, f"op {k}: status {describe(g)}, expected {describe(e)}"
    for b in range(2):
        bad = np.flatnonzero(banks[b] != expect_banks[b])
        assert not len(bad), (f"bank {b} byte {bad[0]}: {banks[b][bad[0]]}, expected "
                              f"{expect_banks[b][bad[0]]} ({len(bad)} mismatches)")
