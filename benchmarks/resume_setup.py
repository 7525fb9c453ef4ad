"""What a resume's setup costs before its checkpoint is read: ``train.initial_state`` for a
fresh run (params drawn, ControlNet copied from the UNet, optimizer state initialised and
all of it placed on the mesh; what a resume did until 2026-12-07) vs for a resume (frozen
parts loaded and placed, the trainable state only shapes for the restore).

    python benchmarks/resume_setup.py [--rounds 2] [--skip_reduced]

Mesh data=8 over 8 fake CPU devices (state replicated, as the shipped configs do on a data
mesh), Adam. Each (model, mode) runs in a fresh process, alternating, as a restarted job
would: wall time of the call until its arrays are ready, and the process's peak resident
memory growth over it (on CPU the 8 devices' copies live in host memory). Prints one JSON
line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from _timing import child_result  # benchmarks/ is this script's sys.path[0]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _one(model_name: str, mode: str) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    from configs import tiny
    from fasdiff_jax import sharding, train

    config = tiny.get_config()
    if model_name != "tiny":
        from fasdiff_step import reduced_sd21_model_config

        config.model = reduced_sd21_model_config()
    mesh = sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    model = train.build_model(config.model)
    tc = train.train_settings(config)
    jax.block_until_ready(jax.device_put(jax.numpy.zeros(8)))  # backend up before timing
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    state = train.initial_state(model, tc, mesh, tuple(config.logical_axis_rules), 0,
                                resume=mode == "resume")
    jax.block_until_ready([x for x in jax.tree.leaves((state.params, state.opt_state))
                           if isinstance(x, jax.Array)])
    seconds = time.perf_counter() - t
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    trainable = model.split(state.params)[0]
    return dict(model=model_name, mode=mode, seconds=round(seconds, 2),
                peak_rss_growth_mib=round(grown / 1024, 1),
                trainable_mib=round(sum(x.size * x.dtype.itemsize
                                        for x in jax.tree.leaves(trainable)) / 2**20, 1),
                trainable_is_shapes=all(isinstance(x, jax.ShapeDtypeStruct)
                                        for x in jax.tree.leaves(trainable)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip_reduced", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(*args.one)), flush=True)
        return
    rows = []
    for model_name in ("tiny",) + (() if args.skip_reduced else ("reduced-sd21",)):
        for _ in range(args.rounds):
            for mode in ("fresh", "resume"):
                row = child_result([sys.executable, __file__, "--one", model_name, mode])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| model | setup as | seconds | peak RSS growth MiB | trainable MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['seconds']} | {r['peak_rss_growth_mib']} | "
              f"{r['trainable_mib']} |")


if __name__ == "__main__":
    main()
