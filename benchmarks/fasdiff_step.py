"""FaSDiff train-step cost (time, XLA FLOPs, compiled memory) and decode time vs sampler steps.

    python benchmarks/fasdiff_step.py [--repeats 3] [--skip_reduced] [--ema_decay 0.9999]
    JAX_PLATFORMS=cuda python benchmarks/fasdiff_step.py --skip_tiny --reduced_batch 8   # GPU

Configs: ``tiny`` (configs/tiny.py, 64 px, batch 8) and ``reduced-sd21``: SD-2.1-base-shaped
UNet at reduced width (block_out_channels (128, 256, 512, 512), 64-dim heads, linear
projection, cross-attention dim 1024, 77 null-text tokens, v-prediction), an SD-shaped VAE
at reduced width (32, 64, 128, 128), 256 px images, batch 1; random frozen SD weights.
``--ema_decay``: each train step is also timed with the trainable params' moving average in
the optimizer state (``train.with_params_ema``), right after the one without.
Prints one JSON line per measurement (and a table at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import tiny  # noqa: E402
from fasdiff_jax import train  # noqa: E402
from fasdiff_jax.models import fasdiff  # noqa: E402


def reduced_sd21_model_config():
    m = tiny.model_config()
    m.image_size = 256
    m.text_length = 77
    m.unet = dict(_class_name="UNet2DConditionModel", sample_size=32, in_channels=4,
                  out_channels=4, block_out_channels=(128, 256, 512, 512),
                  attention_head_dim=[2, 4, 8, 8], use_linear_projection=True,
                  cross_attention_dim=1024, layers_per_block=2, norm_num_groups=32)
    m.vae = dict(_class_name="AutoencoderKL", block_out_channels=(32, 64, 128, 128),
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, sample_size=256)
    m.scheduler = dict(m.scheduler, prediction_type="v_prediction")
    m.compressor = dict(N=128, M=192, num_scales=64, prompt_channels=64, dwt_levels=3, groups=32)
    m.hlfe = dict(features=64, num_blocks=2, heads=4, groups=32, dwt_levels=1)
    m.control = dict(embedding_channels=(32, 64), conditioning_scale=1.0)
    return m


def _median(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def bench_train(name, mcfg, batch, repeats, x0_terms, ema_decay=0.0):
    model = fasdiff.build(mcfg)
    t = time.perf_counter()
    params = model.init_params(jax.random.key(0))
    init_s = time.perf_counter() - t
    opt = optax.adam(1e-4)
    if ema_decay:
        opt = train.with_params_ema(opt, ema_decay)
    opt_state = model.init_opt_state(opt, params)
    size = mcfg.image_size
    imgs = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)), jnp.uint8)
    step = model.make_train_step(opt, x0_terms)
    t = time.perf_counter()
    compiled = step.lower(params, opt_state, {"image": imgs}, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    state = {"p": params, "o": opt_state}

    def run():
        state["p"], state["o"], m = compiled(state["p"], state["o"], {"image": imgs},
                                             jax.random.key(2))
        jax.block_until_ready(m)

    med, runs = _median(run, repeats)
    n_params = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in params.items()}
    out = dict(config=name, batch=batch, image=size, x0_terms=x0_terms, ema_decay=ema_decay,
               step_s=med,
               runs_s=[round(r, 3) for r in runs], images_per_s=batch / med,
               compile_s=compile_s, init_s=init_s, gflop_per_step=cost.get("flops", 0) / 1e9,
               temp_mib=mem.temp_size_in_bytes / 2**20,
               argument_mib=mem.argument_size_in_bytes / 2**20,
               output_mib=mem.output_size_in_bytes / 2**20, params=n_params)
    print(json.dumps(out), flush=True)
    return model, state["p"], out


def bench_decode(model, params, steps_list, repeats):
    face = np.random.default_rng(0).integers(0, 256, (model.cfg["image_size"],) * 2 + (3,),
                                             dtype=np.uint8)
    rows = []
    for steps in steps_list:
        data = model.compress(params, face, steps=steps)
        t = time.perf_counter()
        model.decompress(params, data)
        first = time.perf_counter() - t
        med, runs = _median(lambda: model.decompress(params, data), repeats)
        row = dict(decode_steps=steps, decode_s=med, first_call_s=first, bytes=len(data))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_reduced", action="store_true")
    ap.add_argument("--skip_tiny", action="store_true")
    ap.add_argument("--reduced_batch", type=int, default=1)
    ap.add_argument("--ema_decay", type=float, default=0.0,
                    help="also time each train step with a moving average of the params")
    args = ap.parse_args()
    emas = (0.0, args.ema_decay) if args.ema_decay else (0.0,)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; cpus {os.cpu_count()}; "
          f"load {os.getloadavg()}", flush=True)
    results, dec = [], []
    if not args.skip_tiny:
        model, params, r = bench_train("tiny", tiny.model_config(), 8, args.repeats, False)
        results.append(r)
        results += [bench_train("tiny", tiny.model_config(), 8, args.repeats, False, e)[2]
                    for e in emas[1:]]
        for e in emas:
            results.append(bench_train("tiny", tiny.model_config(), 8, args.repeats, True, e)[2])
        dec = bench_decode(model, params, (1, 4, 16), args.repeats)
    if not args.skip_reduced:
        mcfg = reduced_sd21_model_config()
        mcfg.loss = dict(mcfg.loss, identity=0.0, lpips=0.0)
        for e in emas:
            results.append(bench_train("reduced-sd21", mcfg, args.reduced_batch, args.repeats,
                                       False, e)[2])
    print("\n| config | batch | px | x0 terms | EMA | step s | img/s | compile s | GFLOP/step "
          "| temp MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['batch']} | {r['image']} | {r['x0_terms']} "
              f"| {r['ema_decay'] or '-'} | {r['step_s']:.3f} "
              f"| {r['images_per_s']:.1f} | {r['compile_s']:.0f} | {r['gflop_per_step']:.1f} "
              f"| {r['temp_mib']:.0f} |")
    print("\n| sampler steps | decode s (tiny, 64 px) | file bytes |")
    print("|---|---|---|")
    for d in dec:
        print(f"| {d['decode_steps']} | {d['decode_s']:.3f} | {d['bytes']} |")
    print(f"load at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
