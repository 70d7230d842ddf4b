"""A fast reader for the GGUF container format (llama.cpp's single-file model format).

Why our own parser: ``gguf.GGUFReader`` builds a numpy memmap view for every part of
every key/value field, so opening a model whose tokenizer has ~100k strings costs
several seconds before a single weight is touched. The container itself is simple, so
this module parses it directly: numeric metadata arrays are read with one
``np.frombuffer`` each, string arrays with a tight loop over the mapped bytes, and
tensors become zero-copy ``uint8`` views into a single read-only mmap of the file.

Only the container is ours. Turning quantized blocks back into floats stays with the
``gguf`` package (``gguf.quants.dequantize``), and its ``GGML_QUANT_SIZES`` table is the
source of truth for how many bytes a block of each tensor type takes.

Layout (all little-endian; versions 2 and 3; version 1 used 32-bit counts and is not
supported):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: n_dims x u64, ggml_type: u32,
                    offset: u64 relative to the data section)
    padding to ``general.alignment`` (default 32)
    data section

where ``string`` is a u64 byte length followed by UTF-8 bytes, and an array value is
an item type u32, an item count u64 and the items.

Every read is bounds-checked against the file size, and any inconsistency (truncation,
a tensor that runs past the end of the file, a size that does not match its type's block
layout) is reported as one ``LmforgeError``, because a damaged or mis-downloaded model
file is a user problem, not a bug.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LmforgeError

__all__ = ["GGUFFile", "GGUFTensor"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Arrays of arrays are legal; real files nest at most one level. The limit only stops a
# corrupt file from driving the recursive value reader into a RecursionError.
_MAX_ARRAY_NESTING = 16

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32 = 0, 1, 2, 3, 4, 5, 6
_BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 7, 8, 9, 10, 11, 12

_TYPE_NAMES = {
    _UINT8: "UINT8", _INT8: "INT8", _UINT16: "UINT16", _INT16: "INT16",
    _UINT32: "UINT32", _INT32: "INT32", _FLOAT32: "FLOAT32", _BOOL: "BOOL",
    _STRING: "STRING", _ARRAY: "ARRAY", _UINT64: "UINT64", _INT64: "INT64",
    _FLOAT64: "FLOAT64",
}

# Fixed-size scalar types: struct for single values, numpy dtype for whole arrays.
_SCALAR_STRUCTS = {
    _UINT8: struct.Struct("<B"), _INT8: struct.Struct("<b"),
    _UINT16: struct.Struct("<H"), _INT16: struct.Struct("<h"),
    _UINT32: struct.Struct("<I"), _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"), _BOOL: struct.Struct("<B"),
    _UINT64: struct.Struct("<Q"), _INT64: struct.Struct("<q"),
    _FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES = {
    _UINT8: np.dtype("<u1"), _INT8: np.dtype("<i1"),
    _UINT16: np.dtype("<u2"), _INT16: np.dtype("<i2"),
    _UINT32: np.dtype("<u4"), _INT32: np.dtype("<i4"),
    _FLOAT32: np.dtype("<f4"), _BOOL: np.dtype("<u1"),
    _UINT64: np.dtype("<u8"), _INT64: np.dtype("<i8"),
    _FLOAT64: np.dtype("<f8"),
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Corrupt(Exception):
    """Internal: a structural problem found while parsing; turned into LmforgeError once."""


def _gguf():
    """Import the ``gguf`` package lazily so importing lmforge.io stays cheap."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise LmforgeError(
            "reading GGUF tensors needs the 'gguf' package: pip install gguf"
        ) from e
    return gguf


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of a GGUF file.

    ``shape`` is in numpy order (slowest-varying dimension first), i.e. the reverse of
    the ``ne`` dimensions GGUF stores, so a llama.cpp ``[n_embd, n_vocab]`` embedding is
    ``(n_vocab, n_embd)`` here, as in PyTorch checkpoints. ``raw`` is the tensor's bytes
    as a read-only ``uint8`` view into the file's mmap: nothing is read from disk until
    it is used, and nothing is copied.
    """

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType (an IntEnum)
    raw: np.ndarray = field(repr=False)

    def to_numpy(self) -> np.ndarray:
        """Return the tensor as a new, writable float32 array of ``shape``.

        F32/F16/BF16 are reinterpreted and widened directly (cheap and exact); every
        other type goes through ``gguf.quants.dequantize``. The result is always a copy
        so callers can modify it without touching (or pinning) the file mapping; use
        ``raw`` for zero-copy access.
        """
        gguf = _gguf()
        qt = gguf.GGMLQuantizationType
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, dtype=np.float32)
        if self.qtype == qt.F32:
            out = self.raw.view("<f4").astype(np.float32)
        elif self.qtype == qt.F16:
            out = self.raw.view("<f2").astype(np.float32)
        elif self.qtype == qt.BF16:
            # bf16 is the top half of an IEEE float32: shift into place and reinterpret.
            out = (self.raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
            row_elems = self.shape[-1] if self.shape else 1
            # gguf's dequantizer works on rows of blocks, shaped (..., bytes_per_row).
            rows = self.raw.reshape(-1, row_elems // block_size * type_size)
            try:
                out = gguf.quants.dequantize(rows, self.qtype)
            except NotImplementedError:
                raise LmforgeError(
                    f"GGUF tensor {self.name!r} has type {self.qtype.name}, which the "
                    f"installed gguf package ({_gguf_version()}) cannot dequantize"
                ) from None
            out = np.asarray(out, dtype=np.float32)
        return out.reshape(self.shape)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:  # pragma: no cover
        return "gguf"


class GGUFFile:
    """A parsed GGUF file: metadata and tensor views over one read-only mmap.

    Attributes:
        path: the file.
        version: GGUF format version (2 or 3).
        metadata: key -> value. Scalars are Python int/float/bool/str, string arrays
            are ``list[str]``, numeric/bool arrays are numpy arrays (owned copies, so
            they stay valid and writable independent of the mapping), arrays of arrays
            are lists.
        tensors: tensor infos in file order, each with a zero-copy ``raw`` view.
        alignment: the data alignment the file declares (``general.alignment``, or 32).
        data_offset: absolute file offset of the tensor data section.

    Strings are decoded as UTF-8. Keys and tensor names must be valid UTF-8; string
    *values* that are not (some converters store raw byte tokens) are decoded with
    ``surrogateescape`` so the original bytes survive via
    ``s.encode("utf-8", "surrogateescape")`` instead of failing the whole file.

    There is no ``close()``: the mapping is released when this object and every
    ``raw`` view taken from it are garbage-collected (an explicit close could not be
    safe while views exist).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # what mmap will map
                if size == 0:
                    raise LmforgeError(f"{self.path} is empty, not a GGUF file")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise LmforgeError(f"GGUF file not found: {self.path}") from None
        except IsADirectoryError:
            raise LmforgeError(f"{self.path} is a directory, not a GGUF file") from None
        except (OSError, ValueError) as e:
            raise LmforgeError(f"cannot read GGUF file {self.path}: {e}") from None
        self._mm = mm
        self._size = size
        self._pos = 0
        # One uint8 view of the whole mapping; tensor `raw` arrays are slices of it.
        self._bytes = np.frombuffer(mm, dtype=np.uint8)
        try:
            self._parse()
        except _Corrupt as e:
            raise LmforgeError(
                f"GGUF file {self.path} is truncated or corrupt: {e}"
            ) from None
        except (struct.error, IndexError, ValueError, OverflowError,
                UnicodeDecodeError, MemoryError) as e:
            # Safety net: explicit checks should catch everything first, but no raw
            # low-level exception may escape to the user.
            raise LmforgeError(
                f"GGUF file {self.path} is truncated or corrupt "
                f"(at byte {self._pos}: {type(e).__name__}: {e})"
            ) from None

    # ----------------------------------------------------------------- public API

    def tensor(self, name: str) -> GGUFTensor:
        """Return the tensor called ``name``; LmforgeError if the file has none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise LmforgeError(
                f"GGUF file {self.path} has no tensor named {name!r} "
                f"({len(self.tensors)} tensors)"
            ) from None

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"{len(self.metadata)} keys, {len(self.tensors)} tensors)"
        )

    # ------------------------------------------------------------------- parsing

    def _parse(self) -> None:
        magic = self._take(4, "magic")
        if magic != _MAGIC:
            raise LmforgeError(
                f"{self.path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')"
            )
        version = self._u32("version")
        if version not in _SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in _SUPPORTED_VERSIONS:
                raise LmforgeError(
                    f"{self.path} is a big-endian GGUF file; only little-endian GGUF "
                    "is supported"
                )
            raise LmforgeError(
                f"{self.path} has GGUF version {version}; supported versions are 2 and 3"
                + (" (version 1 files must be re-converted)" if version == 1 else "")
            )
        self.version = version
        tensor_count = self._u64("tensor count")
        kv_count = self._u64("key/value count")
        # Each KV needs >= 8 (key len) + 4 (type) bytes, each tensor info >= 8 + 4 + 4
        # + 8; reject absurd counts before looping so a corrupt header fails fast.
        if kv_count * 12 + tensor_count * 24 > self._size - self._pos:
            raise _Corrupt(
                f"header claims {kv_count} metadata keys and {tensor_count} tensors, "
                f"more than the {self._size} byte file can hold"
            )

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string("metadata key")
            vtype = self._u32(f"type of {key!r}")
            if key in metadata:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            metadata[key] = self._value(vtype, key, 0)
        self.metadata = metadata

        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, int)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise _Corrupt(f"general.alignment must be a power of two, got {alignment!r}")
        self.alignment = alignment

        infos = []
        for i in range(tensor_count):
            name = self._string(f"name of tensor {i}")
            n_dims = self._u32(f"rank of tensor {name!r}")
            dims = self._array_of(_UINT64, n_dims, f"dims of tensor {name!r}")
            type_id = self._u32(f"type of tensor {name!r}")
            offset = self._u64(f"offset of tensor {name!r}")
            infos.append((name, tuple(int(d) for d in dims), type_id, offset))

        self.data_offset = -(-self._pos // alignment) * alignment
        # A file without tensors (a vocabulary-only GGUF) may end before the padding.
        if infos and self.data_offset > self._size:
            raise _Corrupt(
                f"data section would start at byte {self.data_offset}, past the end "
                f"of the file ({self._size} bytes)"
            )

        gguf = _gguf()
        self.tensors = [self._make_tensor(gguf, *info) for info in infos]
        self._by_name: dict[str, GGUFTensor] = {}
        for t in self.tensors:
            if t.name in self._by_name:
                raise _Corrupt(f"tensor {t.name!r} appears twice")
            self._by_name[t.name] = t

    def _make_tensor(
        self, gguf, name: str, dims: tuple[int, ...], type_id: int, offset: int
    ) -> GGUFTensor:
        """Check one tensor info against the block layout and file size; view its bytes."""
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise LmforgeError(
                f"GGUF file {self.path}: tensor {name!r} has ggml type id {type_id}, "
                f"which the installed {_gguf_version()} does not know "
                "(corrupt file, or a newer type: upgrade gguf)"
            ) from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        row = dims[0] if dims else 1
        if row % block_size:
            raise _Corrupt(
                f"tensor {name!r} ({qtype.name}) has rows of {row} elements, not a "
                f"multiple of the block size {block_size}"
            )
        nbytes = n_elements // block_size * type_size
        if offset % self.alignment:
            raise _Corrupt(
                f"tensor {name!r} data offset {offset} is not a multiple of the "
                f"alignment {self.alignment}"
            )
        start = self.data_offset + offset
        end = start + nbytes
        if end > self._size:
            raise _Corrupt(
                f"tensor {name!r} ({qtype.name}, {nbytes} bytes at byte {start}) runs "
                f"past the end of the file ({self._size} bytes)"
            )
        return GGUFTensor(
            name=name,
            shape=tuple(reversed(dims)),
            qtype=qtype,
            raw=self._bytes[start:end],
        )

    # --------------------------------------------------------- low-level readers

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self._size:
            raise _Corrupt(
                f"{what} needs {n} bytes at byte {self._pos}, "
                f"but the file ends at byte {self._size}"
            )

    def _take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = self._mm[self._pos:self._pos + n]
        self._pos += n
        return b

    def _u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = _U32.unpack_from(self._mm, self._pos)
        self._pos += 4
        return v

    def _u64(self, what: str) -> int:
        self._need(8, what)
        (v,) = _U64.unpack_from(self._mm, self._pos)
        self._pos += 8
        return v

    def _string(self, what: str) -> str:
        n = self._u64(f"length of {what}")
        raw = self._take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {self._pos - n} is not valid UTF-8") from None

    def _value(self, vtype: int, key: str, depth: int) -> Any:
        """Read one metadata value of type ``vtype`` (recursing into arrays)."""
        s = _SCALAR_STRUCTS.get(vtype)
        if s is not None:
            self._need(s.size, f"value of {key!r}")
            (v,) = s.unpack_from(self._mm, self._pos)
            self._pos += s.size
            return v != 0 if vtype == _BOOL else v
        if vtype == _STRING:
            n = self._u64(f"length of {key!r}")
            return self._take(n, f"value of {key!r}").decode("utf-8", "surrogateescape")
        if vtype == _ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise _Corrupt(f"arrays in {key!r} are nested more than {depth} deep")
            item_type = self._u32(f"item type of {key!r}")
            count = self._u64(f"item count of {key!r}")
            return self._array_of(item_type, count, key, depth + 1)
        raise _Corrupt(f"{key!r} has unknown value type {vtype} at byte {self._pos - 4}")

    def _array_of(self, item_type: int, count: int, key: str, depth: int = 0) -> Any:
        dtype = _ARRAY_DTYPES.get(item_type)
        if dtype is not None:
            nbytes = count * dtype.itemsize
            self._need(nbytes, f"{count} {_TYPE_NAMES[item_type]} items of {key!r}")
            arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self._pos)
            self._pos += nbytes
            # Copy: metadata must not pin the mapping or alias the (read-only) file.
            return arr != 0 if item_type == _BOOL else arr.copy()
        if item_type == _STRING:
            return self._string_array(count, key)
        if item_type == _ARRAY:
            # Every nested array header is at least 12 bytes; bound the loop first.
            self._need(count * 12, f"{count} nested arrays of {key!r}")
            return [self._value(_ARRAY, key, depth) for _ in range(count)]
        raise _Corrupt(f"array {key!r} has unknown item type {item_type}")

    def _string_array(self, count: int, key: str) -> list[str]:
        """Read ``count`` length-prefixed strings: the hot loop for tokenizer vocabularies.

        Kept deliberately flat (local variables, one bounds check per item, bytes slices
        straight off the mmap) because tokenizers hold ~50-250k strings and this loop is
        most of the time it takes to open a model.
        """
        mm, size = self._mm, self._size
        pos = self._pos
        if count * 8 > size - pos:
            raise _Corrupt(
                f"{key!r} claims {count} strings, more than the rest of the file can hold"
            )
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self._pos = pos
                raise _Corrupt(f"string {i} of {key!r} runs past the end of the file")
            start = pos + 8
            pos = start + unpack(mm, pos)[0]
            if pos > size:
                self._pos = start
                raise _Corrupt(f"string {i} of {key!r} runs past the end of the file")
            out[i] = mm[start:pos].decode("utf-8", "surrogateescape")
        self._pos = pos
        return out
