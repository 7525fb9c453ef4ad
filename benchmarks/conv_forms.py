"""3x3 stride-1 convs on CPU: the forward and input-gradient forms ``layers.conv2d`` picks.

    python benchmarks/conv_forms.py [--repeats 5] [--skip_steps] [--skip_full]

Per layer shape (batch, map, channels of SD UNets at several latent sizes, the hyperprior's
h_s): the forward as XLA's conv (``layers._lax_conv``) vs one GEMM over the taps
(``layers._conv_gemm``); the input gradient as a conv of dy with the flipped, transposed
kernel (``_input_grad_flipped_kernel``), of the flipped dy with the transposed kernel
(``_input_grad_flipped_maps``) or one GEMM reading the kernel in place
(``_input_grad_gemm``); median ms of alternating calls, and which form ``conv2d`` picks.
Then (unless ``--skip_steps``) whole programs built twice, as shipped and with the forms
before these rules (XLA's conv forward, the kernel always flipped), alternating: the reduced
SD-2.1 UNet's fwd+bwd of benchmarks/sd_unet.py (batch 2, 32x32 latents), its forward at
batch 1 (a sampler step's UNet call), the reduced SD-2.1 FaSDiff train step (batch 1,
256 px) and the full SD-2.1 UNet's forward at batch 1, 32x32 latents (FaSDiff's sampler step
at 256 px).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import alternating_medians, before_and_after  # noqa: E402
from fasdiff_jax.models import layers  # noqa: E402

# (batch, map side, C in, C out): 3x3 convs, stride 1
LAYERS = [
    (1, 8, 1280, 1280), (2, 8, 1024, 512), (1, 12, 1280, 1280), (2, 8, 512, 512),
    (1, 16, 1280, 1280), (1, 16, 640, 640), (2, 16, 768, 256), (2, 16, 512, 512),
    (8, 8, 640, 640), (1, 24, 640, 640), (1, 32, 640, 640), (2, 32, 256, 256),
    (2, 32, 128, 128), (1, 48, 320, 320), (8, 16, 192, 128), (8, 64, 128, 128),
]
PADS = ((1, 1), (1, 1))


@contextlib.contextmanager
def forms_before_the_rules():
    """Trace with XLA's conv forward and the kernel always flipped for the input gradient."""
    saved = (layers._GEMM_MAX_POSITIONS, layers._input_grad_stride1)
    layers._GEMM_MAX_POSITIONS = -1
    layers._input_grad_stride1 = layers._input_grad_flipped_kernel
    try:
        yield
    finally:
        layers._GEMM_MAX_POSITIONS, layers._input_grad_stride1 = saved


def _medians_ms(fns: dict, args: tuple, repeats: int) -> dict:
    jitted = {name: jax.jit(f) for name, f in fns.items()}
    med = alternating_medians({name: (lambda f=f: f(*args).block_until_ready())
                               for name, f in jitted.items()}, repeats)
    return {name: 1e3 * m for name, (m, _) in med.items()}


def per_layer(repeats: int) -> None:
    print("| batch x map, C in -> C out | fwd: conv ms | GEMM ms | picked "
          "| dx: kernel flipped ms | maps flipped ms | GEMM ms | picked |")
    print("|---|---|---|---|---|---|---|---|")
    for b, h, cin, cout in LAYERS:
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), np.float32)
        x = jnp.asarray(rng.standard_normal((b, h, h, cin)), np.float32)
        dy = jnp.asarray(rng.standard_normal((b, h, h, cout)), np.float32)
        fwd = _medians_ms({"conv": lambda x, w: layers._lax_conv(x, w, (1, 1), PADS),
                           "gemm": lambda x, w: layers._conv_gemm(x, w, (1, 1), PADS)},
                          (x, w), repeats)
        dx = _medians_ms({form: lambda dy, w, f=getattr(layers, f"_input_grad_{form}"):
                          f(dy, w, PADS) for form in ("flipped_kernel", "flipped_maps", "gemm")},
                         (dy, w), repeats)
        fwd_pick = "gemm" if layers._gemm_conv_pays(b * h * h, w.shape) else "conv"
        if fwd_pick == "gemm":
            dx_pick = "gemm"
        elif layers._flipping_maps_pays(dy.shape, w.shape, (h, h)):
            dx_pick = "maps"
        else:
            dx_pick = "kernel"
        print(f"| {b}x{h}, {cin} -> {cout} | {fwd['conv']:.1f} | {fwd['gemm']:.1f} | {fwd_pick} "
              f"| {dx['flipped_kernel']:.1f} | {dx['flipped_maps']:.1f} | {dx['gemm']:.1f} "
              f"| {dx_pick} |", flush=True)


def unet_runner(batch: int, backward: bool, full: bool = False):
    """benchmarks/sd_unet.py's reduced (or ``full``) SD-2.1 UNet at 32x32 latents (random
    init: the weights do not change the work), its forward or fwd+bwd of a mean-square loss."""
    from flax import linen as nn

    from fasdiff_jax.models.sd.unet import UNet2DConditionModel
    from sd_unet import REDUCED, SD21

    module = UNet2DConditionModel.from_diffusers_config(dict(SD21 if full else REDUCED))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 4)), np.float32)
    t = jnp.asarray([10, 800][:batch])
    ctx = jnp.asarray(rng.standard_normal((batch, 77, 1024)), np.float32)
    params = nn.unbox(module.init(jax.random.key(0), x, t, ctx)["params"])
    out = lambda p: module.apply({"params": p}, x, t, ctx)  # noqa: E731
    fn = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(out(p)))) if backward else out)
    return lambda: jax.block_until_ready(fn(params))


def steps(repeats: int, full: bool) -> None:
    from kernel_gradients import fasdiff_step_runner

    programs = [("SD UNet reduced SD-2.1 fwd+bwd, batch 2, 32x32", lambda: unet_runner(2, True)),
                ("SD UNet reduced SD-2.1 forward, batch 1, 32x32", lambda: unet_runner(1, False)),
                ("FaSDiff reduced SD-2.1 train step, batch 1, 256 px", fasdiff_step_runner)]
    if full:  # what a sampler step of FaSDiff's decoder calls at 256 px
        programs.append(("SD UNet full SD-2.1 forward, batch 1, 32x32",
                         lambda: unet_runner(1, False, full=True)))
    print("\n| program | forms before the rules, s | as shipped, s | speed-up |")
    print("|---|---|---|---|")
    for name, build in programs:
        b, a = before_and_after(build, forms_before_the_rules, repeats)
        print(f"| {name} | {b:.3f} | {a:.3f} | {b / a:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_steps", action="store_true")
    ap.add_argument("--skip_full", action="store_true",
                    help="leave out the full SD-2.1 UNet (866M params: 3.5 GB a copy, two copies)")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus")
    per_layer(args.repeats)
    if not args.skip_steps:
        steps(args.repeats, not args.skip_full)


if __name__ == "__main__":
    main()
