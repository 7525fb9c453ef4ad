"""FaSDiff coding throughput: images / files one at a time vs ``compress_batch`` and
``decompress_batch`` (what ``codec compress|decompress --batch_size`` runs): same images, same
model, after compilation.

    python benchmarks/batched_coding.py [--files 8] [--batches 1,2,4,8] [--repeats 3] [--reduced]
    JAX_PLATFORMS=cuda python benchmarks/batched_coding.py --reduced      # on a GPU

``tiny``: configs/tiny.py (64 px, 4 DDIM steps); ``--reduced``: the reduced SD-2.1 shape of
benchmarks/fasdiff_step.py (256 px). Random weights (decode time does not depend on their
values); faces cut from skimage's astronaut at the model's size, each file its own seed.
Prints a JSON line per mode and batch size: seconds per file (median of ``--repeats`` passes
over the files); for compress, how many files differ from the ones written alone; for
decompress, the largest pixel difference from decoding each file alone.
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
import numpy as np  # noqa: E402
from skimage import data as skdata  # noqa: E402

from configs import tiny  # noqa: E402
from fasdiff_jax.coding import container as ct  # noqa: E402
from fasdiff_jax.models import fasdiff  # noqa: E402


def _per_file_seconds(fn, n_files: int, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / n_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: config's)")
    ap.add_argument("--reduced", action="store_true", help="the reduced SD-2.1 model, 256 px")
    args = ap.parse_args()
    if args.reduced:
        from benchmarks.fasdiff_step import reduced_sd21_model_config

        mcfg = reduced_sd21_model_config()
    else:
        mcfg = tiny.model_config()
    mcfg.loss = dict(mcfg.loss, identity=0.0, lpips=0.0)  # coding needs no loss networks
    model = fasdiff.build(mcfg)
    params = jax.device_put(model.init_params(jax.random.key(0)))
    size = int(mcfg.image_size)
    photo = np.asarray(jax.image.resize(skdata.astronaut(), (2 * size, 2 * size, 3), "linear"),
                       np.uint8)
    faces = [photo[i * size // 8:][:size, i * size // 8:][:, :size] for i in range(args.files)]
    files = [model.compress(params, face, steps=args.steps, seed=i) for i, face in enumerate(faces)]
    alone = [model.decompress(params, f) for f in files]
    info = dict(model="reduced-sd21" if args.reduced else "tiny", px=size,
                steps=model.sampler_spec(args.steps).steps, files=args.files,
                device=jax.devices()[0].device_kind, backend=jax.default_backend())
    batches = [int(x) for x in args.batches.split(",")]

    def compress_alone() -> list[bytes]:
        return [model.compress(params, face, steps=args.steps, seed=i)
                for i, face in enumerate(faces)]

    one = _per_file_seconds(compress_alone, len(files), args.repeats)
    print(json.dumps(dict(info, batch=1, mode="compress", s_per_file=round(one, 4))), flush=True)
    for b in batches:
        def run_compress(b=b) -> list[bytes]:  # each batch's files share a seed: fine for timing
            return [data for i in range(0, len(faces), b)
                    for data in model.compress_batch(params, faces[i:i + b], steps=args.steps,
                                                     seed=i)]
        sec = _per_file_seconds(run_compress, len(files), args.repeats)
        differ = sum(len(x) != len(y) or ct.unpack(x).streams != ct.unpack(y).streams
                     for x, y in zip(run_compress(), files))
        print(json.dumps(dict(info, batch=b, mode="compress_batch", s_per_file=round(sec, 4),
                              speedup=round(one / sec, 2), streams_differing_from_alone=differ)),
              flush=True)
    one = _per_file_seconds(lambda: [model.decompress(params, f) for f in files], len(files),
                            args.repeats)
    print(json.dumps(dict(info, batch=1, mode="decompress", s_per_file=round(one, 4))), flush=True)
    for b in batches:
        def run(b=b):
            return [img for i in range(0, len(files), b)
                    for img in model.decompress_batch(params, files[i:i + b])]
        sec = _per_file_seconds(run, len(files), args.repeats)
        diff = max(int(np.abs(x.astype(int) - y).max()) for x, y in zip(run(), alone))
        print(json.dumps(dict(info, batch=b, mode="decompress_batch", s_per_file=round(sec, 4),
                              speedup=round(one / sec, 2), max_abs_diff_vs_alone=diff)),
              flush=True)


if __name__ == "__main__":
    main()
