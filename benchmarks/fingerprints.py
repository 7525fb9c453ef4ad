"""What naming the weights costs at every codec/evaluate start: FaSDiff's file fingerprint
(scheme 2, per-array sha256 on a thread pool, vs scheme 1, one blake2b stream, still computed
for old files) and ``convert.sd_fingerprint`` of a converted SD folder (hashing every byte vs
reading the memo a previous command left).

    python benchmarks/fingerprints.py [--repeats 3] [--sd_gb 1.0]

The FaSDiff part builds the reduced SD-2.1-shaped model of ``benchmarks/fasdiff_step.py``
(random weights, 227M params, 0.85 GB fingerprinted). The SD-folder part writes a folder of
``--sd_gb`` GB of random bytes laid out like a converted SD folder (in a temporary folder)
and times ``sd_fingerprint`` in fresh processes: the first hashes, the later ones read the
memo. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]


def fasdiff_fingerprints(repeats: int) -> dict:
    import jax

    from fasdiff_jax.models import fasdiff
    from fasdiff_step import reduced_sd21_model_config

    model = fasdiff.build(reduced_sd21_model_config())
    params = model.init_params(jax.random.key(0))
    model.fingerprint(params)  # the compressor's coder and tables, outside the timing
    nbytes = sum(4 * x.size for name in fasdiff.FINGERPRINTED for x in jax.tree.leaves(params[name]))
    times: dict[str, list[float]] = {"scheme2_s": [], "scheme1_s": []}
    for _ in range(repeats):
        model._cache.pop("prep", None)
        model._cache.pop("fp1", None)
        t = time.perf_counter()
        model.fingerprint(params)
        times["scheme2_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        model._first_fingerprint(params)
        times["scheme1_s"].append(time.perf_counter() - t)
    return {"what": "fasdiff_fingerprint", "gb": nbytes / 1e9,
            **{k: statistics.median(v) for k, v in times.items()},
            "runs": {k: [round(x, 3) for x in v] for k, v in times.items()}}


_TIME_SD = """
import sys, time
t = time.perf_counter()
from fasdiff_jax import convert
t = time.perf_counter(); convert.sd_fingerprint(sys.argv[1]); print(time.perf_counter() - t)
"""


def sd_folder_fingerprints(gb: float, repeats: int) -> dict:
    import numpy as np

    from fasdiff_jax import convert

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "sd")
        shares = {"unet/config.json": 0.0, f"unet/{convert.PARAMS_FILE}": 0.9,
                  "vae/config.json": 0.0, f"vae/{convert.PARAMS_FILE}": 0.1,
                  convert.NULL_TEXT_FILE: 0.0}
        rng = np.random.default_rng(0)
        for rel, share in shares.items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                left = max(int(share * gb * 1e9), 1000)
                while left:
                    n = min(left, 1 << 26)
                    f.write(rng.bytes(n))
                    left -= n
        env = dict(os.environ, FASDIFF_CACHE=os.path.join(tmp, "cache"))
        runs = [float(subprocess.run([sys.executable, "-c", _TIME_SD, folder], env=env,
                                     cwd=ROOT, check=True, capture_output=True,
                                     text=True).stdout.split()[-1])
                for _ in range(1 + repeats)]
    return {"what": "sd_fingerprint", "gb": gb, "hash_s": runs[0],
            "memo_s": statistics.median(runs[1:]), "runs": [round(r, 4) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sd_gb", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(fasdiff_fingerprints(args.repeats)), flush=True)
    print(json.dumps(sd_folder_fingerprints(args.sd_gb, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
