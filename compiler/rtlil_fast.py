"""Faster Amaranth 0.5 netlist building and RTLIL emission, with byte-identical output.

``hardwire compile`` of stories260K spent most of its time in per-bit Python loops of
Amaranth 0.5's back end (profiled with cProfile; the old path also elaborated and converted the
chip twice, once for Verilog and once for RTLIL):

* ``Netlist.check_comb_cycles`` walks every comb edge of every net bit; an ``n``-bit adder or
  shifter has ``n**2`` of them (62 million calls for stories260K);
* ``rtlil.ModuleEmitter.emit_memory`` turns every bit of a memory's initial contents into a
  ``Net`` object, then into a one-character string (5 million bits of ROM);
* ``MemoryData.Init`` converts every row of a memory through ``Layout.const`` / ``Const``,
  building a view or constant per row (the RoPE tables alone took a third of elaboration);
* the cyclic garbage collector rescans the millions of live net objects again and again.

:func:`fast_amaranth` replaces these, for the duration of a ``with`` block, by equivalents that
produce the same RTLIL text (``tests/test_compile_fast.py`` compares patched and stock output
byte for byte, whole chips included):

* the comb-cycle check first looks for a cycle in a coarse graph (one node per cell and per
  signal, an edge wherever any bit of one feeds any bit of the other comb-wise). Every
  bit-level cycle is also a cycle there, so an acyclic coarse graph proves there is none; only
  if the coarse graph has a cycle is Amaranth's own bit-level check run (which raises with its
  usual message, or passes);
* memory initial contents are written as one binary string, row by row;
* memory rows that are in-range ints, full lists (``ArrayLayout``) or dicts (``StructLayout``)
  of them are packed directly; anything else goes through Amaranth's own conversion;
* ``Netlist.resolve_value``, ``Netlist.add_value_cell``, ``ModuleEmitter.sigspec``,
  ``Value.__new__`` and ``Net.from_cell`` are the same loops without per-net assertions and
  property calls;
* the cyclic garbage collector is paused (reference counting still frees everything).

Only Amaranth 0.5 is patched; with any other version :func:`fast_amaranth` does nothing.
"""

import contextlib
import gc

__all__ = ["coarse_comb_cycle", "fast_amaranth"]


def _amaranth_05():
    import amaranth
    return amaranth.__version__.startswith("0.5.")


def _cell_sources(cell, nir):
    """Nets that any output bit of ``cell`` depends on combinationally (a superset is fine)."""
    if isinstance(cell, (nir.Operator, nir.Part, nir.Matches, nir.PriorityMatch,
                         nir.AssignmentList, nir.AsyncReadPort, nir.IOBuffer)):
        return cell.input_nets()
    if isinstance(cell, nir.FlipFlop):
        return {cell.clk, cell.arst}
    if isinstance(cell, (nir.Top, nir.Memory, nir.SyncWritePort, nir.SyncReadPort,
                         nir.SyncPrint, nir.SyncProperty, nir.Initial, nir.AnyValue,
                         nir.Instance)):
        return ()     # their comb_edges_to yields nothing
    # any other cell: the union of its own per-bit edges
    nets = set()
    for net in cell.output_nets(0):
        nets.update(src for src, _loc in cell.comb_edges_to(net & 0xffff))
    return nets


def _layout_raw(shape, init, Shape, data):
    """``Const.cast(shape.const(init)).value`` for a plain ``Shape`` with an in-range ``int``,
    an ``ArrayLayout`` with a full list/tuple, or a ``StructLayout`` with a dict of its fields
    (recursively); None for anything else (the caller then uses Amaranth's own conversion)."""
    if type(shape) is Shape:
        if type(init) is not int:
            return None
        w = shape.width
        lo, hi = (-(1 << w >> 1), (1 << w >> 1) - 1) if shape.signed else (0, (1 << w) - 1)
        return init & ((1 << w) - 1) if lo <= init <= hi else None
    if type(shape) is data.ArrayLayout:
        if type(init) not in (list, tuple) or len(init) != shape.length:
            return None
        elem = shape.elem_shape
        w = Shape.cast(elem).width
        raw = 0
        for i, v in enumerate(init):
            r = _layout_raw(elem, v, Shape, data)
            if r is None:
                return None
            raw |= r << (i * w)
        return raw
    if type(shape) is data.StructLayout:
        if type(init) is not dict:
            return None
        fields = dict(shape)
        raw = 0
        for key, v in init.items():
            field = fields.get(key)
            if field is None:
                return None
            r = _layout_raw(field.shape, v, Shape, data)
            if r is None:
                return None
            raw |= r << field.offset
        return raw
    return None


def coarse_comb_cycle(netlist):
    """True if the coarse graph of ``netlist`` (one node per cell and per late-bound signal)
    has a combinational cycle. False proves the bit-level netlist has none."""
    from amaranth.hdl import _nir as nir

    late_to_signal = netlist.late_to_signal
    sig_ids = {}          # id(signal) -> node (negative)
    sig_nets = {}         # node -> late nets of that signal
    for net, (sig, _bit) in late_to_signal.items():
        node = sig_ids.setdefault(id(sig), -1 - len(sig_ids))
        sig_nets.setdefault(node, []).append(net)

    def nodes_of(nets):
        out = set()
        for n in nets:
            if n >= 2:
                out.add(n >> 16)
            elif n < 0:
                out.add(sig_ids[id(late_to_signal[n][0])])
        return out

    succ = {}
    for idx, cell in enumerate(netlist.cells):
        succ[idx] = nodes_of(_cell_sources(cell, nir))
    connections = netlist.connections
    for node, nets in sig_nets.items():
        succ[node] = nodes_of(connections[n] for n in nets)

    # iterative three-colour depth-first search
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(succ, WHITE)
    for root, root_succ in succ.items():
        if colour[root] != WHITE:
            continue
        colour[root] = GREY
        stack = [(root, iter(root_succ))]
        while stack:
            node, it = stack[-1]
            for nxt in it:
                c = colour.get(nxt, BLACK)
                if c == GREY:
                    return True
                if c == WHITE:
                    colour[nxt] = GREY
                    stack.append((nxt, iter(succ[nxt])))
                    break
            else:
                colour[node] = BLACK
                stack.pop()
    return False


@contextlib.contextmanager
def fast_amaranth():
    """Within the block, Amaranth 0.5's comb-cycle check and RTLIL memory emission run the
    fast way (same results, same text). Not thread-safe; restores the originals on exit."""
    if not _amaranth_05():
        yield
        return
    from amaranth.back import rtlil
    from amaranth.hdl import _nir as nir

    orig_check = nir.Netlist.check_comb_cycles
    orig_memory = rtlil.ModuleEmitter.emit_memory
    from amaranth.hdl import Shape, _mem
    from amaranth.lib import data

    orig_init_value = _mem._get_init_value
    orig_value_new = nir.Value.__new__
    orig_from_cell = nir.Net.__dict__["from_cell"]
    net_type, new_tuple = nir.Net, tuple.__new__

    def value_new(cls, nets=()):
        # stock: the same tuple, with an ``assert isinstance(net, Net)`` per element
        if isinstance(nets, net_type):
            return new_tuple(cls, (nets,))
        return new_tuple(cls, nets)

    def get_init_value(init, shape, what="signal"):
        # stock: Const.cast(shape.const(init)).value, building a view per row
        if type(shape) is Shape:
            # stock: Const(Const.cast(init).value, shape).value, which is ``init`` itself for
            # an int within the shape's range
            if type(init) is int:
                w = shape.width
                if (-(1 << w >> 1) <= init < (1 << w >> 1) if shape.signed
                        else 0 <= init < (1 << w)):
                    return init
        elif isinstance(shape, (data.ArrayLayout, data.StructLayout)):
            raw = _layout_raw(shape, init, Shape, data)
            if raw is not None:
                return raw
        return orig_init_value(init, shape, what)

    def resolve_value(self, value):
        # stock: Value(self.resolve_net(net) for net in value), asserting each is a Net
        conn = self.connections
        out = []
        for net in value:
            while net < 0:
                net = conn[net]
            out.append(net)
        return new_tuple(nir.Value, out)

    def add_value_cell(self, width, cell):
        # stock: Value(Net.from_cell(cell_idx, bit) for bit in range(width))
        base = self.add_cell(cell) << 16
        return new_tuple(nir.Value, map(net_type, range(base, base + width)))

    def sigspec(self, *parts):
        # stock: the same chunks, built from a concatenated Value with Net properties
        value = []
        for part in parts:
            if isinstance(part, net_type):
                value.append(part)
            else:
                value.extend(part)
        nets = self.nets
        chunks = []
        n = len(value)
        begin = 0
        while begin < n:
            net = value[begin]
            end = begin + 1
            if 0 <= net <= 1:
                while end < n and 0 <= value[end] <= 1:
                    end += 1
                bits = "".join("1" if value[i] else "0" for i in range(end - 1, begin - 1, -1))
                chunks.append(f"{end - begin}'{bits}")
            else:
                wire, start = nets[net]
                bit = start + 1
                while end < n and not 0 <= value[end] <= 1 and nets[value[end]] == (wire, bit):
                    end += 1
                    bit += 1
                if end - begin == 1:
                    chunks.append(f"{wire.name} [{start}]")
                else:
                    chunks.append(f"{wire.name} [{bit - 1}:{start}]")
            begin = end
        if len(chunks) == 1:
            return chunks[0]
        return "{ " + " ".join(reversed(chunks)) + " }"

    def from_cell(cls, cell, bit):
        # stock: the same, after asserting 0 <= bit < 2**16 and cell >= 0
        return cls((cell << 16) | bit)

    def check_comb_cycles(self):
        try:
            acyclic = not coarse_comb_cycle(self)
        except Exception:       # anything unforeseen in the netlist: the stock check decides
            acyclic = False
        if not acyclic:
            orig_check(self)

    def emit_memory(self, cell_idx, cell):
        width, depth = cell.width, cell.depth
        if not width or not depth:
            return orig_memory(self, cell_idx, cell)
        # stock: sigspec of the nets (row r bit b at position r*width + b), all constant, so
        # one chunk "N'<bits, most significant first>"
        mask, fmt = (1 << width) - 1, f"0{width}b"
        data = f"{width * depth}'" + "".join(format(row & mask, fmt)
                                              for row in reversed(cell.init))
        self.builder.cell("$meminit_v2", ports={
            "ADDR": self.sigspec(),
            "DATA": data,
            "EN": self.sigspec(nir.Value.ones(width)),
        }, parameters={
            "MEMID": self.memories[cell_idx].memid,
            "ABITS": 0,
            "WIDTH": width,
            "WORDS": depth,
            "PRIORITY": 0,
        }, src_loc=cell.src_loc)

    nir.Netlist.check_comb_cycles = check_comb_cycles
    rtlil.ModuleEmitter.emit_memory = emit_memory
    nir.Value.__new__ = value_new
    nir.Net.from_cell = classmethod(from_cell)
    _mem._get_init_value = get_init_value
    orig_resolve = nir.Netlist.resolve_value
    orig_add_value_cell = nir.Netlist.add_value_cell
    orig_sigspec = rtlil.ModuleEmitter.sigspec
    nir.Netlist.resolve_value = resolve_value
    nir.Netlist.add_value_cell = add_value_cell
    rtlil.ModuleEmitter.sigspec = sigspec
    gc_was_enabled = gc.isenabled()
    gc.disable()        # millions of short-lived nets: the cyclic collector only rescans them
    try:
        yield
    finally:
        if gc_was_enabled:
            gc.enable()
        nir.Netlist.resolve_value = orig_resolve
        nir.Netlist.add_value_cell = orig_add_value_cell
        rtlil.ModuleEmitter.sigspec = orig_sigspec
        nir.Netlist.check_comb_cycles = orig_check
        rtlil.ModuleEmitter.emit_memory = orig_memory
        nir.Value.__new__ = orig_value_new
        nir.Net.from_cell = orig_from_cell
        _mem._get_init_value = orig_init_value
