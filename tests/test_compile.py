"""`hardwire compile`: Verilog + RTLIL + report.json, deterministic, atomic, clear errors."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardwire.compiler.emit import compile_model
from hardwire.compiler.loaders import load_model
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model
from hardwire.compiler.plan import plan_chip, predict_cycles
from hardwire.compiler.quantize import quantize_model
from hardwire.sim.verilated import fst_available

# simulations are cached here across runs (keyed by the design), like the cocotb builds
BUILD = Path(__file__).resolve().parent.parent / "build"


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


def _hardwire(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "hardwire", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _tiny_cycles(tiny_bin, n_positions):
    """The planner's cycles per token for the tiny chip at positions 0..n-1."""
    qm = quantize_model(load_model(tiny_bin), wbits="8")
    plan = plan_chip(qm)
    return [predict_cycles(qm, plan, p)["total"] for p in range(n_positions)]


def test_run_rtl_engine_matches_golden(tiny_bin):
    """`hardwire run --engine rtl --json`: the Verilated chip's tokens equal the golden
    model's, with one measured cycle count per token fed, equal to the cycle formula."""
    def run(engine):
        p = _hardwire("run", tiny_bin, "-n", 8, "--engine", engine, "--json", "--build-dir",
                      BUILD)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    rtl, golden = run("rtl"), run("golden")
    assert rtl["tokens"] == golden["tokens"] and rtl["prompt_tokens"] == [1]
    assert rtl["cycles"] == _tiny_cycles(tiny_bin, len(rtl["tokens"]))
    assert all(b > a for a, b in zip(rtl["cycles"], rtl["cycles"][1:]))   # attention grows
    assert rtl["clock_mhz"] == 50.0


def _fst_end_time(path):
    """End time from an FST file's header block (type 0, big-endian length, start, end)."""
    raw = Path(path).read_bytes()[:25]
    assert raw[0] == 0, "not an FST header block"
    return int.from_bytes(raw[17:25], "big")


def _vcd_clock_edges(path):
    """Rising edges of the top-level clk in a VCD."""
    code, edges = None, 0
    with open(path) as f:
        for line in f:
            w = line.split()
            if code is None and w[:2] == ["$var", "wire"] and w[4] == "clk":
                code = w[3]
            elif code is not None and line.strip() == f"1{code}":
                edges += 1
    assert code is not None, "no clk in the VCD"
    return edges


def test_run_rtl_text_clock_and_traces(tiny_bin, tmp_path):
    """Text mode: the golden text on stdout, cycles and the tokens/s the clock of --clock-mhz
    gives on stderr. --trace writes an FST or a VCD (by suffix) covering every cycle run (FST
    only where the liblz4 headers exist, else a one-line error); any other suffix is a
    one-line error."""
    golden = _hardwire("run", tiny_bin, "-n", 4, "--engine", "golden")
    assert golden.returncode == 0, golden.stderr
    cycles = _tiny_cycles(tiny_bin, 4)
    mean = sum(cycles) / len(cycles)
    for suffix in ("vcd", "fst"):
        wave = tmp_path / f"wave.{suffix}"
        p = _hardwire("run", tiny_bin, "-n", 4, "--engine", "rtl", "--clock-mhz", 25,
                      "--trace", wave, "--build-dir", BUILD)
        if suffix == "fst" and not fst_available():
            # Verilator's FST writer needs lz4.h: without it, one line saying so, exit 2
            assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
                "hardwire: error: FST waveforms need the liblz4"), p.stderr
            assert "Traceback" not in p.stderr and not wave.exists()
            continue
        assert p.returncode == 0, p.stderr
        assert p.stdout == golden.stdout
        last = p.stderr.strip().splitlines()[-1]
        assert last == (f"[4 tokens, {mean:.0f} cycles/token on average (min {min(cycles)}, "
                        f"max {max(cycles)}): {25e6 / mean:,.0f} tokens/s at 25 MHz]"), last
        if suffix == "vcd":
            assert _vcd_clock_edges(wave) >= sum(cycles)
        else:
            assert _fst_end_time(wave) >= 10 * sum(cycles)     # 10 time units per clock
    p = _hardwire("run", tiny_bin, "-n", 2, "--engine", "rtl", "--trace", tmp_path / "w.txt",
                  "--build-dir", BUILD)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "w.txt" in p.stderr and ".fst or .vcd" in p.stderr
