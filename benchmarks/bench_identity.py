"""Time dlib's face-recognition ResNet in Flax vs dlib's own C++ implementation (CPU).

    python benchmarks/bench_identity.py [--batch 8] [--repeats 5]

Prints: file parse time, jit compile time, forward ms/chip (ours, batch B), dlib
compute_face_descriptor ms/chip, and forward+backward ms/chip (the identity-loss use).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax.models import identity as idm


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t = time.perf_counter()
    module, params = idm.load_dlib_identity()
    print(f"parse dlib .dat: {time.perf_counter() - t:.2f} s")
    rng = np.random.default_rng(0)
    chips_np = rng.uniform(0, 255, (args.batch, 150, 150, 3)).astype(np.uint8)
    chips = jnp.asarray(chips_np, jnp.float32)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x))
    t = time.perf_counter()
    jax.block_until_ready(fwd(params, chips))
    print(f"forward compile+first run (B={args.batch}): {time.perf_counter() - t:.2f} s")
    s = _best(lambda: fwd(params, chips), args.repeats)
    print(f"ours forward: {1e3 * s / args.batch:.1f} ms/chip (B={args.batch})")

    target = jnp.zeros((args.batch, 128))
    grad = jax.jit(jax.grad(
        lambda p, x: idm.identity_distance(module.apply({"params": p}, x), target).sum(),
        argnums=1))
    jax.block_until_ready(grad(params, chips))
    s = _best(lambda: grad(params, chips), args.repeats)
    print(f"ours forward+backward (grad wrt chips): {1e3 * s / args.batch:.1f} ms/chip")

    try:
        import dlib
    except ImportError:
        return
    rec = dlib.face_recognition_model_v1(idm.default_model_path())
    batch = [np.ascontiguousarray(c) for c in chips_np]
    rec.compute_face_descriptor(batch[0])
    t = time.perf_counter()
    for _ in range(args.repeats):
        for c in batch:
            rec.compute_face_descriptor(c)
    per = (time.perf_counter() - t) / (args.repeats * args.batch)
    print(f"dlib compute_face_descriptor: {1e3 * per:.1f} ms/chip")


if __name__ == "__main__":
    main()
