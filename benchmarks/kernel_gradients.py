"""Conv kernel gradients on CPU: the conv form vs one GEMM, per layer and in whole train steps.

    python benchmarks/kernel_gradients.py [--repeats 5] [--skip_steps]

Per layer shape (batch, map, channels of the hyperprior and of SD UNets):
``layers._kernel_grad_conv`` (dy as a dilated kernel over x, one XLA conv) vs
``layers._kernel_grad_gemm`` (x in space-to-depth form times shifted copies of dy, one dot),
median ms of alternating calls, and which one ``layers._kernel_grad`` picks. Then (unless
``--skip_steps``) whole train steps built twice, with the one-GEMM form allowed (as shipped)
and disallowed (its size threshold set out of reach while the step is traced): the
mbt2018-mean step (N=128, M=192, batch 8, 256 px; also at 2 microbatches, where the gradients
run inside a ``lax.scan``) and the reduced SD-2.1 FaSDiff step (benchmarks/fasdiff_step.py's
shape, batch 1, 256 px).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _timing import alternating_medians, before_and_after  # noqa: E402
from fasdiff_jax.models import hyperprior, layers, train_step  # noqa: E402

# (batch, map side, C in, C out, kernel, stride, padding)
LAYERS = [
    (8, 256, 3, 128, 5, 2, 2), (8, 128, 128, 128, 5, 2, 2), (8, 64, 128, 128, 5, 2, 2),
    (8, 32, 128, 192, 5, 2, 2), (8, 64, 128, 128, 3, 1, 1), (8, 64, 128, 128, 2, 1, 0),
    (8, 128, 128, 3, 3, 1, 1), (8, 16, 192, 128, 3, 1, 1), (8, 64, 320, 320, 3, 1, 1),
    (2, 64, 320, 320, 3, 1, 1), (8, 32, 640, 640, 3, 1, 1), (8, 16, 1280, 1280, 3, 1, 1),
    (8, 64, 4, 320, 3, 1, 1), (8, 32, 320, 320, 3, 2, 1),
]


@contextlib.contextmanager
def conv_form_only():
    """Trace with the one-GEMM kernel gradient out of reach (the code before it existed)."""
    saved = layers._GEMM_KERNEL_GRAD_MIN_AREA
    layers._GEMM_KERNEL_GRAD_MIN_AREA = 1 << 62
    try:
        yield
    finally:
        layers._GEMM_KERNEL_GRAD_MIN_AREA = saved


def per_layer(repeats: int) -> None:
    print("| batch x map, C in -> C out, kernel/stride | conv form ms | one GEMM ms | picked |")
    print("|---|---|---|---|")
    for b, h, cin, cout, k, s, p in LAYERS:
        rng = np.random.default_rng(0)
        x = jax.numpy.asarray(rng.standard_normal((b, h, h, cin)), np.float32)
        ho = (h + 2 * p - k) // s + 1
        dy = jax.numpy.asarray(rng.standard_normal((b, ho, ho, cout)), np.float32)
        args = ((k, k, cin, cout), (s, s), ((p, p), (p, p)))
        fns = {form: jax.jit(lambda x, dy, f=f: f(x, dy, *args)) for form, f in
               (("conv", layers._kernel_grad_conv), ("gemm", layers._kernel_grad_gemm))}
        med = alternating_medians({f: (lambda f=f: fns[f](x, dy).block_until_ready())
                                   for f in fns}, repeats)
        picked = "gemm" if layers._gemm_kernel_grad_pays(dy.shape, *args) else "conv"
        print(f"| {b}x{h}, {cin} -> {cout}, {k}x{k}/{s} | {1e3 * med['conv'][0]:.0f} | "
              f"{1e3 * med['gemm'][0]:.0f} | {picked} |", flush=True)


def fasdiff_step_runner():
    """A call of the reduced SD-2.1 FaSDiff train step (benchmarks/fasdiff_step.py's shape,
    batch 1, 256 px), built (traced) now and compiled at its first call."""
    from configs import tiny
    from fasdiff_jax import train
    from fasdiff_step import reduced_sd21_model_config

    cfg = tiny.get_config()
    cfg.model = reduced_sd21_model_config()
    fd = train.build_model(cfg.model)
    fd_params = fd.init_params(jax.random.key(0))
    faces = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    adam = optax.adam(1e-4)
    s = fd.make_train_step(adam, False)
    carry = [jax.tree.map(lambda a: a.copy(), fd_params), fd.init_opt_state(adam, fd_params)]

    def run():  # the step donates params and state: carry them
        carry[0], carry[1], _ = jax.block_until_ready(
            s(carry[0], carry[1], faces, jax.random.key(1)))
    return run


def steps(repeats: int) -> None:
    rng = np.random.default_rng(0)
    hp = hyperprior.MeanScaleHyperprior(N=128, M=192)
    hp_params = hyperprior.init_params(hp, jax.random.key(0), (256, 256))
    images = jax.numpy.asarray(rng.uniform(size=(8, 256, 256, 3)), np.float32)
    adam = optax.adam(1e-4)

    def mbt(microbatches):
        s = train_step.make_train_step(lambda p, b, r: hyperprior.loss_fn(hp, p, b, r, 0.01),
                                       lambda p: (p, {}), adam, donate=False,
                                       microbatches=microbatches)
        state = adam.init(hp_params)
        return lambda: jax.block_until_ready(s(hp_params, state, images, jax.random.key(1)))

    print("\n| train step | conv form only, s | with one-GEMM kernel gradients, s | speed-up |")
    print("|---|---|---|---|")
    for name, build in (("mbt2018-mean, batch 8, 256 px", lambda: mbt(1)),
                        ("mbt2018-mean, 2 microbatches of 4", lambda: mbt(2)),
                        ("FaSDiff reduced SD-2.1, batch 1, 256 px", fasdiff_step_runner)):
        b, a = before_and_after(build, conv_form_only, repeats)
        print(f"| {name} | {b:.2f} | {a:.2f} | {b / a:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_steps", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus")
    per_layer(args.repeats)
    if not args.skip_steps:
        steps(args.repeats)


if __name__ == "__main__":
    main()
