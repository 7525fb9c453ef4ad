"""Can the integer h_s run exactly on the accelerator? float64 XLA vs the host's numpy.

    python benchmarks/hs_device_probe.py [--params DIR/params.npz]

The host integer h_s (``hyperprior.hyper_synthesis_int``) is exact because float64 products
and sums of integers below 2**53 are exact in any order. The same arithmetic as an XLA
program (``jax_enable_x64``) in two forms: im2col + dot (a float64 GEMM; ``hyperprior.DeviceHs``,
which the codec uses on GPUs) and ``conv_general_dilated`` (whatever convolution algorithm the
backend picks; an FFT or Winograd one would not be exact). Reports, per latent size, whether each form equals the host
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


def hs_conv(layers, z):
    """The integer h_s with ``conv_general_dilated`` for its convolutions (the rejected form)."""
    a = jnp.clip(z, -H.Z_CLIP, H.Z_CLIP - 1) * 2.0**H.A_FRAC
    conv = lambda a, k, ph, pw: jax.lax.conv_general_dilated(  # noqa: E731
        a[None], jnp.asarray(k), (1, 1), (tuple(ph), tuple(pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)[0]
    for l in layers:
        if l.upsample:
            acc = H._interleave_phases([conv(a, k, ph, pw) for _, k, (ph, pw) in l.phases], jnp)
        else:
            acc = conv(a, l.kernel, (1, 1), (1, 1))
        a = H._requantise(acc, l.bias, l.activation, jnp)
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
    ap.add_argument("--sides", default="4,16,32", help="latent sides (x64 = image side in px)")
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
        for side in map(int, a.sides.split(",")):
            z = np.random.default_rng(side).integers(-8, 9, (side, side, n)).astype(np.float64)
            host = H.hyper_synthesis_int(layers, z)
            reps = 30 if side <= 4 else 8
            row = {"activation": act, "z": [side, side, n],
                   "host_ms": _median_ms(lambda: H.hyper_synthesis_int(layers, z), reps)}
            conv_fn = jax.jit(lambda zz: hs_conv(layers, zz))
            forms = {"gemm": H.DeviceHs(layers),  # what the codec uses (im2col + GEMM)
                     "conv": lambda zz: tuple(np.asarray(v).astype(np.int64) for v in conv_fn(zz))}
            for form, fn in forms.items():
                def run(fn=fn):
                    with jax.enable_x64(True):
                        return fn(z)

                t = time.perf_counter(); m, s = run(); row[f"{form}_first_ms"] = 1e3 * (time.perf_counter() - t)
                row[f"{form}_exact"] = bool(np.array_equal(m, host[0]) and np.array_equal(s, host[1]))
                row[f"{form}_max_diff"] = float(max(np.abs(m - host[0]).max(), np.abs(s - host[1]).max()))
                row[f"{form}_ms"] = _median_ms(run, reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
