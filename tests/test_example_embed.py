"""The README's embedding example (``examples/embed_chip.py``): a user's Amaranth top around
the generated chip, simulated with Amaranth's simulator, generates the golden model's tokens
until the context is full; its Verilog converts. Negative control: the same bench reading a
top whose feedback is broken (it always feeds BOS) must disagree."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator
from hardwire.compiler.golden import generate_golden
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model

# the negative control elaborates a subclass around the example's chip, not the example's top
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

REPO = Path(__file__).resolve().parent.parent
# seed 2 of this shape generates varied tokens (26, 18, 18, 18, 18, 39, 39, 39)
TINY = dict(seed=2, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24,
            vocab_size=40, seq_len=8)


def _example():
    spec = importlib.util.spec_from_file_location("embed_chip",
                                                  REPO / "examples" / "embed_chip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _generate(top, max_cycles=40_000):
    got, done = [], []

    async def bench(ctx):
        ctx.set(top.start, 1)
        await ctx.tick()
        ctx.set(top.start, 0)
        for _ in range(max_cycles):
            await ctx.tick()
            if ctx.get(top.token_valid):
                got.append(ctx.get(top.token))
            if ctx.get(top.done):
                done.append(True)
                return

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got, bool(done)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "tiny.bin"
    save_llama2c(random_model(**TINY), path)
    return path


def test_user_top_generates_the_golden_story(tiny):
    ex = _example()
    qm, top = ex.story_top(tiny)
    want = generate_golden(qm, [ex.BOS], TINY["seq_len"], stop_on_bos=False)
    assert len(set(want)) > 2                      # a discriminating sequence
    got, done = _generate(top)
    assert done, "the context-full flag never rose"
    assert got == want


def test_broken_feedback_is_caught(tiny):
    ex = _example()

    class AlwaysBOS(ex.StoryTop):
        def elaborate(self, platform):
            m = super().elaborate(platform)
            m.d.comb += self._chip.token_in.payload.eq(ex.BOS)     # overrides the feedback
            return m

    qm, top = ex.story_top(tiny)
    want = generate_golden(qm, [ex.BOS], TINY["seq_len"], stop_on_bos=False)
    got, _ = _generate(AlwaysBOS(top._chip))
    assert got[0] == want[0] and got != want


def test_user_top_converts_to_verilog(tiny):
    _, top = _example().story_top(tiny)
    text = verilog.convert(top, name="story_top")
    assert "module story_top(" in text and "token_valid" in text


def test_readme_snippet_generates_the_golden_story(tiny):
    """The README's code block, run as written (model path pointed at the tiny model)."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'load_model("models/stories260K.bin")' in code
    ns = {}
    exec(compile(code.replace("models/stories260K.bin", str(tiny)), "README.md", "exec"), ns)
    got, done = _generate(ns["StoryTop"]())
    want = generate_golden(ns["qm"], [1], TINY["seq_len"], stop_on_bos=False)
    assert done and got == want


def test_example_script_rejects_a_bad_model(tmp_path):
    out = tmp_path / "top.v"
    p = subprocess.run([sys.executable, str(REPO / "examples" / "embed_chip.py"),
                        str(tmp_path / "nope.bin"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"embed_chip: error: {tmp_path / 'nope.bin'}: no such file"
    assert not out.exists()
