"""``make bench``: speed of the tool and of the chip on stories260K (figures for BENCHMARKS.md).

Measures, on this machine, each with the wall time of the step itself:

* ``hardwire compile`` (quantize + plan + elaborate + emit Verilog/RTLIL + report);
* the ``rtl`` engine's simulation build from nothing (Amaranth export of the simulation top,
  then Verilator + C++ with an empty runtime-object cache) and again when cached;
* a greedy generation of ``-n`` tokens from BOS in the Verilated chip: simulated tokens/s and
  cycles/s, the measured cycles per token at every position next to the planner's formula,
  and the tokens next to the golden model's;
* MAC utilization = MACs per token / (MAC units x measured cycles per token).

Writes ``<out>/bench.json`` (every figure, every position) and prints a short summary. Exit
status 1 if the RTL tokens differ from the golden model or a cycle count from the formula.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError

POSITIONS = (0, 1, 15, 63, 127, 191, 255)


def _macs_per_token(qm, pos):
    """Multiply-accumulates of one token at ``pos``: every weight once, plus attention scores
    and weighted sums over ``pos + 1`` positions in every head of every layer."""
    c = qm.config
    macs = sum(int(m.q.size) for L in qm.layers
               for m in (L.wq, L.wk, L.wv, L.wo, L.w1, L.w3, L.w2))
    macs += int(qm.classifier.q.size)
    return macs + 2 * c.n_layers * c.n_heads * c.head_size * (pos + 1)


def run_bench(model_path, *, n=256, wbits="8", fold=None, out="build/bench", build_dir="build",
              progress=sys.stderr):
    """Run every measurement on the chip of ``fold`` (default: the planner's); return the
    result dict (see the module docstring)."""
    from hardwire.compiler.emit import compile_model
    from hardwire.compiler.golden import generate_golden
    from hardwire.compiler.loaders import load_model
    from hardwire.compiler.plan import plan_chip, predict_cycles
    from hardwire.compiler.quantize import quantize_model
    from hardwire.sim.chip_sim import ChipSim, chip_sim_executable

    def say(msg):
        print(f"[bench] {msg}", file=progress, flush=True)

    model_path, out = Path(model_path), Path(out)
    if not model_path.is_file():
        raise HardwireError(f"{model_path}: model not found (`make models` downloads it)")
    res = {"model": str(model_path), "wbits": wbits, "fold": fold, "cpus": os.cpu_count(),
           "load_average_start": list(os.getloadavg())}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    say("compile (hardwire compile) ...")
    t0 = time.perf_counter()
    rep = compile_model(model_path, out / "compile", wbits=wbits, fold=fold, progress=progress)
    res["compile_seconds"] = round(time.perf_counter() - t0, 1)
    res["mac_units"] = rep["mac_units"]

    qm = quantize_model(load_model(model_path), wbits=wbits)
    plan = plan_chip(qm, fold=fold)
    say("simulation build from nothing (export + Verilator, empty runtime cache) ...")
    old_cache = os.environ.get("HARDWIRE_CACHE_DIR")
    os.environ["HARDWIRE_CACHE_DIR"] = str((out / "empty-cache").absolute())
    try:
        cold = {}
        chip_sim_executable(qm, plan, build_dir=build_dir, rebuild=True, timings=cold,
                            progress=progress)
    finally:
        if old_cache is None:
            del os.environ["HARDWIRE_CACHE_DIR"]
        else:
            os.environ["HARDWIRE_CACHE_DIR"] = old_cache
    res["sim_export_seconds"] = round(cold["export_seconds"], 1)
    res["verilator_build_seconds_cold"] = round(cold["build_seconds"], 1)
    t0 = time.perf_counter()
    exe = chip_sim_executable(qm, plan, build_dir=build_dir, progress=progress)
    res["sim_build_seconds_cached"] = round(time.perf_counter() - t0, 2)

    n = min(n, qm.config.seq_len)
    say(f"simulating {n} tokens from BOS ...")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with ChipSim(exe) as sim:
        tokens, cycles = sim.generate([1], n, stop_on_bos=False)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the simulator's own CPU time: tokens/s on an unloaded core, whatever else is running
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    res["sim_cpu_seconds"] = round(cpu, 2)
    res["sim_tokens_per_cpu_s"] = round(len(cycles) / cpu, 1) if cpu else None
    res["sim_tokens"] = len(cycles)
    res["sim_seconds"] = round(wall, 2)
    res["sim_tokens_per_s"] = round(len(cycles) / wall, 1)
    res["sim_cycles_per_s"] = round(sum(cycles) / wall)
    predicted = [predict_cycles(qm, plan, p)["total"] for p in range(len(cycles))]
    res["cycles_match_formula"] = cycles == predicted
    res["rtl_equals_golden"] = tokens == generate_golden(qm, [1], n, stop_on_bos=False)
    units = rep["mac_units"]["total"]
    res["by_position"] = {
        str(p): {"cycles_measured": cycles[p], "cycles_formula": predicted[p],
                 "mac_utilization": round(_macs_per_token(qm, p) / (units * cycles[p]), 4)}
        for p in POSITIONS if p < len(cycles)}
    res["mean_cycles_per_token"] = round(sum(cycles) / len(cycles), 1)
    res["cycles_measured"] = cycles
    res["load_average_end"] = list(os.getloadavg())
    return res


def summary(res):
    """A few human-readable lines."""
    pos = res["by_position"]
    lines = [
        f"fold {res['fold'] or '(planner default)'}: "
        f"compile {res['compile_seconds']} s; simulation build from nothing: export "
        f"{res['sim_export_seconds']} s + Verilator {res['verilator_build_seconds_cold']} s; "
        f"cached {res['sim_build_seconds_cached']} s",
        f"simulation: {res['sim_tokens']} tokens in {res['sim_seconds']} s = "
        f"{res['sim_tokens_per_s']} tokens/s ({res['sim_cycles_per_s']:,} cycles/s); "
        f"simulator CPU time {res['sim_cpu_seconds']} s = {res['sim_tokens_per_cpu_s']} "
        f"tokens per CPU second",
        "cycles/token measured (formula): " + ", ".join(
            f"pos {p}: {v['cycles_measured']} ({v['cycles_formula']})" for p, v in pos.items()),
        f"MAC units {res['mac_units']['total']}; utilization " + ", ".join(
            f"pos {p}: {100 * v['mac_utilization']:.1f}%" for p, v in pos.items()),
        f"RTL tokens == golden: {res['rtl_equals_golden']}; every cycle count == formula: "
        f"{res['cycles_match_formula']}; load average {res['load_average_start'][0]:.1f} -> "
        f"{res['load_average_end'][0]:.1f} on {res['cpus']} cores",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.bench")
    ap.add_argument("--models", default="models", help="folder with stories260K.bin")
    ap.add_argument("-n", type=int, default=256, help="tokens to simulate (256)")
    ap.add_argument("--wbits", default="8")
    ap.add_argument("--fold", default=None, help="folding (see hardwire compile --help; "
                    "e.g. layers=shared for the layer-serial chip)")
    ap.add_argument("--out", default="build/bench", help="bench.json and the compile output")
    ap.add_argument("--build-dir", default="build", help="simulation cache (rebuilt here)")
    args = ap.parse_args(argv)
    try:
        res = run_bench(Path(args.models) / "stories260K.bin", n=args.n, wbits=args.wbits,
                        fold=args.fold, out=args.out, build_dir=args.build_dir)
    except HardwireError as e:
        print(f"hardwire: error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) / "bench.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res))
    print(f"wrote {path}")
    return 0 if res["rtl_equals_golden"] and res["cycles_match_formula"] else 1


if __name__ == "__main__":
    sys.exit(main())
