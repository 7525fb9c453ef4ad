"""The train step with and without the params gathered over the batch axes, per mesh.

python benchmarks/param_gather.py [--repeats 5] [--meshes 8x1x1,1x8x1,4x2x1,2x2x2,1x2x4,2x1x4]
python benchmarks/param_gather.py --memory --meshes 1x8x1,2x2x2

configs/tiny.py's FaSDiff train step (batch 8, 64 px, SGD with rate 1 so the update is the
gradient) on 8 fake CPU devices, each mesh (data x fsdp x tensor) built twice: as before
(``gather_params_over=()``: XLA chooses how to use params split over fsdp) and gathered over
the batch axes data and fsdp (what the train loop does where ``train.params_gathered_over``
says so). Reports each step's median time
(the two alternate, :func:`_timing.alternating_medians`) and the relative error of each
trainable component's update against data=8 without gathering (params replicated there, so
the gathering changes nothing in that program). CPU only: on TPU/GPU the collectives cost
differently, so the times say little about pods; the errors are what this is for.

``--memory``: the reduced SD-2.1 config's train step (benchmarks/fasdiff_step.py, 256 px,
batch 8, Adam) compiled both ways for each mesh, from shapes only; reports XLA's memory
analysis per device (arguments, temporaries).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from _timing import alternating_medians  # noqa: E402
from configs import tiny  # noqa: E402
from fasdiff_jax import sharding, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meshes", default="8x1x1,1x8x1,4x2x1,2x2x2,1x2x4,2x1x4")
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    if args.memory:
        return memory(args.meshes)
    cfg = tiny.get_config()
    model = train.build_model(cfg.model)
    params = jax.device_get(model.init_params(jax.random.key(0)))  # host: steps donate theirs
    rules = tuple(cfg.logical_axis_rules)
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    sgd = optax.sgd(1.0)
    devices = np.array(jax.devices())
    batch_axes = ("data", "fsdp")

    def program(shape, gather):
        mesh = Mesh(devices.reshape(shape), ("data", "fsdp", "tensor"))
        p_sh = train.param_shardings(model, params, mesh, rules)
        step = model.make_train_step(sgd, False, mesh=mesh, param_shardings=p_sh,
                                     gather_params_over=batch_axes if gather else ())
        p = jax.device_put(params, p_sh)
        state = [p, sgd.init(model.split(p)[0])]
        batch = jax.device_put(images, sharding.batch_sharding(mesh, 4, batch_axes))
        rng = jax.random.key(1)

        def run():  # the step donates params and state: carry them
            state[0], state[1], _ = jax.block_until_ready(step(*state, batch, rng))

        state[0], state[1], _ = step(*state, batch, rng)
        return run, jax.device_get(state[0])

    def updates(new):
        tr, _ = model.split(new)
        old, _ = model.split(params)
        return {c: np.concatenate([np.ravel(np.asarray(a) - b) for a, b in
                                   zip(jax.tree.leaves(tr[c]), jax.tree.leaves(old[c]))])
                for c in tr}

    want = updates(program((8, 1, 1), False)[1])
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{len(devices)} (fake)")
    print("| mesh (data x fsdp x tensor) | step ms, as before | step ms, gathered | "
          "update error as before (compressor / controlnet / hlfe) | gathered |")
    print("|---|---|---|---|---|")
    for text in args.meshes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        runs, errs = {}, {}
        for gather in (False, True):
            runs[gather], new = program(shape, gather)
            got = updates(new)
            errs[gather] = " / ".join(f"{np.linalg.norm(got[c] - want[c]) / np.linalg.norm(want[c]):.1e}"
                                      for c in want)
        med = alternating_medians(runs, args.repeats)
        print(f"| {text} | {1e3 * med[False][0]:.0f} | {1e3 * med[True][0]:.0f} | "
              f"{errs[False]} | {errs[True]} |", flush=True)


def memory(meshes: str) -> None:
    from fasdiff_step import reduced_sd21_model_config

    cfg = tiny.get_config()
    cfg.model = reduced_sd21_model_config()
    model = train.build_model(cfg.model)
    frozen = model.frozen_params(jax.random.key(0))
    shapes = {**model.trainable_shapes(),
              **jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)}
    del frozen
    adam = optax.adam(1e-4)
    opt_shapes = jax.eval_shape(lambda p: adam.init(model.split(p)[0]), shapes)

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    print("| mesh | arguments MiB | temporaries MiB, as before | gathered | compile s (before / gathered) |")
    print("|---|---|---|---|---|")
    for text in meshes.split(","):
        mesh = Mesh(np.array(jax.devices()).reshape(tuple(int(v) for v in text.split("x"))),
                    ("data", "fsdp", "tensor"))
        p_sh = train.param_shardings(model, shapes, mesh, tuple(cfg.logical_axis_rules))
        o_sh = train._opt_shardings(adam, opt_shapes, model.split(p_sh)[0], mesh)
        batch = jax.ShapeDtypeStruct((8, 256, 256, 3), np.uint8,
                                     sharding=sharding.batch_sharding(mesh, 4))
        rng = jax.eval_shape(lambda: jax.random.key(1))
        got = {}
        for gather in (False, True):
            step = model.make_train_step(adam, False, mesh=mesh, param_shardings=p_sh,
                                         opt_shardings=o_sh,
                                         gather_params_over=("data", "fsdp") if gather else ())
            t0 = time.perf_counter()
            compiled = step.lower(placed(shapes, p_sh), placed(opt_shapes, o_sh), batch,
                                  rng).compile()
            got[gather] = (compiled.memory_analysis(), time.perf_counter() - t0)
        mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        print(f"| {text} | {mib(got[True][0].argument_size_in_bytes)} | "
              f"{mib(got[False][0].temp_size_in_bytes)} | {mib(got[True][0].temp_size_in_bytes)} | "
              f"{got[False][1]:.0f} / {got[True][1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
