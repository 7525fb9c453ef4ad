"""Blocking time of an Orbax save of the train state, replicated over 8 devices (mesh data=8),
with Orbax's default jax.Array handler vs ``train.register_checkpoint_array_handler``.

    python benchmarks/checkpoint_save.py [--saves 3] [--skip_reduced]

The state is what ``train.py`` saves: the trainable params and their Adam state. Each
(model, handler) pair runs in a fresh process, because the cost being measured (one eager
slice op per replica slice, compiled once per shape and process) is a first-save cost that
an in-process cache would hide. Prints one JSON line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from _timing import child_result  # benchmarks/ is this script's sys.path[0]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _one(model_name: str, handler: str, saves: int) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import optax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import tiny
    from fasdiff_jax import sharding, train
    from fasdiff_jax.models import fasdiff

    if model_name == "tiny":
        mcfg = tiny.model_config()
    else:
        from fasdiff_step import reduced_sd21_model_config

        mcfg = reduced_sd21_model_config()
    model = fasdiff.build(mcfg)
    params = fasdiff.FaSDiff.split(model.init_params(jax.random.key(0)))[0]
    mesh = sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    replicated = NamedSharding(mesh, P())
    state = jax.device_put({"params": params, "opt_state": optax.adam(1e-3).init(params)},
                           replicated)
    jax.block_until_ready(state)
    if handler == "fasdiff":
        train.register_checkpoint_array_handler()
    leaves = jax.tree.leaves(state)
    times = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = ocp.StandardCheckpointer()
        for i in range(saves):
            t = time.perf_counter()
            ckpt.save(os.path.join(d, str(i)), state)
            ckpt.wait_until_finished()
            times.append(time.perf_counter() - t)
        ckpt.close()
    return dict(model=model_name, handler=handler, leaves=len(leaves),
                mib=sum(x.nbytes for x in leaves) / 2**20, save_s=[round(t, 3) for t in times])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--skip_reduced", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "HANDLER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(*args.one, args.saves)), flush=True)
        return
    rows = []
    for model_name in ("tiny",) + (() if args.skip_reduced else ("reduced-sd21",)):
        for handler in ("orbax-default", "fasdiff"):
            row = child_result([sys.executable, __file__, "--saves", str(args.saves), "--one",
                                model_name, handler])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| model | handler | leaves | MiB | first save s | later saves s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['handler']} | {r['leaves']} | {r['mib']:.1f} | "
              f"{r['save_s'][0]:.2f} | {', '.join(f'{t:.2f}' for t in r['save_s'][1:])} |")


if __name__ == "__main__":
    main()
