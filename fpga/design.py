"""A quantized model as a board design: chip + host link, for the FPGA and for simulation.

:func:`board_design` is shared by ``hardwire synth`` (:mod:`.synth`) and ``hardwire
board-sim`` (:mod:`.board_sim`), so both build the same gateware around the same chip.
"""

import hashlib
import json
from dataclasses import dataclass

from hardwire.compiler.errors import HardwireError

from .board import BoardCore, ULX3SBoard, clocks_per_bit

__all__ = ["DEFAULT_BAUD", "DEFAULT_CLOCK_MHZ", "BoardDesign", "board_design", "build_id_of"]

DEFAULT_BAUD = 115200
DEFAULT_CLOCK_MHZ = 50.0


def build_id_of(**options):
    """32-bit build identifier: the first 4 bytes of the sha256 of the build options (the
    chip name carries the model and datapath digests), so equal options give equal ids."""
    text = json.dumps(options, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


@dataclass
class BoardDesign:
    name: str          # the chip's name (model, weight widths, datapath digest)
    qm: object         # QuantizedModel
    plan: object       # ChipPlan
    chip: object       # LlamaChip
    core: BoardCore
    clock_hz: int
    clocks_per_bit: int
    build_id: int

    def ulx3s(self):
        """The FPGA top (PLL, pins) around :attr:`core`."""
        return ULX3SBoard(self.core)


def board_design(qm, *, fold=None, clock_hz=None, baud=None, cpb=None, timeout_cycles=None,
                 target="ulx3s", lora=None):
    """Plan and build the chip of ``qm`` and wrap it in a :class:`BoardCore`.

    ``clock_hz`` defaults to 50 MHz (for ``target="ulx3s"`` rounded to what the PLL makes).
    The UART bit period is ``cpb`` clocks, else derived from ``baud`` (default 115200).
    ``lora`` (the chip builder's LoRA configuration, default none) is passed to
    ``build_chip``; a chip built with it has the LoRA loader ports, which the host link
    forwards its LoRA commands to.
    """
    from hardwire.compiler.chip_builder import build_chip, chip_name
    from hardwire.compiler.plan import plan_chip

    clock_hz = DEFAULT_CLOCK_MHZ * 1e6 if clock_hz is None else float(clock_hz)
    if target == "ulx3s":
        try:
            pll = ULX3SBoard.pll_for(clock_hz)
        except ValueError as e:
            raise HardwireError(str(e)) from None
        if abs(pll.f_out_mhz * 1e6 - clock_hz) > 1e-3 * clock_hz:
            raise HardwireError(f"--clock-mhz {clock_hz / 1e6:g}: the nearest PLL output "
                                f"is {pll.f_out_mhz:g} MHz; use that")
        clock_hz = pll.f_out_mhz * 1e6
    clock_hz = round(clock_hz)
    if cpb is None:
        try:
            cpb = clocks_per_bit(clock_hz, DEFAULT_BAUD if baud is None else baud)
        except ValueError as e:
            raise HardwireError(str(e)) from None
    try:
        plan = plan_chip(qm, fold=fold)
    except ValueError as e:
        raise HardwireError(f"--fold: {e}") from None
    name = chip_name(qm)
    options = dict(name=name, plan=plan.to_dict() if hasattr(plan, "to_dict") else str(plan),
                   clock_hz=clock_hz, cpb=cpb, target=target)
    if lora is not None:                    # absent for plain chips: their build ids stay
        options["lora"] = lora
    build_id = build_id_of(**options)
    chip = build_chip(qm, plan) if lora is None else build_chip(qm, plan, lora=lora)
    try:
        core = BoardCore(chip, clock_hz=clock_hz, clocks_per_bit=cpb, build_id=build_id,
                         timeout_cycles=timeout_cycles)
    except ValueError as e:
        raise HardwireError(f"board: {e}") from None
    return BoardDesign(name=name, qm=qm, plan=plan, chip=chip, core=core, clock_hz=clock_hz,
                       clocks_per_bit=cpb, build_id=build_id)
