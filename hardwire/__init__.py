"""hardwire: turn a trained Llama checkpoint into a chip.

The repository's folders are installed as sub-packages:

* ``compiler/`` -> :mod:`hardwire.compiler` (loaders, quantization, numerics, golden model, planning)
* ``hdl/``      -> :mod:`hardwire.hdl` (Amaranth components)
* ``sim/``      -> :mod:`hardwire.sim` (Verilator / cocotb harnesses)
* ``fpga/``     -> :mod:`hardwire.fpga` (boards, host link, synthesis flow)
"""

__version__ = "0.1.0"
