"""cocotb bench of the whole ``LlamaChip``: token sessions against the golden model.

Vectors (``$HARDWIRE_VECTORS``), a script of operations run in order:

* ``op_kind``: 0 feed ``op_token``; 1 feed the chip's own previous ``token_out`` (greedy);
  2 feed ``op_token`` expecting it to be dropped (no output, no tap: an error case);
  3 pulse ``reset_ctx``.
* per op, the state after it: ``op_pos`` (``pos``), ``op_err_token``, ``op_err_context``.
* per feed that has an output (kinds 0 and 1, in order): ``exp_token`` (golden next token),
  ``exp_taps`` (feeds, n_layers, dim) (golden ``L{i}.out``), ``exp_cycles``
  (``LlamaChip.cycles_per_token(pos)``), measured from the ``token_in`` transfer to the first
  cycle ``token_out.valid`` is high with ``token_out.ready`` held high.
* ``resid_bits``, ``period_ns``, ``quiet`` (cycles watched for a dropped token), ``id_words``.

The bench never polls per cycle from Python: it waits on edges of ``token_out__valid`` and
``tap_valid`` and measures cycles from the simulation time, so the simulation runs at
Verilator speed.
"""

import time

import cocotb
from cocotb.triggers import FallingEdge, First, ReadOnly, RisingEdge, Timer
from hardwire.sim.chip_bench_helpers import (
    TapCollector,
    check_id_rom,
    check_token,
    feed_token,
    pulse_reset_ctx,
    wait_token_out,
)
from hardwire.sim.cocotb_helpers import load_vectors, reset, start_clock

FEED, FEED_OWN, DROP, RESET_CTX = 0, 1, 2, 3


async def _check_state(dut, k, v):
    await ReadOnly()
    state = {"pos": int(dut.pos.value), "err_token": int(dut.err_token.value),
             "err_context": int(dut.err_context.value)}
    want = {"pos": int(v["op_pos"][k]), "err_token": int(v["op_err_token"][k]),
            "err_context": int(v["op_err_context"][k])}
    assert state == want, f"op {k}: state {state}, expected {want}"


@cocotb.test()
async def script(dut):
    v = load_vectors()
    period = int(v["period_ns"])
    bits = int(v["resid_bits"])
    n_feeds, n_layers, dim = v["exp_taps"].shape
    start_clock(dut, period)
    dut.token_in__valid.value = 0
    dut.token_out__ready.value = 1
    dut.reset_ctx.value = 0
    dut.id_addr.value = 0
    await reset(dut)
    for _ in range(2):      # the reset may be registered on its way into the chip
        await RisingEdge(dut.clk)

    await check_id_rom(dut, v["id_words"])      # combinational

    taps = TapCollector(dut, bits, dim)
    cocotb.start_soon(taps.run())
    feed, last, wall, cycles_total = 0, None, time.monotonic(), 0
    for k, kind in enumerate(int(x) for x in v["op_kind"]):
        if kind == RESET_CTX:
            await pulse_reset_ctx(dut)
            await _check_state(dut, k, v)
            continue
        token = last if kind == FEED_OWN else int(v["op_token"][k])
        assert token is not None, f"op {k}: no previous output to feed back"
        t_in = await feed_token(dut, token)
        if kind == DROP:
            quiet = int(v["quiet"])
            fired = await First(RisingEdge(dut.token_out__valid), Timer(int(quiet * period), "ns"))
            assert not isinstance(fired, RisingEdge) and not int(dut.token_out__valid.value), \
                f"op {k}: token {token} should have been dropped, but an output appeared"
            assert not taps.take(), f"op {k}: a dropped token {token} reached a layer"
            assert not int(dut.busy.value), f"op {k}: busy after a dropped token"
            await _check_state(dut, k, v)
            continue
        what = f"op {k} (pos {int(v['op_pos'][k]) - 1}, token {token})"
        out, cycles = await wait_token_out(dut, t_in, period=period, what=what,
                                           limit=4 * int(v["exp_cycles"][feed]) + 100)
        check_token(what, out=out, cycles=cycles, taps=taps.take(), n_layers=n_layers,
                    exp_token=v["exp_token"][feed], exp_taps=v["exp_taps"][feed],
                    exp_cycles=v["exp_cycles"][feed])
        cycles_total += cycles
        last, feed = out, feed + 1
        await FallingEdge(dut.clk)      # the output transfers on the edge before this
        await _check_state(dut, k, v)
    assert feed == n_feeds, f"{feed} outputs checked, {n_feeds} expected"
    wall = time.monotonic() - wall
    dut._log.info("%d tokens, %d cycles in %.1f s: %.0f cycles/s, %.1f tokens/s", feed,
                  cycles_total, wall, cycles_total / wall, feed / wall)
