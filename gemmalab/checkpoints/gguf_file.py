"""A lean GGUF container parser (v2/v3): metadata, tensor directory, memory-mapped tensor bytes.

`gguf.GGUFReader` builds a numpy view per field part, which takes ~10 s for the 262k-entry token list
of a Gemma vocabulary; this parser reads the header sequentially with struct and memory-maps the
data, so opening the 270M file takes a fraction of a second. Layout (ggml docs/gguf.md):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv x (key, type u32, value)
    | n_tensors x (name, n_dims u32, ne u64[n_dims], type u32, offset u64) | pad to alignment | data
All integers little-endian; strings are u64 length + UTF-8 bytes.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
       11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: contiguous axis first
    ggml_type: int
    offset: int  # absolute offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order (ne reversed)."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        import gguf
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


class GGUFFile:
    """Parsed header of a GGUF file; `data(t)` returns a tensor's bytes without copying."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                raise CheckpointError(f"{self.path} is empty, not a GGUF file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError, IndexError) as e:
            raise CheckpointError(f"{self.path} is a corrupt or truncated GGUF file (header: {e})"
                                  ) from None

    # ---- parsing ----------------------------------------------------------------------------------
    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > self.size:
            raise struct.error("string runs past the end of the file")
        s = self._mm[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a 262k-entry vocabulary): one tight loop, no struct call per item."""
        mm, pos, size, out = self._mm, self._pos, self.size, []
        from_bytes, append = int.from_bytes, out.append
        for _ in range(count):
            n = from_bytes(mm[pos:pos + 8], "little")
            pos += 8
            if pos + n > size:
                raise struct.error("string runs past the end of the file")
            append(mm[pos:pos + n].decode("utf-8"))
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _ARRAY:
            itype, count = self._read("<I"), self._read("<Q")
            if itype == _STRING:
                return self._strings(count)
            if itype in _NP:
                arr = np.frombuffer(self._mm, dtype=_NP[itype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr
            return [self._value(itype) for _ in range(count)]
        raise struct.error(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        import gguf

        self._pos = 0
        if self._mm[:4] != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported "
                                  "(2 and 3 are)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise struct.error(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ne = tuple(self._read("<Q") for _ in range(self._read("<I")))
            infos.append((name, ne, self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, ne, ggml_type, offset in infos:
            if ggml_type not in gguf.GGML_QUANT_SIZES:
                n_bytes = 0  # unknown type: reported by the dequantizer with its name
            else:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
                n_bytes = int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * type_size
            self.tensors.append(TensorInfo(name, ne, ggml_type, data_start + offset, n_bytes))
        end = max((t.offset + t.n_bytes for t in self.tensors), default=data_start)
        if end > self.size:
            raise CheckpointError(f"{self.path} is truncated: its tensors need {end} bytes, the file "
                                  f"has {self.size}")

    # ---- access -----------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 array backed by the memory map."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def read_into(self, t: TensorInfo, out) -> None:
        """Copy a tensor's bytes into `out` (a writable buffer of t.n_bytes) with a plain file read,
        so that no page of the memory map stays resident for data that is kept in another form."""
        view = memoryview(out).cast("B")
        if view.nbytes != t.n_bytes:
            raise ValueError(f"{t.name}: buffer of {view.nbytes} bytes for {t.n_bytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            got = f.readinto(view)
        if got != t.n_bytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {t.name} is incomplete")
