"""Flax SD UNet vs diffusers' PyTorch UNet on this CPU, with the same weights, in one run.

Reduced SD-2.1-shaped UNet: block_out_channels (128, 256, 512, 512), 64-dim heads
(heads = channels // 64 -> diffusers attention_head_dim [2, 4, 8, 8]), linear projection,
cross-attention dim 1024, batch 2, 32x32 latents, 77 tokens, float32. Reports forward and
forward+backward (grad of a mean-square loss w.r.t. all params) medians and the ratio, a
conv-vs-attention micro breakdown, and the full SD-2.1 UNet's parameter count and FLOPs per
train step from XLA's cost analysis (abstract shapes only: no full-size weights built).

    python benchmarks/sd_unet.py [--repeats 5] [--skip_full] [--compile_full]
    python benchmarks/sd_unet.py --skip_full --attention_impls xla,xla_autodiff   # A/B
    JAX_PLATFORMS=cuda python benchmarks/sd_unet.py --torch_device cuda --skip_full   # GPU

``--attention_impls`` (names in ``layers.ATTENTION_IMPLEMENTATIONS``) times our fwd+bwd once
per implementation, alternating calls in one process (this VM's speed drifts over minutes).

On a GPU both run there in float32 with each framework's default matmul/conv precision
(TF32 on Ampere and later for JAX's convs and dots, and for torch's convs); timings
synchronise the device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _timing import alternating_medians  # noqa: E402
from fasdiff_jax.convert import load_diffusers  # noqa: E402
from fasdiff_jax.models import layers  # noqa: E402
from fasdiff_jax.models.sd.unet import UNet2DConditionModel  # noqa: E402

REDUCED = dict(sample_size=32, in_channels=4, out_channels=4,
               block_out_channels=(128, 256, 512, 512), attention_head_dim=[2, 4, 8, 8],
               use_linear_projection=True, cross_attention_dim=1024, layers_per_block=2,
               norm_num_groups=32)
SD21 = dict(sample_size=96, in_channels=4, out_channels=4,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True, cross_attention_dim=1024, layers_per_block=2,
            upcast_attention=True, norm_num_groups=32)


DEV = torch.device("cpu")


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (and compilation for jax)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_unet(repeats: int, impls: list[str]) -> dict:
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    tmodel = TorchUNet(**REDUCED).eval()
    with torch.no_grad():
        for p in tmodel.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d, safe_serialization=True)
        module, params = load_diffusers(d)
    n_params = sum(p.numel() for p in tmodel.parameters())
    tmodel.to(DEV)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([10, 800])
    ctx = torch.randn(2, 77, 1024, generator=g)
    xj, tj, cj = jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    x, t, ctx = x.to(DEV), t.to(DEV), ctx.to(DEV)

    def t_fwd():
        with torch.no_grad():
            return tmodel(x, t, ctx).sample

    def t_fwd_bwd():
        tmodel.zero_grad(set_to_none=True)
        loss = tmodel(x, t, ctx).sample.square().mean()
        loss.backward()
        return loss

    fwd = jax.jit(lambda p, a, b, c: module.apply({"params": p}, a, b, c))
    def grad_fn(impl: str):
        m = module.clone(attention_impl=impl)
        return jax.jit(jax.grad(lambda p, a, b, c: jnp.mean(jnp.square(m.apply({"params": p}, a, b, c)))))

    ref = t_fwd().permute(0, 2, 3, 1).cpu().numpy()
    err = float(np.abs(np.asarray(fwd(params, xj, tj, cj)) - ref).max() / np.abs(ref).max())

    res = {"params": n_params, "rel_err": err}
    res["torch_fwd"], res["torch_fwd_all"] = median_time(t_fwd, repeats)
    res["jax_fwd"], res["jax_fwd_all"] = median_time(
        lambda: fwd(params, xj, tj, cj).block_until_ready(), repeats)
    res["torch_fwd_bwd"], res["torch_fwd_bwd_all"] = median_time(t_fwd_bwd, repeats)
    grads = {impl: grad_fn(impl) for impl in impls}
    timed = alternating_medians(
        {impl: (lambda g=g: jax.block_until_ready(g(params, xj, tj, cj))) for impl, g in grads.items()},
        repeats)
    res["jax_fwd_bwd"], res["jax_fwd_bwd_all"] = timed[impls[0]]
    res["jax_fwd_bwd_by_impl"] = timed
    return res


def bench_parts(repeats: int, impls: list[str]) -> dict:
    """fwd+bwd of the first block's two costliest ops: a 3x3 conv and self-attention."""
    out = {}
    rng = np.random.default_rng(0)
    # 3x3 conv, 128 -> 128 channels at 32x32, batch 2
    xc = rng.normal(size=(2, 128, 32, 32)).astype(np.float32)
    wc = (rng.normal(size=(128, 128, 3, 3)) * 0.02).astype(np.float32)
    xt, wt = torch.tensor(xc, device=DEV, requires_grad=True), torch.tensor(wc, device=DEV, requires_grad=True)

    def t_conv():
        y = torch.nn.functional.conv2d(xt, wt, padding=1)
        y.square().mean().backward()

    xj, wj = jnp.asarray(xc.transpose(0, 2, 3, 1)), jnp.asarray(wc.transpose(2, 3, 1, 0))
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    j_conv = jax.jit(jax.grad(lambda x, w: jnp.mean(jnp.square(conv(x, w))), argnums=(0, 1)))
    out["conv_torch"], _ = median_time(t_conv, repeats)
    out["conv_jax"], _ = median_time(lambda: jax.block_until_ready(j_conv(xj, wj)), repeats)
    # self-attention over 1024 tokens, 2 heads of 64
    q = rng.normal(size=(2, 1024, 128)).astype(np.float32)
    qt = torch.tensor(q, device=DEV, requires_grad=True)

    def t_attn():
        a = qt.view(2, 1024, 2, 64).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(a, a, a)
        y.square().mean().backward()

    qj = jnp.asarray(q)
    j_attn = {impl: jax.jit(jax.grad(lambda a, impl=impl: jnp.mean(jnp.square(
        layers.attention(a, a, a, 2, impl=impl))))) for impl in impls}
    out["attn_torch"], _ = median_time(t_attn, repeats)
    timed = alternating_medians(
        {impl: (lambda f=f: jax.block_until_ready(f(qj))) for impl, f in j_attn.items()}, repeats)
    out["attn_jax"] = timed[impls[0]][0]
    out["attn_jax_by_impl"] = {impl: t for impl, (t, _) in timed.items()}
    return out


def full_sd21_cost(compile_full: bool) -> dict:
    cfg = dict(SD21)
    module = UNet2DConditionModel.from_diffusers_config(cfg)
    x = jax.ShapeDtypeStruct((1, 96, 96, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    c = jax.ShapeDtypeStruct((1, 77, 1024), jnp.float32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape),
                                                  jnp.zeros(t.shape, jnp.int32),
                                                  jnp.zeros(c.shape))["params"])
    from flax import linen as nn

    abstract = nn.unbox(abstract)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))

    def step(p, a, b, cc):
        return jax.value_and_grad(
            lambda q: jnp.mean(jnp.square(module.apply({"params": q}, a, b, cc))))(p)

    lowered = jax.jit(step).lower(abstract, x, t, c)
    res = {"params": n_params}
    t0 = time.perf_counter()
    if compile_full:
        cost = lowered.compile().cost_analysis()
        res["source"] = "compiled HLO (jit(...).lower(...).compile().cost_analysis())"
    else:
        cost = lowered.cost_analysis()
        res["source"] = "lowered HLO (jit(...).lower(...).cost_analysis())"
    res["analysis_s"] = time.perf_counter() - t0
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    res["flops"] = float(cost["flops"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_full", action="store_true")
    ap.add_argument("--compile_full", action="store_true")
    ap.add_argument("--torch_device", default="cpu", help="cpu or cuda")
    ap.add_argument("--attention_impls", default="xla",
                    help="comma-separated layers.ATTENTION_IMPLEMENTATIONS names; the first is "
                         "the one compared with torch")
    args = ap.parse_args()
    impls = args.attention_impls.split(",")
    unknown = sorted(set(impls) - set(layers.ATTENTION_IMPLEMENTATIONS))
    if unknown:
        ap.error(f"unknown attention implementations {unknown}; "
                 f"choose from {sorted(layers.ATTENTION_IMPLEMENTATIONS)}")
    global DEV
    DEV = torch.device(args.torch_device)
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
          f"{torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu'}, "
          f"threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    r = bench_unet(args.repeats, impls)
    fmt = lambda xs: ", ".join(f"{v:.3f}" for v in xs)  # noqa: E731
    print(f"reduced SD-2.1 UNet: {r['params'] / 1e6:.1f}M params, jax vs torch rel err {r['rel_err']:.2e}")
    for k in ("fwd", "fwd_bwd"):
        print(f"  {k:8s} torch {r['torch_' + k]:.3f}s  jax {r['jax_' + k]:.3f}s  "
              f"speed-up torch/jax {r['torch_' + k] / r['jax_' + k]:.2f}x")
        print(f"           torch runs [{fmt(r['torch_' + k + '_all'])}] jax runs [{fmt(r['jax_' + k + '_all'])}]")
    if len(impls) > 1:
        for impl, (t, ts) in r["jax_fwd_bwd_by_impl"].items():
            print(f"  fwd_bwd  jax attention={impl}: {t:.3f}s [{fmt(ts)}]")
    p = bench_parts(args.repeats, impls)
    print(f"  3x3 conv fwd+bwd (2x128x32x32): torch {p['conv_torch'] * 1e3:.1f}ms jax {p['conv_jax'] * 1e3:.1f}ms")
    print(f"  attention fwd+bwd (2x1024 tok, 2x64): torch {p['attn_torch'] * 1e3:.1f}ms "
          + " ".join(f"jax[{impl}] {t * 1e3:.1f}ms" for impl, t in p["attn_jax_by_impl"].items()))
    if not args.skip_full:
        f = full_sd21_cost(args.compile_full)
        print(f"full SD-2.1 UNet: {f['params'] / 1e6:.1f}M params; train step (batch 1, 96x96 "
              f"latents, 77 tokens, fwd+bwd) {f['flops'] / 1e12:.2f} TFLOP from {f['source']} "
              f"({f['analysis_s']:.0f}s)")


if __name__ == "__main__":
    main()
