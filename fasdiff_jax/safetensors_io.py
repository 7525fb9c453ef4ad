"""Read and write safetensors files with numpy only (no torch), bf16 included.

The format is an 8-byte little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}``, then the raw little-endian tensor bytes. We parse it
ourselves so fp16/bf16 SD checkpoints load without torch and every malformed file raises
:class:`~fasdiff_jax.errors.ConversionError` naming the file (and the tensor). We accept what
the reference ``safetensors`` package accepts and nothing more: integer shapes and offsets,
byte ranges that tile the payload exactly, no repeated names, a string->string metadata map.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from fasdiff_jax import files
from fasdiff_jax.errors import ConversionError

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class _Object(dict):
    """A JSON object that remembers which keys it repeated (``json`` keeps the last one)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.repeated = sorted(k for k, c in Counter(k for k, _ in pairs).items() if c > 1)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(path: str, raw: bytes) -> dict:
    """The header object, as strict as the format: UTF-8 JSON, no NaN/Infinity, no repeated
    tensor names (Python's json would keep the last silently)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_Object,
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError) as e:
        # ValueError covers json.JSONDecodeError and over-long integer literals.
        raise ConversionError(f"{path}: cannot read safetensors header: "
                              f"{type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    if header.repeated:
        raise ConversionError(f"{path}: safetensors header repeats tensor name(s) "
                              f"{header.repeated[:8]!r}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise ConversionError(f"{path}: safetensors __metadata__ must map strings to strings, "
                              f"got {str(meta)[:200]}")
    return header


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: str, name: str, info: Any, payload: int) -> tuple[np.dtype, tuple, int, int]:
    """One tensor's (dtype, shape, begin, end), validated as the format requires."""
    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path}: tensor {name!r}: {why} (header entry "
                               f"{str(info)[:200]})")

    if not isinstance(info, dict):
        raise bad("entry is not a JSON object")
    if isinstance(info, _Object) and info.repeated:
        raise bad(f"entry repeats field(s) {info.repeated}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise bad(f"missing field {field!r}")
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"unsupported dtype {info['dtype']!r} (supported: {sorted(_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_uint(s) for s in shape):
        raise bad("shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_uint, offsets))
            and offsets[0] <= offsets[1]):
        raise bad("data_offsets must be [begin, end], non-negative integers, begin <= end")
    begin, end = offsets
    # Python ints cannot wrap; stop multiplying once past the payload (a mismatch anyway).
    count = 0 if 0 in shape else 1
    for s in shape:
        if count > payload:
            break
        count *= s
    if count * dtype.itemsize != end - begin:
        raise bad(f"shape {shape} of {info['dtype']} needs "
                  f"{'more than ' if count > payload else ''}{count * dtype.itemsize} bytes "
                  f"but data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only).

    Accepts exactly what the format (and the ``safetensors`` package) accepts: tensors whose
    byte ranges tile the payload from 0 to its end without gaps, overlaps or trailing bytes,
    so a corrupt or hand-edited file fails here, naming the file and tensor, not later."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{path}: safetensors header length {n} exceeds file size")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read safetensors header: {e}") from e
    header = _parse_header(path, raw)
    payload = size - 8 - n
    entries = {name: _entry(path, name, info, payload)
               for name, info in header.items() if name != "__metadata__"}
    pos = 0
    for name in sorted(entries, key=lambda k: entries[k][2:]):
        begin, end = entries[name][2:]
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise ConversionError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}) "
                                  f"{what} (expected to begin at byte {pos})")
        pos = end
    if pos != payload:
        why = "truncated or corrupt" if pos > payload else "trailing bytes after the last tensor"
        raise ConversionError(
            f"{path}: tensors cover {pos} bytes but the payload has {payload} ({why})")
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if payload
            else np.zeros(0, np.uint8))
    return {name: np.frombuffer(data[b:e], dtype=dt).reshape(shape)
            for name, (dt, shape, b, e) in entries.items()}


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays) in the safetensors layout, atomically: a failure
    (a full disk) leaves the old file or none, and no temporary file (GBs for a UNet); one a
    killed run left is removed."""
    path = os.fspath(path)
    files.remove_stale_temps(os.path.dirname(os.path.abspath(path)), {os.path.basename(path)})
    files.write_atomically(path, lambda tmp: write_file(tensors, tmp, metadata))


def write_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
               metadata: Mapping[str, str] | None = None) -> None:
    """:func:`save_file` straight into ``path``, not atomically: for a caller that writes to
    its own temporary name (:func:`fasdiff_jax.files.write_atomically`)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes 0-d 1-d
        if a.dtype.newbyteorder("<") in _NAMES:
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {a.dtype} in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
