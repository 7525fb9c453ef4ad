"""Read and write safetensors files with numpy only (no torch), bf16 included.

The format is an 8-byte little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}``, then the raw little-endian tensor bytes. We parse it
ourselves so fp16/bf16 SD checkpoints load without torch and every malformed file raises
:class:`~fasdiff_jax.errors.ConversionError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

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


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only)."""
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
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: bad header entry for {name!r}: {info!r}") from e
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != expected or start < 0 or end > data.size:
            raise ConversionError(
                f"{path}: tensor {name!r} spans bytes [{start}, {end}) but needs {expected} "
                f"bytes within a {data.size}-byte payload (truncated or corrupt file)"
            )
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    return out


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
        a = np.ascontiguousarray(np.asarray(tensors[name]))
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
