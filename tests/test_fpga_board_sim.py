"""The whole board in Verilator (UART + host link + the real chip of a random tiny model),
started as ``hardwire board-sim`` in the background; the host talks to its pty with
:class:`HostLink` and ``hardwire chat`` exactly as to a ULX3S. Generated tokens must equal
``generate_golden``; garbage must be answered with ERROR frames and leave the link working.

The first run builds the Verilator model (~1.5 min); later runs reuse the cached export and
build (``build/board``)."""

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hardwire.compiler.golden import generate_golden
from hardwire.compiler.loaders import load_model
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.quantize import quantize_model
from hardwire.fpga import protocol as P
from hardwire.fpga.host import HostLink, LinkError

from board_sim_proc import running_board_sim

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
TINY = dict(dim=24, n_layers=2, n_heads=3, n_kv_heads=3, hidden_dim=43, vocab_size=37,
            seq_len=16, shared_classifier=False)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """``(qm, pty path, model path)`` of a running ``hardwire board-sim``."""
    path = tmp_path_factory.mktemp("board") / "tiny.bin"
    save_llama2c(random_model(seed=7, **TINY), path)
    qm = quantize_model(load_model(path), wbits="8")
    with running_board_sim(path, "--baud-divisor", 8, build_dir=BUILD) as port:
        yield qm, port, path


def test_info_identifies_the_chip(board):
    qm, port, _ = board
    with HostLink(port) as link:
        info = link.info()
    assert info["magic_ok"] and info["id_version"] == 1
    assert info["config"] == {k: TINY[k] for k in info["config"]}
    assert info["model_hash"] == qm.model_hash
    assert info["digest"] == qm.digest()[:8]
    assert info["weight_bits"] == {k: 8 for k in info["weight_bits"]}
    assert info["clocks_per_bit"] == 8 and info["max_payload"] == 512


def test_generation_is_golden_to_the_end_of_the_context(board):
    qm, port, _ = board
    c = qm.config
    prompt = [1, 5, 9, 3]
    want = generate_golden(qm, prompt, c.seq_len, stop_on_bos=False)   # 13 tokens
    with HostLink(port) as link:
        link.reset()
        got = [link.feed(prompt)] + link.generate(len(want) - 1)
        assert got == want
        st = link.status()
        assert (st["pos"], st["pending"], st["err_context"]) == (c.seq_len, want[-1], False)
        with pytest.raises(LinkError, match="CONTEXT_FULL") as e:
            link.generate(1)
        assert e.value.code == P.Err.CONTEXT_FULL
        link.reset()                                   # RESET: a new context, same result
        assert link.status()["pos"] == 0 and link.status()["pending"] is None
        assert [link.feed(prompt)] + link.generate(5) == want[:6]


def test_garbage_gets_error_frames_and_the_link_survives(board):
    qm, port, _ = board
    rng = random.Random(11)
    want = generate_golden(qm, [1, 2], 4, stop_on_bos=False)
    with HostLink(port) as link:
        link.reset()
        for k in range(3):
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(5, 80)))
            if k == 1:
                junk = b"\xa5\x01\x03\x7f\xff" + junk          # a frame header gone wrong
            link.write_raw(junk)
            frames = link.read_frames(quiet=1.0)
            assert frames and all(f.is_error for f in frames), frames
        link.write_raw(P.encode_frame(P.Cmd.FEED, struct.pack(">H", 2))[:-3])   # truncated
        (frame,) = link.read_frames(quiet=1.0)
        assert frame.error()[0] == P.Err.TIMEOUT
        with pytest.raises(LinkError, match="TOKEN_RANGE"):
            link.feed([1, qm.config.vocab_size])               # 1 is fed, then rejected
        link.reset()
        assert [link.feed([1, 2])] + link.generate(3) == want
        assert link.status()["error_frames"] >= 5


def test_hardwire_chat_cli(board):
    qm, port, _ = board
    p = subprocess.run([sys.executable, "-m", "hardwire", "chat", "--port", port, "-n", "6",
                        "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["prompt_tokens"] == [1]
    assert result["tokens"] == generate_golden(qm, [1], 6)
    p = subprocess.run([sys.executable, "-m", "hardwire", "chat", "--port", port, "-n", "3"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and p.stdout.split() == [str(t) for t in
                                                      generate_golden(qm, [1], 3)]


def test_chat_errors_are_one_line(board, tmp_path):
    _, port, _ = board
    p = subprocess.run([sys.executable, "-m", "hardwire", "chat", "--port", port, "--prompt",
                        "hello"], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--prompt needs --tokenizer" in p.stderr
    missing = tmp_path / "no-such-tty"
    p = subprocess.run([sys.executable, "-m", "hardwire", "chat", "--port", str(missing)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and str(missing) in p.stderr
    assert "cannot open" in p.stderr
