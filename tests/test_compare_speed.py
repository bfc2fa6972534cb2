"""`python -m hardwire.sim.compare_speed` against stand-in executables that speak the chip
driver's protocol (no Verilator needed): agreement, a token mismatch, --rounds, bad input."""

import stat

from hardwire.sim.compare_speed import main


def fake_chipsim(path, token, cycles):
    """An executable that answers every ``G`` with 3 ``O`` lines and ``P`` with the total."""
    path.write_text(
        "#!/bin/sh\n"
        "n=0\n"
        "while read cmd rest; do\n"
        f"  case $cmd in G) for i in 1 2 3; do echo O {token} {cycles}; n=$((n+{cycles})); done;;\n"
        "  R) echo R 0;; P) echo P 0 0 0 0 $n;; Q) exit 0;; esac\n"
        "done\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_agree_and_rounds(tmp_path, capsys):
    a = fake_chipsim(tmp_path / "a", 7, 100)
    b = fake_chipsim(tmp_path / "b", 7, 100)
    assert main(["--repeat", "2", "--rounds", "3", f"a={a}", f"b={b}"]) == 0
    out = capsys.readouterr().out
    assert out.count("a: 6 tokens, 600 cycles") == 3
    assert "a: median" in out and "b: median" in out and "over 3 rounds" in out


def test_token_mismatch_fails(tmp_path, capsys):
    a = fake_chipsim(tmp_path / "a", 7, 100)
    b = fake_chipsim(tmp_path / "b", 8, 100)
    assert main(["--repeat", "1", f"a={a}", f"b={b}"]) == 1
    assert "b: tokens differ" in capsys.readouterr().out


def test_cycle_offset_reported(tmp_path, capsys):
    a = fake_chipsim(tmp_path / "a", 7, 100)
    b = fake_chipsim(tmp_path / "b", 7, 110)
    assert main(["--repeat", "1", f"a={a}", f"b={b}"]) == 0
    assert "b: cycles per token differ by [10]" in capsys.readouterr().out


def test_bad_counts_exit_2(capsys):
    assert main(["--rounds", "0", "a=b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 1" in err
