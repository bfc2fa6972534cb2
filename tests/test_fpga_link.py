"""Host link gateware in Amaranth simulation: CRC, frame codec, UART, PLL dividers, and the
protocol engine against a TEST DOUBLE of the chip interface (tests/benches/board_chip_double:
an arithmetic next-token function, not a model) for every command and every error path.
The real chip is exercised end to end over the simulated UART in test_fpga_board_sim.py."""

import collections
import functools
import random
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator

from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora_image import LoraImageError, pack_lora
from hardwire.compiler.quantize import quantize_model
from hardwire.fpga import protocol as P
from hardwire.fpga.board import BoardCore, clocks_per_bit, ecp5_pll
from hardwire.fpga.hostlink import FrameTx, HostLinkEngine, connect_chip, crc16_next
from hardwire.fpga.host import HostLink, LoraRejected, check_lora_image, lora_load
from hardwire.fpga.uart import UARTRx, UARTTx
from hardwire.hdl.chip import WEIGHT_CLASSES, id_rom_words

sys.path.insert(0, str(Path(__file__).resolve().parent / "benches"))
from board_chip_double import ChipDouble, DoubleModel, lora_shift
from test_hdl_lora_loader import LoaderModel, _recrc, loader_args
from test_lora import write_peft

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

V, S = 40, 12            # vocabulary and context of the double
TIMEOUT = 120            # inter-byte timeout of the engine under test (cycles)
ID_WORDS = [0x48575231, 1] + [0x1000 + k for k in range(17)]


# ------------------------------------------------------------------------ pure protocol

def test_crc16_check_value_and_gateware_equations():
    assert P.crc16(b"123456789") == 0x29B1            # CRC-16/CCITT-FALSE check value
    crc, byte, out = Signal(16), Signal(8), Signal(16)
    m = Module()
    m.d.comb += out.eq(crc16_next(crc, byte))
    sim = Simulator(m)
    rng = random.Random(1)

    async def tb(ctx):
        for _ in range(300):
            c, b = rng.randrange(1 << 16), rng.randrange(256)
            ctx.set(crc, c)
            ctx.set(byte, b)
            assert ctx.get(out) == P.crc16_update(c, b), (c, b)
    sim.add_testbench(tb)
    sim.run()


def test_frame_codec_roundtrip_and_resync():
    f1 = P.encode_frame(P.Cmd.FEED, struct.pack(">3H", 1, 2, 3))
    f2 = P.encode_frame(P.Cmd.STATUS)
    assert f1[:5] == bytes([0xA5, 1, 3, 0, 6]) and len(f1) == 5 + 6 + 2
    bad = bytearray(f2)
    bad[-1] ^= 1
    dec = P.FrameDecoder()
    frames = dec.feed(b"\x00\x13" + f1[:4]) + dec.feed(f1[4:] + bytes(bad) + f2)
    assert [(f.cmd, f.ok) for f in frames] == [(3, True), (5, False), (5, True)]
    assert frames[0].payload == struct.pack(">3H", 1, 2, 3) and dec.skipped == 2
    err = P.FrameDecoder().feed(P.encode_frame(0xFF, bytes([4, 3, 0x12, 0x34])))[0]
    assert err.is_error and err.error() == (P.Err.BAD_LENGTH, 3, 0x1234)


def test_pll_dividers_match_ecppll():
    # reference values printed by Project Trellis' ecppll (yowasp-ecppll -i 25 -o F)
    for f_out, want in ((50, (1, 2, 12)), (62.5, (2, 5, 10)), (40, (5, 8, 15)),
                        (75, (1, 3, 8)), (48, (8, 15, 13))):
        pll = ecp5_pll(25, f_out)
        assert (pll.clki_div, pll.clkfb_div, pll.clkop_div) == want, f_out
        assert 400 <= pll.f_vco_mhz <= 800
    assert ecp5_pll(25, 50).f_out_mhz == 50


def test_clocks_per_bit():
    assert clocks_per_bit(50_000_000, 115200) == 434
    assert clocks_per_bit(50_000_000, 1_000_000) == 50
    with pytest.raises(ValueError, match="not reachable"):
        clocks_per_bit(50_000_000, 20_000_000)


# ----------------------------------------------------------------------- parameter errors

def _engine(**kw):
    args = dict(token_bits=7, vocab_size=V, seq_len=S, clock_hz=50_000_000, clocks_per_bit=4,
                timeout_cycles=TIMEOUT)
    args.update(kw)
    return HostLinkEngine(**args)


@pytest.mark.parametrize("kw, message", [
    (dict(vocab_size=70000, token_bits=18), r"vocab_size \(70000\) must be 1..65536"),
    (dict(token_bits=5), r"token_bits \(5\) cannot hold token 39"),
    (dict(seq_len=70000), r"seq_len \(70000\) must be 1..65535"),
    (dict(max_payload=7), r"max_payload \(7\) must be even and 4..65534"),
    (dict(build_id=1 << 32), r"build_id \(4294967296\) must fit a 32-bit word"),
    (dict(timeout_cycles=0), r"timeout_cycles and token_timeout_cycles must be positive"),
])
def test_engine_parameter_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        _engine(**kw)


def test_uart_and_frame_tx_parameter_errors():
    with pytest.raises(ValueError, match=r"clocks_per_bit \(3\) must be at least 4"):
        UARTTx(clocks_per_bit=3)
    with pytest.raises(ValueError, match=r"clocks_per_bit \(2\) must be at least 4"):
        UARTRx(clocks_per_bit=2)
    with pytest.raises(ValueError, match="info_words must be 32-bit"):
        FrameTx(info_words=[-1])


# ---------------------------------------------------------------------------------- UART

def test_uart_loopback_and_timing():
    cpb = 5
    m = Module()
    m.submodules.tx = tx = UARTTx(clocks_per_bit=cpb)
    m.submodules.rx = rx = UARTRx(clocks_per_bit=cpb)
    m.d.comb += rx.rx.eq(tx.tx)
    data = [0x00, 0xFF, 0xA5, 0x5A, 0x01, 0x80] + [random.Random(2).randrange(256)
                                                   for _ in range(10)]
    got = []
    sim = Simulator(m)
    sim.add_clock(1e-8)

    async def send(ctx):
        for b in data:
            ctx.set(tx.i.valid, 1)
            ctx.set(tx.i.payload, b)
            await ctx.tick().until(tx.i.ready)
        ctx.set(tx.i.valid, 0)

    async def recv(ctx):
        ctx.set(rx.o.ready, 1)
        cycle = 0
        async for _, _, valid, payload, ferr in ctx.tick().sample(rx.o.valid, rx.o.payload,
                                                                   rx.framing_error):
            cycle += 1
            assert not ferr
            if valid:
                got.append((payload, cycle))
            if len(got) == len(data):
                break
    sim.add_testbench(send)
    sim.add_testbench(recv)
    sim.run_until(1e-8 * (len(data) + 2) * tx.cycles_per_byte())
    assert [b for b, _ in got] == data
    gaps = {b - a for (_, a), (_, b) in zip(got, got[1:])}
    assert gaps == {tx.cycles_per_byte()}, gaps            # back to back: 10 * cpb + 1


def test_uart_rx_framing_error_and_glitch():
    cpb = 6
    m = Module()
    m.submodules.rx = rx = UARTRx(clocks_per_bit=cpb)
    sim = Simulator(m)
    sim.add_clock(1e-8)
    seen = {"bytes": [], "ferr": 0}

    async def drive(ctx):
        async def bits(levels):
            for level in levels:
                ctx.set(rx.rx, level)
                await ctx.tick().repeat(cpb)
        ctx.set(rx.o.ready, 1)
        await ctx.tick().repeat(5)
        ctx.set(rx.rx, 0)                       # a 1-cycle glitch is not a start bit
        await ctx.tick()
        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(3 * cpb)
        await bits([0] + [1, 0, 1, 0, 1, 0, 1, 0] + [0])     # stop bit 0: framing error
        await bits([1] * 3)
        await bits([0] + [0, 1, 1, 0, 0, 1, 1, 0] + [1])     # 0x66
        await bits([1] * 3)

    async def watch(ctx):
        async for _, _, valid, payload, ferr in ctx.tick().sample(rx.o.valid, rx.o.payload,
                                                                   rx.framing_error):
            seen["ferr"] += ferr
            if valid:
                seen["bytes"].append(payload)
    sim.add_testbench(drive)
    sim.add_process(watch)
    sim.run_until(1e-8 * 40 * cpb)
    assert seen["ferr"] == 1 and seen["bytes"] == [0x66]


# ----------------------------------------------------------------------- protocol engine

class LinkBench:
    """The engine wired to the chip double; a script of byte bursts, replies collected.
    With ``lora`` (loader arguments) the double holds a real LoraLoader."""

    def __init__(self, *, latency=3, token_timeout=5000, max_payload=16, lora=None,
                 id_words=ID_WORDS):
        self.chip = ChipDouble(vocab_size=V, seq_len=S, latency=latency, id_words=id_words,
                               lora=lora)
        self.link = _engine(token_bits=self.chip.token_bits, build_id=0xB11D,
                            max_payload=max_payload, token_timeout_cycles=token_timeout,
                            lora=lora is not None)
        m = self.m = Module()
        m.submodules.chip, m.submodules.link = self.chip, self.link
        connect_chip(m, self.link, self.chip)

    def run(self, steps, *, max_cycles=60000):
        """``steps``: ``(bytes, n_replies)``: send the bytes (a byte every other cycle),
        then wait for ``n_replies`` frames (or, if None, for ``3 * TIMEOUT`` cycles).
        Returns the frames received after each step."""
        link, dec = self.link, P.FrameDecoder()
        frames, out = [], []
        sim = Simulator(self.m)
        sim.add_clock(1e-8)
        errors = []

        async def tx_side(ctx):
            ctx.set(link.tx.ready, 1)
            async for _, _, valid, payload, err in ctx.tick().sample(
                    link.tx.valid, link.tx.payload, link.error):
                if valid:
                    frames.extend(dec.feed(bytes([payload])))
                errors.append(err)

        async def rx_side(ctx):
            cycles = 0
            for data, n in steps:
                start = len(frames)
                for b in data:
                    ctx.set(link.rx.valid, 1)
                    ctx.set(link.rx.payload, b)
                    await ctx.tick().until(link.rx.ready)
                    ctx.set(link.rx.valid, 0)
                    await ctx.tick()
                if n is None:
                    await ctx.tick().repeat(3 * TIMEOUT)
                else:
                    while len(frames) < start + n:
                        await ctx.tick()
                        cycles += 1
                        assert cycles < max_cycles, f"no reply to {data.hex()}"
                out.append(frames[start:])
        sim.add_process(tx_side)
        sim.add_testbench(rx_side)
        sim.run()            # until the testbench is done (the monitor is a process)
        assert all(f.ok and f.version == P.VERSION for f in frames)
        self.error_pulses = sum(errors)
        return out


def req(cmd, payload=b""):
    return P.encode_frame(cmd, payload)


def tokens(*t):
    return struct.pack(f">{len(t)}H", *t)


def test_engine_commands_against_double():
    model = DoubleModel(V, S)
    prompt = [1, 5, 9]
    first = [model.feed(t) for t in prompt][-1]
    gen = [first]
    for _ in range(4 + 5):
        gen.append(model.feed(gen[-1]))
    gen4, gen5 = gen[1:5], gen[5:10]
    stop = gen5[2]                      # GENERATE 5 with this stop token ends after 3
    bench = LinkBench()
    r = bench.run([
        (req(P.Cmd.INFO), 1),
        (req(P.Cmd.STATUS), 1),
        (req(P.Cmd.FEED, tokens(*prompt)), 1),
        (req(P.Cmd.GENERATE, tokens(4)), 4),
        (req(P.Cmd.STATUS), 1),
        (req(P.Cmd.GENERATE, tokens(5, stop)), 3),
        (req(P.Cmd.RESET), 1),
        (req(P.Cmd.STATUS), 1),
        (req(P.Cmd.FEED, tokens(*range(1, 9))), 1),        # a full 16-byte payload
    ])
    info = r[0][0]
    assert info.cmd == 0x81 and len(info.payload) == 4 * (4 + 64)
    words = struct.unpack(">68I", info.payload)
    assert words[:4] == (0xB11D, 50_000_000, 4, 16)
    assert list(words[4:4 + len(ID_WORDS)]) == ID_WORDS and not any(words[4 + len(ID_WORDS):])
    assert r[1][0].payload == bytes(7)                           # pos 0, no flags, 0 errors
    assert r[2][0].cmd == 0x83 and struct.unpack(">H", r[2][0].payload)[0] == first
    assert [struct.unpack(">HB", f.payload) for f in r[3]] == [(t, int(k == 3))
                                                              for k, t in enumerate(gen4)]
    pos, flags, pend, errs = struct.unpack(">HBHH", r[4][0].payload)
    assert (pos, flags, pend, errs) == (7, P.STATUS_PENDING, gen4[-1], 0)
    assert [struct.unpack(">HB", f.payload) for f in r[5]] == [(gen5[0], 0), (gen5[1], 0),
                                                              (gen5[2], 1)]
    assert r[6][0].cmd == 0x82 and r[6][0].payload == b""
    assert struct.unpack(">HBHH", r[7][0].payload)[:2] == (0, 0)
    model.reset()
    want = [model.feed(t) for t in range(1, 9)][-1]
    assert struct.unpack(">H", r[8][0].payload)[0] == want


def _err(frames):
    assert len(frames) == 1 and frames[0].is_error, frames
    return frames[0].error()


def test_engine_errors_and_recovery():
    bench = LinkBench()
    good = req(P.Cmd.FEED, tokens(3))
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0x40
    garbage = bytes(random.Random(5).randrange(256) for _ in range(40)).replace(b"\xa5", b"")
    steps = [
        (req(P.Cmd.GENERATE, tokens(2)), 1),                   # 0 no pending token
        (req(P.Cmd.FEED, tokens(1)), 1),                       # 1 ok
        (req(P.Cmd.GENERATE, tokens(0)), 1),                   # 2 n = 0
        (req(P.Cmd.STATUS, b"\x00"), None),                    # 3 STATUS takes no payload
        (req(P.Cmd.FEED, bytes(3)), None),                     # 4 odd FEED length
        (req(P.Cmd.FEED, bytes(18)), None),                    # 5 longer than max_payload
        (P.encode_frame(P.Cmd.INFO, version=2), None),         # 6 bad version
        (req(0x12), None),                                     # 7 reserved (LoRA): unknown
        (bytes(bad_crc), None),                                # 8 bad CRC
        (good[:7], None),                                      # 9 truncated
        (garbage, None),                                       # 10 garbage
        (req(P.Cmd.FEED, tokens(2, V, 3)), 1),                 # 11 token out of range
        (req(P.Cmd.STATUS), 1),                                # 12
        (req(P.Cmd.FEED, tokens(*range(1, 9))), 1),            # 13 pos 2 -> 10
        (req(P.Cmd.FEED, tokens(4, 5, 6)), 1),                 # 14 context (12) full at 6
        (req(P.Cmd.GENERATE, tokens(3)), 1),                   # 15 context full
        (req(P.Cmd.RESET) + b"\x01\x02", 2),                   # 16 bytes during a command
        (req(P.Cmd.FEED, tokens(7)), 1),                       # 17 works again
    ]
    r = bench.run(steps)
    E = P.Err
    assert _err(r[0]) == (E.NO_TOKEN, P.Cmd.GENERATE, 0)
    assert r[1][0].cmd == 0x83
    assert _err(r[2]) == (E.BAD_ARG, P.Cmd.GENERATE, 0)
    assert _err(r[3]) == (E.BAD_LENGTH, P.Cmd.STATUS, 1)
    assert _err(r[4]) == (E.BAD_LENGTH, P.Cmd.FEED, 3)
    assert _err(r[5]) == (E.BAD_LENGTH, P.Cmd.FEED, 18)
    assert _err(r[6]) == (E.BAD_VERSION, P.Cmd.INFO, 2)
    assert _err(r[7]) == (E.UNKNOWN_CMD, 0x12, 0)
    assert _err(r[8]) == (E.BAD_CRC, P.Cmd.FEED, struct.unpack(">H", bad_crc[-2:])[0])
    assert _err(r[9]) == (E.TIMEOUT, P.Cmd.FEED, 7)
    assert _err(r[10]) == (E.BAD_SYNC, 0, len(garbage))
    assert _err(r[11]) == (E.TOKEN_RANGE, P.Cmd.FEED, 1)        # token 2 was fed
    pos, _, _, errs = struct.unpack(">HBHH", r[12][0].payload)
    assert (pos, errs) == (2, 11)                        # tokens 1 and 2 were fed
    assert r[13][0].cmd == 0x83
    assert _err(r[14]) == (E.CONTEXT_FULL, P.Cmd.FEED, 2)
    assert _err(r[15]) == (E.CONTEXT_FULL, P.Cmd.GENERATE, 0)
    assert r[16][0].cmd == 0x82 and _err(r[16][1:]) == (E.BAD_SYNC, 0, 2)
    assert r[17][0].cmd == 0x83
    assert bench.error_pulses == 14


def test_engine_chip_watchdog():
    bench = LinkBench(latency=400, token_timeout=100)
    r = bench.run([(req(P.Cmd.FEED, tokens(1, 2)), 1), (req(P.Cmd.STATUS), 1)])
    assert _err(r[0]) == (P.Err.CHIP_TIMEOUT, P.Cmd.FEED, 0)
    assert r[1][0].cmd == 0x85


def test_board_core_over_uart():
    """INFO and a FEED through the UARTs of a BoardCore (the double as its chip)."""
    cpb = 4
    chip = ChipDouble(vocab_size=V, seq_len=S, latency=2, id_words=ID_WORDS)
    core = BoardCore(chip, clock_hz=1_000_000, clocks_per_bit=cpb, build_id=7,
                     timeout_cycles=40 * cpb)
    sim = Simulator(core)
    sim.add_clock(1e-6)
    dec, frames = P.FrameDecoder(), []
    requests = [req(P.Cmd.FEED, tokens(4, 6)), req(P.Cmd.STATUS)]

    async def host(ctx):
        for request in requests:
            for b in request:
                for level in [0] + [(b >> k) & 1 for k in range(8)] + [1]:
                    ctx.set(core.uart_rx, level)
                    await ctx.tick().repeat(cpb)
            await ctx.tick().repeat(20 * 10 * cpb)         # wait for the reply

    async def line(ctx):
        bits, timer, byte = None, 0, 0
        async for _, _, tx in ctx.tick().sample(core.uart_tx):
            if bits is None:
                if not tx:
                    bits, timer = 0, cpb // 2 + cpb
                continue
            timer -= 1
            if timer == 0:
                if bits < 8:
                    byte |= tx << bits
                    bits += 1
                    timer = cpb
                else:
                    frames.extend(dec.feed(bytes([byte])))
                    bits, byte = None, 0
    sim.add_testbench(host)
    sim.add_process(line)
    sim.run_until(1e-6 * 70 * 10 * cpb)
    model = DoubleModel(V, S)
    model.feed(4)
    assert [f.cmd for f in frames] == [0x83, 0x85]
    assert struct.unpack(">H", frames[0].payload)[0] == model.feed(6)
    assert struct.unpack(">HBHH", frames[1].payload)[:2] == (2, P.STATUS_PENDING)


# ------------------------------------------------------------------------- LoRA upload

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@functools.cache
def tiny_lora():
    """A random tiny model, its chip's loader arguments and ID ROM, and three images: two
    valid adapters and the first one with a flipped body byte (CRC)."""
    model = random_model(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=12,
                         vocab_size=32, seq_len=16, seed=4)
    qm = quantize_model(model, wbits=8)
    shorts = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with tempfile.TemporaryDirectory() as tmp:
        images = [pack_lora(write_peft(Path(tmp) / str(k), model, shorts, 2, seed=k), model,
                            wbits=8, qm=qm, r_max=2) for k in range(2)]
    bad = bytearray(images[0])
    bad[100] ^= 4
    c = model.config
    ids = id_rom_words(model_hash="00" * 32, dim=c.dim, n_layers=c.n_layers,
                       n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, hidden_dim=c.hidden_dim,
                       vocab_size=V, seq_len=S, weight_bits=dict.fromkeys(WEIGHT_CLASSES, 8),
                       digest=qm.digest())
    return loader_args(qm, targets=TARGETS, r_max=2), ids, images + [bytes(bad)]


class LoraScript:
    """Link requests and the replies the loader model and the double model predict."""

    def __init__(self, args):
        self.lm, self.dm = LoaderModel(**args), DoubleModel(V, S)
        self.steps, self.expect = [], []

    def lora(self, cmd, image=b""):
        code = P.LORA_COMMANDS[cmd]
        chunks = [image[k:k + 16] for k in range(0, len(image), 16)] or [b""]
        for chunk in chunks:
            for b in chunk:
                self.lm.byte(b)
            if code is not None:
                self.lm.cmd(int(code))
            self.lm.boundary()                      # the chip is idle: a boundary
            self.steps.append((req(cmd, chunk), 1))
            err = self.lm.error if cmd != P.Cmd.LORA_STATUS else 0
            self.expect.append(("error", (P.Err.LORA_REJECTED, cmd, int(err))) if err
                               else ("status", self.lm.status()))
        return self

    def feed(self, *toks):
        shift = lora_shift(self.lm.on, self.lm.active)
        out = [self.dm.feed(t, shift) for t in toks][-1]
        self.steps.append((req(P.Cmd.FEED, tokens(*toks)), 1))
        self.expect.append(("token", out))
        return self

    def check(self, replies):
        assert len(replies) == len(self.expect)
        for k, (frames, (kind, want)) in enumerate(zip(replies, self.expect)):
            assert len(frames) == 1, (k, frames)
            f = frames[0]
            if kind == "error":
                assert f.is_error and f.error() == want, (k, f)
            elif kind == "status":
                assert not f.is_error and struct.unpack(">H", f.payload)[0] == want, (k, f)
            else:
                assert f.cmd == 0x83 and struct.unpack(">H", f.payload)[0] == want, (k, f)


def test_engine_lora_upload_commit_reject_lock():
    """Upload, commit, enable; an upload between tokens takes effect at the next token; a
    corrupt or truncated upload is rejected (LORA_REJECTED + the loader's code) and the old
    adapter keeps serving; lock; length rules."""
    args, ids, (img_a, img_b, corrupt) = tiny_lora()
    C = P.Cmd
    s = LoraScript(args)
    s.feed(1, 2)                                              # no adapter
    s.lora(C.LORA_BEGIN).lora(C.LORA_DATA, img_a).lora(C.LORA_COMMIT).lora(C.LORA_ENABLE)
    s.feed(3)                                                 # adapter A (bank 1)
    s.lora(C.LORA_BEGIN).lora(C.LORA_DATA, img_b).lora(C.LORA_COMMIT)
    s.feed(4)                                                 # adapter B (bank 0) from here
    s.lora(C.LORA_BEGIN).lora(C.LORA_DATA, corrupt).lora(C.LORA_COMMIT)     # CRC
    s.lora(C.LORA_BEGIN).lora(C.LORA_DATA, img_a[:-5]).lora(C.LORA_COMMIT)  # truncated
    s.lora(C.LORA_DATA, img_a[:3])                                          # no BEGIN
    s.feed(5)                                                 # still adapter B
    s.lora(C.LORA_DISABLE).feed(6).lora(C.LORA_ENABLE).lora(C.LORA_LOCK)
    s.lora(C.LORA_BEGIN).lora(C.LORA_STATUS).feed(7)          # locked: refused, B serving
    assert next(e for e in s.expect if e[0] == "error")[1][2] == P.LoraError.CRC
    assert s.lm.locked and s.lm.on and s.lm.active == 0
    bench = LinkBench(lora=args, id_words=ids, max_payload=16)
    steps = s.steps + [(req(C.LORA_DATA), None), (req(C.LORA_COMMIT, b"\x00"), None),
                       (req(0x17), None)]
    r = bench.run(steps, max_cycles=200000)
    s.check(r[:len(s.expect)])
    assert _err(r[-3]) == (P.Err.BAD_LENGTH, C.LORA_DATA, 0)
    assert _err(r[-2]) == (P.Err.BAD_LENGTH, C.LORA_COMMIT, 1)
    assert _err(r[-1]) == (P.Err.UNKNOWN_CMD, 0x17, 0)


def test_engine_lora_negative_control():
    """The check above can fail: predicting the old adapter after a commit is caught."""
    args, ids, (img_a, _, _) = tiny_lora()
    s = LoraScript(args)
    C = P.Cmd
    s.lora(C.LORA_BEGIN).lora(C.LORA_DATA, img_a).lora(C.LORA_COMMIT).lora(C.LORA_ENABLE)
    s.feed(3)
    s.expect[-1] = ("token", DoubleModel(V, S).feed(3))        # as if no adapter
    r = LinkBench(lora=args, id_words=ids).run(s.steps, max_cycles=100000)
    with pytest.raises(AssertionError):
        s.check(r)


def test_engine_without_lora_refuses_lora_commands():
    r = LinkBench().run([(req(P.Cmd.LORA_STATUS), None), (req(P.Cmd.LORA_BEGIN), None)])
    assert _err(r[0]) == (P.Err.UNKNOWN_CMD, P.Cmd.LORA_STATUS, 0)
    assert _err(r[1]) == (P.Err.UNKNOWN_CMD, P.Cmd.LORA_BEGIN, 0)


class SimSerial:
    """A serial-port-like object whose far end is an Amaranth simulation of the engine and
    the chip double: what the host writes is fed to ``link.rx``, ``link.tx`` is read back."""

    name = "sim"

    def __init__(self, bench, *, chunk=400):
        self.bench, self.chunk = bench, chunk
        self.inq, self.out = collections.deque(), bytearray()
        self.sim = Simulator(bench.m)
        self.sim.add_clock(1e-8)
        self.now = 0
        link = bench.link

        async def wire(ctx):
            ctx.set(link.tx.ready, 1)
            while True:
                if self.inq:
                    ctx.set(link.rx.valid, 1)
                    ctx.set(link.rx.payload, self.inq[0])
                else:
                    ctx.set(link.rx.valid, 0)
                took = bool(self.inq) and ctx.get(link.rx.ready)
                sent = ctx.get(link.tx.payload) if ctx.get(link.tx.valid) else None
                await ctx.tick()
                if took:
                    self.inq.popleft()
                if sent is not None:
                    self.out.append(sent)
        self.sim.add_testbench(wire)

    def write(self, data):
        self.inq.extend(data)

    def read(self, n):
        for _ in range(50):
            if self.out:
                break
            self.now += self.chunk
            self.sim.run_until(self.now * 1e-8)
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    def close(self):
        pass


def test_host_lora_load_over_simulated_link(tmp_path):
    """HostLink / lora_load (what `hardwire lora load` runs) against the engine and a real
    LoraLoader: upload + commit + enable, the chip's reasons for refusing a corrupt or a
    foreign image, the old adapter serving throughout."""
    args, ids, (img_a, img_b, corrupt) = tiny_lora()
    bench = LinkBench(lora=args, id_words=ids, max_payload=64)
    port = SimSerial(bench)
    seen = []
    res = lora_load(port, img_a, progress=lambda a, b: seen.append((a, b)), source="a.hwla")
    assert seen[-1] == (len(img_a), len(img_a)) and len(seen) == -(-len(img_a) // 64)
    assert (res["status"]["bank"], res["status"]["on"], res["status"]["error"]) == (1, True,
                                                                                     "OK")
    link = HostLink(port, timeout=30)
    dm = DoubleModel(V, S)
    assert link.feed([3]) == dm.feed(3, lora_shift(1, 1))
    with pytest.raises(LoraRejected, match=r"LORA_COMMIT: CRC mismatch.*\(CRC\); the active "
                                           r"adapter is unchanged"):
        link.lora_upload(corrupt)
    st = link.lora_status()
    assert (st["bank"], st["on"], st["error"]) == (1, True, P.LoraError.CRC)
    assert link.feed([4]) == dm.feed(4, lora_shift(1, 1))
    # a foreign image (another digest) is refused by the host check before any upload ...
    foreign = bytearray(img_b)
    foreign[8] ^= 1
    foreign = _recrc(foreign)
    info = link.info()
    with pytest.raises(LoraImageError, match=r"^f.hwla: packed for another base model"):
        check_lora_image(foreign, info=info, source="f.hwla")
    # ... and by the chip if sent anyway
    with pytest.raises(LoraRejected, match=r"\(DIGEST\)"):
        link.lora_upload(foreign)
    link.lora_upload(img_b, commit=True)
    assert link.feed([5]) == dm.feed(5, lora_shift(1, 0))     # still enabled: B, bank 0
    link.close()


def test_lora_load_cli_errors(tmp_path, capsys):
    """`hardwire lora load`: a bad image or a bad port is one line, exit 2."""
    from hardwire.cli import main
    _, _, (img_a, _, corrupt) = tiny_lora()
    good, bad = tmp_path / "a.hwla", tmp_path / "bad.hwla"
    good.write_bytes(img_a)
    bad.write_bytes(corrupt)
    cases = [
        ([str(tmp_path / "none.hwla"), "--port", "/dev/null"], "none.hwla: no such file"),
        ([str(bad), "--port", "/dev/null"], "bad.hwla: CRC mismatch"),
        ([str(good), "--port", str(tmp_path / "ttyNONE")], "cannot open"),
        ([str(good)], "the following arguments are required: --port"),
    ]
    for argv, text in cases:
        assert main(["lora", "load", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hardwire: error:") and text in err, err
