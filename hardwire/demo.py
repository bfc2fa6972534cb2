"""``make demo``: compile stories260K into a chip, simulate it, print the story it writes.

Without the model it says where to get it and runs a seeded random tiny model instead. The
long steps (compile, the one-time simulation build) print a line every 20 s while they run.
"""

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError

PROMPT = "Once upon a time"


@contextlib.contextmanager
def _ticker(label, *, every=20.0, out=sys.stderr):
    """Print ``label ... N s`` every ``every`` seconds until the block ends."""
    done = threading.Event()
    t0 = time.perf_counter()

    def tick():
        while not done.wait(every):
            print(f"[hardwire] ... {label}: {time.perf_counter() - t0:.0f} s", file=out,
                  flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _run(model_path, *, n, out_dir, build_dir, prompt, clock_mhz):
    from hardwire.compiler import api
    from hardwire.compiler.emit import compile_model, format_report
    t0 = time.perf_counter()
    print(f"[hardwire] compiling {model_path} into a chip (Verilog, RTLIL, report) ...",
          file=sys.stderr, flush=True)
    with _ticker("compiling"):
        rep = compile_model(model_path, out_dir, progress=sys.stderr)
    print(format_report(rep), file=sys.stderr)
    print(f"[hardwire] compiled in {time.perf_counter() - t0:.1f} s -> {out_dir}",
          file=sys.stderr)
    with _ticker("preparing the simulation"):
        res = api.run_generation(model_path, prompt=prompt, n=n, engine="rtl",
                                 build_dir=build_dir, clock_mhz=clock_mhz, progress=sys.stderr)
    print()
    print(res["text"])
    print()
    print(api.format_cycles(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.demo")
    ap.add_argument("--models", default="models", help="folder with stories260K.bin")
    ap.add_argument("-n", type=int, default=200, help="tokens to generate (200)")
    ap.add_argument("--prompt", default=PROMPT, help=f"prompt ({PROMPT!r})")
    ap.add_argument("--clock-mhz", type=float, default=50.0, help="clock for tokens/s (50)")
    ap.add_argument("--out", default="build/demo")
    ap.add_argument("--build-dir", default="build", help="simulation cache")
    args = ap.parse_args(argv)
    model = Path(args.models) / "stories260K.bin"
    try:
        if model.is_file():
            _run(model, n=args.n, out_dir=args.out, build_dir=args.build_dir,
                 prompt=args.prompt, clock_mhz=args.clock_mhz)
        else:
            print(f"[hardwire] {model} not found. Get the real model with `make models` "
                  f"(downloads stories260K.bin and tok512.bin from "
                  f"https://huggingface.co/karpathy/tinyllamas, checked against pinned sha256) "
                  f"or point MODELS= at a folder that has them. Running a seeded random tiny "
                  f"model instead (its text is token ids: it has no tokenizer).",
                  file=sys.stderr, flush=True)
            from hardwire.compiler.loaders.llama2c import save_llama2c
            from hardwire.compiler.loaders.random import random_model
            m = random_model(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                             vocab_size=64, seq_len=64, seed=0, shared_classifier=False)
            path = Path(args.build_dir) / "demo-random" / "random-tiny.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_llama2c(m, path)
            _run(path, n=min(args.n, 48), out_dir=Path(args.build_dir) / "demo-random" / "chip",
                 build_dir=args.build_dir, prompt="", clock_mhz=args.clock_mhz)
    except HardwireError as e:
        print(f"hardwire: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
