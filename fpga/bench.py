"""FPGA figures for BENCHMARKS.md without make: ``python -m hardwire.fpga.bench``.

Runs what ``make synth`` runs (``hardwire synth stories260K.bin --board ulx3s-85f -o
build/synth``, i.e. :func:`~.synth.synth_board`) and condenses ``synth.json`` into one
record; a model that does not fit the FPGA is a result too (``fits: false`` with the reason).
Writes ``<out>/bench.json``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError

__all__ = ["main", "synth_bench"]

_KEYS = ("name", "board", "device", "clock_mhz", "LUT4", "FF", "DP16KD", "MULT18X18D",
         "available", "fmax_mhz", "fmax_design_mhz", "timing_met", "tokens_per_s",
         "tokens_per_s_at_clock", "link_tokens_per_s", "lut_mapper", "fit", "bitstream")


def synth_bench(model, out="build/synth", *, board="ulx3s-85f", fold=None, clock_mhz=50.0,
                progress=True):
    """Synthesize ``model`` for ``board``; returns a record with ``fits`` and the figures
    (or the reason it does not fit) and the wall time."""
    from .synth import synth_board
    t0 = time.monotonic()
    record = {"model": str(model), "board": board}
    try:
        rep = synth_board(model, out, board=board, fold=fold, clock_mhz=clock_mhz,
                          progress=progress)
    except HardwireError as e:
        record.update(fits=False, reason=str(e))
    else:
        record.update(fits=True, **{k: rep[k] for k in _KEYS if k in rep},
                      mean_cycles_per_token=rep["cycles_per_token"]["mean"])
    record["seconds"] = round(time.monotonic() - t0, 1)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.fpga.bench", description=__doc__)
    ap.add_argument("--models", default="models", help="folder with stories260K.bin")
    ap.add_argument("--model", default=None, help="a model file (default: stories260K.bin)")
    ap.add_argument("-o", "--out", default="build/synth")
    ap.add_argument("--fold", default=None)
    ap.add_argument("--clock-mhz", type=float, default=50.0)
    args = ap.parse_args(argv)
    model = Path(args.model) if args.model else Path(args.models) / "stories260K.bin"
    if not model.is_file():
        print(f"hardwire.fpga.bench: {model} not found", file=sys.stderr)
        return 2
    record = synth_bench(model, args.out, fold=args.fold, clock_mhz=args.clock_mhz)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
