"""Our numpy safetensors reader/writer agrees with the safetensors package and rejects bad files."""

import os
import re

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from fasdiff_jax import safetensors_io
from fasdiff_jax.errors import ConversionError


def test_reads_files_written_by_safetensors_including_bf16(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": torch.from_numpy(rng.normal(size=(3, 4, 2, 2)).astype(np.float32)),
        "b.bias": torch.from_numpy(rng.normal(size=(5,)).astype(np.float16)),
        "c": torch.randn(7, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    }
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    out = safetensors_io.load_file(path)
    assert set(out) == set(tensors)
    np.testing.assert_array_equal(out["a.weight"], tensors["a.weight"].numpy())
    assert out["b.bias"].dtype == np.float16
    assert out["c"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["c"].astype(np.float32), tensors["c"].float().numpy())


def test_writes_files_the_safetensors_package_reads(tmp_path):
    arrays = {"x/y": np.arange(12, dtype=np.float32).reshape(3, 4),
              "z": np.ones((2,), ml_dtypes.bfloat16)}
    path = tmp_path / "o.safetensors"
    safetensors_io.save_file(arrays, path, metadata={"k": "v"})
    back = safetensors_io.load_file(path)
    np.testing.assert_array_equal(back["x/y"], arrays["x/y"])
    ref = safetensors.torch.load_file(str(path))
    np.testing.assert_array_equal(ref["x/y"].numpy(), arrays["x/y"])
    assert ref["z"].dtype == torch.bfloat16


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1])
def test_truncated_or_garbage_files_raise_conversion_error(tmp_path, cut):
    path = tmp_path / "t.safetensors"
    safetensors_io.save_file({"w": np.zeros((64, 64), np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[: len(data) - 100])
    with pytest.raises(ConversionError, match=str(path)):
        safetensors_io.load_file(path)


def test_absurd_header_length_is_rejected(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConversionError, match="header length"):
        safetensors_io.load_file(path)
    assert os.path.getsize(path) == 10


def _raw(header: bytes, payload: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + payload


def _f32(shape="[1]", offsets="[0,4]", name="a") -> bytes:
    return (f'"{name}":{{"dtype":"F32","shape":{shape},"data_offsets":{offsets}}}').encode()


# Each is rejected by the reference safetensors package; the tensor named in our error, if any.
MALFORMED = {
    "negative_shape": (b"{" + _f32("[-1,-4]", "[0,16]") + b"}", b"\0" * 16, "a"),
    "negative_shape_reversed_offsets": (b"{" + _f32("[-1]", "[4,0]") + b"}", b"\0" * 16, "a"),
    "shape_product_wraps_int64": (b"{" + _f32("[4294967296,4294967296]", "[0,0]") + b"}",
                                  b"", "a"),
    "shape_beyond_uint64": (b"{" + _f32("[18446744073709551616]", "[0,0]") + b"}", b"", "a"),
    "float_shape": (b"{" + _f32("[2.7]", "[0,8]") + b"}", b"\0" * 8, "a"),
    "integral_float_shape": (b"{" + _f32("[1.0]") + b"}", b"\0" * 4, "a"),
    "string_shape": (b"{" + _f32('"12"', "[0,8]") + b"}", b"\0" * 8, "a"),
    "bool_shape": (b"{" + _f32("[true]") + b"}", b"\0" * 4, "a"),
    "infinite_offset": (b"{" + _f32("[1]", "[0,Infinity]") + b"}", b"\0" * 4, None),
    "nan_offset": (b"{" + _f32("[1]", "[0,NaN]") + b"}", b"\0" * 4, None),
    "float_offset": (b"{" + _f32("[1]", "[0,4.0]") + b"}", b"\0" * 4, "a"),
    "three_offsets": (b"{" + _f32("[1]", "[0,4,4]") + b"}", b"\0" * 4, "a"),
    "reversed_offsets": (b"{" + _f32("[0]", "[4,0]") + b"}", b"\0" * 4, "a"),
    "overlapping_ranges": (b"{" + _f32("[2]", "[0,8]") + b"," + _f32("[2]", "[4,12]", "b")
                           + b"}", b"\0" * 12, "b"),
    "duplicate_tensor_name": (b"{" + _f32() + b"," + _f32("[1]", "[4,8]") + b"}", b"\0" * 8,
                              "a"),
    "gap_before_first_tensor": (b"{" + _f32("[1]", "[8,12]") + b"}", b"\0" * 12, "a"),
    "gap_between_tensors": (b"{" + _f32() + b"," + _f32("[1]", "[8,12]", "b") + b"}",
                            b"\0" * 12, "b"),
    "trailing_bytes": (b"{" + _f32() + b"}", b"\0" * 8, None),
    "truncated_payload": (b"{" + _f32("[4]", "[0,16]") + b"}", b"\0" * 8, None),
    "size_mismatch": (b"{" + _f32("[3]", "[0,8]") + b"}", b"\0" * 8, "a"),
    "huge_offsets": (b"{" + _f32("[1]", "[4611686018427387904,4611686018427387908]") + b"}",
                     b"\0" * 4, "a"),
    "entry_not_object": (b'{"a":[1,2]}', b"", "a"),
    "missing_shape": (b'{"a":{"dtype":"F32","data_offsets":[0,4]}}', b"\0" * 4, "a"),
    "header_not_object": (b"[1]", b"", None),
    "deeply_nested": (b"[" * 100000 + b"]" * 100000, b"", None),
    "not_utf8": (b'{"\xff\xfe":1}', b"", None),
    "trailing_nul_in_header": (b"{" + _f32() + b"}\0", b"\0" * 4, None),
    "metadata_not_strings": (b'{"__metadata__":{"x":1},' + _f32() + b"}", b"\0" * 4, None),
    "metadata_not_map": (b'{"__metadata__":["x"],' + _f32() + b"}", b"\0" * 4, None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_rejected_like_the_reference(tmp_path, case):
    header, payload, tensor = MALFORMED[case]
    data = _raw(header, payload)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.numpy.load(data)  # the format forbids it, not just our reader
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(ConversionError, match=re.escape(str(path))) as info:
        safetensors_io.load_file(path)
    if tensor is not None:
        assert repr(tensor) in str(info.value)


SUPPORTED = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def test_valid_files_of_every_dtype_load_like_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (name, dt) in enumerate(sorted(SUPPORTED.items())):
        arrays[name] = (rng.normal(size=(2, 3)) * 50).astype(dt)
        arrays[f"{name}.scalar"] = np.asarray(rng.normal() * 9).astype(dt)
        arrays[f"{name}.empty"] = np.zeros((0, i + 1), dt)
    path = tmp_path / "all.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "np"})
    ours = safetensors_io.load_file(path)
    assert set(ours) == set(arrays)
    ref_np = safetensors.numpy.load(_without_bf16(path.read_bytes()))
    ref_bf16 = safetensors.torch.load_file(str(path))
    for name, a in arrays.items():
        assert ours[name].dtype == a.dtype and ours[name].shape == a.shape, name
        if name.startswith("BF16"):
            bits = ref_bf16[name].view(torch.int16).numpy()
            np.testing.assert_array_equal(ours[name].view(np.int16), bits)
        else:
            np.testing.assert_array_equal(ours[name], ref_np[name])


def _without_bf16(data: bytes) -> bytes:
    """The same file as ``safetensors.numpy`` (which cannot load BF16) sees it: BF16 tensors
    relabelled I16, same bytes."""
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"dtype":"BF16"', b'"dtype":"I16"').ljust(n)
    return data[:8] + header + data[8 + n:]


def test_header_whitespace_empty_file_and_null_metadata_are_valid(tmp_path):
    for i, header in enumerate([b'{}', b'  {"__metadata__":null,' + _f32() + b"}  ",
                                b'{"__metadata__":{"k":"v"},' + _f32("[]") + b"}"]):
        data = _raw(header, b"" if header == b"{}" else b"\0\0\x80?")
        path = tmp_path / f"v{i}.safetensors"
        path.write_bytes(data)
        ours = safetensors_io.load_file(path)
        ref = safetensors.numpy.load(data)
        assert set(ours) == set(ref)
        for k in ref:
            assert ours[k].shape == ref[k].shape
            np.testing.assert_array_equal(ours[k], ref[k])


def test_save_file_output_is_read_by_the_reference_for_every_dtype(tmp_path):
    arrays = {name: np.arange(6).reshape(2, 3).astype(dt) for name, dt in SUPPORTED.items()}
    arrays["empty"] = np.zeros((0,), np.float32)
    arrays["scalar"] = np.asarray(3.0, np.float32)
    path = tmp_path / "w.safetensors"
    safetensors_io.save_file(arrays, path, metadata={"k": "v", "n": 1})
    ref_np = safetensors.numpy.load(_without_bf16(path.read_bytes()))
    ref_torch = safetensors.torch.load_file(str(path))
    for name, a in arrays.items():
        if name == "BF16":
            np.testing.assert_array_equal(ref_torch[name].float().numpy(), a.astype(np.float32))
        else:
            np.testing.assert_array_equal(ref_np[name], a)
            assert ref_np[name].dtype == a.dtype and ref_np[name].shape == a.shape
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"k": "v", "n": "1"}
