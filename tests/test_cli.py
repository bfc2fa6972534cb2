"""The command line: output formats, exit codes and one-line errors."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from hardwire.cli import main
from hardwire.compiler.loaders.llama2c import save_llama2c
from hardwire.compiler.loaders.random import random_model


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "hardwire", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    m = random_model(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=40,
                     seq_len=16, seed=5, shared_classifier=False)
    p = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    save_llama2c(m, p)
    return p


def test_inspect_json(models_dir, capsys):
    assert main(["inspect", str(models_dir / "stories260K.bin"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["dim"] == 64 and info["parameters"] == 260032
    assert info["rom_bits"]["8"] == 8 * info["matrix_parameters"]


def test_run_json_fields_float_and_golden(models_dir, capsys):
    model = str(models_dir / "stories260K.bin")
    assert main(["run", model, "--prompt", "Tom and his dog", "-n", "8", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["prompt_tokens"][0] == 1 and len(f["tokens"]) == 8
    assert main(["run", model, "--prompt", "Tom and his dog", "-n", "8", "--json",
                 "--engine", "golden"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["prompt_tokens"] == f["prompt_tokens"] and len(g["tokens"]) == 8


def test_run_prints_text(models_dir, capsys):
    assert main(["run", str(models_dir / "stories260K.bin"), "-n", "10"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_quantize_report_json(tiny_bin, capsys):
    assert main(["quantize", str(tiny_bin), "--wbits", "8", "--report", "--json", "-n", "6"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 0 <= rep["top1_agreement"] <= 1 and rep["positions"] > 0
    assert np.isfinite(rep["ce_increase"])


@pytest.mark.parametrize("args,needle", [
    (["run", "{tiny}", "-n", "0"], "must be positive"),
    (["run", "{tiny}", "--engine", "gpu"], "invalid choice"),
    (["run", "{missing}"], "no such file"),
    (["run", "{tiny}", "--prompt", "hello"], "no tokenizer"),
    (["quantize", "{tiny}", "--wbits", "12"], "not supported"),
    (["inspect", "{garbage}"], "garbage.bin"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_bin, args, needle):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x01\x02\x03")
    args = [a.format(tiny=tiny_bin, missing=tmp_path / "nope.bin", garbage=garbage)
            for a in args]
    code, out, err = run_cli(*args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err


def test_prompt_longer_than_context(models_dir):
    code, out, err = run_cli("run", models_dir / "stories260K.bin", "--seq-len", "4",
                             "--prompt", "Once upon a time there was a girl")
    assert code == 2 and "longer than the context" in err and len(err.splitlines()) == 1


def test_help_on_every_command():
    for cmd in ("inspect", "run", "quantize"):
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and "usage" in out


def test_lora_pack_and_run_with_adapter(models_dir, tmp_path, capsys):
    adapter = str(Path(__file__).resolve().parents[1] / "examples/adapters/stories260K-mia")
    model = str(models_dir / "stories260K.bin")
    assert main(["lora", "pack", adapter, "--model", model, "-o", str(tmp_path / "a.bin")]) == 0
    assert (tmp_path / "a.bin").stat().st_size > 1000
    capsys.readouterr()
    assert main(["run", model, "-n", "16", "--engine", "golden", "--lora", adapter]) == 0
    assert "Mia" in capsys.readouterr().out
    code, _, err = run_cli("lora", "pack", tmp_path / "missing", "--model", model, "-o",
                           tmp_path / "b.bin")
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "b.bin").exists()


def test_synth_refused_fold_leaves_no_output(tmp_path, tiny_bin):
    out = tmp_path / "out"
    code, _, err = run_cli("synth", tiny_bin, "-o", out, "--fold", "bogus=1", "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown key 'bogus'" in err
    assert not out.exists()
