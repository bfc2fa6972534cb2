"""cocotb bench of ``LoraUnit`` (delta chunks) and ``LoraProjection`` (requantized rows).

Both have the ports ``i``, ``o`` (``rows/pe`` chunks per vector), ``wr`` (SRAM byte writes),
``bank`` and ``on``. Vectors (``$HARDWIRE_VECTORS``): ``x`` (N, cols) inputs (optional
``k`` (N,): their exponents, for ``exp_max > 0``); ``img1``, ``img0`` two adapter sections (bytes at body offsets ``base`` ..); ``expect1``, ``expect0``
(N, rows) the golden outputs with each adapter, ``expect_off`` without; ``out_bits``, ``pe``;
``valid_prob``/``ready_prob``; ``cycles_on``, ``cycles_off`` (the formulas: last chunk after
the input transfer) and ``first_chunk`` (the first chunk, ``LoraUnit`` only, else -1).

Tests:

* ``banks``: bank 1 written while idle; bank 0 (all zero) on -> the base outputs; bank 1 on
  while bank 0 is written with the other adapter *during* the run (the inactive bank: results
  unchanged); bank 0 on -> that adapter; ``on`` low -> the base outputs. Random gaps and
  backpressure.
* ``full_rate``: inputs always valid, output always ready; values and the cycle formulas.
"""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from hardwire.sim.cocotb_helpers import (load_vectors, log_transfers, pack_signed, reset,
                                         start_clock, stream_recv, stream_send, unpack_signed)


async def write_bytes(dut, img, base, bank):
    """Write ``img[base:]`` into ``bank``, one byte a cycle."""
    for off in range(base, len(img)):
        await FallingEdge(dut.clk)
        dut.wr__en.value = 1
        dut.wr__bank.value = bank
        dut.wr__addr.value = off
        dut.wr__data.value = int(img[off])
    await FallingEdge(dut.clk)
    dut.wr__en.value = 0


async def run_vectors(dut, v, expect, what, *, valid_prob, ready_prob, seed):
    pe, ob = int(v["pe"]), int(v["out_bits"])
    n, rows = expect.shape
    groups = rows // pe
    words = [pack_signed(x, int(v["in_bits"])) for x in v["x"]]
    if "k" in v:    # exponent of each input vector (exp_max > 0), above the vector
        words = [w | (int(kk) << (len(x) * int(v["in_bits"])))
                 for w, x, kk in zip(words, v["x"], v["k"])]
    send = cocotb.start_soon(stream_send(dut, "i", words, valid_prob=valid_prob, rng=seed))
    got = await stream_recv(dut, "o", n * groups, ready_prob=ready_prob, rng=seed + 1)
    await send
    for k, word in enumerate(got):
        vec, grp = divmod(k, groups)
        out = unpack_signed(word, pe, ob)
        want = [int(e) for e in expect[vec, grp * pe:(grp + 1) * pe]]
        bad = [j for j in range(pe) if out[j] != want[j]]
        assert not bad, (f"{what}: vector {vec}, row {grp * pe + bad[0]}: got {out[bad[0]]}, "
                         f"expected {want[bad[0]]} ({len(bad)} mismatches in chunk {grp})")


async def setup(dut):
    start_clock(dut)
    dut.wr__en.value = 0
    dut.bank.value = 0
    dut.on.value = 0
    dut.o__ready.value = 0
    dut.i__valid.value = 0
    await reset(dut)


@cocotb.test()
async def banks(dut):
    v = load_vectors()
    vp, rp, base = float(v["valid_prob"]), float(v["ready_prob"]), int(v["base"])
    await setup(dut)
    await write_bytes(dut, v["img1"], base, 1)
    dut.on.value, dut.bank.value = 1, 0
    await run_vectors(dut, v, v["expect_off"], "bank 0 all zero", valid_prob=vp,
                      ready_prob=rp, seed=1)
    dut.bank.value = 1
    writer = cocotb.start_soon(write_bytes(dut, v["img0"], base, 0))
    await run_vectors(dut, v, v["expect1"], "bank 1 while bank 0 is written", valid_prob=vp,
                      ready_prob=rp, seed=3)
    await writer
    dut.bank.value = 0
    await run_vectors(dut, v, v["expect0"], "bank 0", valid_prob=vp, ready_prob=rp, seed=5)
    dut.on.value, dut.bank.value = 0, 1
    await run_vectors(dut, v, v["expect_off"], "off", valid_prob=vp, ready_prob=rp, seed=7)


@cocotb.test()
async def full_rate(dut):
    v = load_vectors()
    await setup(dut)
    await write_bytes(dut, v["img1"], int(v["base"]), 1)
    pe, rows = int(v["pe"]), v["expect1"].shape[1]
    groups, n = rows // pe, len(v["x"])
    for on, expect, key in ((1, v["expect1"], "cycles_on"), (0, v["expect_off"], "cycles_off")):
        dut.on.value, dut.bank.value = on, 1
        log = {"i": [], "o": []}
        task = cocotb.start_soon(log_transfers(dut, log))
        await run_vectors(dut, v, expect, f"full rate on={on}", valid_prob=1.0, ready_prob=1.0,
                          seed=9)
        task.cancel()
        i, o = log["i"], log["o"]
        last = {o[k * groups + groups - 1] - i[k] for k in range(n)}
        assert last == {int(v[key])}, f"{key}: measured {sorted(last)}, formula {int(v[key])}"
        if on and int(v["first_chunk"]) >= 0:
            first = {o[k * groups] - i[k] for k in range(n)}
            assert first == {int(v["first_chunk"])}, \
                f"first chunk: measured {sorted(first)}, formula {int(v['first_chunk'])}"
        dut._log.info(f"on={on}: {sorted(last)[0]} cycles per vector")
