"""Compare the speed of chip simulation executables (``chipsim`` built by the ``rtl`` engine).

    python -m hardwire.sim.compare_speed [--repeat 60] [--tokens 15] [--rounds 1] NAME=EXE ...

Each executable gets the same script on stdin (``--repeat`` times: greedy ``--tokens`` tokens
from BOS, then a context reset) and is timed by the CPU time it used (``getrusage`` of the
child), so the figure does not depend on what else runs on the machine; wall time is printed
too. The token and cycle lists of all executables must agree (exit status 1 otherwise, apart
from a constant cycle offset, which is reported).

On a loaded machine the CPU time of the same executable still varies by 10-20% (caches and
cores are shared): ``--rounds N`` runs the executables N times, interleaved, and reports the
median and best cycles per CPU second of each.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import time


def measure(exe, script):
    """``(tokens, cycles per token, total cycles, wall s, cpu s)`` of one run of ``exe``."""
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([exe], input=script, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = max(1e-6, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
    lines = [line.split() for line in p.stdout.splitlines()]
    outs = [w for w in lines if w and w[0] == "O"]
    total = int(next(w for w in lines if w and w[0] == "P")[5])
    return [int(w[1]) for w in outs], [int(w[2]) for w in outs], total, wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.sim.compare_speed")
    ap.add_argument("exes", nargs="+", help="NAME=path/to/chipsim")
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    if min(args.repeat, args.tokens, args.rounds) < 1:
        print("compare_speed: --repeat, --tokens and --rounds must be at least 1",
              file=sys.stderr)
        return 2
    script = f"G 1 {args.tokens}\nR\n" * args.repeat + "P\nQ\n"
    ref = None
    ok = True
    rates = {}
    for _ in range(args.rounds):
        for spec in args.exes:
            name, _, exe = spec.partition("=")
            tokens, cycles, total, wall, cpu = measure(exe, script)
            rates.setdefault(name, []).append(total / cpu)
            print(f"{name}: {len(tokens)} tokens, {total:,} cycles; CPU {cpu:.2f} s -> "
                  f"{len(tokens) / cpu:,.0f} tokens/s, {total / cpu:,.0f} cycles/s per CPU "
                  f"second (wall {wall:.2f} s)")
            if ref is None:
                ref = (tokens, cycles)
            elif tokens != ref[0]:
                print(f"{name}: tokens differ from the first executable's")
                ok = False
            elif cycles != ref[1]:
                offsets = {a - b for a, b in zip(cycles, ref[1])}
                print(f"{name}: cycles per token differ by {sorted(offsets)}")
    if args.rounds > 1:
        for name, r in rates.items():
            print(f"{name}: median {statistics.median(r):,.0f}, best {max(r):,.0f} cycles/s per "
                  f"CPU second over {len(r)} rounds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
