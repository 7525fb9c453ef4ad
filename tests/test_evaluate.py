"""Evaluation: bpp from real file bytes, PSNR/LPIPS/identity on decoded images, JSON-ready."""

import json

import numpy as np
import pytest
from skimage import data as skdata

from fasdiff_jax import evaluate
from fasdiff_jax.models import identity as identity_lib


@pytest.fixture(scope="module")
def faces():
    face = skdata.astronaut()[30:222, 150:342]  # 192x192 real face
    return [("astronaut", face), ("astronaut_small", face[::2, ::2].copy())]


def _raw_codec(img: np.ndarray) -> bytes:
    return np.asarray(img.shape, np.uint16).tobytes() + img.tobytes()


def _raw_decode(data: bytes) -> np.ndarray:
    shape = tuple(np.frombuffer(data[:6], np.uint16))
    return np.frombuffer(data[6:], np.uint8).reshape(shape)


def test_lossless_and_lossy_codecs(faces):
    metrics = evaluate.Metrics()
    exact = evaluate.evaluate(_raw_codec, _raw_decode, faces, metrics, name="raw")
    for row, (_, img) in zip(exact["images"], faces):
        assert row["bytes"] == img.size + 6
        assert row["bpp"] == pytest.approx(8 * (img.size + 6) / (img.shape[0] * img.shape[1]))
        assert row["psnr-rgb"] == float("inf") and row["lpips"] == pytest.approx(0, abs=1e-6)
        assert row["identity-cos"] == pytest.approx(1.0, abs=1e-5)

    def coarse(img):  # 8 grey levels per channel: visibly worse, same size
        return _raw_codec((img // 32) * 32 + 16)

    lossy = evaluate.evaluate(coarse, _raw_decode, faces, metrics, name="coarse")
    r = lossy["results"]
    assert 20 < r["psnr-rgb"] < 40 and r["lpips"] > 0.01 and 0.8 < r["identity-cos"] < 1.0
    json.dumps(lossy)  # serialisable as is
    assert set(r) >= {"bpp", "bytes", "psnr-rgb", "lpips", "identity-cos", "encoding_time",
                      "decoding_time"}


def test_aligned_face_chips_box():
    import jax.numpy as jnp

    img = jnp.zeros((1, 100, 100, 3)).at[:, 20:90, 15:85].set(1.0)  # box 17.5..92.5 x 12.5..87.5
    chips = np.asarray(identity_lib.aligned_face_chips(img, (0.2, 0.15, 0.7)))
    assert chips.shape == (1, 150, 150, 3)
    assert np.allclose(chips, 255.0)  # the box lies inside the white square
    with pytest.raises(AssertionError, match="decoded"):
        evaluate.evaluate(_raw_codec, lambda d: _raw_decode(d)[:5], [("x", np.zeros((8, 8, 3),
                                                                    np.uint8))], object())
