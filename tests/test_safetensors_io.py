"""Our numpy safetensors reader/writer agrees with the safetensors package and rejects bad files."""

import os

import ml_dtypes
import numpy as np
import pytest
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
