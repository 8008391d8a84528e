"""A minimal reader of MATLAB 5 (v5/v7, not v7.3 HDF5) MAT-files: enough for the ImageNet devkit's ``meta.mat``
(a struct array of numbers and strings), without scipy.

Format (MathWorks, "MAT-File Format", level 5): a 128-byte header (text, version, endian indicator ``IM``),
then data elements. An element is a tag (type, byte count; or a "small" tag holding up to 4 bytes of data)
and its data padded to 8 bytes. ``miCOMPRESSED`` (15) holds a zlib stream of further elements; ``miMATRIX``
(14) holds array flags (class), dimensions, a name and the class's parts: struct arrays (field names, then a
matrix per element per field, column-major), cell arrays (a matrix per element), char arrays and numeric arrays
(real part only; the stored type may be narrower than the class, as MATLAB writes it).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
             16: "u1", 17: "u2", 18: "u4"}  # 16-18: UTF-8/16/32 text
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4


class _Reader:
    def __init__(self, data: bytes, endian: str):
        self.data, self.pos, self.e = data, 0, endian

    def tag(self) -> tuple[int, int, bytes]:
        first, second = struct.unpack_from(self.e + "II", self.data, self.pos)
        if first >> 16:  # small element: type and size in the first word, data in the second
            mtype, n = first & 0xFFFF, first >> 16
            payload = self.data[self.pos + 4 : self.pos + 4 + n]
            self.pos += 8
            return mtype, n, payload
        mtype, n = first, second
        start = self.pos + 8
        if start + n > len(self.data):
            raise ValueError(f"element of {n} bytes runs past the end of the data")
        payload = self.data[start : start + n]
        self.pos = start + (n + 7) // 8 * 8 if mtype != _MI_COMPRESSED else start + n
        return mtype, n, payload


def _numbers(mtype: int, payload: bytes, e: str) -> np.ndarray:
    if mtype not in _MI_TYPES:
        raise ValueError(f"unsupported MAT data type {mtype}")
    return np.frombuffer(payload, dtype=np.dtype(_MI_TYPES[mtype]).newbyteorder(e))


def _matrix(payload: bytes, e: str) -> tuple[str, Any]:
    """One miMATRIX body -> (name, value). Structs: list of dicts; cells: list; char: str; numbers: scalar or
    flat array (column-major order)."""
    if not payload:
        return "", None
    r = _Reader(payload, e)
    _, _, flags = r.tag()
    cls = struct.unpack_from(e + "I", flags)[0] & 0xFF
    _, _, dims_raw = r.tag()
    dims = [int(d) for d in _numbers(5, dims_raw, e)]
    _, _, name_raw = r.tag()
    name = name_raw.decode("latin-1")
    count = int(np.prod(dims)) if dims else 0
    if cls == _MX_STRUCT:
        _, _, flen_raw = r.tag()
        flen = int(_numbers(5, flen_raw, e)[0])
        _, _, names_raw = r.tag()
        fields = [names_raw[i : i + flen].split(b"\0", 1)[0].decode("latin-1")
                  for i in range(0, len(names_raw), flen)]
        elements = []
        for _ in range(count):
            item = {}
            for f in fields:
                mtype, _, sub = r.tag()
                if mtype != _MI_MATRIX:
                    raise ValueError(f"struct field {f!r} is not a matrix element")
                item[f] = _matrix(sub, e)[1]
            elements.append(item)
        return name, elements
    if cls == _MX_CELL:
        cells = []
        for _ in range(count):
            mtype, _, sub = r.tag()
            cells.append(_matrix(sub, e)[1] if mtype == _MI_MATRIX else None)
        return name, cells
    mtype, _, real = r.tag()
    values = _numbers(mtype, real, e)
    if cls == _MX_CHAR:
        if mtype in (16,):
            return name, real.decode("utf-8")
        return name, "".join(chr(int(c)) for c in values)
    if count == 1:
        return name, values[0].item()
    return name, values


def read_mat_variables(path: str) -> dict[str, Any]:
    """Every variable of a level-5 MAT-file (see the module docstring for what is supported)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise ValueError("not a MATLAB 5 MAT-file (a v7.3 file is HDF5: re-save it with -v7)")
    e = "<" if data[126:128] == b"IM" else ">"
    r = _Reader(data[128:], e)
    out: dict[str, Any] = {}
    while r.pos + 8 <= len(r.data):
        mtype, _, payload = r.tag()
        if mtype == _MI_COMPRESSED:
            inner = _Reader(zlib.decompress(payload), e)
            mtype, _, payload = inner.tag()
        if mtype == _MI_MATRIX:
            name, value = _matrix(payload, e)
            out[name] = value
    return out


def read_mat_struct(path: str, name: str) -> list[dict[str, Any]]:
    """The struct array variable ``name`` as a list of dicts (field -> value)."""
    variables = read_mat_variables(path)
    if name not in variables or not isinstance(variables[name], list):
        raise ValueError(f"no struct array {name!r} in it (variables: {', '.join(sorted(variables)) or 'none'})")
    return variables[name]


__all__ = ["read_mat_struct", "read_mat_variables"]
