"""``make demo``: compile stories260K into a chip, simulate it, print the story it writes.

Without the model it says where to get it and runs a seeded random tiny model instead.
"""

import argparse
import sys
import time
from pathlib import Path

from hardwire.compiler.errors import HardwireError


def _run(model_path, *, n, out_dir, build_dir, prompt=""):
    from hardwire.compiler import api
    from hardwire.compiler.emit import compile_model, format_report
    t0 = time.perf_counter()
    rep = compile_model(model_path, out_dir, progress=sys.stderr)
    print(format_report(rep), file=sys.stderr)
    print(f"[hardwire] compiled in {time.perf_counter() - t0:.1f} s -> {out_dir}",
          file=sys.stderr)
    res = api.run_generation(model_path, prompt=prompt, n=n, engine="rtl", build_dir=build_dir,
                             progress=sys.stderr)
    print()
    print(res["text"])
    print()
    print(api.format_cycles(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.demo")
    ap.add_argument("--models", default="models", help="folder with stories260K.bin")
    ap.add_argument("-n", type=int, default=200, help="tokens to generate")
    ap.add_argument("--out", default="build/demo")
    args = ap.parse_args(argv)
    model = Path(args.models) / "stories260K.bin"
    try:
        if model.is_file():
            _run(model, n=args.n, out_dir=args.out, build_dir="build")
        else:
            print(f"[hardwire] {model} not found: `make models` downloads stories260K from "
                  "huggingface.co/karpathy/tinyllamas (pinned sha256). Running a seeded random "
                  "tiny model instead.", file=sys.stderr)
            from hardwire.compiler.loaders.llama2c import save_llama2c
            from hardwire.compiler.loaders.random import random_model
            m = random_model(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                             vocab_size=64, seq_len=64, seed=0, shared_classifier=False)
            path = Path("build") / "demo-random" / "random-tiny.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_llama2c(m, path)
            _run(path, n=min(args.n, 48), out_dir="build/demo-random/chip", build_dir="build")
    except HardwireError as e:
        print(f"hardwire: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
