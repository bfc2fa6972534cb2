"""Embed the generated Llama chip in your own Amaranth design.

``StoryTop`` is a user's top: one ``start`` pulse feeds BOS, then every next token the chip
produces is fed back in (greedy generation in hardware) and shown on ``token``/``token_valid``
until the context is full (``done``). Run this file to write its Verilog::

    .venv/bin/python examples/embed_chip.py models/stories260K.bin -o story_top.v
"""

import argparse
import sys

from amaranth.back import verilog
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from hardwire.compiler.chip_builder import build_chip
from hardwire.compiler.errors import HardwireError
from hardwire.compiler.loaders import load_model
from hardwire.compiler.plan import plan_chip
from hardwire.compiler.quantize import quantize_model

BOS = 1


class StoryTop(wiring.Component):
    """Greedy generation from BOS around a ``LlamaChip``.

    Parameters
    ----------
    chip : hardwire.hdl.chip.LlamaChip
        The chip, as :func:`hardwire.compiler.chip_builder.build_chip` returns it.
    """

    def __init__(self, chip):
        self._chip = chip
        token = chip.token_out.payload.shape()
        super().__init__({"start": In(1), "token": Out(token), "token_valid": Out(1),
                          "done": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.chip = chip = self._chip
        pending = Signal()                                  # a next token waits to go in
        nxt = Signal.like(self.token)
        m.d.comb += [
            chip.token_in.valid.eq(self.start | pending),
            chip.token_in.payload.eq(Mux(self.start, BOS, nxt)),
            chip.token_out.ready.eq(1),
            self.token.eq(chip.token_out.payload),
            self.token_valid.eq(chip.token_out.valid),
            self.done.eq(chip.err_context),
        ]
        with m.If(chip.token_in.valid & chip.token_in.ready):
            m.d.sync += pending.eq(0)
        with m.If(chip.token_out.valid):                     # after the line above: wins
            m.d.sync += [pending.eq(1), nxt.eq(chip.token_out.payload)]
        return m


def story_top(model_path, *, wbits="8", fold=None):
    """Load, quantize, plan and build: ``(quantized model, StoryTop)``."""
    qm = quantize_model(load_model(model_path), wbits=wbits)
    chip = build_chip(qm, plan_chip(qm, fold=fold))       # an Amaranth wiring.Component
    return qm, StoryTop(chip)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", default="story_top.v")
    args = ap.parse_args()
    try:
        _, top = story_top(args.model)
    except HardwireError as e:                 # a bad model file: one line, exit 2
        print(f"embed_chip: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    text = verilog.convert(top, name="story_top")
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
