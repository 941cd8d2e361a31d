"""Reading GGUF files (llama.cpp's model format): metadata, tensor directory and tensors,
dequantized to float.

The header is parsed here rather than by the ``gguf`` package's ``GGUFReader``, because the
file is untrusted input: every count, length and offset is checked against the bytes that
remain before anything is read or allocated (a header claiming 2^60 tensors or a 2^60-byte
string is refused at once), every tensor's bytes must lie inside the file, aligned and
not overlapping another's, and each tensor's byte length must equal what its type and shape
need. Errors are :class:`ferrolm.errors.FormatError` naming the file and the problem.
F32, F16 and BF16 tensors are converted here; quantized blocks (Q4_0 ... Q6_K) go through
``gguf.quants.dequantize`` (PyPI ``gguf``), imported only when such a tensor is read.

Example:
    >>> f = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> f.metadata["general.architecture"], f.tensors["token_embd.weight"].type_name  # doctest: +SKIP
    ('llama', 'Q8_0')
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .._io import PathLike
from ..errors import FormatError

__all__ = ["GGUFFile", "GGUFTensorInfo", "GGML_TYPES", "SUPPORTED_TYPES"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 2  # arrays of arrays at most

#: ggml type id -> (name, values per block, bytes per block), from llama.cpp's ggml.h / gguf-py.
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
}

#: The tensor types :meth:`GGUFFile.tensor` dequantizes.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF metadata value types: id -> (struct format, size) for scalars; 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class GGUFTensorInfo(NamedTuple):
    """One tensor of the directory: ``shape`` in torch's order (rows first: GGUF's dims
    reversed), ``offset`` and ``nbytes`` absolute within the file."""

    name: str
    type_id: int
    type_name: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


class _Cursor:
    """Reads little-endian values from a buffer, each read checked against its end."""

    def __init__(self, buf, path: str) -> None:
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(
                f"truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.end - self.pos} left"
            )
        out = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        raw = bytes(self.take(n, what))  # a copy: no view of the map outlives this call
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def room_for(self, count: int, min_size: int, what: str) -> None:
        """Refuses a count whose items cannot fit in the bytes left (before looping over it)."""
        if count * min_size > self.end - self.pos:
            raise self.fail(
                f"corrupt GGUF: {what} claims {count} entries (at least {count * min_size} bytes), "
                f"but only {self.end - self.pos} bytes remain"
            )


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.scalar(fmt, size, f"the value of {key!r}")
    if vtype == _STRING:
        return cur.string(f"the value of {key!r}")
    if vtype == _ARRAY:
        if depth >= MAX_NESTING:
            raise cur.fail(f"metadata {key!r} nests arrays more than {MAX_NESTING} deep")
        itype = cur.u32(f"the element type of {key!r}")
        count = cur.u64(f"the length of {key!r}")
        if itype in _SCALARS:
            size = _SCALARS[itype][1]
            cur.room_for(count, size, f"array {key!r}")
            raw = cur.take(count * size, f"array {key!r}")
            arr = np.frombuffer(raw, dtype=_NUMPY[itype]).copy()
            return (arr != 0).tolist() if itype == 7 else arr.tolist()
        if itype in (_STRING, _ARRAY):
            cur.room_for(count, 8, f"array {key!r}")
            return [_value(cur, itype, key, depth + 1) for _ in range(count)]
        raise cur.fail(f"metadata {key!r} has an array of unknown value type {itype}")
    raise cur.fail(f"metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """A GGUF file opened for reading: ``metadata`` (key -> value), ``metadata_types`` (key ->
    (GGUF value type id, element type id of an array or None): what a writer needs to store the
    value again as it was), ``tensors`` (name ->
    :class:`GGUFTensorInfo`, in file order), ``version``, ``alignment``. Tensor data is
    memory-mapped and read on demand by :meth:`tensor`. Use as a context manager or call
    :meth:`close`.

    Raises:
        FileNotFoundError: no such file. FormatError: not a GGUF file, an unsupported
            version or byte order, or any count, length or offset that does not fit the file.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        if Path(self.path).is_dir():
            raise IsADirectoryError(f"{self.path} is a folder; expected a .gguf file")
        size = os.path.getsize(self.path)  # FileNotFoundError as is
        if size < 24:
            raise FormatError(f"{self.path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        cur = _Cursor(self._mm, self.path)
        magic = bytes(cur.take(4, "the magic"))
        if magic != MAGIC:
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = cur.u32("the version")
        if version & 0xFFFF == 0 and version:
            raise cur.fail("a big-endian GGUF file; only little-endian files are supported")
        if version not in VERSIONS:
            raise cur.fail(f"GGUF version {version} is not supported (expected one of {VERSIONS})")
        self.version = version
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        cur.room_for(n_kv, 8 + 4 + 1, "the metadata count")
        self.metadata: Dict[str, Any] = {}
        self.metadata_types: Dict[str, Tuple[int, Optional[int]]] = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            if key in self.metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            vtype = cur.u32(f"the type of {key!r}")
            item = None
            if vtype == _ARRAY and cur.end - cur.pos >= 4:
                item = struct.unpack_from("<I", self._mm, cur.pos)[0]  # the element type, read again by _value
            self.metadata[key] = _value(cur, vtype, key)
            self.metadata_types[key] = (vtype, item)
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise cur.fail(f"general.alignment must be a power of two, got {align!r}")
        self.alignment = align
        cur.room_for(n_tensors, 8 + 4 + 4 + 8, "the tensor count")
        infos: List[Tuple[str, int, Tuple[int, ...], int]] = []
        for _ in range(n_tensors):
            name = cur.string("a tensor name")
            n_dims = cur.u32(f"the rank of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1..{MAX_DIMS})")
            dims = [cur.u64(f"a dimension of {name!r}") for _ in range(n_dims)]
            type_id = cur.u32(f"the type of {name!r}")
            rel = cur.u64(f"the offset of {name!r}")
            infos.append((name, type_id, tuple(dims), rel))
        data_start = -(-cur.pos // align) * align
        self.tensors: Dict[str, GGUFTensorInfo] = {}
        for name, type_id, dims, rel in infos:
            if name in self.tensors:
                raise cur.fail(f"tensor {name!r} appears twice")
            if type_id not in GGML_TYPES:
                raise cur.fail(f"tensor {name!r} has unknown ggml type {type_id}")
            tname, block, bsize = GGML_TYPES[type_id]
            if any(d <= 0 for d in dims):
                raise cur.fail(f"tensor {name!r} has a zero dimension {list(dims)}")
            n = 1
            for d in dims:
                n *= d
                if n > size * 8:  # no ggml type stores more than 8 values per byte
                    raise cur.fail(f"tensor {name!r} claims shape {list(dims)}, far more than the file holds")
            if dims[0] % block:
                raise cur.fail(f"tensor {name!r} ({tname}) has rows of {dims[0]}, not a multiple of its block {block}")
            nbytes = n // block * bsize
            if rel % align:
                raise cur.fail(f"tensor {name!r} starts at offset {rel}, not aligned to {align}")
            start = data_start + rel
            if start + nbytes > size:
                raise cur.fail(
                    f"truncated or corrupt GGUF: tensor {name!r} ({tname}, shape {list(dims[::-1])}) needs bytes "
                    f"{start}..{start + nbytes}, the file ends at {size}"
                )
            self.tensors[name] = GGUFTensorInfo(name, type_id, tname, tuple(dims[::-1]), start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise cur.fail(f"corrupt GGUF: tensors {a!r} and {b!r} overlap")

    # ---- access

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmaps the file (tensors already read stay valid: they are copies)."""
        mm = getattr(self, "_mm", None)
        if mm is not None:
            self._mm = None
            try:
                mm.close()
            except BufferError:
                pass  # a view (a raw() array still in use) holds it: unmapped when the last view goes

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` (a read-only uint8 view of the file)."""
        info = self._info(name)
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantized to ``dtype`` (float32 or bfloat16), shape ``info.shape``.

        Raises:
            KeyError: no such tensor. FormatError: a type outside :data:`SUPPORTED_TYPES`.
            ImportError: a quantized type without the ``gguf`` package installed.
        """
        info = self._info(name)
        raw = self.raw(name)
        t = info.type_name
        if t == "F32":
            out = torch.from_numpy(raw.view("<f4").reshape(info.shape).copy())
        elif t == "F16":
            out = torch.from_numpy(raw.view("<f2").reshape(info.shape).astype(np.float32))
        elif t == "BF16":
            out = torch.from_numpy(raw.view("<i2").reshape(info.shape).copy()).view(torch.bfloat16)
        elif t in SUPPORTED_TYPES:
            try:
                from gguf import GGMLQuantizationType
                from gguf.quants import dequantize
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(f"reading {t} tensors of {self.path} needs the gguf package: pip install gguf") from e
            row_bytes = info.shape[-1] // GGML_TYPES[info.type_id][1] * GGML_TYPES[info.type_id][2]
            blocks = raw.reshape(-1, row_bytes)
            out = torch.from_numpy(dequantize(blocks, GGMLQuantizationType(info.type_id)).reshape(info.shape))
        else:
            raise FormatError(
                f"{self.path}: tensor {name!r} has type {t}, which ferrolm cannot read "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        return out.to(dtype)
