"""LoRA end to end: a PEFT adapter changes the story on the simulated chip exactly as the
golden model with the adapter predicts.

* ``hardwire run --engine rtl --lora ADAPTER``: the chip is built with the adapter's LoRA
  datapath, the packed image goes through the chip's loader ports (BEGIN, bytes, COMMIT,
  ENABLE) in the Verilator driver, and the tokens must equal ``generate_golden`` with
  ``LoraGoldenModel`` and differ from the base model's.
* ``hardwire board-sim --lora-targets``, ``hardwire lora load`` and ``hardwire chat`` over
  the pty: the same, through UART and host link; corrupt and truncated images are refused
  while the previous adapter keeps serving; after ``lora load --lock`` uploads are refused.

Tiny random models and random adapters (``write_peft`` of tests/test_lora.py); the first
run builds two Verilator models (a few minutes), later runs reuse ``build/``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hardwire.compiler import api
from hardwire.compiler.chip_builder import LoraSpec
from hardwire.compiler.errors import HardwireError
from hardwire.compiler.loaders import load_model
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora import load_peft_adapter, quantize_lora
from hardwire.compiler.lora_image import image_bytes
from hardwire.compiler.quantize import quantize_model
from hardwire.fpga.host import HostLink, LinkError
from board_sim_proc import running_board_sim
from test_lora import write_peft

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40,
            seq_len=16, shared_classifier=False)
N = 12

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "hardwire", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_exit2(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for s in needles:
        assert s in p.stderr, p.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model path, adapter, other adapter)``: a tiny model and two random q/v adapters
    (rank 4) whose golden stories differ from the base story and from each other."""
    d = tmp_path_factory.mktemp("lora_e2e")
    path = d / "tiny.bin"
    save_llama2c(random_model(seed=3, **TINY), path)
    model = load_model(path)
    ad = write_peft(d / "ad", model, ("q_proj", "v_proj"), rank=4, seed=1, lora_alpha=32)
    other = write_peft(d / "other", model, ("q_proj", "v_proj"), rank=4, seed=2, lora_alpha=32)
    return path, ad, other


def _golden(path, lora=None, n=N):
    return api.run_generation(path, engine="golden", n=n, lora=lora)["tokens"]


def test_tiny_adapter_changes_the_golden_story(tiny):
    path, ad, other = tiny
    base, with_ad, with_other = _golden(path), _golden(path, ad), _golden(path, other)
    assert len(base) == len(with_ad) == N            # no early BOS: long enough to compare
    assert with_ad != base and with_other != with_ad


def test_rtl_spec_defaults_to_the_adapters_targets_and_next_power_of_two(tiny, tmp_path):
    path, ad, _ = tiny
    model = load_model(path)
    spec = api.rtl_lora_spec(load_peft_adapter(ad, model))
    assert spec == LoraSpec(targets=("wq", "wv"), r_max=4)
    ad3 = write_peft(tmp_path / "r3", model, ("q_proj", "down_proj"), rank=3)
    assert api.rtl_lora_spec(load_peft_adapter(ad3, model)) == LoraSpec(
        targets=("wq", "w2"), r_max=4)
    adapter = load_peft_adapter(ad, model)
    with pytest.raises(HardwireError, match="not in --lora-targets"):
        api.rtl_lora_spec(adapter, LoraSpec(targets=("wq",), r_max=8))
    with pytest.raises(HardwireError, match="above --lora-rank 2"):
        api.rtl_lora_spec(adapter, LoraSpec(targets=("wq", "wv"), r_max=2))


def test_rtl_engine_with_adapter_equals_golden_with_adapter(tiny):
    path, ad, _ = tiny
    res = api.run_generation(path, engine="rtl", n=N, lora=ad, build_dir=BUILD,
                             progress=sys.stderr)
    want = _golden(path, ad)
    assert res["tokens"] == want
    assert res["tokens"] != _golden(path)
    assert res["lora_build"] == {"targets": ["wq", "wv"], "r_max": 4}
    assert res["lora_status"]["on"] == 1 and res["lora_status"]["error"] == "OK"


def test_rtl_engine_negative_control_and_refused_images(tiny):
    """Another adapter's image in the same chip gives another story (the comparison can
    fail); the chip's loader refuses a CRC-flipped and a truncated image."""
    from hardwire.sim.chip_sim import generate_rtl
    path, ad, other = tiny
    model = load_model(path)
    qm = quantize_model(model, wbits="8")
    spec = LoraSpec(targets=("wq", "wv"), r_max=4)
    img_other = image_bytes(quantize_lora(load_peft_adapter(other, model), model, qm,
                                          targets=spec.targets, r_max=4), model.config)
    got = generate_rtl(qm, [1], N, build_dir=BUILD, lora=spec, lora_image=img_other)["tokens"]
    assert got == _golden(path, other)
    assert got != _golden(path, ad)                  # negative control
    bad = bytearray(img_other)
    bad[-1] ^= 0x40
    with pytest.raises(HardwireError, match=r"COMMIT \(CRC\)"):
        generate_rtl(qm, [1], 2, build_dir=BUILD, lora=spec, lora_image=bytes(bad))
    with pytest.raises(HardwireError, match=r"COMMIT \(TRUNCATED\)"):
        generate_rtl(qm, [1], 2, build_dir=BUILD, lora=spec, lora_image=img_other[:-100])


def test_run_cli_rtl_lora_and_bad_combinations(tiny):
    path, ad, _ = tiny
    p = _cli("run", path, "--engine", "rtl", "--lora", ad, "-n", N, "--json",
             "--build-dir", BUILD)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tokens"] == _golden(path, ad)
    _one_line_exit2(_cli("run", path, "--engine", "rtl", "--lora", ad, "--lora-targets", "q",
                         "--build-dir", BUILD), "wv", "not in --lora-targets", str(ad))
    _one_line_exit2(_cli("run", path, "--engine", "rtl", "--lora", ad, "--lora-targets", "q,v",
                         "--lora-rank", "2", "--build-dir", BUILD), "above --lora-rank 2")
    _one_line_exit2(_cli("run", path, "--engine", "golden", "--lora", ad, "--lora-targets",
                         "q,v"), "--engine golden")
    _one_line_exit2(_cli("run", path, "--engine", "rtl", "--lora-rank", "8"),
                    "--lora-rank needs --lora-targets")


def test_synth_and_board_sim_cli_lora_bad_combinations_exit_2(tiny, tmp_path):
    path, _, _ = tiny
    _one_line_exit2(_cli("synth", path, "-o", tmp_path / "s", "--lora-rank", "8"),
                    "--lora-rank needs --lora-targets")
    _one_line_exit2(_cli("synth", path, "-o", tmp_path / "s", "--lora-targets", "q,v",
                         "--lora-rank", "6"), "power of two")
    _one_line_exit2(_cli("synth", path, "-o", tmp_path / "s", "--lora-targets", "q,x"),
                    "unknown projection 'x'")
    _one_line_exit2(_cli("board-sim", path, "--lora-targets", "q,v", "--lora-rank", "3"),
                    "power of two")
    _one_line_exit2(_cli("board-sim", path, "--lora-rank", "8"), "--lora-rank needs")


def test_synth_passes_lora_to_the_board_design(tiny, tmp_path):
    """``synth_board``/``fit_board`` elaborate the board with the LoRA chip (no tools run)."""
    from hardwire.fpga.synth import fit_board
    path, _, _ = tiny
    qm = quantize_model(load_model(path), wbits="8")
    # one plan (the planner's): the fit search itself is tested in test_fpga_fit.py
    b, _ = fit_board(qm, "target=256", build_dir=tmp_path,
                     lora=LoraSpec(targets=("wq", "wv"), r_max=4))
    assert b.design.chip.lora_loader is not None
    assert "lora" in b.il
    plain, _ = fit_board(qm, "target=256", build_dir=tmp_path / "plain")
    assert plain.design.chip.lora_loader is None


# ------------------------------------------------------------------------ board simulation


@pytest.fixture(scope="module")
def board(tiny):
    """The pty of a running ``hardwire board-sim --lora-targets q,v --lora-rank 4``."""
    path = tiny[0]
    with running_board_sim(path, "--lora-targets", "q,v", "--lora-rank", 4, build_dir=BUILD,
                           start_timeout=1200) as port:
        yield port


def _chat(port, n=N):
    p = _cli("chat", "--port", port, "-n", n, "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["tokens"]


def test_board_sim_lora_load_chat_rejects_and_lock(tiny, board, tmp_path):
    path, ad, other = tiny
    port = board
    base, want = _golden(path), _golden(path, ad)
    img = tmp_path / "ad.bin"
    p = _cli("lora", "pack", ad, "--model", path, "-o", img)
    assert p.returncode == 0, p.stderr
    data = img.read_bytes()

    assert _chat(port) == base                        # nothing loaded: the base story
    p = _cli("lora", "load", img, "--port", port, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "committed" in p.stdout and "adapter on" in p.stdout, p.stdout
    got = _chat(port)
    assert got == want and got != base

    # corrupt (CRC flipped) and truncated images: refused, the adapter keeps serving
    crc = tmp_path / "crc.bin"
    crc.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    _one_line_exit2(_cli("lora", "load", crc, "--port", port, timeout=300), str(crc), "CRC")
    short = tmp_path / "short.bin"
    short.write_bytes(data[:len(data) // 2])
    _one_line_exit2(_cli("lora", "load", short, "--port", port, timeout=300), str(short),
                    "truncated")
    # the same images sent raw past the host checks: the chip's loader refuses them
    with HostLink(port) as link:
        with pytest.raises(LinkError, match="CRC"):
            link.lora_upload(crc.read_bytes())
        with pytest.raises(LinkError, match="TRUNCATED"):
            link.lora_upload(short.read_bytes())
        st = link.lora_status()
        assert st["on"] and not st["locked"]
    assert _chat(port) == want

    # another adapter: another story (negative control of the comparison), then back
    img2 = tmp_path / "other.bin"
    assert _cli("lora", "pack", other, "--model", path, "-o", img2).returncode == 0
    assert _cli("lora", "load", img2, "--port", port, timeout=300).returncode == 0
    assert _chat(port) == _golden(path, other) != want

    # load and lock: a further upload is refused, the locked adapter keeps serving
    p = _cli("lora", "load", img, "--port", port, "--lock", timeout=300)
    assert p.returncode == 0 and "locked" in p.stdout, p.stderr
    _one_line_exit2(_cli("lora", "load", img2, "--port", port, timeout=300), "LOCKED")
    assert _chat(port) == want
