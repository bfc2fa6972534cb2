"""`hardwire compile --lora-targets/--lora-rank`: a chip with the LoRA SRAM block, its report
section, deterministic output, clear errors."""

import filecmp
import json
import subprocess
import sys

import pytest

from hardwire.compiler.chip_builder import LoraSpec
from hardwire.compiler.emit import compile_model
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.lora_image import image_length


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    m = random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40,
                     seq_len=16, seed=7)
    p = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    save_llama2c(m, p)
    return p


def test_compile_with_lora_reports_sram_and_cycles(tiny_bin, tmp_path):
    spec = LoraSpec(targets=("wq", "wv", "w2"), r_max=4)
    a = compile_model(tiny_bin, tmp_path / "a", lora=spec)
    base = compile_model(tiny_bin, tmp_path / "base")
    compile_model(tiny_bin, tmp_path / "b", lora=spec)
    assert a["name"] == f"{base['name']}_lora_wq_wv_w2_r4"
    for n in (f"{a['name']}.v", f"{a['name']}.il", "report.json"):
        assert filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False), n
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    lo = rep["lora"]
    assert lo["targets"] == ["wq", "wv", "w2"] and lo["r_max"] == 4
    assert lo["image_bytes"] == image_length(2, ("wq", "wv", "w2"), 4, 16, 8, 24)
    assert len(lo["sram_bits_by_unit"]) == 6 and lo["sram_bits"] == sum(
        lo["sram_bits_by_unit"].values()) > 0
    c0 = lo["cycles_per_token"]["0"]
    assert c0["lora_off"] == rep["cycles_per_token"]["0"]["cycles"]["total"]   # off == base
    assert c0["added"] == c0["lora_on"] - c0["lora_off"] > 0
    v = (tmp_path / "a" / f"{a['name']}.v").read_text()
    assert "lora_in__payload" in v and "lora_in__payload" not in (
        tmp_path / "base" / f"{base['name']}.v").read_text()


@pytest.mark.parametrize("args, msg", [
    (["--lora-targets", "q,zz"], "unknown projection"),
    (["--lora-targets", "q", "--lora-rank", "6"], "power of two"),
    (["--lora-rank", "8"], "needs --lora-targets"),
])
def test_compile_bad_lora_options_are_one_line_exit_2(tiny_bin, tmp_path, args, msg):
    p = subprocess.run([sys.executable, "-m", "hardwire", "compile", str(tiny_bin), "-o",
                        str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
