"""cocotb bench of a ``LlamaChip`` with LoRA: adapter uploads through the chip's loader ports
(``lora_in``, ``lora_cmd``, ``lora_status``) between and during token sessions, against the
golden model with the adapter in force.

Vectors (``$HARDWIRE_VECTORS``): ``images`` (concatenated adapter images) with
``image_start``/``image_len``; a script ``op_kind``/``op_arg`` run in order:

* 0 FEED ``op_arg``; 1 FEED the chip's previous output; 3 pulse ``reset_ctx``;
* 4 CMD ``op_arg`` (a ``LoraCmd`` code) while idle;
* 5 UPLOAD_BG image ``op_arg``: stream its bytes on ``lora_in`` in the background (the
  following tokens are computed meanwhile);
* 6 WAIT until the background upload has sent its last byte;
* 7 FEED the previous output and send CMD ``op_arg`` while that token is computed.

After each op, ``op_on`` is the expected ``lora_status.on`` and ``lora_status.error`` must be
0. Per feed (kinds 0, 1, 7): ``exp_token``, ``exp_taps`` (feeds, n_layers, dim) and
``exp_cycles`` (``cycles_per_token(pos, lora_on=...)``, ``token_in`` transfer to the first
``token_out.valid``).
"""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge
from hardwire.sim.chip_bench_helpers import (
    TapCollector,
    check_id_rom,
    check_token,
    feed_token,
    pulse_reset_ctx,
    wait_token_out,
)
from hardwire.sim.cocotb_helpers import load_vectors, reset, start_clock

FEED, FEED_OWN, RESET_CTX, CMD, UPLOAD_BG, WAIT, FEED_OWN_CMD = 0, 1, 3, 4, 5, 6, 7


async def send_bytes(dut, data):
    """``lora_in`` (always ready in the loader): one byte a cycle."""
    for b in data:
        await FallingEdge(dut.clk)
        dut.lora_in__valid.value = 1
        dut.lora_in__payload.value = int(b)
        await ReadOnly()
        assert int(dut.lora_in__ready.value), "lora_in not ready"
    await FallingEdge(dut.clk)
    dut.lora_in__valid.value = 0


async def send_cmd(dut, code):
    await FallingEdge(dut.clk)
    dut.lora_cmd__valid.value = 1
    dut.lora_cmd__payload.value = int(code)
    for _ in range(1000):
        await ReadOnly()
        if int(dut.lora_cmd__ready.value):
            break
        await FallingEdge(dut.clk)
    else:
        raise AssertionError(f"lora_cmd {code} not taken in 1000 cycles")
    await FallingEdge(dut.clk)
    dut.lora_cmd__valid.value = 0


async def check_status(dut, k, on):
    for _ in range(3):
        await RisingEdge(dut.clk)
    await ReadOnly()
    s = int(dut.lora_status.value)
    err, got_on = (s >> 8) & 0xFF, (s >> 1) & 1
    assert err == 0, f"op {k}: lora_status error {err} (status {s:#06x})"
    assert got_on == on, f"op {k}: lora_status.on is {got_on}, expected {on} ({s:#06x})"


@cocotb.test()
async def script(dut):
    v = load_vectors()
    period, bits = int(v["period_ns"]), int(v["resid_bits"])
    n_feeds, n_layers, dim = v["exp_taps"].shape
    start_clock(dut, period)
    for name in ("token_in__valid", "reset_ctx", "id_addr", "lora_in__valid",
                 "lora_cmd__valid"):
        getattr(dut, name).value = 0
    dut.token_out__ready.value = 1
    await reset(dut)
    for _ in range(2):
        await RisingEdge(dut.clk)
    await check_id_rom(dut, v["id_words"])
    taps = TapCollector(dut, bits, dim)
    cocotb.start_soon(taps.run())
    images = bytes(v["images"].astype("uint8"))
    upload, last, nfeed = None, None, 0
    for k, (kind, arg) in enumerate(zip((int(x) for x in v["op_kind"]),
                                        (int(x) for x in v["op_arg"]))):
        on = int(v["op_on"][k])
        if kind == RESET_CTX:
            await pulse_reset_ctx(dut)
            continue
        if kind == CMD:
            await send_cmd(dut, arg)
            await check_status(dut, k, on)
            continue
        if kind == UPLOAD_BG:
            s, n = int(v["image_start"][arg]), int(v["image_len"][arg])
            upload = cocotb.start_soon(send_bytes(dut, images[s:s + n]))
            continue
        if kind == WAIT:
            await upload
            upload = None
            continue
        token = arg if kind == FEED else last
        t_in = await feed_token(dut, token)
        if kind == FEED_OWN_CMD:
            await ReadOnly()
            assert int(dut.busy.value), f"op {k}: the chip is not busy for the command"
            await send_cmd(dut, arg)
            await ReadOnly()
            assert int(dut.busy.value), f"op {k}: the command was not sent inside the token"
        what = f"op {k} (feed {nfeed}, token {token})"
        out, cycles = await wait_token_out(dut, t_in, period=period, what=what,
                                           limit=4 * int(v["exp_cycles"][nfeed]) + 100)
        check_token(what, out=out, cycles=cycles, taps=taps.take(), n_layers=n_layers,
                    exp_token=v["exp_token"][nfeed], exp_taps=v["exp_taps"][nfeed],
                    exp_cycles=v["exp_cycles"][nfeed])
        last, nfeed = out, nfeed + 1
        await FallingEdge(dut.clk)
        if upload is None:
            await check_status(dut, k, on)
    assert nfeed == n_feeds, f"{nfeed} outputs checked, {n_feeds} expected"
    dut._log.info("%d tokens checked", nfeed)
