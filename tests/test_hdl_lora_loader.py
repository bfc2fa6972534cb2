"""LoraLoader: real (stories260K Mia) and random-model images through commands, bytes and
token boundaries, against a Python model of the documented semantics (docs/lora.md, "Loader
and errors"); every rejection; the SRAM writes byte for byte; a negative control."""

import gc
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable
from golden_vectors import stories_model, stories_qmodel
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora import base_digest8
from hardwire.compiler.lora_image import (
    HEADER,
    MAGIC,
    VERSION,
    LoraImageError,
    image_length,
    pack_lora,
    read_image,
    target_mask,
)
from hardwire.compiler.quantize import quantize_model
from hardwire.hdl.lora_loader import LoraCmd, LoraError, LoraLoader
from hardwire.sim.cocotb_runner import export_verilog, run_cocotb

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
MIA = TESTS.parent / "examples" / "adapters" / "stories260K-mia"
TOP = "lora_loader"
E = LoraError
_verilog = {}


def loader_args(qm, *, targets, r_max):
    """``header`` and ``image_length`` of the loader for the chip of ``qm``."""
    c = qm.config
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, base_digest8(qm), c.n_layers,
                         target_mask(targets), r_max, 0, c.dim, c.kv_dim, c.hidden_dim, 0)
    return dict(header=header, image_length=image_length(c.n_layers, targets, r_max, c.dim,
                                                         c.kv_dim, c.hidden_dim))


class LoaderModel:
    """The loader's documented behaviour, in Python (zlib CRC, slices of the received bytes)."""

    FIELDS = (("magic", 0, 4), ("version", 4, 6), ("header", 6, 8), ("header", 30, 32),
              ("mask", 18, 20), ("r_max", 20, 22), ("digest", 8, 16), ("shape", 16, 18),
              ("shape", 24, 30))

    def __init__(self, header, image_length):
        self.header, self.n = bytes(header), image_length
        self.body = image_length - 36
        self.r_max = struct.unpack_from("<H", header, 20)[0]
        self.active, self.valid, self.pending, self.enabled, self.on = 0, [0, 0], 0, 0, 0
        self.locked, self.open, self.error, self.overflow = 0, 0, E.OK, 0
        self.rx = bytearray()
        self.banks = np.full((2, self.body), -1, dtype=np.int64)

    def byte(self, b):
        if self.locked:
            self.error = E.LOCKED
        elif not self.open:
            self.error = E.NO_BEGIN
        elif len(self.rx) == self.n:
            self.overflow, self.error = 1, E.OVERFLOW
        else:
            k = len(self.rx)
            self.rx.append(b)
            if 32 <= k < self.n - 4:
                self.banks[1 - self.active, k - 32] = b

    def _commit_error(self):
        rx, n = bytes(self.rx), self.n
        if not self.open:
            return E.NO_BEGIN
        if len(rx) < 32:
            return E.TRUNCATED
        bad = {f for f, lo, hi in self.FIELDS if rx[lo:hi] != self.header[lo:hi]}
        for f, err in (("magic", E.MAGIC), ("version", E.VERSION), ("header", E.HEADER),
                       ("mask", E.MASK), ("r_max", E.R_MAX)):
            if f in bad:
                return err
        if struct.unpack_from("<H", rx, 22)[0] > self.r_max:
            return E.RANK
        if len(rx) < n:
            return E.TRUNCATED
        if self.overflow:
            return E.OVERFLOW
        if zlib.crc32(rx[:n - 4]) != struct.unpack_from("<I", rx, n - 4)[0]:
            return E.CRC
        for f, err in (("digest", E.DIGEST), ("shape", E.SHAPE)):
            if f in bad:
                return err
        return E.OK

    def cmd(self, c):
        if c > LoraCmd.LOCK:
            self.error = E.BAD_CMD
        elif self.locked:
            self.error = E.LOCKED
        elif c == LoraCmd.BEGIN:
            self.open, self.pending, self.overflow, self.error = 1, 0, 0, E.OK
            self.rx = bytearray()
            self.valid[1 - self.active] = 0
        elif c == LoraCmd.COMMIT:
            self.error = self._commit_error()
            self.open = 0
            if self.error == E.OK:
                self.valid[1 - self.active], self.pending = 1, 1
        else:
            self.enabled = {LoraCmd.ENABLE: 1, LoraCmd.DISABLE: 0}.get(c, self.enabled)
            self.locked |= c == LoraCmd.LOCK
            self.error = E.OK

    def boundary(self):
        if self.pending:
            self.active, self.pending = 1 - self.active, 0
        self.on = int(self.enabled and self.valid[self.active])

    def status(self):
        bits = (self.active, self.on, self.pending, self.locked, self.open, self.enabled,
                self.valid[self.active])
        return sum(b << k for k, b in enumerate(bits)) | int(self.error) << 8


class Script:
    """Ops for the bench, played on the model as they are added."""

    def __init__(self, args):
        self.model = LoaderModel(**args)
        self.data, self.ops, self.status = bytearray(), [], []

    def _op(self, kind, arg=0, start=0, stop=0):
        self.ops.append((kind, arg, start, stop))
        self.status.append(self.model.status())

    def cmd(self, c):
        self.model.cmd(int(c))
        self._op(0, int(c))
        return self

    def send(self, data):
        start = len(self.data)
        self.data += data
        for b in data:
            self.model.byte(b)
        self._op(1, 0, start, len(self.data))
        return self

    def boundary(self, cycles=1):
        self.model.boundary()
        self._op(2, cycles)
        return self

    def idle(self, cycles=20):
        self._op(3, cycles)
        return self

    def upload(self, image, *, commit=True):
        self.cmd(LoraCmd.BEGIN).send(image)
        return self.cmd(LoraCmd.COMMIT) if commit else self

    @property
    def m(self):
        return self.model


def run(dut, script, *, valid_prob=1.0, expect_failure=False, perturb=None):
    if id(dut) not in _verilog:
        _verilog[id(dut)] = (dut, export_verilog(dut, TOP))
    status = np.array(script.status, dtype=np.int64)
    banks = script.model.banks.copy()
    if perturb == "status":
        status[len(status) // 2] ^= 1 << 2
    elif perturb == "bank":
        k = int(np.flatnonzero(banks[script.model.active] >= 0)[5])
        banks[script.model.active, k] ^= 1
    vectors = dict(data=np.frombuffer(bytes(script.data), dtype=np.uint8),
                   ops=np.array(script.ops, dtype=np.int64), expect_status=status,
                   expect_banks=banks, valid_prob=valid_prob)
    return run_cocotb(component_or_verilog=_verilog[id(dut)][1], toplevel=TOP,
                      test_module="lora_loader_bench", test_dir=TESTS / "benches",
                      build_root=BUILD_ROOT, vectors=vectors, expect_failure=expect_failure,
                      timeout_s=300)


def _recrc(data):
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def _patch(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return _recrc(b)


def _flip(data, offset):
    b = bytearray(data)
    b[offset] ^= 0x10
    return bytes(b)


_cache = {}


def stories_case():
    """The Mia image (wq, wv, r_max 8) and a second valid image for the same chip (Mia's body
    with other bytes: the loader does not look at field values)."""
    if "stories" not in _cache:
        qm = stories_qmodel(8)
        mia = pack_lora(MIA, stories_model(), wbits=8, qm=qm)
        read_image(mia, qm, targets=("wq", "wv"), r_max=8)
        other = bytearray(mia)
        rng = np.random.default_rng(3)
        other[32:-4] = rng.integers(-127, 128, len(mia) - 36, dtype=np.int8).tobytes()
        _cache["stories"] = (loader_args(qm, targets=("wq", "wv"), r_max=8), mia,
                             _recrc(other))
    return _cache["stories"]


def stories_dut():
    if "dut" not in _cache:
        _cache["dut"] = LoraLoader(**stories_case()[0])
    return _cache["dut"]


def stories_script():
    args, mia, other = stories_case()
    s = Script(args)
    s.idle(3).cmd(LoraCmd.ENABLE).boundary()                # enabled, but no valid bank: off
    assert s.m.on == 0
    s.upload(mia).idle(30)                                  # committed: pending, not active
    assert s.m.pending and s.m.active == 0
    s.boundary(3)
    assert (s.m.active, s.m.on) == (1, 1)
    s.upload(other)                                         # during a token: bank 1 keeps serving
    s.idle(50).boundary()
    assert (s.m.active, s.m.on) == (0, 1)
    s.cmd(LoraCmd.DISABLE).idle(5).boundary()
    assert s.m.on == 0
    s.cmd(LoraCmd.ENABLE).boundary()
    return s


REJECTIONS = [
    ("crc", lambda d: _flip(d, 500), E.CRC),
    ("crc_trailer", lambda d: _flip(d, len(d) - 1), E.CRC),
    ("truncated", lambda d: d[:-10], E.TRUNCATED),
    ("truncated_header", lambda d: d[:20], E.TRUNCATED),
    ("trailing", lambda d: d + b"\x00\x01\x02", E.OVERFLOW),
    ("magic", lambda d: _patch(d, 0, "<4s", b"HWLB"), E.MAGIC),
    ("version", lambda d: _patch(d, 4, "<H", 2), E.VERSION),
    ("header_size", lambda d: _patch(d, 6, "<H", 40), E.HEADER),
    ("reserved", lambda d: _patch(d, 30, "<H", 1), E.HEADER),
    ("digest", lambda d: _patch(d, 8, "<B", d[8] ^ 1), E.DIGEST),
    ("n_layers", lambda d: _patch(d, 16, "<H", 4), E.SHAPE),
    ("dim", lambda d: _patch(d, 24, "<H", 32), E.SHAPE),
    ("hidden", lambda d: _patch(d, 28, "<H", 171), E.SHAPE),
    ("mask", lambda d: _patch(d, 18, "<H", 0x7), E.MASK),
    ("r_max", lambda d: _patch(d, 20, "<H", 16), E.R_MAX),
    ("rank", lambda d: _patch(d, 22, "<H", 9), E.RANK),
]


def test_model_rejections_match_read_image():
    """The model's rejections are real: read_image refuses every mutated image too, and the
    model accepts the unmutated ones."""
    args, mia, other = stories_case()
    qm = stories_qmodel(8)
    for name, mutate, err in REJECTIONS:
        s = Script(args).upload(mutate(mia))
        assert s.m.error == err, name
        with pytest.raises(LoraImageError):
            read_image(mutate(mia), qm, targets=("wq", "wv"), r_max=8)
    for image in (mia, other):
        assert Script(args).upload(image).m.error == E.OK


def test_stories260k_mia_upload_switch_at_boundary():
    s = stories_script()
    _, mia, other = stories_case()
    assert list(s.m.banks[1]) == list(mia[32:-4]) and list(s.m.banks[0]) == list(other[32:-4])
    run(stories_dut(), s)


def test_stories260k_bubbles():
    run(stories_dut(), stories_script(), valid_prob=0.6)


def test_rejections_keep_the_active_adapter():
    args, mia, other = stories_case()
    s = Script(args).upload(mia).cmd(LoraCmd.ENABLE).boundary()
    for name, mutate, err in REJECTIONS:
        s.upload(mutate(mia)).idle(3).boundary(2)
        assert (s.m.error, s.m.active, s.m.on) == (err, 1, 1), name
    s.cmd(LoraCmd.COMMIT)                                   # commit without BEGIN
    assert s.m.error == E.NO_BEGIN
    s.send(mia[:40])                                        # bytes without BEGIN
    assert s.m.error == E.NO_BEGIN
    s.cmd(LoraCmd.BEGIN).send(mia + b"\x07")                # overflow flagged at the byte
    assert s.m.error == E.OVERFLOW
    s.cmd(5)
    assert s.m.error == E.BAD_CMD
    s.upload(other).cmd(LoraCmd.BEGIN).boundary()           # BEGIN cancels the pending switch
    assert (s.m.active, s.m.pending, s.m.valid) == (1, 0, [0, 1])
    s.upload(other).cmd(LoraCmd.LOCK).boundary()            # committed before the lock: switches
    assert (s.m.active, s.m.locked, s.m.on) == (0, 1, 1)
    for op in (lambda: s.cmd(LoraCmd.BEGIN), lambda: s.send(mia[:8]),
               lambda: s.cmd(LoraCmd.COMMIT), lambda: s.cmd(LoraCmd.DISABLE),
               lambda: s.cmd(LoraCmd.ENABLE)):
        op()
        s.boundary()
        assert (s.m.error, s.m.active, s.m.on) == (E.LOCKED, 0, 1)
    run(stories_dut(), s)


def test_random_tiny_models(tmp_path):
    """Images of random adapters (every target) on random tiny models, two chip builds."""
    from test_lora import write_peft
    shorts = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for seed, (dim, layers, heads, kv, hidden, rank, r_max) in enumerate(
            [(16, 2, 2, 1, 24, 2, 4), (8, 1, 1, 1, 12, 3, 3)]):
        model = random_model(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                             hidden_dim=hidden, vocab_size=32, seq_len=16, seed=seed)
        qm = quantize_model(model, wbits=8)
        images = [pack_lora(write_peft(tmp_path / f"a{seed}{k}", model, shorts, rank,
                                       seed=10 * seed + k), model, wbits=8, qm=qm,
                            r_max=r_max) for k in range(2)]
        targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        args = loader_args(qm, targets=targets, r_max=r_max)
        s = Script(args).upload(images[0]).cmd(LoraCmd.ENABLE).boundary()
        s.upload(_flip(images[1], 40)).boundary().upload(images[1][:-1]).boundary()
        s.upload(images[1]).idle(5).boundary()
        assert (s.m.active, s.m.on, s.m.error) == (0, 1, E.OK)
        assert list(s.m.banks[1]) == list(images[0][32:-4])
        run(LoraLoader(**args), s, valid_prob=0.8)


def test_negative_control():
    res = run(stories_dut(), stories_script(), expect_failure=True, perturb="status")
    assert "status" in res.tests[0].message
    res = run(stories_dut(), stories_script(), expect_failure=True, perturb="bank")
    assert "bank 0 byte" in res.tests[0].message


@pytest.mark.parametrize("kwargs, message", [
    (dict(header=bytes(31), image_length=100), r"^header must be 32 bytes, not 31$"),
    (dict(header=bytes(32), image_length=36),
     r"^image_length \(36\) must exceed the header and CRC \(36 bytes\)$"),
    (dict(header=bytes(32), image_length=100), r"^header: r_max must be at least 1$"),
])
def test_bad_config(kwargs, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=message) as info:
            LoraLoader(**kwargs)
        del info
        gc.collect()
