"""A whole chip with LoRA (``build_chip(..., lora=LoraSpec(...))``) against the golden model
with the adapter in force, in cocotb + Verilator (``benches/lora_chip_bench.py``).

Adapters reach the chip only as HWLA images through its loader ports, as the host sends them.
Each script checks every token, every layer output (debug tap) and every token's cycles (the
formula with the adapter on or off) and: the adapter's tokens differ from the base model's;
an all-zero adapter gives the base model's tokens; ``DISABLE`` gives the base model; an image
uploaded into the inactive bank *during* generation changes nothing until it is committed,
and a commit sent inside a token switches banks only after that token.
"""

import functools
from pathlib import Path

import numpy as np
import pytest
from golden_vectors import REPO, stories_model, stories_qmodel
from hardwire.compiler.chip_builder import LoraSpec, build_chip, chip_name
from hardwire.compiler.golden import generate_golden
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora import (
    LoraGoldenModel,
    QLoraMatrix,
    QuantizedLora,
    base_digest8,
    load_peft_adapter,
    quantize_lora,
)
from hardwire.compiler.lora_image import image_bytes, read_image
from hardwire.compiler.plan import plan_chip
from hardwire.compiler.quantize import quantize_model
from hardwire.hdl.lora_loader import LoraCmd
from hardwire.sim.chip_sim import chip_key
from hardwire.sim.cocotb_runner import run_cocotb
from hardwire.sim.verilated import COCOTB_BUILD_ARGS, MAKEFLAGS, cached_export
from test_chip import _makeflags

TESTS = Path(__file__).resolve().parent
BUILD_ROOT = TESTS.parent / "build" / "cocotb"
VERILOG_CACHE = BUILD_ROOT / "_chip_lora_verilog"
MIA = REPO / "examples" / "adapters" / "stories260K-mia"
PERIOD_NS = 10
FEED, FEED_OWN, RESET_CTX, CMD, UPLOAD_BG, WAIT, FEED_OWN_CMD = 0, 1, 3, 4, 5, 6, 7

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def chip_verilog(qm, plan, spec):
    """``(chip, verilog_path)`` of the chip with LoRA ``spec``, prepared by the shared fast-build
    helper (``hardwire.sim.verilated``) and cached by digest, plan, spec and sources."""
    chip = build_chip(qm, plan, lora=spec)
    path = cached_export(lambda: chip, name=chip_name(qm), key=f"{chip_key(qm, plan)}\n{spec!r}",
                         cache_dir=VERILOG_CACHE, public=True)
    return chip, path


def zero_lora(qm, targets, r_max):
    """The all-zero adapter (PEFT's initial state) for every target."""
    shapes = qm.config.tensor_shapes()
    layers = []
    for i in range(qm.config.n_layers):
        mats = {}
        for t in targets:
            rows, cols = shapes[f"layers.{i}.{t}"]
            mats[t] = QLoraMatrix(t, np.zeros((r_max, cols), np.int64), np.zeros(r_max, np.int64),
                                  0, np.zeros((rows, r_max), np.int64), np.zeros(rows, np.int64),
                                  0)
        layers.append(mats)
    return QuantizedLora(base_digest8(qm), tuple(targets), r_max, r_max, layers, name="zero")


def random_lora(qm, targets, r_max, seed, *, gain_bits=3):
    """Random integers in the image's ranges, scaled so the correction is a sizeable part of
    the accumulator (and cannot overflow it)."""
    r = np.random.default_rng(seed)
    shapes = qm.config.tensor_shapes()
    layers = []
    for i in range(qm.config.n_layers):
        mats = {}
        for t in targets:
            rows, cols = shapes[f"layers.{i}.{t}"]
            a = r.integers(-127, 128, (r_max, cols))
            b = r.integers(-127, 128, (rows, r_max))
            mu = r.integers(1 << 15, 1 << 17, r_max)
            mb = r.integers(1 << 15, 1 << 17, rows)
            su = (cols * 127 * 20 * (1 << 17)).bit_length() - 7
            sb = (r_max * 127 * 127 * (1 << 17)).bit_length() - (cols * 127 * 24).bit_length() - gain_bits
            mats[t] = QLoraMatrix(t, a, mu, su, b, mb, sb)
        layers.append(mats)
    return QuantizedLora(base_digest8(qm), tuple(targets), r_max, r_max, layers, name="random")


class Script:
    """Operations for ``lora_chip_bench`` with the golden model's expectations alongside: the
    golden model's adapter follows the loader (active bank, enabled), its KV cache the
    chip's context."""

    def __init__(self, qm, chip, spec, images):
        self.qm, self.chip, self.spec = qm, chip, spec
        self.zero = zero_lora(qm, spec.targets, spec.r_max)
        self.images = [image_bytes(ql, qm.config) for ql in images]
        for data in self.images:        # every image is one the host would send
            read_image(data, qm, targets=spec.targets, r_max=spec.r_max)
        self.adapters = images
        self.golden = LoraGoldenModel(qm, self.zero)
        self.ops, self.args, self.on = [], [], []
        self.tokens, self.taps, self.cycles = [], [], []
        self.bank_img = [None, None]     # image in each bank
        self.active, self.enabled, self.pending = 0, False, None
        self.uploading, self.pos, self.last = None, 0, None

    def _on(self):
        return self.enabled and self.bank_img[self.active] is not None

    def _op(self, kind, arg=0):
        self.ops.append(kind)
        self.args.append(arg)
        self.on.append(int(self._on()))

    def _boundary(self):
        if self.pending is not None:
            self.active, self.pending = self.pending, None

    def _token(self, kind, token):
        self.golden.qlora = self.adapters[self.bank_img[self.active]] if self._on() \
            else self.zero
        t = {}
        self.golden.step(token, self.pos, trace=t)
        self.tokens.append(t["next_token"])
        self.taps.append([t[f"L{i}.out"] for i in range(self.qm.config.n_layers)])
        self.cycles.append(self.chip.cycles_per_token(self.pos, lora_on=self._on()))
        self.pos += 1
        self.last = t["next_token"]

    def feed(self, *tokens):
        for tok in tokens:
            self._token(FEED, tok)
            self._boundary()
            self._op(FEED, tok)
        return self

    def feed_own(self, n):
        for _ in range(n):
            self._token(FEED_OWN, self.last)
            self._boundary()
            self._op(FEED_OWN)
        return self

    def reset_ctx(self):
        self.pos = 0
        self._op(RESET_CTX)
        return self

    def _cmd(self, code):
        if code == LoraCmd.BEGIN:
            self.bank_img[1 - self.active] = None
            self.pending = None
        elif code == LoraCmd.COMMIT:
            self.bank_img[1 - self.active] = self.uploaded
            self.pending = 1 - self.active
        elif code in (LoraCmd.ENABLE, LoraCmd.DISABLE):
            self.enabled = code == LoraCmd.ENABLE

    def cmd(self, code):
        self._cmd(code)
        self._boundary()                 # idle: a boundary
        self._op(CMD, int(code))
        return self

    def upload(self, index):
        """BEGIN, the image in the background, WAIT (tokens may be fed in between)."""
        self.cmd(LoraCmd.BEGIN)
        self.uploaded = index
        self._op(UPLOAD_BG, index)
        return self

    def wait(self):
        self._op(WAIT)
        return self

    def feed_own_commit(self):
        """The next token with COMMIT sent while it is computed: it still uses the old bank."""
        self._token(FEED_OWN_CMD, self.last)
        self._cmd(LoraCmd.COMMIT)
        self._boundary()
        self._op(FEED_OWN_CMD, int(LoraCmd.COMMIT))
        return self

    def vectors(self, *, perturb=False):
        lens = [len(d) for d in self.images]
        tokens = np.array(self.tokens)
        if perturb:
            tokens[-1] = (tokens[-1] + 1) % self.qm.config.vocab_size
        return dict(images=np.frombuffer(b"".join(self.images), dtype=np.uint8),
                    image_start=np.cumsum([0] + lens[:-1]), image_len=np.array(lens),
                    op_kind=np.array(self.ops), op_arg=np.array(self.args),
                    op_on=np.array(self.on), exp_token=tokens, exp_taps=np.array(self.taps),
                    exp_cycles=np.array(self.cycles), period_ns=PERIOD_NS,
                    resid_bits=self.chip.resid_bits, id_words=np.array(self.chip.id_words))


def run(script, verilog, *, perturb=False, expect_failure=False, timeout_s=1800):
    with _makeflags(MAKEFLAGS):
        return run_cocotb(component_or_verilog=verilog, toplevel=chip_name(script.qm),
                          test_module="lora_chip_bench", test_dir=TESTS / "benches",
                          build_root=BUILD_ROOT, vectors=script.vectors(perturb=perturb),
                          expect_failure=expect_failure, timeout_s=timeout_s,
                          build_args=COCOTB_BUILD_ARGS)


def session(qm, chip, spec, adapter, *, n):
    """The common script: adapter on from BOS; disabled (base); the all-zero adapter
    (base); the adapter uploaded while zero-adapter tokens are generated and committed inside
    a token; the adapter's tokens again. Returns the script and the token runs to compare."""
    s = Script(qm, chip, spec, [adapter, zero_lora(qm, spec.targets, spec.r_max)])
    s.upload(0).wait().cmd(LoraCmd.COMMIT).cmd(LoraCmd.ENABLE)
    s.feed(1).feed_own(n - 1)
    lora_run = s.tokens[-n:]
    s.cmd(LoraCmd.DISABLE).reset_ctx().feed(1).feed_own(n - 1)
    off_run = s.tokens[-n:]
    s.cmd(LoraCmd.ENABLE).upload(1).wait().cmd(LoraCmd.COMMIT).reset_ctx()
    s.feed(1).feed_own(n - 1)
    zero_run = s.tokens[-n:]
    # upload the adapter into the inactive bank while zero-adapter tokens are generated
    s.reset_ctx().upload(0).feed(1).feed_own(n - 2).wait().feed_own_commit()
    during = s.tokens[-n:]
    s.reset_ctx().feed(1).feed_own(n - 1)
    again = s.tokens[-n:]
    return s, dict(lora=lora_run, off=off_run, zero=zero_run, during=during, again=again)


def check_runs(qm, runs, n):
    base = generate_golden(qm, [1], n, stop_on_bos=False)
    assert runs["off"] == base and runs["zero"] == base and runs["during"] == base
    assert runs["lora"] == runs["again"]
    assert runs["lora"] != base


# ------------------------------------------------------------------------------- tiny model

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40,
            seq_len=16)
TINY_FOLD = "attn=1,wq=4x4:const,w2=2x8"
TINY_SPEC = LoraSpec(targets=("wq", "wv", "w2"), r_max=4, simd=8)


@functools.cache
def tiny():
    model = random_model(seed=7, **TINY)
    calib = [1] + [int(t) for t in np.random.default_rng(1).integers(3, 40, 7)]
    qm = quantize_model(model, wbits=8, calib_tokens=calib)
    chip, verilog = chip_verilog(qm, plan_chip(qm, fold=TINY_FOLD), TINY_SPEC)
    return qm, chip, verilog


def test_tiny_random_adapter():
    qm, chip, verilog = tiny()
    n = 6
    s, runs = session(qm, chip, TINY_SPEC, random_lora(qm, TINY_SPEC.targets, 4, 4), n=n)
    check_runs(qm, runs, n)
    run(s, verilog)


def test_tiny_negative_control():
    qm, chip, verilog = tiny()
    s, _ = session(qm, chip, TINY_SPEC, random_lora(qm, TINY_SPEC.targets, 4, 4), n=3)
    run(s, verilog, perturb=True, expect_failure=True)


# ---------------------------------------------------------------------------- stories260K

STORIES_SPEC = LoraSpec(targets=("wq", "wv"), r_max=8)


def test_stories260k_mia():
    """The committed Mia adapter (wq, wv, r_max 8) on the stories260K chip."""
    qm = stories_qmodel(8)
    ql = quantize_lora(load_peft_adapter(MIA, stories_model()), stories_model(), qm,
                       targets=STORIES_SPEC.targets, r_max=STORIES_SPEC.r_max)
    chip, verilog = chip_verilog(qm, plan_chip(qm), STORIES_SPEC)
    n = 16          # "Once upon a time, there was a little girl named" Mia, not Lily: token 14
    s, runs = session(qm, chip, STORIES_SPEC, ql, n=n)
    check_runs(qm, runs, n)
    run(s, verilog, timeout_s=3000)


def test_cycles_added_stories260k():
    """What LoRA adds per token on stories260K (wq, wv, r_max 8): 46 cycles per layer."""
    qm = stories_qmodel(8)
    chip = build_chip(qm, plan_chip(qm), lora=STORIES_SPEC)
    plain = build_chip(qm, plan_chip(qm))
    for pos in (0, 100):
        assert chip.cycles_per_token(pos, lora_on=False) == plain.cycles_per_token(pos)
        assert chip.cycles_per_token(pos) - plain.cycles_per_token(pos) == 5 * 46
    w = chip.id_words
    assert w[19] == (0b101 | 8 << 8) and w[20] == 11256
    assert plain.id_words[19:21] == [0, 0]
