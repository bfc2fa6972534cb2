"""The LoRA adapter image: what the host uploads into the chip's inactive LoRA SRAM bank.

A versioned little-endian binary (``docs/lora.md`` has the table):

* a 32-byte header: magic ``HWLA``, version, header size, the first 8 bytes of the base
  ``QuantizedModel.digest()``, ``n_layers``, target bitmask (bit ``i`` = ``LORA_TARGETS[i]``),
  ``r_max``, ``rank``, ``dim``, ``kv_dim``, ``hidden_dim``;
* per layer, per target in bit order: ``A_q`` (``r_max x cols`` int8, row-major), ``mult_u``
  (``r_max`` u32), ``shift_u`` (u8), ``B_q`` (``rows x r_max`` int8, row-major), ``mult_b``
  (``rows`` u32), ``shift_b`` (u8);
* CRC32 (``zlib.crc32``) of everything before it, u32.
"""

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import HardwireError
from .lora import (LORA_TARGETS, MAX_RANK, QLoraMatrix, QuantizedLora, base_digest8,
                   load_peft_adapter, quantize_lora)
from .quantize import MULT_LIMIT, quantize_model

__all__ = ["MAGIC", "VERSION", "HEADER", "LoraImageError", "image_bytes", "image_length",
           "pack_lora", "write_image", "read_image", "load_image", "target_mask",
           "section_offsets", "image_body", "build_header"]

MAGIC = b"HWLA"
VERSION = 1
# magic, version, header size, base digest, n_layers, target mask, r_max, rank, dim, kv_dim,
# hidden_dim, reserved
HEADER = struct.Struct("<4sHH8sHHHHHHHH")
assert HEADER.size == 32
CRC = struct.Struct("<I")
_SHIFT_MAX = 63


class LoraImageError(HardwireError):
    """An adapter image is truncated, corrupt, or made for another chip."""


def target_mask(targets):
    return sum(1 << LORA_TARGETS.index(t) for t in targets)


def _targets_of(mask):
    return tuple(t for i, t in enumerate(LORA_TARGETS) if mask >> i & 1)


def _shape(name, dim, kv_dim, hidden):
    """``(rows, cols)`` of a target matrix."""
    return {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
            "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}[name]


def _section_bytes(rows, cols, r_max):
    return r_max * cols + 4 * r_max + 1 + rows * r_max + 4 * rows + 1


def image_length(n_layers, targets, r_max, dim, kv_dim, hidden):
    """Total bytes of an image (header, body, CRC): what a commit compares the upload with."""
    body = sum(_section_bytes(*_shape(t, dim, kv_dim, hidden), r_max) for t in targets)
    return HEADER.size + n_layers * body + CRC.size


def section_offsets(n_layers, targets, r_max, dim, kv_dim, hidden):
    """Byte offset of every ``(layer, target)`` section inside the image body (the body starts
    after the header), in image order: the address map of the chip's LoRA SRAM."""
    targets = [t for t in LORA_TARGETS if t in targets]
    out, off = {}, 0
    for layer in range(n_layers):
        for t in targets:
            out[layer, t] = off
            off += _section_bytes(*_shape(t, dim, kv_dim, hidden), r_max)
    return out


def build_header(qm, targets, r_max):
    """The 32 header bytes every image for the chip of ``qm`` with LoRA ``targets`` and
    ``r_max`` carries (the rank field, which images may set below ``r_max``, is 0 here): what
    the chip's loader compares an upload's header with."""
    from .lora import base_digest8
    c = qm.config
    return HEADER.pack(MAGIC, VERSION, HEADER.size, base_digest8(qm), c.n_layers,
                       target_mask(targets), r_max, 0, c.dim, c.kv_dim, c.hidden_dim, 0)


def image_body(data):
    """The body of a packed image (what the chip's SRAM holds): header and CRC removed."""
    return bytes(data[HEADER.size:len(data) - CRC.size])


def image_bytes(qlora, config):
    """Serialise a :class:`~.lora.QuantizedLora` for a model of ``config`` (a LlamaConfig)."""
    c = config
    head = HEADER.pack(MAGIC, VERSION, HEADER.size, qlora.digest8, qlora.n_layers,
                       target_mask(qlora.targets), qlora.r_max, qlora.rank, c.dim, c.kv_dim,
                       c.hidden_dim, 0)
    parts = [head]
    for mats in qlora.layers:
        for name in qlora.targets:
            m = mats[name]
            parts += [np.asarray(m.a_q, dtype=np.int8).tobytes(),
                      np.asarray(m.mult_u, dtype="<u4").tobytes(), bytes((m.shift_u,)),
                      np.asarray(m.b_q, dtype=np.int8).tobytes(),
                      np.asarray(m.mult_b, dtype="<u4").tobytes(), bytes((m.shift_b,))]
    data = b"".join(parts)
    return data + CRC.pack(zlib.crc32(data))


def pack_lora(adapter_path, model, *, wbits="8", targets=None, r_max=None, qm=None,
              calib_tokens=None, qat=False):
    """Load a PEFT adapter, quantize it for the chip of ``model`` at ``wbits``, return its image.

    Parameters
    ----------
    adapter_path : str or os.PathLike
        PEFT adapter directory (:func:`~.lora.load_peft_adapter`).
    model : LlamaModel
        The base model.
    wbits : int or str
        The chip's weight widths (as ``--wbits``); they determine the base digest.
    targets : sequence of str, optional
        The chip's LoRA targets (llama2.c names; default: the adapter's).
    r_max : int, optional
        The chip's LoRA rank (default: the adapter's).
    qm : QuantizedModel, optional
        The base datapath, if already quantized (must match ``model`` and ``wbits``).
    qat : bool
        The chip's base weights were quantized with ``--qat`` (ignored when ``qm`` is given).
    """
    from .quantize import parse_wbits
    if qm is None:
        qm = quantize_model(model, wbits=wbits, qat=qat)
    elif qm.wbits != parse_wbits(wbits):
        raise HardwireError(f"the quantized model has weight widths {qm.wbits}, not {wbits}")
    adapter = load_peft_adapter(adapter_path, model,
                                max_rank=MAX_RANK if r_max is None else r_max)
    ql = quantize_lora(adapter, model, qm, targets=targets, r_max=r_max,
                       calib_tokens=calib_tokens)
    return image_bytes(ql, model.config)


def write_image(path, data):
    """Write an image file (via a temporary file, so a reader never sees half an image)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)
    return path


def load_image(path, qm, **kw):
    """Read an image file (see :func:`read_image`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HardwireError("no such file", path=path) from None
    except OSError as e:
        raise HardwireError(f"cannot read: {e.strerror}", path=path) from None
    return read_image(data, qm, source=str(path), **kw)


def read_image(data, qm, *, targets=None, r_max=None, source="adapter image"):
    """Parse and validate an image for the chip of ``qm``; return a :class:`QuantizedLora`.

    ``targets`` and ``r_max``, if given, are the chip's compile-time LoRA parameters and must
    match the image's. Every check a commit would make is made here: magic, version, length
    (truncation or trailing bytes), CRC, base digest, layer count and shapes, field ranges.

    Raises
    ------
    LoraImageError
        One line, ``SOURCE: problem``.
    """
    data = bytes(data)

    def bad(msg):
        raise LoraImageError(msg, path=source)

    if len(data) < HEADER.size + CRC.size:
        bad(f"truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    (magic, version, hsize, digest8, n_layers, mask, rmax, rank, dim, kv_dim, hidden,
     reserved) = HEADER.unpack_from(data)
    if magic != MAGIC:
        bad(f"not a hardwire LoRA image (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        bad(f"image version {version} is not supported (this is version {VERSION})")
    if hsize != HEADER.size or reserved:
        bad(f"bad header (size {hsize}, reserved {reserved})")
    if mask == 0 or mask >> len(LORA_TARGETS):
        bad(f"bad target mask 0x{mask:04x}")
    if not 0 < rmax <= MAX_RANK or rank > rmax:
        bad(f"bad rank: r_max {rmax}, rank {rank} (1 <= rank <= r_max <= {MAX_RANK})")
    names = _targets_of(mask)
    expected = image_length(n_layers, names, rmax, dim, kv_dim, hidden)
    if len(data) < expected:
        bad(f"truncated: {len(data)} bytes, expected {expected}")
    if len(data) > expected:
        bad(f"{len(data) - expected} trailing bytes after the {expected}-byte image")
    (crc,) = CRC.unpack_from(data, expected - CRC.size)
    if crc != zlib.crc32(data[:expected - CRC.size]):
        bad(f"CRC mismatch (stored 0x{crc:08x}, computed "
            f"0x{zlib.crc32(data[:expected - CRC.size]):08x}): the image is corrupt")
    if digest8 != base_digest8(qm):
        bad(f"packed for another base model or weight width (digest {digest8.hex()}, this "
            f"chip {base_digest8(qm).hex()})")
    c = qm.config
    if (n_layers, dim, kv_dim, hidden) != (c.n_layers, c.dim, c.kv_dim, c.hidden_dim):
        bad(f"shape {n_layers} layers, dim {dim}, kv_dim {kv_dim}, hidden {hidden} does not "
            f"match the model ({c.n_layers}, {c.dim}, {c.kv_dim}, {c.hidden_dim})")
    if targets is not None and tuple(t for t in LORA_TARGETS if t in targets) != names:
        bad(f"targets {','.join(names)} do not match the chip's {','.join(targets)}")
    if r_max is not None and rmax != r_max:
        bad(f"r_max {rmax} does not match the chip's {r_max}")

    off = HEADER.size

    def take(n, dtype):
        nonlocal off
        a = np.frombuffer(data, dtype=dtype, count=n, offset=off).astype(np.int64)
        off += n * np.dtype(dtype).itemsize
        return a

    layers = []
    for i in range(n_layers):
        mats = {}
        for name in names:
            rows, cols = _shape(name, dim, kv_dim, hidden)
            a_q = take(rmax * cols, np.int8).reshape(rmax, cols)
            mult_u, (shift_u,) = take(rmax, "<u4"), take(1, np.uint8)
            b_q = take(rows * rmax, np.int8).reshape(rows, rmax)
            mult_b, (shift_b,) = take(rows, "<u4"), take(1, np.uint8)
            where = f"layers.{i}.{name}"
            if np.any(a_q == -128) or np.any(b_q == -128):
                bad(f"{where}: weight -128 is outside the symmetric int8 range")
            if mult_u.max() > MULT_LIMIT or mult_b.max() > MULT_LIMIT:
                bad(f"{where}: multiplier above {MULT_LIMIT}")
            if shift_u > _SHIFT_MAX or shift_b > _SHIFT_MAX:
                bad(f"{where}: shift above {_SHIFT_MAX}")
            if np.any(a_q[rank:]) or np.any(mult_u[rank:]) or np.any(b_q[:, rank:]):
                bad(f"{where}: non-zero padding beyond rank {rank}")
            mats[name] = QLoraMatrix(name, a_q, mult_u, int(shift_u), b_q, mult_b, int(shift_b))
        layers.append(mats)
    assert off == expected - CRC.size
    return QuantizedLora(digest8, names, rmax, rank, layers, name=Path(str(source)).name)
