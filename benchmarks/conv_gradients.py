"""Conv gradients on CPU: XLA's own vs ``layers.conv2d``'s, unrolled and inside a ``lax.scan``.

    python benchmarks/conv_gradients.py [--repeats 5] [--skip_step]

XLA:CPU puts its own conv gradients into canonical form (and YNNPACK kernels) only outside
loops; inside the scan of gradient accumulation (``train.microbatches``) they stay generic
convs. ``layers.conv2d`` writes them as canonical forward convs. Per case: the gradient of two
parts, summed either unrolled or by a 2-step ``lax.scan``, for XLA's own and ours (median ms,
alternating calls), plus the ``dim_labels`` of the compiled loop's convs. Then (unless
``--skip_step``) the mbt2018-mean train step (N=128, M=192, batch 8, 256 px) at 1, 2 and 4
microbatches. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _timing import alternating_medians  # noqa: E402
from fasdiff_jax.models import hyperprior, layers, train_step  # noqa: E402

# (name, part input shape, kernel shape, strides, padding, gradient: "dw" or "dx")
CASES = [
    ("g_a_2 kernel grad, 5x5/2 128->128", (4, 128, 128, 128), (5, 5, 128, 128), (2, 2), ((2, 2), (2, 2)), "dw"),
    ("3x3 128->128 kernel grad", (8, 64, 64, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), "dw"),
    ("3x3 128->128 input grad", (8, 64, 64, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), "dx"),
]


def _grad_fns(conv, strides, pads, which):
    def grad(x, w, dy):
        _, vjp = jax.vjp(lambda x, w: conv(x, w, strides, pads), x, w)
        dx, dw = vjp(dy)
        return dw if which == "dw" else dx

    def unrolled(xs, w, dys):
        return grad(xs[0], w, dys[0]) + grad(xs[1], w, dys[1])

    def scanned(xs, w, dys):
        shape = jax.eval_shape(grad, xs[0], w, dys[0])
        return jax.lax.scan(lambda c, p: (c + grad(p[0], w, p[1]), None),
                            jnp.zeros(shape.shape, shape.dtype), (xs, dys))[0]
    return jax.jit(unrolled), jax.jit(scanned)


def bench_cases(repeats: int) -> list[dict]:
    rows = []
    for name, shape, wshape, strides, pads, which in CASES:
        rng = np.random.default_rng(0)
        xs = jnp.asarray(rng.standard_normal((2,) + shape, np.float32))
        w = jnp.asarray(rng.standard_normal(wshape, np.float32) * 0.05)
        dys = jnp.asarray(rng.standard_normal((2,) + layers._lax_conv(xs[0], w, strides, pads).shape, np.float32))
        fns, labels = {}, {}
        for impl, conv in (("xla", layers._lax_conv), ("ours", layers.conv2d)):
            fns[f"{impl}_unrolled"], fns[f"{impl}_scan"] = _grad_fns(conv, strides, pads, which)
            hlo = fns[f"{impl}_scan"].lower(xs, w, dys).compile().as_text()
            labels[impl] = sorted(set(re.findall(r"dim_labels=([^,\s]+)", hlo)))
        ms = {k: 1e3 * t for k, (t, _) in alternating_medians(
            {k: (lambda f=f: jax.block_until_ready(f(xs, w, dys))) for k, f in fns.items()},
            repeats).items()}
        row = {"case": name, "ms": ms, "scan_dim_labels": labels}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_step(repeats: int) -> dict:
    model = hyperprior.MeanScaleHyperprior(N=128, M=192)
    params = hyperprior.init_params(model, jax.random.key(0), (256, 256))
    opt = optax.adam(1e-4)
    state = opt.init(params)
    batch = jax.random.uniform(jax.random.key(1), (8, 256, 256, 3))
    steps = {}
    for parts in (1, 2, 4):
        step = train_step.make_train_step(
            lambda p, b, r: hyperprior.loss_fn(model, p, b, r, 0.01), lambda p: (p, {}), opt,
            donate=False, microbatches=parts)
        steps[parts] = (lambda step=step: jax.block_until_ready(
            step(params, state, batch, jax.random.key(2))))
    out = {f"microbatches_{k}_s": t for k, (t, _) in alternating_medians(steps, repeats).items()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_step", action="store_true")
    args = ap.parse_args()
    rows = bench_cases(args.repeats)
    print("\n| case | XLA unrolled | XLA in scan | ours unrolled | ours in scan | loop convs (XLA / ours) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        m, lab = r["ms"], r["scan_dim_labels"]
        print(f"| {r['case']} | {m['xla_unrolled']:.0f} ms | {m['xla_scan']:.0f} ms | {m['ours_unrolled']:.0f} ms "
              f"| {m['ours_scan']:.0f} ms | {', '.join(lab['xla'])} / {', '.join(lab['ours'])} |")
    step = {} if args.skip_step else bench_step(max(3, args.repeats // 2))
    if step:
        print("\nhyperprior train step (b8, 256 px): " + ", ".join(
            f"{k.split('_')[1]} part(s) {v:.2f} s" for k, v in step.items()))
    print(json.dumps({"cases": rows, "step": step, "device": jax.devices()[0].device_kind,
                      "jax": jax.__version__}))


if __name__ == "__main__":
    main()
