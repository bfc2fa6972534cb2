"""What the LoRA block costs on the ECP5-85F build: ``python -m hardwire.fpga.lora_cost``.

Synthesizes the same small chip + ULX3S board top twice through Yosys -> nextpnr-ecp5 ->
ecppack (the settings of CI's full-flow test: plan ``macs=8``, classic ABC, router2, no
timing-driven placement), without and with a LoRA build, and prints the difference of LUT4,
FF, DP16KD, MULT18X18D and Fmax as JSON plus a one-line summary (BENCHMARKS.md, "LoRA block
cost on the ECP5-85F build").
"""

import argparse
import json
import sys
import time

__all__ = ["lora_cost", "main"]

#: The chip of ``tests/test_fpga_synth.py``'s full-flow test (dim 8, one layer).
MINI = dict(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8, vocab_size=8, seq_len=4,
            shared_classifier=False)
KEYS = ("LUT4", "FF", "DP16KD", "MULT18X18D", "fmax_design_mhz")


def lora_cost(out, *, targets=("wq", "wv"), r_max=8, progress=True):
    """Figures of the base and the LoRA build of the :data:`MINI` chip and their difference."""
    from ..compiler.chip_builder import LoraSpec
    from ..compiler.loaders.random import random_model
    from ..compiler.quantize import quantize_model
    from .synth import synth_qmodel
    qm = quantize_model(random_model(seed=3, **MINI), wbits=8, calib_tokens=[1, 5, 3, 7, 2])
    runs = {}
    for which, lora in (("base", None), ("lora", LoraSpec(targets=targets, r_max=r_max))):
        t0 = time.monotonic()
        rep = synth_qmodel(qm, f"{out}/{which}", fold="macs=8", lut_mapper="abc",
                           progress=progress, nextpnr_opts=("--router", "router2", "--no-tmdriv"),
                           lora=lora)
        runs[which] = {k: rep[k] for k in KEYS} | {"seconds": round(time.monotonic() - t0, 1)}
    runs["lora_cost"] = {k: round(runs["lora"][k] - runs["base"][k], 2) for k in KEYS}
    runs["lora"]["targets"], runs["lora"]["r_max"] = list(targets), r_max
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hardwire.fpga.lora_cost", description=__doc__)
    ap.add_argument("--out", default="build/lora_cost", help="synthesis folders (build/lora_cost)")
    ap.add_argument("--targets", default="wq,wv", help="LoRA targets (wq,wv)")
    ap.add_argument("--rank", type=int, default=8, help="r_max, a power of two (8)")
    args = ap.parse_args(argv)
    from ..compiler.chip_builder import LoraSpec
    from ..compiler.errors import HardwireError
    try:
        spec = LoraSpec(targets=tuple(args.targets.split(",")), r_max=args.rank)
        runs = lora_cost(args.out, targets=spec.targets, r_max=spec.r_max)
    except (ValueError, HardwireError) as e:
        print(f"lora_cost: {e}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2))
    c = runs["lora_cost"]
    print(f"LoRA cost: {c['LUT4']:+,} LUT4, {c['FF']:+,} FF, {c['DP16KD']:+} DP16KD, "
          f"{c['MULT18X18D']:+} MULT18X18D, Fmax {c['fmax_design_mhz']:+.1f} MHz", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
