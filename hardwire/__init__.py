"""hardwire: turn a trained Llama checkpoint into a chip.

The repository's folders are installed as sub-packages:

* ``compiler/`` -> :mod:`hardwire.compiler` (loaders, numerics, golden model, planning)
* ``hdl/``      -> :mod:`hardwire.hdl` (Amaranth components)
* ``sim/``      -> :mod:`hardwire.sim` (Verilator / cocotb harnesses)
* ``fpga/``     -> :mod:`hardwire.fpga` (boards, host link, synthesis flow)
"""

import os as _os

# The golden model and quantizer do many small matrix operations: BLAS threads only add
# contention there (measured 6.3 s -> 3.5 s for quantizing stories260K on 2 cores).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_v, "1")

__version__ = "0.1.0"
