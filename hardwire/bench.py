"""``make bench``: speed of the tool and of the chip on stories260K (figures for BENCHMARKS.md).

Measures, on this machine: compile time (quantize + plan + elaborate + emit), byte-identical
re-compilation, Verilator build time (from scratch, in a fresh folder), simulated tokens/s over
a greedy generation from BOS, cycles per token by position (measured in RTL simulation) next to
the planner's prediction, and agreement of the RTL tokens with the golden model. Writes
``build/bench/bench.json`` and prints a short summary.
"""

import argparse
import filecmp
import json
import shutil
import sys
import time
from pathlib import Path


def _bench(model_path, *, n, out, wbits):
    from hardwire.compiler.chip_builder import build_chip, chip_name
    from hardwire.compiler.emit import compile_model
    from hardwire.compiler.golden import generate_golden
    from hardwire.compiler.loaders import load_model
    from hardwire.compiler.plan import plan_chip, predict_cycles
    from hardwire.compiler.quantize import quantize_model
    from hardwire.sim.chip_sim import ChipSim, build_chip_sim
    from hardwire.sim.cocotb_runner import export_verilog

    res = {"model": str(model_path), "wbits": wbits, "tokens": n}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rep = compile_model(model_path, out / "compile-a", wbits=wbits, progress=sys.stderr)
    res["compile_seconds"] = round(time.perf_counter() - t0, 2)
    compile_model(model_path, out / "compile-b", wbits=wbits)
    a, b = out / "compile-a", out / "compile-b"
    res["byte_identical_recompile"] = all(
        filecmp.cmp(a / f.name, b / f.name, shallow=False) for f in a.iterdir())
    res["mac_units"] = rep["mac_units"]["total"]

    qm = quantize_model(load_model(model_path), wbits=wbits)
    plan = plan_chip(qm)
    verilog = export_verilog(build_chip(qm, plan), "top")
    t0 = time.perf_counter()
    exe = build_chip_sim(verilog, name=chip_name(qm), build_dir=out / "fresh-sim",
                         progress=sys.stderr)
    res["verilator_build_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    with ChipSim(exe) as sim:
        tokens, cycles = sim.generate([1], n, stop_on_bos=False)
    wall = time.perf_counter() - t0
    res["sim_seconds"] = round(wall, 2)
    res["sim_tokens_per_s"] = round(len(cycles) / wall, 1)
    res["cycles_measured"] = cycles
    res["cycles_predicted"] = [predict_cycles(qm, plan, p)["total"] for p in range(len(cycles))]
    res["cycles_match_prediction"] = res["cycles_measured"] == res["cycles_predicted"]
    golden = generate_golden(qm, [1], n, stop_on_bos=False)
    res["rtl_equals_golden"] = tokens == golden
    mean = sum(cycles) / len(cycles)
    res["mean_cycles_per_token"] = round(mean, 1)
    res["cycles_at"] = {str(p): cycles[p] for p in (0, 63, 127, 255) if p < len(cycles)}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.bench")
    ap.add_argument("--models", default="models")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--wbits", default="8")
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    res = _bench(Path(args.models) / "stories260K.bin", n=args.n, out=out, wbits=args.wbits)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"compile {res['compile_seconds']} s (byte-identical re-run: "
          f"{res['byte_identical_recompile']}); Verilator build {res['verilator_build_seconds']}"
          f" s; simulation {res['sim_tokens_per_s']} tokens/s ({res['tokens']} tokens in "
          f"{res['sim_seconds']} s); cycles/token {res['cycles_at']} (mean "
          f"{res['mean_cycles_per_token']}), prediction exact: {res['cycles_match_prediction']};"
          f" RTL == golden: {res['rtl_equals_golden']}; {res['mac_units']} MAC units")
    print(f"wrote {out / 'bench.json'}")
    return 0 if res["rtl_equals_golden"] and res["cycles_match_prediction"] else 1


if __name__ == "__main__":
    sys.exit(main())
