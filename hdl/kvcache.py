"""The key/value cache of attention: two block RAMs, one row per position (and layer)."""

import operator

from amaranth.hdl import Cat, Module, Shape
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import pos_shape, vector_layout

__all__ = ["KVCache", "KVReadSignature"]


class KVReadSignature(wiring.Signature):
    """Read port of a :class:`KVCache`, seen from the cache (like ``ReadPort.Signature``).

    With ``en`` high, the rows at ``addr`` appear on ``k`` and ``v`` in the next cycle (a
    synchronous block RAM read); with ``en`` low the outputs hold.

    Members
    -------
    addr : ``In(range(n_pos))``
    en : ``In(1)``
    k, v : ``Out(vector_layout(bits, kv_dim))``
    """

    def __init__(self, *, n_pos, kv_dim, bits):
        self._n_pos, self._kv_dim, self._bits = n_pos, kv_dim, bits
        row = vector_layout(bits, kv_dim)
        super().__init__({
            "addr": In(Shape.cast(range(n_pos))),
            "en": In(1),
            "k": Out(row),
            "v": Out(row),
        })

    n_pos = property(lambda self: self._n_pos)
    kv_dim = property(lambda self: self._kv_dim)
    bits = property(lambda self: self._bits)

    def __eq__(self, other):
        return (type(other) is type(self) and
                (other.n_pos, other.kv_dim, other.bits) == (self.n_pos, self.kv_dim, self.bits))

    def __repr__(self):
        return f"KVReadSignature(n_pos={self.n_pos}, kv_dim={self.kv_dim}, bits={self.bits})"


class KVCache(wiring.Component):
    """Keys and values of positions ``0..n_pos-1`` of ``n_layers`` layers (all kv heads).

    A write stores ``k`` and ``v`` at row ``pos`` (one transfer per cycle, ``w.ready`` is
    always high). A write with ``pos >= n_pos`` is consumed but not stored (nothing wraps)
    and sets the sticky ``error``. The read port returns both rows one cycle after the
    address; a read of the row being written in the same cycle returns the new row
    (transparent read). Rows start at zero.

    With ``n_layers = L > 1`` each memory holds ``L * n_pos`` rows, the layer in the high part
    of the address (row ``layer * n_pos + pos``, a plain concatenation when ``n_pos`` is a
    power of two): the ``layer`` port selects the layer's rows for both the write and the
    read port, so every layer has its own context.

    Parameters
    ----------
    n_pos : int
        Positions (the context length).
    kv_dim : int
        Elements per key/value row (``n_kv_heads * head_size``).
    bits : int
        Element width.
    n_layers : int
        Layers whose rows the cache holds (default 1: one layer, no ``layer`` port).

    Members
    -------
    w : ``In(stream.Signature(StructLayout({"pos": ..., "k": ..., "v": ...})))``
        Rows to store: ``pos`` of ``pos_shape(n_pos)`` (holds ``0..n_pos``), ``k`` and ``v``
        of ``vector_layout(bits, kv_dim)``.
    read : ``Out(KVReadSignature(n_pos=n_pos, kv_dim=kv_dim, bits=bits))``
        Synchronous read port of both memories.
    error : ``Out(1)``
        Sticky: a write had ``pos >= n_pos``.
    layer : ``In(range(n_layers))``
        Only when ``n_layers > 1``: the layer whose rows ``w`` writes and ``read`` reads.
    """

    def __init__(self, *, n_pos, kv_dim, bits=8, n_layers=1):
        n_pos, kv_dim, bits = operator.index(n_pos), operator.index(kv_dim), operator.index(bits)
        n_layers = operator.index(n_layers)
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}")
        if n_pos < 1:
            raise ValueError(f"n_pos must be at least 1, not {n_pos}")
        if kv_dim < 1:
            raise ValueError(f"kv_dim must be at least 1, not {kv_dim}")
        if bits < 2:
            raise ValueError(f"bits must be at least 2 for signed elements, not {bits}")
        self._n_pos, self._kv_dim, self._bits, self._n_layers = n_pos, kv_dim, bits, n_layers
        row = vector_layout(bits, kv_dim)
        members = {
            "w": In(stream.Signature(data.StructLayout({
                "pos": pos_shape(n_pos), "k": row, "v": row}))),
            "read": Out(KVReadSignature(n_pos=n_pos, kv_dim=kv_dim, bits=bits)),
            "error": Out(1),
        }
        if n_layers > 1:
            members["layer"] = In(range(n_layers))
        super().__init__(members)

    n_pos = property(lambda self: self._n_pos)
    kv_dim = property(lambda self: self._kv_dim)
    bits = property(lambda self: self._bits)
    n_layers = property(lambda self: self._n_layers)

    def read_latency(self):
        """Cycles from ``read.addr``/``read.en`` to the rows on ``read.k``/``read.v``."""
        return 1

    def initiation_interval(self):
        """Cycles between write transfers (one row per cycle)."""
        return 1

    def elaborate(self, platform):
        m = Module()
        row = vector_layout(self._bits, self._kv_dim)
        depth = self._n_layers * self._n_pos
        m.submodules.k_mem = k_mem = memory.Memory(shape=row, depth=depth, init=[])
        m.submodules.v_mem = v_mem = memory.Memory(shape=row, depth=depth, init=[])
        k_wr, v_wr = k_mem.write_port(), v_mem.write_port()
        k_rd = k_mem.read_port(transparent_for=(k_wr,))
        v_rd = v_mem.read_port(transparent_for=(v_wr,))

        w = self.w.payload
        in_range = w.pos < self._n_pos
        wr_addr, rd_addr = self._row(w.pos), self._row(self.read.addr)
        m.d.comb += [
            self.w.ready.eq(1),
            k_wr.addr.eq(wr_addr), v_wr.addr.eq(wr_addr),
            k_wr.data.eq(w.k), v_wr.data.eq(w.v),
            k_wr.en.eq(self.w.valid & in_range), v_wr.en.eq(self.w.valid & in_range),
            k_rd.addr.eq(rd_addr), v_rd.addr.eq(rd_addr),
            k_rd.en.eq(self.read.en), v_rd.en.eq(self.read.en),
            self.read.k.eq(k_rd.data), self.read.v.eq(v_rd.data),
        ]
        with m.If(self.w.valid & ~in_range):
            m.d.sync += self.error.eq(1)
        return m

    def _row(self, pos):
        """Memory row of position ``pos`` (``< n_pos``) of layer ``layer``."""
        if self._n_layers == 1:
            return pos
        pos_bits = Shape.cast(range(self._n_pos)).width
        if self._n_pos == 1 << pos_bits:
            return Cat(pos[:pos_bits], self.layer)
        return self.layer * self._n_pos + pos
