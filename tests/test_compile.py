"""`hardwire compile`: Verilog + RTLIL + report.json, deterministic, atomic, clear errors."""

import filecmp
import json
import subprocess
import sys

import pytest

from hardwire.compiler.emit import compile_model
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    m = random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40,
                     seq_len=16, seed=7, shared_classifier=False)
    p = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    save_llama2c(m, p)
    return p


def test_compile_is_deterministic_and_reports(tiny_bin, tmp_path):
    a = compile_model(tiny_bin, tmp_path / "a")
    compile_model(tiny_bin, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([f"{a['name']}.v", f"{a['name']}.il", "report.json"])
    for n in names:
        assert filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False), n
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["config"]["n_layers"] == 2 and rep["mac_units"]["total"] > 0
    c0 = rep["cycles_per_token"]["0"]
    c15 = rep["cycles_per_token"]["15"]
    assert c15["cycles"]["total"] > c0["cycles"]["total"]      # attention grows with context
    assert 0 < c0["mac_utilization"] <= 1
    assert "module" in (tmp_path / "a" / f"{a['name']}.v").read_text()


def test_compile_bad_fold_is_one_line_exit_2(tiny_bin, tmp_path):
    p = subprocess.run([sys.executable, "-m", "hardwire", "compile", str(tiny_bin), "-o",
                        str(tmp_path / "out"), "--fold", "wq=7x7"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()          # no half-written output


def test_run_rtl_engine_matches_golden(tiny_bin, tmp_path):
    """`hardwire run --engine rtl --json`: the Verilated chip's tokens equal the golden model's,
    with a cycle count per token fed."""
    def run(engine):
        p = subprocess.run([sys.executable, "-m", "hardwire", "run", str(tiny_bin), "-n", "8",
                            "--engine", engine, "--json", "--build-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    rtl, golden = run("rtl"), run("golden")
    assert rtl["tokens"] == golden["tokens"] and rtl["prompt_tokens"] == [1]
    assert len(rtl["cycles"]) == len(rtl["tokens"])
    assert all(b > a for a, b in zip(rtl["cycles"], rtl["cycles"][1:]))   # attention grows
