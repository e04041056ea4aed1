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


def _short(value) -> str:
    """A metadata value for an error message: one line, at most ~80 characters."""
    if isinstance(value, (np.ndarray, list)):
        head = value[:8].tolist() if isinstance(value, np.ndarray) else value[:8]
        value = head + (["..."] if len(value) > 8 else [])
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


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


class _Corrupt(Exception):
    """A structural problem found while parsing; GGUFFile turns it into a one-line CheckpointError."""


# The smallest encodings, for checking a count against the bytes left before looping or allocating:
# a key/value is key length u64 + type u32 + a 1-byte value; a tensor info is name length u64 + n_dims
# u32 + type u32 + offset u64; an array element of type array is its type u32 + count u64.
_MIN_KV, _MIN_TENSOR_INFO, _MIN_ARRAY = 8 + 4 + 1, 8 + 4 + 4 + 8, 4 + 8
_MAX_DIMS = 4  # GGML_MAX_DIMS; llama.cpp's gguf.cpp refuses more
_MAX_NESTING = 8  # arrays of arrays: gguf-py reads them, llama.cpp refuses them; we allow a few levels
_INT64_MAX = 2**63 - 1


class GGUFFile:
    """Parsed header of a GGUF file; `data(t)` returns a tensor's bytes without copying.

    Every count and length in the header is checked against the bytes left in the file before
    anything is read or allocated for it, so a damaged file is a CheckpointError naming the file and
    the field, never an exception from struct/numpy or a huge allocation.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                raise CheckpointError(f"{self.path} is empty, not a GGUF file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        try:
            self._parse()
        except _Corrupt as e:
            raise CheckpointError(f"{self.path} is a corrupt or truncated GGUF file ({e})") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} is a corrupt GGUF file (a string at byte "
                                  f"{self._pos + e.start} is not UTF-8)") from None

    # ---- parsing ----------------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> None:
        """Refuse a field of n bytes that would run past the end of the file (before reading it)."""
        if n > self.size - self._pos:
            raise _Corrupt(f"{what} at byte {self._pos} needs {n} bytes, {self.size - self._pos} are left")

    def _read(self, fmt: str, what: str = "a header field"):
        n = struct.calcsize(fmt)
        self._need(n, what)
        value = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += n
        return value

    def _string(self, what: str = "a string") -> str:
        n = self._read("<Q", f"the length of {what}")
        self._need(n, what)
        s = self._mm[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a 262k-entry vocabulary): one tight loop, no struct call per item."""
        self._need(8 * count, f"an array of {count} strings")
        mm, pos, size, out = self._mm, self._pos, self.size, []
        from_bytes, append = int.from_bytes, out.append
        for _ in range(count):
            if pos + 8 > size:
                self._pos = pos
                self._need(8, "the length of a string in an array")
            n = from_bytes(mm[pos:pos + 8], "little")
            pos += 8
            if n > size - pos:
                self._pos = pos
                self._need(n, "a string in an array")
            try:
                append(mm[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                self._pos = pos
                raise
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int, depth: int = 0):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype], "a metadata value")
        if vtype == _ARRAY:
            itype, count = self._read("<I", "an array type"), self._read("<Q", "an array length")
            if itype == _STRING:
                return self._strings(count)
            if itype in _NP:
                dtype = np.dtype(_NP[itype])
                self._need(count * dtype.itemsize, f"an array of {count} {dtype.name}")
                arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr
            if itype != _ARRAY:
                raise _Corrupt(f"unknown array element type {itype} at byte {self._pos - 12}")
            if depth >= _MAX_NESTING:
                raise _Corrupt(f"arrays nested more than {_MAX_NESTING} deep at byte {self._pos - 12}")
            self._need(count * _MIN_ARRAY, f"an array of {count} arrays")
            return [self._value(itype, depth + 1) for _ in range(count)]
        raise _Corrupt(f"unknown metadata value type {vtype} at byte {self._pos - 4}")

    def _parse(self) -> None:
        self._pos = 0
        if self._mm[:4] != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file")
        self._pos = 4
        self.version = self._read("<I", "the version")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported "
                                  "(2 and 3 are)")
        n_tensors, n_kv = self._read("<Q", "the tensor count"), self._read("<Q", "the key count")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        self._need(n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO, f"{n_kv} keys and {n_tensors} tensor infos")
        self.metadata: dict = {}
        for _ in range(n_kv):
            at = self._pos
            key = self._string("a metadata key")
            if key in self.metadata:
                raise _Corrupt(f"duplicate metadata key {key[:80]!r} at byte {at}")
            self.metadata[key] = self._value(self._read("<I", f"the type of {key[:80]!r}"))
        infos, names = [], set()
        for _ in range(n_tensors):
            at = self._pos
            name = self._string("a tensor name")
            if name in names:
                raise _Corrupt(f"duplicate tensor name {name[:80]!r} at byte {at}")
            names.add(name)
            n_dims = self._read("<I", f"the dimension count of tensor {name[:80]!r}")
            if n_dims > _MAX_DIMS:
                raise _Corrupt(f"tensor {name[:80]!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            ne = tuple(self._read("<Q", f"a dimension of tensor {name[:80]!r}") for _ in range(n_dims))
            ggml_type = self._read("<I", f"the type of tensor {name[:80]!r}")
            infos.append((name, ne, ggml_type, self._read("<Q", f"the offset of tensor {name[:80]!r}")))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"general.alignment is {_short(align)}, not a power of two")
        data_start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, ne, ggml_type, offset in infos:
            self.tensors.append(self._tensor_info(name, ne, ggml_type, offset, align, data_start))

    def _tensor_info(self, name: str, ne: tuple[int, ...], ggml_type: int, offset: int, align: int,
                     data_start: int) -> TensorInfo:
        """A tensor's directory entry, checked as llama.cpp's gguf.cpp checks it: the element count
        fits int64, rows hold whole blocks, the offset is aligned and the data lies inside the file."""
        import gguf

        n_elements = 1
        for n in ne:
            n_elements *= n
        if any(n > _INT64_MAX for n in ne) or n_elements > _INT64_MAX:
            raise _Corrupt(f"tensor {name[:80]!r} has dimensions {list(ne)} (more than 2^63 elements)")
        if ggml_type not in gguf.GGML_QUANT_SIZES:
            n_bytes = 0  # unknown type: reported by the dequantizer with its name
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            row = ne[0] if ne else 1
            if row % block:
                raise _Corrupt(f"tensor {name[:80]!r} of type {gguf.GGMLQuantizationType(ggml_type).name} "
                               f"has rows of {row} weights, not a multiple of its {block}-weight blocks")
            n_bytes = n_elements // block * type_size
        if offset % align:
            raise _Corrupt(f"tensor {name[:80]!r} has offset {offset}, not a multiple of the alignment {align}")
        if data_start + offset + n_bytes > self.size:
            raise CheckpointError(f"{self.path} is truncated: tensor {name[:80]!r} needs bytes up to "
                                  f"{data_start + offset + n_bytes}, the file has {self.size}")
        return TensorInfo(name, ne, ggml_type, data_start + offset, n_bytes)

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
        view = memoryview(out)
        if view.nbytes != t.n_bytes:
            raise ValueError(f"{t.name}: buffer of {view.nbytes} bytes for {t.n_bytes}")
        if not t.n_bytes:  # a tensor with a 0 dimension (legal in GGUF): nothing to read, and a
            return         # memoryview with a 0 in its shape cannot be cast
        view = view.cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            got = f.readinto(view)
        if got != t.n_bytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {t.name} is incomplete")
