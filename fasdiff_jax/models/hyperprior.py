"""Mean-scale hyperprior image codec (Minnen et al. 2018; CompressAI's ``mbt2018-mean``).

``g_a``/``g_s`` use GDN/IGDN, ``h_a`` LeakyReLU, ``h_s`` ReLU by default or, with
``hs_activation="leaky_relu"``, CompressAI's LeakyReLU(0.01) (slope 655/2**16 in the integer
net); ``z`` has a factorized prior (:class:`~fasdiff_jax.models.entropy.EntropyBottleneck`),
``y`` a mean-scale Gaussian. :func:`params_from_compressai` loads a CompressAI
``MeanScaleHyperprior`` state dict into the ``leaky_relu`` variant.

Decodable by construction. Everything that selects a distribution at the decoder (scale
index and mean of every element of ``y``) comes from ``h_s`` evaluated as an *integer network*
on the host (:func:`hyper_synthesis_int`): weights are fixed point with ``W_FRAC`` = 12
fractional bits clipped to 18 bits, activations ``A_FRAC`` = 10 fractional bits clipped to 21
bits, biases in accumulator units. Every product-sum is an integer below 2**53 (asserted per
layer from the fan-in), so numpy's float64 matmul computes it exactly in any summation order,
with or without FMA; rescaling divides by a power of two and floors, also exact. Scale
indexes come from comparing integer scales with integer levels
(:func:`~fasdiff_jax.models.entropy.scale_thresholds`); means are exact multiples of 2**-10.
The JAX device, batch size, device count, jit or XLA flags never enter the decoder's choice
of distributions. Training simulates the same quantisation with straight-through rounding
(``_fq``), so the trained float ``h_s`` and the integer one agree up to float32 rounding.

On a GPU the same integer network runs as a float64 XLA program (:class:`DeviceHs`:
im2col + float64 GEMMs, the same exact-integer argument; 1.0 vs 10 ms per 256 px image on an
H100 machine). Which place runs it (``FASDIFF_HS_PLACE`` = ``auto`` | ``host`` | ``device``;
``auto`` is the device on GPUs, the host elsewhere) never changes a symbol; each process also
checks the device program against the host one before using it (:func:`prepare`).

Only ``g_s`` (pixels from the decoded ``y_hat``) runs in floating point on the device, so a
different machine may differ in the last ulp of a pixel before rounding to uint8, never in
symbols (measured: CPU vs H100 decodes of the same files differ by at most 1 level in
0.14-0.21% of pixels, with TF32 convolutions on the GPU).

The coding helpers :func:`encode_latents` / :func:`decode_latents` are generic: any codec with
a factorized ``z`` and a mean-scale ``y`` (FaSDiff's compressor) can reuse them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fasdiff_jax.coding import container as _ct
from fasdiff_jax.coding.errors import BitstreamError
from fasdiff_jax.coding.symbols import SymbolDecoder, SymbolEncoder
from fasdiff_jax.models import entropy as E
from fasdiff_jax.models import train_step
from fasdiff_jax.models.layers import CONV_KERNEL_AXES, Conv, conv2d, shape_differences

W_FRAC = 12
W_CLIP = 1 << 17
A_FRAC = E.SCALE_FRAC_BITS  # 10: h_s outputs are scales in the scale table's fixed point
A_CLIP = 1 << 20
Z_CLIP = A_CLIP >> A_FRAC  # |z_hat| <= 1024 so it fits the integer net's input range
# LeakyReLU slope of h_s when ``hs_activation="leaky_relu"`` (CompressAI's 0.01), fixed point
LEAK_NUM, LEAK_SHIFT = 655, 16  # 655 / 2**16 = 0.0099945
HS_ACTIVATIONS = ("relu", "leaky_relu")
MULTIPLE = 64
CODEC_ID = 1
MODEL_CONFIG_KEYS = ("N", "M", "num_scales", "hs_activation")
MAX_PIXELS = 1 << 24  # largest padded image a file may ask a decoder to synthesise (default)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class GDN(nn.Module):
    """Generalized divisive normalisation (Ballé 2016), CompressAI's parametrisation."""

    inverse: bool = False
    beta_min: float = 1e-6
    gamma_init: float = 0.1

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ped = 2.0**-36
        beta_bound = (self.beta_min + ped) ** 0.5
        beta = self.param("beta", lambda k, s: jnp.sqrt(jnp.ones(s) + ped), (c,))
        gamma = self.param(
            "gamma", lambda k, s: jnp.sqrt(self.gamma_init * jnp.eye(s[0]) + ped), (c, c)
        )
        beta = jnp.maximum(beta, beta_bound) ** 2 - ped
        gamma = jnp.maximum(gamma, ped**0.5) ** 2 - ped
        norm = beta + jnp.einsum("...i,oi->...o", x * x, gamma)
        return x * jnp.sqrt(norm) if self.inverse else x * jax.lax.rsqrt(norm)


def _upconv_dilated(x, w, b):
    """Reference transposed conv (stride 2, k=5, torch padding 2, output_padding 1) via an
    lhs-dilated conv. Exact, but XLA:CPU's backward of it is ~30x slower than a plain conv."""
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), ((2, 3), (2, 3)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + b


# Per output phase of the stride-2 upsampling: the 5-tap kernel's taps (dilated-conv
# indexing) and the (low, high) padding of the stride-1 conv over the input that yields it.
_UP_PHASES = {0: ((0, 2, 4), (1, 1)), 1: ((1, 3), (0, 1))}


def _up_phases(w):
    """``[((rh, rw), kernel of that output phase, (pad_h, pad_w))]`` for a 5x5 ``w`` (numpy
    or JAX): the one description of the phases, used on the device and on the host."""
    return [((rh, rw), w[np.array(th)][:, np.array(tw)], (ph, pw))
            for rh, (th, ph) in _UP_PHASES.items() for rw, (tw, pw) in _UP_PHASES.items()]


def _upconv(x, w, b):
    """Transposed conv, stride 2, k=5 (torch padding 2, output padding 1): out = 2 * in.

    Sub-pixel form: the four output phases come from stride-1 convs over the input (no
    multiplications by the zeros of the dilated form, whose XLA:CPU backward was ~30x slower:
    31 s vs 1.0 s for 8x64x64x128), interleaved by depth-to-space. With 16+ output channels
    each phase is its own conv with exactly its taps (3x3, 3x2, 2x3, 2x2: 25 in all; forward
    1.8x faster than one 3x3 conv to all phases, 137 vs 242 ms for 8x64x64x128 -> 128);
    narrower layers use that one conv, as per-phase GEMMs get too thin (58 vs 200 ms, -> 3).
    """
    if w.shape[:2] != (5, 5):
        raise ValueError(f"_upconv needs a 5x5 kernel, got {w.shape}")
    bsz, h, wd, _ = x.shape
    c = w.shape[-1]
    phases = _up_phases(w)  # in (rh, rw) order: (0, 0), (0, 1), (1, 0), (1, 1)
    if c >= 16:
        y = jnp.stack([conv2d(x, k, (1, 1), pads) for _, k, pads in phases], 3)
        y = y.reshape(bsz, h, wd, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    else:  # each phase's kernel zero-padded to the 3x3 window of pad (1, 1)
        kernels = [jnp.pad(k, ((1 - ph[0], 0), (1 - pw[0], 0), (0, 0), (0, 0)))
                   for _, k, (ph, pw) in phases]
        y = conv2d(x, jnp.concatenate(kernels, -1), (1, 1), ((1, 1), (1, 1)))
        y = y.reshape(bsz, h, wd, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(bsz, 2 * h, 2 * wd, c) + b


class UpConv(nn.Module):
    features: int
    kernel_size: int = 5

    @nn.compact
    def __call__(self, x, fake_quant: bool = False):
        k = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        )
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                       (self.features,))
        k, b = jnp.asarray(k), jnp.asarray(b)
        if fake_quant:
            k, b = _fq_weight(k), _fq(b, W_FRAC + A_FRAC, None)
        return _upconv(x, k, b)


def _fq(x, frac: int, clip: int | None):
    """Fixed-point rounding (floor(x*2^f + 1/2) / 2^f), optional clip, straight-through."""
    q = jnp.floor(x * 2.0**frac + 0.5)
    if clip is not None:
        q = jnp.clip(q, -clip, clip - 1)
    return x + jax.lax.stop_gradient(q * 2.0**-frac - x)


def _fq_weight(w):
    return _fq(w, W_FRAC, W_CLIP)


class QConv(nn.Module):
    """3x3 stride-1 conv of ``h_s`` with optional simulated integer arithmetic."""

    features: int

    @nn.compact
    def __call__(self, x, fake_quant: bool = False):
        k = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
            (3, 3, x.shape[-1], self.features),
        )
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                       (self.features,))
        k, b = jnp.asarray(k), jnp.asarray(b)
        if fake_quant:
            k, b = _fq_weight(k), _fq(b, W_FRAC + A_FRAC, None)
        return conv2d(x, k, (1, 1), ((1, 1), (1, 1))) + b


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
NUM_SCALES_RANGE = (2, 1024)  # scale levels from 0.11 to 256: 1024 tables take 18 MB


def check_sizes(n: Any, m: Any, num_scales: Any) -> None:
    """Refuse channel and scale-level counts no model has (ValueError naming them): N=0 and
    num_scales=1 failed with a bare ZeroDivisionError, num_scales=0 made a one-table coder
    silently, num_scales=100000 ran 93 s into a 56 GiB allocation."""
    lo, hi = NUM_SCALES_RANGE
    bad = [f"{name}={v!r} (need an integer >= 1)" for name, v in (("N", n), ("M", m))
           if not _is_count(v, 1)]
    if not (_is_count(num_scales, lo) and num_scales <= hi):
        bad.append(f"num_scales={num_scales!r} (need an integer in {lo}..{hi})")
    if bad:
        raise ValueError(f"hyperprior sizes: {', '.join(bad)}")


def _is_count(v: Any, minimum: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum


class MeanScaleHyperprior(nn.Module):
    """mbt2018-mean. ``N``: g_a/g_s and hyper-latent channels, ``M``: latent channels;
    ``hs_activation``: one of :data:`HS_ACTIVATIONS` (CompressAI's model: ``"leaky_relu"``)."""

    N: int = 128
    M: int = 192
    num_scales: int = 128
    hs_activation: str = "relu"

    def __post_init__(self):
        check_sizes(self.N, self.M, self.num_scales)  # at construction: caches compare models
        if self.hs_activation not in HS_ACTIVATIONS:
            raise ValueError(f"hs_activation must be one of {HS_ACTIVATIONS}, got {self.hs_activation!r}")
        super().__post_init__()

    def setup(self):
        n, m = self.N, self.M
        self.g_a_0 = Conv(n, 5, 2, name="g_a_0")
        self.g_a_1 = GDN(name="g_a_1")
        self.g_a_2 = Conv(n, 5, 2, name="g_a_2")
        self.g_a_3 = GDN(name="g_a_3")
        self.g_a_4 = Conv(n, 5, 2, name="g_a_4")
        self.g_a_5 = GDN(name="g_a_5")
        self.g_a_6 = Conv(m, 5, 2, name="g_a_6")
        self.g_s_0 = UpConv(n, name="g_s_0")
        self.g_s_1 = GDN(inverse=True, name="g_s_1")
        self.g_s_2 = UpConv(n, name="g_s_2")
        self.g_s_3 = GDN(inverse=True, name="g_s_3")
        self.g_s_4 = UpConv(n, name="g_s_4")
        self.g_s_5 = GDN(inverse=True, name="g_s_5")
        self.g_s_6 = UpConv(3, name="g_s_6")
        self.h_a_0 = Conv(n, 3, 1, name="h_a_0")
        self.h_a_2 = Conv(n, 5, 2, name="h_a_2")
        self.h_a_4 = Conv(n, 5, 2, name="h_a_4")
        self.h_s_0 = UpConv(m, name="h_s_0")
        self.h_s_2 = UpConv(m * 3 // 2, name="h_s_2")
        self.h_s_4 = QConv(m * 2, name="h_s_4")
        self.entropy_bottleneck = E.EntropyBottleneck(n)
        self.gaussian_conditional = E.GaussianConditional()

    def dummy_inputs(self) -> tuple:
        """Inputs for ``init`` (the :mod:`fasdiff_jax.convert` folder protocol)."""
        return jnp.zeros((1, MULTIPLE, MULTIPLE, 3)), "round"

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **overrides: Any) -> "MeanScaleHyperprior":
        """The model a ``config.json`` of :func:`save_model` names (the name is the
        :mod:`fasdiff_jax.convert` folder protocol; the keys are ours: N, M, num_scales,
        hs_activation)."""
        from fasdiff_jax.errors import UnsupportedConfigError

        fields = {k: v for k, v in {**cfg, **overrides}.items() if k != "_class_name"}
        unknown = sorted(set(fields) - set(MODEL_CONFIG_KEYS))
        if unknown:
            raise UnsupportedConfigError(f"MeanScaleHyperprior config has unknown keys {unknown}; "
                                         f"expected {list(MODEL_CONFIG_KEYS)}")
        absent = [k for k in ("N", "M") if k not in fields]  # a default of 128 named dozens
        if absent:  # of wrong shapes instead
            raise UnsupportedConfigError(f"MeanScaleHyperprior config lacks {', '.join(absent)}")
        try:
            return cls(**fields)
        except ValueError as e:  # a size or activation no model has: named with the file
            raise UnsupportedConfigError(str(e)) from None

    def g_a(self, x):
        for i in range(0, 6, 2):
            x = getattr(self, f"g_a_{i + 1}")(getattr(self, f"g_a_{i}")(x))
        return self.g_a_6(x)

    def g_s(self, y):
        for i in range(0, 6, 2):
            y = getattr(self, f"g_s_{i + 1}")(getattr(self, f"g_s_{i}")(y))
        return self.g_s_6(y)

    def h_a(self, y):
        z = nn.leaky_relu(self.h_a_0(y), 0.01)
        z = nn.leaky_relu(self.h_a_2(z), 0.01)
        return self.h_a_4(z)

    def h_s(self, z_hat):
        """Float simulation of :func:`hyper_synthesis_int`: returns (means, scales)."""
        def act(a):  # on the 2**-A_FRAC grid already; the leak rounds back onto it
            if self.hs_activation == "relu":
                return nn.relu(a)
            return jnp.where(a >= 0, a, _fq(a * (LEAK_NUM * 2.0**-LEAK_SHIFT), A_FRAC, None))

        a = _fq(z_hat, A_FRAC, A_CLIP)
        a = act(_fq(self.h_s_0(a, True), A_FRAC, A_CLIP))
        a = act(_fq(self.h_s_2(a, True), A_FRAC, A_CLIP))
        out = _fq(self.h_s_4(a, True), A_FRAC, A_CLIP)
        scales, means = jnp.split(out, 2, axis=-1)
        return means, scales

    def encode_latents_device(self, x):
        """x in [0,1] NHWC (multiple of 64) -> (y, z) floats."""
        y = self.g_a(x)
        return y, self.h_a(y)

    def decode_device(self, y_hat):
        return self.g_s(y_hat)

    def __call__(self, x, mode: str = "noise", rng=None):
        """Training / evaluation forward: (x_hat, y_likelihoods, z_likelihoods)."""
        y_hat, y_lik, z_lik = self.entropy_stage(self.g_a(x), mode, rng)
        return self.g_s(y_hat), y_lik, z_lik

    def entropy_stage(self, y, mode: str = "noise", rng=None):
        """y -> (y_hat, y_likelihoods, z_likelihoods) through h_a, the bottleneck and h_s."""
        r1 = r2 = None
        if rng is not None:
            r1, r2 = jax.random.split(rng)
        z = jnp.clip(self.h_a(y), -Z_CLIP, Z_CLIP - 1)
        z_hat, z_lik = self.entropy_bottleneck(z, mode, r1)
        means, scales = self.h_s(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, means, scales, mode, r2)
        return y_hat, y_lik, z_lik


# --------------------------------------------------------------------------------------------
# integer hyper-synthesis on the host
# --------------------------------------------------------------------------------------------
def _im2col(a, kh: int, kw: int, pad_h: tuple[int, int], pad_w: tuple[int, int], xp=np):
    """(H, W, C) -> (Ho, Wo, kh*kw*C) patches of a stride-1 conv, in (kh, kw, C) order; numpy
    (host h_s) or ``xp=jnp`` (:class:`DeviceHs`)."""
    a = xp.pad(a, (tuple(pad_h), tuple(pad_w), (0, 0)))
    ho, wo = a.shape[0] - kh + 1, a.shape[1] - kw + 1
    return xp.concatenate([a[i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], -1)


_PARALLEL_MIN_MACS = 1 << 22


_POOL: dict[int, tuple[ThreadPoolExecutor, int]] = {}


def _gemm_pool() -> tuple[ThreadPoolExecutor, int]:
    """(pool, workers) of this process: a forked child (data-loader workers) gets its own, as
    the parent's pool threads do not exist there and tasks sent to it would never run."""
    pid = os.getpid()
    if pid not in _POOL:
        _POOL.clear()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(4, cpus or 1)  # sched_getaffinity: Linux only
        _POOL[pid] = ThreadPoolExecutor(workers, thread_name_prefix="fasdiff-hs"), workers
    return _POOL[pid]


def _matmuls(lhs: list[np.ndarray], rhs: list[np.ndarray]) -> list[np.ndarray]:
    """``[l @ r for l, r in zip(lhs, rhs)]``, on a thread pool when big enough.

    float64 products and sums of integers below 2**53 are exact, so the results do not
    depend on how the work is split. Each GEMM is a single-threaded BLAS call (the caller
    limits BLAS to one thread): OpenBLAS's own threads keep spinning after a call and slowed
    the next XLA:CPU call (compress 76 -> 147 ms on 2 cores); idle pool threads sleep."""
    pool, workers = _gemm_pool()
    if workers == 1 or not _worth_threads(sum(l.size * r.shape[1] for l, r in zip(lhs, rhs))):
        return [l @ r for l, r in zip(lhs, rhs)]
    return list(pool.map(np.matmul, lhs, rhs))


def _worth_threads(macs: int) -> bool:
    return macs >= _PARALLEL_MIN_MACS


def _im2col_conv(a: np.ndarray, w: np.ndarray, pad_h: tuple[int, int],
                 pad_w: tuple[int, int]) -> np.ndarray:
    """float64 stride-1 conv of (H, W, C) with (kh, kw, C, O): exact for integers below 2**53."""
    cols = _im2col(a, *w.shape[:2], pad_h, pad_w)
    ho, wo = cols.shape[:2]
    cols, wm = cols.reshape(ho * wo, -1), w.reshape(-1, w.shape[-1])
    if not _worth_threads(cols.shape[0] * wm.size):  # small: one GEMM, no split and concat
        return (cols @ wm).reshape(ho, wo, -1)
    blocks = np.array_split(cols, _gemm_pool()[1])
    return np.concatenate(_matmuls(blocks, [wm] * len(blocks))).reshape(ho, wo, -1)


def _int_upconv(a: np.ndarray, phases: list) -> np.ndarray:
    """The transposed conv of :func:`_upconv` on the host, one conv per output phase: the
    same integer products as the dilated form without its zeros (4x fewer multiplies)."""
    h, wd, _ = a.shape
    cols = [_im2col(a, *k.shape[:2], ph, pw).reshape(h * wd, -1) for _, k, (ph, pw) in phases]
    accs = _matmuls(cols, [k.reshape(-1, k.shape[-1]) for _, k, _ in phases])
    return _interleave_phases([acc.reshape(h, wd, -1) for acc in accs], np)


def _interleave_phases(outs: list, xp=np):
    """The four output phases of a stride-2 transposed conv, in :func:`_up_phases` order
    ((0, 0), (0, 1), (1, 0), (1, 1)), each (H, W, O) -> the (2H, 2W, O) output."""
    h, w = outs[0].shape[:2]
    return xp.stack(outs).reshape(2, 2, h, w, -1).transpose(2, 0, 3, 1, 4).reshape(2 * h, 2 * w, -1)


def _requantise(acc, bias, activation: str | None, xp=np):
    """Accumulator + bias (units 2**-(W_FRAC + A_FRAC)) -> the next activations (units
    2**-A_FRAC): a power-of-two scale, floor and clip, then the activation; all exact. The
    leak of ``leaky_relu`` is ``floor(a * 655 / 2**16 + 1/2)``, an exact product below 2**31."""
    a = xp.clip(xp.floor((acc + bias) * 2.0**-W_FRAC + 0.5), -A_CLIP, A_CLIP - 1)
    if activation == "relu":
        return xp.maximum(a, 0.0)
    if activation == "leaky_relu":
        return xp.where(a >= 0, a, xp.floor(a * (LEAK_NUM * 2.0**-LEAK_SHIFT) + 0.5))
    return a


@dataclass(frozen=True)
class IntLayer:
    kernel: np.ndarray  # float64 holding integers (units 2**-W_FRAC)
    bias: np.ndarray  # float64 holding integers (units 2**-(W_FRAC + A_FRAC))
    upsample: bool
    activation: str | None = None  # after this layer: one of HS_ACTIVATIONS, or None

    def __post_init__(self):  # per-phase kernels, sliced once (4 MB per call otherwise)
        phases = ([(r, np.ascontiguousarray(k), p) for r, k, p in _up_phases(self.kernel)]
                  if self.upsample else None)
        object.__setattr__(self, "phases", phases)


def _int_weight(w) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return np.clip(np.floor(w * 2.0**W_FRAC + 0.5), -W_CLIP, W_CLIP - 1)


def integer_hs_layers(hs_params: dict, activation: str = "relu") -> list[IntLayer]:
    """Quantise ``h_s`` params once (float32 -> exact integers), checking the 2**53 bound."""
    layers = []
    for name, up, act in (("h_s_0", True, activation), ("h_s_2", True, activation),
                          ("h_s_4", False, None)):
        k = _int_weight(hs_params[name]["kernel"])
        b = np.floor(np.asarray(hs_params[name]["bias"], np.float64) * 2.0 ** (W_FRAC + A_FRAC) + 0.5)
        fan_in = k.shape[0] * k.shape[1] * k.shape[2]
        bound = fan_in * W_CLIP * A_CLIP + np.abs(b).max(initial=0)
        if bound >= 2.0**53:
            raise ValueError(f"{name}: fan-in {fan_in} breaks the exact-integer bound")
        layers.append(IntLayer(k, b, up, act))
    return layers


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_BLAS_LOCK = threading.Lock()
_BLAS_USERS: list = []  # [the limit in force] while any thread runs the integer h_s


@contextlib.contextmanager
def _single_thread_blas():
    """BLAS at one thread while any thread runs the integer h_s, the user's setting back
    after the last: two threads each entering and restoring threadpoolctl's limit in turn
    left BLAS at one thread for the rest of the process (the second saved the first's 1)."""
    with _BLAS_LOCK:
        if not _BLAS_USERS:
            _BLAS_USERS.append(_blas_controller().limit(limits=1, user_api="blas"))
        _BLAS_USERS.append(None)
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS.pop()
            if len(_BLAS_USERS) == 1:
                _BLAS_USERS.pop().restore_original_limits()


def hyper_synthesis_int(layers: list[IntLayer], z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer h_s: z_hat (h, w, N) ints -> (means_fixed, scales_fixed) int64, units 2**-10.

    BLAS runs single-threaded here; its GEMMs are split over a thread pool instead
    (:func:`_matmuls`). Rescaling and activations: :func:`_requantise`."""
    a = np.clip(np.asarray(z_hat, np.float64), -Z_CLIP, Z_CLIP - 1) * 2.0**A_FRAC
    with _single_thread_blas():
        for l in layers:
            acc = _int_upconv(a, l.phases) if l.upsample else _im2col_conv(a, l.kernel, (1, 1), (1, 1))
            a = _requantise(acc, l.bias, l.activation)
    scales, means = np.split(a.astype(np.int64), 2, axis=-1)
    return means, scales


HS_PLACES = ("auto", "host", "device")
HS_PLACE_ENV = "FASDIFF_HS_PLACE"


def hs_place() -> str:
    """Where this process runs the integer h_s: ``FASDIFF_HS_PLACE`` or ``auto`` -> "host" | "device".

    ``auto`` picks the device on GPUs (float64 GEMMs are native there) and the host elsewhere:
    on CPUs numpy is as fast without compiling per latent size, and TPUs emulate float64."""
    place = os.environ.get(HS_PLACE_ENV, "auto")
    if place not in HS_PLACES:
        raise ValueError(f"{HS_PLACE_ENV}={place!r}: expected one of {HS_PLACES}")
    if place == "auto":
        return "device" if jax.default_backend() == "gpu" else "host"
    return place


def _bucket(n: int) -> int:
    """Latent sides are padded to a power of two (>= 4): few compiled programs per process."""
    return max(4, 1 << (n - 1).bit_length())


class DeviceHs:
    """:func:`hyper_synthesis_int` as one float64 XLA program on JAX's default device.

    Exact for the same reason as on the host: every product and partial sum is an integer
    below 2**53 (the bound :func:`integer_hs_layers` checks), so float64 GEMMs return the
    exact integer whatever the summation order or FMA use; the convolutions are im2col +
    ``dot`` (a GEMM, not a convolution algorithm that could transform its inputs, such as
    FFT or Winograd). Latents are zero-padded to :func:`_bucket` sizes and every
    intermediate is masked back to zero outside the valid region, which is exactly the
    host's zero padding, so the padding never reaches a valid output. The first latent size
    of each bucket compiles (0.5-3.6 s on an H100), also when decoding a malformed file."""

    def __init__(self, layers: list[IntLayer]):
        self.layers = layers
        with jax.enable_x64(True):
            self.weights = [
                ([jnp.asarray(k.reshape(-1, k.shape[-1])) for _, k, _ in l.phases] if l.upsample
                 else [jnp.asarray(l.kernel.reshape(-1, l.kernel.shape[-1]))], jnp.asarray(l.bias))
                for l in layers]
        self._fn = jax.jit(self._program)

    def _program(self, weights, z, hw):
        a = jnp.clip(z, -Z_CLIP, Z_CLIP - 1) * 2.0**A_FRAC
        hv, wv = hw[0], hw[1]
        for l, (kernels, bias) in zip(self.layers, weights):
            if l.upsample:
                acc = _interleave_phases([_exact_dot(_im2col(a, *k.shape[:2], ph, pw, jnp), km)
                                          for (_, k, (ph, pw)), km in zip(l.phases, kernels)], jnp)
                hv, wv = 2 * hv, 2 * wv
            else:
                acc = _exact_dot(_im2col(a, *l.kernel.shape[:2], (1, 1), (1, 1), jnp), kernels[0])
            a = _requantise(acc, bias, l.activation, jnp)
            valid = ((jnp.arange(a.shape[0]) < hv)[:, None, None]
                     & (jnp.arange(a.shape[1]) < wv)[None, :, None])
            a = jnp.where(valid, a, 0.0)
        return a

    def __call__(self, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w, n = z_hat.shape
        zp = np.zeros((_bucket(h), _bucket(w), n), np.float64)
        zp[:h, :w] = z_hat
        with jax.enable_x64(True):
            out = np.asarray(self._fn(self.weights, zp, np.array([h, w], np.int64)))
        f = out.shape[0] // zp.shape[0]
        scales, means = np.split(out[: f * h, : f * w].astype(np.int64), 2, axis=-1)
        return means, scales


def _exact_dot(a, b):
    """float64 GEMM at full precision whatever ``jax_default_matmul_precision`` says."""
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _checked_device_hs(layers: list[IntLayer]) -> DeviceHs | None:
    """A :class:`DeviceHs` that reproduced the host's integers on check latents, else None.

    The check (two latent shapes, one of them padded, values up to the clip bound) guards
    against a backend whose float64 GEMM is not IEEE (an emulation, a reduced-precision
    mode) or that cannot run float64 at all; it costs one compile per shape, once per params
    object."""
    kind = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    try:
        dev = DeviceHs(layers)
        for shape, lim in (((4, 4), 12), ((3, 5), Z_CLIP)):
            z = rng.integers(-lim, lim + 1, shape + (layers[0].kernel.shape[2],))
            got, want = dev(z), hyper_synthesis_int(layers, z)
            if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                warnings.warn(f"the device h_s on {kind} differs from the host's integers; "
                              f"running it on the host", RuntimeWarning, stacklevel=3)
                return None
    except Exception as e:  # noqa: BLE001 - any backend failure: the host path always works
        warnings.warn(f"the device h_s cannot run on {kind} ({type(e).__name__}: {e}); running it "
                      f"on the host", RuntimeWarning, stacklevel=3)
        return None
    return dev


# --------------------------------------------------------------------------------------------
# generic latent coding (reused by FaSDiff's compressor)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentCoder:
    """Everything the host needs to code (z, y): tables, integer h_s, fingerprint."""

    z_tables: E.CdfTables
    y_tables: E.CdfTables
    thresholds: np.ndarray
    hs_layers: list
    eb_params: dict
    eb_layers: int
    hs_device: DeviceHs | None = None  # the same integer h_s as an XLA program (GPUs)

    def hyper_synthesis(self, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(means, scales) of :func:`hyper_synthesis_int`, computed where ``prepare`` chose."""
        if self.hs_device is not None:
            return self.hs_device(z_hat)
        return hyper_synthesis_int(self.hs_layers, z_hat)

    def y_distributions(self, z_hat: np.ndarray):
        means, scales = self.hyper_synthesis(z_hat)
        return means, E.scale_indexes(scales, self.thresholds)


def encode_latents(coder: LatentCoder, y: np.ndarray, z: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(y (h,w,M) float, z (h',w',N) float) -> (one stream: z then y, y_hat float64)."""
    z_hat = np.clip(np.round(np.asarray(z, np.float64)), -Z_CLIP, Z_CLIP - 1).astype(np.int64)
    ch = np.broadcast_to(np.arange(z_hat.shape[-1]), z_hat.shape)
    enc = SymbolEncoder()
    enc.encode(z_hat, ch, coder.z_tables)
    means, idx = coder.y_distributions(z_hat)
    mu = means * 2.0**-A_FRAC
    sym = np.clip(np.round(np.asarray(y, np.float64) - mu), -E.SYMBOL_LIMIT, E.SYMBOL_LIMIT - 1)
    sym = sym.astype(np.int64)
    enc.encode(sym, idx, coder.y_tables)
    return enc.finish(), sym + mu


def decode_latents(coder: LatentCoder, stream: bytes, z_shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`encode_latents`: -> y_hat (h, w, M) float64 (exact)."""
    ch = np.broadcast_to(np.arange(z_shape[-1]), z_shape)
    dec = SymbolDecoder(stream)
    z_hat = dec.decode(ch, coder.z_tables).reshape(z_shape)
    means, idx = coder.y_distributions(z_hat)
    sym = dec.decode(idx, coder.y_tables).reshape(idx.shape)
    dec.finish()
    return sym + means * 2.0**-A_FRAC


def latent_bits(coder: LatentCoder, y: np.ndarray, z: np.ndarray,
                quantized_scales: bool = True) -> tuple[float, float]:
    """Model estimate (Σ -log2 p, 1e-9 floor) of (z bits, y bits) with the decoder's means.

    ``quantized_scales=True`` uses the scale levels the decoder codes with (the inference
    model's probabilities); ``False`` the integer net's unquantised scales, as in training
    and in CompressAI's estimate.
    """
    z_hat = np.clip(np.round(np.asarray(z, np.float64)), -Z_CLIP, Z_CLIP - 1)
    z_lik = E.bottleneck_likelihood_np(coder.eb_params, z_hat, coder.eb_layers)
    means, scales = coder.hyper_synthesis(z_hat.astype(np.int64))
    if quantized_scales:
        scales = coder.thresholds[E.scale_indexes(scales, coder.thresholds)]
    mu = means * 2.0**-A_FRAC
    y_hat = np.round(np.asarray(y, np.float64) - mu) + mu
    y_lik = E.gaussian_likelihood(y_hat, mu, scales * 2.0**-A_FRAC, np)
    return float(-np.log2(z_lik).sum()), float(-np.log2(y_lik).sum())


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def init_params(model: MeanScaleHyperprior, rng: jax.Array, size: tuple[int, int] = (64, 64)) -> dict:
    """Parameters for ``model``; their shapes do not depend on ``size``.

    The initialisers draw from the ``rbg`` PRNG seeded with ``rng``'s key data: XLA on CPU
    takes 15-30 s to compile threefry for the ~60 initialisers of this model, rbg about 1 s.
    """
    del size  # parameter shapes do not depend on the image size
    data = jnp.ravel(jax.random.key_data(rng)).astype(jnp.uint32)
    key = jax.random.wrap_key_data(jnp.resize(data, (4,)), impl="rbg")
    init = jax.jit(lambda r: nn.meta.unbox(model.init({"params": r}, jnp.zeros((1, 64, 64, 3)), "round")))
    return init(key)


# CompressAI state-dict entries that are not parameters: its derived CDF tables, learned
# quantiles (our tables are a pure function of the params) and reparametrisation constants.
_COMPRESSAI_BUFFERS = ("quantiles", "_offset", "_quantized_cdf", "_cdf_length", "target",
                       "likelihood_lower_bound.bound", "beta_reparam.pedestal",
                       "beta_reparam.lower_bound.bound", "gamma_reparam.pedestal",
                       "gamma_reparam.lower_bound.bound", "scale_table", "scale_bound",
                       "lower_bound_scale.bound")


def params_from_compressai(state_dict: dict) -> dict:
    """A CompressAI ``MeanScaleHyperprior`` state dict (tensor name -> numpy array) -> params
    for ``MeanScaleHyperprior(N, M, hs_activation="leaky_relu")`` computing the same model.

    Conv2d weights (O, I, kh, kw) become HWIO; ConvTranspose2d weights (I, O, kh, kw) become
    the HWIO kernel of our lhs-dilated form, i.e. spatially flipped; GDN and the entropy
    bottleneck keep CompressAI's reparametrised tensors under our names. CompressAI's learned
    quantiles and CDF buffers are not needed: our tables are a function of these params.
    Strict: a missing tensor, or one that is neither used nor a known CompressAI buffer (e.g.
    the context model of ``mbt2018``), raises :class:`~fasdiff_jax.errors.ConversionError`
    naming it, so another architecture's weights never load silently.
    """
    from fasdiff_jax.errors import ConversionError

    # copies: the caller's arrays (a torch tensor's memory) stay theirs to change
    sd = {_current_compressai_name(k): np.array(v, np.float32) for k, v in state_dict.items()}
    if "g_a.0.weight" not in sd:
        raise ConversionError("not a CompressAI MeanScaleHyperprior state dict: no 'g_a.0.weight'")
    layout = {"conv": lambda w: w.transpose(2, 3, 1, 0),
              "transposed": lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1]}
    kinds = {**{f"g_a_{i}": "conv" for i in (0, 2, 4, 6)}, **{f"h_a_{i}": "conv" for i in (0, 2, 4)},
             **{f"g_s_{i}": "transposed" for i in (0, 2, 4, 6)},
             "h_s_0": "transposed", "h_s_2": "transposed", "h_s_4": "conv"}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> np.ndarray | None:
        used.add(key)
        if key not in sd:
            missing.append(key)
        return sd.get(key)

    p = {}
    for name, kind in kinds.items():
        key = f"{name[:3]}.{name[4:]}"  # g_a_0 -> g_a.0
        w, b = take(f"{key}.weight"), take(f"{key}.bias")
        if w is not None:
            p[name] = {"kernel": np.ascontiguousarray(layout[kind](w)), "bias": b}
    for part in ("g_a", "g_s"):
        for i in (1, 3, 5):
            p[f"{part}_{i}"] = {"beta": take(f"{part}.{i}.beta"), "gamma": take(f"{part}.{i}.gamma")}
    n_layers = 1 + max((int(k.split(".")[2]) for k in sd
                        if k.startswith("entropy_bottleneck.matrices.")), default=0)
    eb = {}
    for i in range(n_layers):
        eb[f"matrix_{i}"] = take(f"entropy_bottleneck.matrices.{i}")
        eb[f"bias_{i}"] = take(f"entropy_bottleneck.biases.{i}")
        if i < n_layers - 1:
            eb[f"factor_{i}"] = take(f"entropy_bottleneck.factors.{i}")
    p["entropy_bottleneck"] = eb
    unexpected = sorted(k for k in sd if k not in used and not k.endswith(_COMPRESSAI_BUFFERS))
    if missing or unexpected:
        raise ConversionError(
            f"not a CompressAI MeanScaleHyperprior (mbt2018-mean) state dict: missing "
            f"{missing[:12]}, unexpected {unexpected[:12]}")
    return {"params": p}


_OLD_EB_NAMES = {"_bias": "biases", "_matrix": "matrices", "_factor": "factors"}


def _current_compressai_name(key: str) -> str:
    """CompressAI 1.2's name for an entropy-bottleneck tensor of an older checkpoint, as its
    own loaders rename them (``zoo.pretrained.rename_key``, then ``remap_old_keys``): zoo
    files keep ``_matrices.0`` (an nn.ParameterList), later ones ``_matrix0``; today's
    ``matrices.0``. Such files were refused as another architecture."""
    head = "entropy_bottleneck."
    if not key.startswith(head):
        return key
    rest = key[len(head):]
    for old, new in _OLD_EB_NAMES.items():
        if rest.startswith(f"_{new}."):  # _matrices.0 (zoo files)
            return f"{head}{new}.{rest[len(new) + 2:]}"
        if rest.startswith(old) and rest[len(old):].isdigit():  # _matrix0
            return f"{head}{new}.{rest[len(old):]}"
    return key


def model_config(model: MeanScaleHyperprior) -> dict:
    """The ``config.json`` of :func:`save_model`."""
    return {"_class_name": "MeanScaleHyperprior", **{k: getattr(model, k) for k in MODEL_CONFIG_KEYS}}


def save_model(folder: str, model: MeanScaleHyperprior, params: dict) -> None:
    """``folder/config.json`` + ``folder/params.safetensors``: what the codec and evaluate
    commands load with ``--model_dir`` (:func:`load_model`)."""
    from fasdiff_jax import convert

    convert.save_component(folder, model_config(model), params["params"])


def load_model(folder: str) -> tuple[MeanScaleHyperprior, dict]:
    """(model, params) from a :func:`save_model` folder; every shape is checked against the
    config (:class:`~fasdiff_jax.errors.ConversionError` otherwise). The params are put on
    the default device once (not re-sent from the memory-mapped file on every call)."""
    from fasdiff_jax import convert

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise convert.ConversionError(
            f"{folder}: no config.json, not a hyperprior folder (make one with python -m "
            f"fasdiff_jax.convert --compressai_checkpoint CKPT --out {folder})")
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        raise convert.ConversionError(
            f"{folder}: a training workdir, not a converted model folder: pass it as "
            f"--workdir (or export it: python -m fasdiff_jax.convert --hyperprior_workdir)")
    module, params = convert.load_component(folder)
    if not isinstance(module, MeanScaleHyperprior):
        raise convert.ConversionError(f"{folder}: holds a {type(module).__name__}, not a "
                                      f"MeanScaleHyperprior")
    try:
        check_finite_weights(params)
    except convert.ConversionError as e:
        raise convert.ConversionError(f"{folder}: {e}") from None
    return module, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


@dataclass
class _Prepared:
    coder: LatentCoder
    fingerprint: bytes
    params: Any
    place: str
    leaves: tuple = ()  # the arrays it was made from (held: their ids stay theirs)

    def made_from(self, params: Any) -> bool:
        return self.params is params and holds_same_arrays(params, self.leaves)


def holds_same_arrays(params: Any, leaves: tuple) -> bool:
    """Whether ``params`` still holds exactly the arrays ``leaves`` (by identity), for caches
    kept per params object: an array replaced inside it (``p["params"][k] = other[k]``) kept
    the old tables and fingerprint, so files carried the fingerprint of weights they were not
    coded with. The numpy ones are made read-only (:func:`freeze_host_arrays`), so no array
    changes in place either."""
    now = jax.tree.leaves(params)
    return len(now) == len(leaves) and all(a is b for a, b in zip(now, leaves))


def freeze_host_arrays(leaves: Sequence[Any]) -> tuple:
    """Make the writable numpy arrays among ``leaves`` read-only, for caches derived from
    their values: an in-place change (``p[...] *= 3``, e.g. on what
    :func:`params_from_compressai` returns) kept the old tables, integer h_s and fingerprint,
    and files then decoded with no weights. Such a change now fails where it is made
    (numpy's "assignment destination is read-only"); replace the array instead. jax arrays
    are immutable already (an array that views a writable one can still change through
    that one). Returns ``leaves`` as a tuple."""
    for leaf in leaves:
        if isinstance(leaf, np.ndarray) and leaf.flags.writeable:
            leaf.flags.writeable = False
    return tuple(leaves)


_CACHE: list[tuple[Any, int, _Prepared]] = []  # (model, id(params), what was prepared)


def _fingerprint(model: MeanScaleHyperprior, params: dict, tables_digest: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    act = "" if model.hs_activation == "relu" else f" hs={model.hs_activation}"  # relu: as before
    h.update(f"mbt2018-mean N={model.N} M={model.M} S={model.num_scales} W{W_FRAC} A{A_FRAC}{act}".encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda t: str(t[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, "<f4")).tobytes())
    h.update(tables_digest)
    return h.digest()


def check_finite_weights(params: dict) -> None:
    """A NaN or Inf weight (a damaged file) failed deep in the CDF tables' integer conversion
    (OverflowError) or coded garbage; it is refused by name."""
    from fasdiff_jax.errors import ConversionError, listed

    bad = [jax.tree_util.keystr(path, simple=True, separator="/")
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if not np.isfinite(np.asarray(leaf)).all()]
    if bad:
        raise ConversionError(f"non-finite values (NaN or Inf) in the hyperprior's weights: "
                              f"{listed(bad, ', ')}")


_SHAPES: list[tuple[Any, Any]] = []  # (model, its params' shapes), by model config


def param_shapes(model: MeanScaleHyperprior) -> dict:
    """The shapes (``jax.ShapeDtypeStruct``) of ``model``'s params, as :func:`init_params`
    makes them, without computing any (cached per model config)."""
    for m, shapes in _SHAPES:
        if m == model:
            return shapes
    key = jax.random.key(0, impl="rbg")
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": key},
                                                             *model.dummy_inputs())))
    _SHAPES.insert(0, (model, shapes))
    del _SHAPES[8:]
    return shapes


def check_params_fit(model: MeanScaleHyperprior, params: Any) -> None:
    """Refuse params made for another model (other N/M, another kind, a missing layer) by
    name: they failed inside flax (ScopeParamShapeError, KeyError) or the CDF tables."""
    from fasdiff_jax.errors import ConversionError, listed

    if not (isinstance(params, Mapping) and isinstance(params.get("params"), Mapping)):
        raise ConversionError(f"params: expected the {{'params': {{...}}}} dict init_params "
                              f"returns, got {type(params).__name__}")
    diff = shape_differences(param_shapes(model), params)
    if diff:
        raise ConversionError(f"params do not fit {type(model).__name__}(N={model.N}, "
                              f"M={model.M}): {listed(diff)}")


def prepare(model: MeanScaleHyperprior, params: dict) -> _Prepared:
    """Tables, integer h_s and fingerprint for these params (cached per params object).

    Where the integer h_s runs follows :func:`hs_place`; a device program that does not
    reproduce the host's integers on the check inputs is not used (a warning says so)."""
    place = hs_place()
    for m, p_id, prep in _CACHE:
        if m == model and p_id == id(params) and prep.made_from(params) and prep.place == place:
            return prep
    check_params_fit(model, params)
    p = params["params"]
    check_finite_weights(p)
    eb = {k: np.asarray(v) for k, v in p["entropy_bottleneck"].items()}
    n_layers = len([k for k in eb if k.startswith("matrix_")])
    thresholds = E.scale_thresholds(model.num_scales)
    hs_layers = integer_hs_layers(p, model.hs_activation)
    coder = LatentCoder(
        z_tables=E.bottleneck_tables(eb, n_layers),
        y_tables=E.gaussian_tables(thresholds),
        thresholds=thresholds,
        hs_layers=hs_layers,
        eb_params=eb,
        eb_layers=n_layers,
        hs_device=_checked_device_hs(hs_layers) if place == "device" else None,
    )
    fp = _fingerprint(model, params, E.tables_digest(coder.z_tables, coder.y_tables))
    prep = _Prepared(coder, fp, params, place, freeze_host_arrays(jax.tree.leaves(params)))
    _CACHE.insert(0, (model, id(params), prep))
    del _CACHE[4:]
    return prep


def to_rgb(image: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 (or a PIL image) -> (HxWx3, original channels).

    HxWx4 is composited over white by the rule the CLI reads RGBA files with
    (:func:`fasdiff_jax.data.align.to_rgb`): dropping alpha coded the colours hidden under
    transparent pixels, so the API and the CLI made different files of one picture. A PIL
    image is read as the CLI reads a file (any mode; a palette image was coded as its
    indexes, a CMYK one as RGB plus alpha). Sizes are checked before any conversion."""
    if isinstance(image, (list, tuple)):  # np.asarray made it one more axis, then a raw error
        raise TypeError(f"expected one image (a uint8 numpy array), got a {type(image).__name__}"
                        f": pass the array itself (batch functions take a sequence of them)")
    from PIL import Image

    if isinstance(image, Image.Image):
        _check_size(image.height, image.width)
        from fasdiff_jax.data.align import to_rgb as pil_to_rgb

        image = np.asarray(pil_to_rgb(image, keep_gray=True))
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {np.shape(image)}")
    _check_size(*img.shape[:2])
    c = img.shape[-1]
    if c == 1:
        img = np.repeat(img, 3, axis=-1)
    elif c == 4:  # the file still records 4 channels: decoded as HxWx4, opaque
        from PIL import Image

        from fasdiff_jax.data.align import to_rgb as composite_over_white  # PIL: only for RGBA

        img = np.asarray(composite_over_white(Image.fromarray(np.ascontiguousarray(img))))
    return img, c


def _check_size(h: int, w: int) -> None:
    """Before any device work or conversion (a gray 65535x65535 array was made RGB, 12.9 GB,
    before the padded size was refused)."""
    if not (1 <= h <= _ct.MAX_SIDE and 1 <= w <= _ct.MAX_SIDE):
        raise ValueError(f"image size {h}x{w} outside 1..{_ct.MAX_SIDE} pixels a side")
    if h * w > MAX_PIXELS:
        raise ValueError(f"image of {h}x{w} pixels exceeds the decoders' limit of {MAX_PIXELS} "
                         f"pixels; code it in tiles")


def pad_to_multiple(img: np.ndarray, multiple: int = MULTIPLE) -> tuple[np.ndarray, int, int]:
    """Edge-pad bottom/right to a multiple: -> (padded, pad_bottom, pad_right).

    Refuses (ValueError, before any model work) an image whose padded size the decoders
    refuse by default (``MAX_PIXELS``): it would make a file nobody decodes as written."""
    h, w = img.shape[:2]
    pb, pr = (-h) % multiple, (-w) % multiple
    if (h + pb) * (w + pr) > MAX_PIXELS:
        raise ValueError(f"image of {h}x{w} pixels ({h + pb}x{w + pr} padded) exceeds the "
                         f"decoders' limit of {MAX_PIXELS} pixels; code it in tiles")
    return np.pad(img, ((0, pb), (0, pr), (0, 0)), mode="edge"), pb, pr


def _config_key(model: MeanScaleHyperprior) -> MeanScaleHyperprior:
    """``model`` as a cache key: unbound (flax refuses to hash a module bound to variables)."""
    return model if model.scope is None else model.clone(parent=None)


def _encode_device(model, params, x):
    key = _config_key(model)
    fn = _encode_fns.get(key)
    if fn is None:
        fn = jax.jit(lambda p, x: key.apply(p, x, method=MeanScaleHyperprior.encode_latents_device))
        _encode_fns[key] = fn
    return fn(params, x)


def _decode_device(model, params, y_hat):
    key = _config_key(model)
    fn = _decode_fns.get(key)
    if fn is None:
        fn = jax.jit(lambda p, y: key.apply(p, y, method=MeanScaleHyperprior.decode_device))
        _decode_fns[key] = fn
    return fn(params, y_hat)


# Programs per model config (modules compare and hash by their fields): keyed by id, each new
# but equal model object compiled again (0.55-0.85 s a call) and was kept for good.
_encode_fns: dict = {}
_decode_fns: dict = {}


def pow2_padded(items: list) -> list:
    """``items`` with the last repeated up to a power-of-two length: batched device calls then
    compile one program per size 1, 2, 4, ... instead of one per batch length."""
    return items + items[-1:] * ((1 << (len(items) - 1).bit_length()) - len(items))


# At most this many (padded) pixels per batched device call of the analysis transforms, so
# a batch of large photos needs no more device memory than one 2048x2048 image alone.
BATCH_PIXELS = 1 << 22


def check_image_batch(images: Any) -> None:
    """Refuse one image where a batch is expected (TypeError): iterating it made each pixel
    row an image of its own (H files of one HxWx3 picture). An array batch must be NHWC, so
    a 3-D array is always read as one HxWxC image, never as N gray HxW images. A string,
    bytes or a mapping is refused too (each character or key was taken for an image)."""
    if isinstance(images, (str, bytes, bytearray, Mapping)):
        raise TypeError(f"images must be a sequence of images or an NHWC array, got a "
                        f"{type(images).__name__}")
    ndim = getattr(images, "ndim", None)
    if ndim is None or ndim == 4:
        return
    what = {2: "one HxW image", 3: "one HxWxC image"}.get(ndim, f"a {ndim}-D array")
    raise TypeError(f"images must be a sequence of images or an NHWC array; got {what} "
                    f"(shape {tuple(np.shape(images))}): use compress() for one image; pass N "
                    f"gray HxW images as an N x H x W x 1 array (images[..., None]) or a list")


def analyse_images(images: Sequence[np.ndarray], analyse: Callable, multiple: int = MULTIPLE,
                   to_input: Callable = lambda u8: u8.astype(np.float32) / 255.0) -> list:
    """The device's part of compressing: per image ``(y, z, (h, w), channels, pad_bottom,
    pad_right)`` (y, z float64 HWC) or, in its place, the error that image raised (TypeError,
    ValueError: bad dtype, shape or size). Images of one padded size go through
    ``analyse(x) -> (y, z)`` together, ``x`` a power-of-two batch (:func:`pow2_padded`) of at
    most :data:`BATCH_PIXELS` pixels (any single image alone). ``images``: a sequence of
    images or an NHWC array (:func:`check_image_batch`)."""
    check_image_batch(images)
    prepared: list = []
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        try:
            img, c = to_rgb(image)
            padded, pb, pr = pad_to_multiple(img, multiple)
        except (TypeError, ValueError) as e:
            prepared.append(e)
            continue
        prepared.append((padded, img.shape[:2], c, pb, pr))
        groups.setdefault(padded.shape, []).append(i)
    out = list(prepared)
    for (hp, wp, _), members in groups.items():
        per_call = 1 << max(0, (BATCH_PIXELS // (hp * wp)).bit_length() - 1)  # a power of two
        for start in range(0, len(members), per_call):
            chunk = members[start:start + per_call]
            batch = pow2_padded([prepared[i][0] for i in chunk])
            y, z = analyse(jnp.asarray(to_input(np.stack(batch))))
            y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
            for j, i in enumerate(chunk):
                out[i] = (y[j], z[j]) + prepared[i][1:]
    return out


def _analyse(model, params, image):
    (result,) = analyse_images([image], lambda x: _encode_device(model, params, x))
    if isinstance(result, Exception):
        raise result
    return result


def files_of(coder: LatentCoder, analysed: list, codec_id: int, fingerprint: bytes,
             sampler: _ct.SamplerSpec | None = None) -> list[bytes | Exception]:
    """The host's part of compressing: each :func:`analyse_images` result entropy-coded and
    packed as a file (errors stay in their places)."""
    out: list[bytes | Exception] = []
    for r in analysed:
        if isinstance(r, Exception):
            out.append(r)
            continue
        y, z, (h, w), c, pb, pr = r
        try:
            stream, _ = encode_latents(coder, y, z)
            out.append(_ct.pack(_ct.Container(h, w, pb, pr, c, codec_id, fingerprint, (stream,),
                                              sampler or _ct.SamplerSpec())))
        except ValueError as e:
            out.append(e)
    return out


def compress_batch(model: MeanScaleHyperprior, params: dict, images: Sequence[np.ndarray]
                   ) -> list[bytes | Exception]:
    """:func:`compress` of several images, those of one padded size in one device call; an
    image that cannot be coded gets its error in its place, the others go on. A file may
    differ from the one :func:`compress` writes alone where float rounding of the transforms
    differs between batch sizes; it decodes all the same (the decoder needs only the file).
    ``images``: a sequence of images or an NHWC array; one image (a 2-D or 3-D array) is a
    TypeError (:func:`check_image_batch`)."""
    check_image_batch(images)  # before prepare's work
    prep = prepare(model, params)
    analysed = analyse_images(images, lambda x: _encode_device(model, params, x))
    return files_of(prep.coder, analysed, CODEC_ID, prep.fingerprint)


def compress(model: MeanScaleHyperprior, params: dict, image: np.ndarray) -> bytes:
    """uint8 image (HxW, HxWx1/3/4) -> container bytes. Alpha is composited over white, as
    the CLI reads RGBA files (:func:`to_rgb`); the file records the channel count."""
    (data,) = compress_batch(model, params, [image])
    if isinstance(data, Exception):
        raise data
    return data


def decode_file_latents(
    model: MeanScaleHyperprior, params: dict, data: bytes, max_pixels: int | None = MAX_PIXELS, *,
    codec_id: int = CODEC_ID, fingerprint: bytes | None = None,
) -> tuple[_ct.Container, np.ndarray]:
    """Parse and validate a file and decode its symbols: -> (container, y_hat (h, w, M)).

    All host-side, no device work; every malformed file is a :class:`BitstreamError`.
    ``max_pixels`` bounds the (padded) image a file may ask the decoder to synthesise; None
    lifts the bound (only for trusted files: a header may ask for 65535x65535 pixels).
    Codecs built on this entropy model (FaSDiff) pass their own ``codec_id`` and a
    ``fingerprint`` that also covers their other weights; ``model.multiple`` (default 64)
    is the padding multiple.
    """
    check_max_pixels(max_pixels)
    prep = prepare(model, params)
    c = _ct.unpack(data, fingerprint or prep.fingerprint, codec_id)
    m = getattr(model, "multiple", MULTIPLE)
    hp, wp = c.height + c.pad_bottom, c.width + c.pad_right
    if hp % m or wp % m or c.pad_bottom >= m or c.pad_right >= m:
        raise BitstreamError(f"padded size {hp}x{wp} is not the minimal multiple of {m}")
    if max_pixels is not None and hp * wp > max_pixels:
        raise BitstreamError(f"image of {hp}x{wp} pixels exceeds the limit of {max_pixels}")
    if len(c.streams) != 1:
        raise BitstreamError(f"expected 1 stream, the file has {len(c.streams)}")
    return c, decode_latents(prep.coder, c.streams[0], (hp // m, wp // m, model.N))


def check_max_pixels(max_pixels: Any) -> None:
    """Refuse a ``max_pixels`` that is neither a positive int nor None (no limit): None was a
    raw TypeError from the comparison; a float or a bool would bound the image silently."""
    if max_pixels is None:
        return
    if not isinstance(max_pixels, (int, np.integer)) or isinstance(max_pixels, (bool, np.bool_)):
        raise TypeError(f"max_pixels must be an int (pixels) or None (no limit), got "
                        f"{type(max_pixels).__name__} {max_pixels!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")


def decompress(
    model: MeanScaleHyperprior, params: dict, data: bytes, max_pixels: int | None = MAX_PIXELS
) -> np.ndarray:
    """Container bytes -> uint8 HxWxC image (C as given to :func:`compress`; alpha = 255, an
    RGBA image decoded as its composite over white). ``max_pixels``: as in
    :func:`decode_file_latents` (None: no limit)."""
    c, y_hat = decode_file_latents(model, params, data, max_pixels)
    x_hat = _decode_device(model, params, jnp.asarray(y_hat[None], jnp.float32))
    return to_uint8(np.asarray(x_hat[0]), c)


def to_uint8(x_hat: np.ndarray, c: _ct.Container) -> np.ndarray:
    """Decoded image (padded, [0,1]) -> uint8 image cropped to the file's size and channels."""
    img = np.clip(np.round(x_hat * 255.0), 0, 255).astype(np.uint8)[: c.height, : c.width]
    if c.channels == 1:
        return np.round(img.astype(np.float32).mean(-1)).astype(np.uint8)[..., None]
    if c.channels == 4:
        return np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)
    return img


def estimate_bits(model: MeanScaleHyperprior, params: dict, image: np.ndarray,
                  quantized_scales: bool = True) -> float:
    """Σ -log2 p of z and y under the inference model: the integer net's means and (by
    default) the scale levels the coder uses; see :func:`latent_bits`."""
    prep = prepare(model, params)
    y, z, *_ = _analyse(model, params, image)
    zb, yb = latent_bits(prep.coder, y, z, quantized_scales)
    return zb + yb


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def loss_fn(model: MeanScaleHyperprior, params: dict, batch: jax.Array, rng: jax.Array,
            lmbda: float = 0.01, quantization: str = "noise") -> tuple[jax.Array, dict]:
    """Rate (bpp) + lmbda * 255² * MSE on a [0,1] NHWC batch (multiple of 64); latents with
    additive noise (``quantization="noise"``, training) or rounded (``"round"``, as coded)."""
    x_hat, y_lik, z_lik = model.apply(params, batch, quantization, rng)
    n_px = batch.shape[0] * batch.shape[1] * batch.shape[2]
    bpp = E.bits_from_likelihoods(y_lik, z_lik) / n_px
    mse = jnp.mean((x_hat - batch) ** 2)
    loss = bpp + lmbda * 255.0**2 * mse
    return loss, {"loss": loss, "bpp": bpp, "mse": mse}


def make_train_step(model: MeanScaleHyperprior, optimizer: optax.GradientTransformation,
                    lmbda: float = 0.01):
    """A jitted ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`` on a
    [0,1] NHWC batch; ``opt_state = optimizer.init(params)``."""
    return train_step.make_train_step(lambda p, b, r: loss_fn(model, p, b, r, lmbda),
                                      lambda p: (p, {}), optimizer, donate=False)


# CompressAI's MSE lambdas of mbt2018-mean's quality levels 1-8 (its model zoo).
COMPRESSAI_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)


@dataclass
class TrainableHyperprior:
    """The mbt2018-mean baseline in the train loop's model interface, so it trains with the
    same mesh, input pipeline, CLU logging, Orbax checkpoints and resume as FaSDiff
    (``config.model.kind = "hyperprior"``, ``configs/mbt2018_mean.py``) on rate +
    lmbda·255²·MSE; every parameter is trained, nothing is frozen."""

    model: MeanScaleHyperprior
    lmbda: float

    KEY = "hyperprior"  # the one entry of the loop's params: {KEY: {"params": ...}}

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainableHyperprior":
        """From ``config.model``: N, M, num_scales, hs_activation, lmbda."""
        model = MeanScaleHyperprior(N=int(cfg["N"]), M=int(cfg["M"]),
                                    num_scales=int(cfg.get("num_scales", 128)),
                                    hs_activation=cfg.get("hs_activation", "relu"))
        return cls(model, float(cfg["lmbda"]))

    @property
    def loss_cfg(self) -> dict:
        return {"lmbda": self.lmbda}

    @property
    def multiple(self) -> int:
        """Training crops are multiples of this (z is at 1/64); the codec pads other sizes."""
        return MULTIPLE

    def init_params(self, rng: jax.Array) -> dict:
        return {self.KEY: init_params(self.model, rng)}

    def frozen_params(self, rng: jax.Array) -> dict:
        return {}

    def trainable_shapes(self) -> dict:
        return {self.KEY: param_shapes(self.model)}

    @staticmethod
    def split(params: dict) -> tuple[dict, dict]:
        return dict(params), {}

    def loss_fn(self, params: dict, batch: Any, rng: jax.Array,
                quantization: str = "noise") -> tuple[jax.Array, dict]:
        """``batch["image"]``: uint8 NHWC, sides multiples of :data:`MULTIPLE`."""
        img = batch["image"] if isinstance(batch, Mapping) else batch
        return loss_fn(self.model, params[self.KEY], img.astype(jnp.float32) / 255.0, rng,
                       self.lmbda, quantization)

    def make_train_step(self, optimizer: optax.GradientTransformation, x0_terms: bool | None = None,
                        mesh: Any = None, param_shardings: Any = None,
                        opt_shardings: Any = None, microbatches: int = 1,
                        gather_params_over: Sequence[str] = ()):
        del x0_terms  # FaSDiff's stage-2 terms; the baseline has none
        return train_step.make_train_step(self.loss_fn, self.split, optimizer, mesh,
                                          param_shardings, opt_shardings,
                                          microbatches=microbatches,
                                          gather_params_over=gather_params_over)

    def make_eval_step(self, x0_terms: bool | None = None, mesh: Any = None,
                       param_shardings: Any = None):
        """Held-out metrics with rounded latents (bpp: the model's estimate of the files)."""
        del x0_terms
        return train_step.make_eval_step(lambda p, b, r: self.loss_fn(p, b, r, "round"),
                                         mesh, param_shardings)

    def reconstruct(self, params: dict, images: Any, rng: jax.Array) -> jax.Array:
        """uint8 NHWC -> float [0, 1] with rounded latents (g_s of what files code)."""
        del rng
        x_hat = self.model.apply(params[self.KEY], images.astype(jnp.float32) / 255.0,
                                 "round")[0]
        return jnp.clip(x_hat, 0.0, 1.0)

    def init_opt_state(self, optimizer: optax.GradientTransformation, params: dict):
        return optimizer.init(params)
