"""Can the integer h_s run exactly on the accelerator? float64 XLA vs the host's numpy.

    python benchmarks/hs_device_probe.py [--params DIR/params.npz]

The host integer h_s (``hyperprior.hyper_synthesis_int``) is exact because float64 products
and sums of integers below 2**53 are exact in any order. The same arithmetic as an XLA
program (``jax_enable_x64``) in two forms: im2col + dot (a float64 GEMM) and
``conv_general_dilated`` (whatever convolution algorithm the backend picks; an FFT or
Winograd one would not be exact). Reports, per latent size, whether each form equals the host
bit for bit on random z, and the median time of each including the transfers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fasdiff_jax.models import hyperprior as H  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


def _im2col(a, kh, kw, ph, pw):
    a = jnp.pad(a, ((0, 0), tuple(ph), tuple(pw), (0, 0)))
    ho, wo = a.shape[1] - kh + 1, a.shape[2] - kw + 1
    return jnp.concatenate([a[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], -1)


def _conv(a, k, ph, pw, form):
    if form == "gemm":
        return jnp.dot(_im2col(a, *k.shape[:2], ph, pw), k.reshape(-1, k.shape[-1]), precision=HIGHEST)
    return jax.lax.conv_general_dilated(a, k, (1, 1), (tuple(ph), tuple(pw)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


def hs_device(layers, z, form):
    a = jnp.clip(z, -H.Z_CLIP, H.Z_CLIP - 1) * 2.0**H.A_FRAC
    for l in layers:
        if l.upsample:
            outs = [_conv(a, jnp.asarray(k), ph, pw, form) for _, k, (ph, pw) in l.phases]
            b, h, w, o = outs[0].shape
            acc = jnp.stack(outs).reshape(2, 2, b, h, w, o).transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * h, 2 * w, o)
        else:
            acc = _conv(a, jnp.asarray(l.kernel), (1, 1), (1, 1), form)
        a = jnp.clip(jnp.floor((acc + l.bias) * 2.0**-H.W_FRAC + 0.5), -H.A_CLIP, H.A_CLIP - 1)
        if l.activation == "relu":
            a = jnp.maximum(a, 0.0)
        elif l.activation == "leaky_relu":
            a = jnp.where(a >= 0, a, jnp.floor(a * (H.LEAK_NUM * 2.0**-H.LEAK_SHIFT) + 0.5))
    scales, means = jnp.split(a, 2, axis=-1)
    return means, scales


def _median_ms(fn, n=30):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default=".gpu/xdev/params.npz")
    a = ap.parse_args()
    npz = np.load(a.params)  # written by cross_device_files.py; keys "['params']['h_s_0']['kernel']"
    hs = {}
    for key in npz.files:
        parts = [p.strip("'") for p in key.strip("[]").split("][")]
        if parts[0] == "params" and parts[1].startswith("h_s_"):
            hs.setdefault(parts[1], {})[parts[2]] = npz[key]
    n = hs["h_s_0"]["kernel"].shape[2]
    for act in H.HS_ACTIVATIONS:
        layers = H.integer_hs_layers(hs, act)
        rows = []
        for side in (4, 16, 32):  # 256, 1024, 2048 px
            z = np.random.default_rng(side).integers(-8, 9, (side, side, n)).astype(np.float64)
            host = H.hyper_synthesis_int(layers, z)
            reps = 30 if side <= 4 else 8
            row = {"activation": act, "z": [side, side, n],
                   "host_ms": _median_ms(lambda: H.hyper_synthesis_int(layers, z), reps)}
            for form in ("gemm", "conv"):
                fn = jax.jit(lambda zz, f=form: hs_device(layers, zz, f))

                def run():
                    m, s = fn(jnp.asarray(z[None]))
                    return np.asarray(m)[0], np.asarray(s)[0]

                t = time.perf_counter(); m, s = run(); row[f"{form}_first_ms"] = 1e3 * (time.perf_counter() - t)
                row[f"{form}_exact"] = bool(np.array_equal(m, host[0]) and np.array_equal(s, host[1]))
                row[f"{form}_max_diff"] = float(max(np.abs(m - host[0]).max(), np.abs(s - host[1]).max()))
                row[f"{form}_ms"] = _median_ms(run, reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
