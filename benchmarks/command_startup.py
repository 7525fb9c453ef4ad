"""Wall time of whole ``codec`` commands (fresh processes) without and with the persistent
compilation cache (``fasdiff_jax/compile_cache.py``).

    python benchmarks/command_startup.py --workdir=RUN [--images=8] [--rounds=2]

Trains nothing: give a workdir (e.g. ``python -m fasdiff_jax.main --config=configs/tiny.py
--workdir=/tmp/t --config.train.steps=2``). Per round, each of compress (``--images`` crops of
scikit-image's astronaut, 200x200, one ``--out_dir`` run) and decompress runs as a new process
with ``--compile_cache=none``, then twice with a fresh cache folder (the first run fills it,
the second loads from it). Checks that all three runs write the same bytes. Prints one JSON
line per round and the medians.
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

import numpy as np
from PIL import Image
from skimage import data as skdata


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fasdiff_jax.codec", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _tree_bytes(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def one_round(workdir: str, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        faces = os.path.join(tmp, "faces")
        os.makedirs(faces)
        photo = skdata.astronaut()
        for i in range(images):
            Image.fromarray(np.ascontiguousarray(photo[i * 20:i * 20 + 200, 100 + i * 10:300 + i * 10])
                            ).save(os.path.join(faces, f"f{i}.png"))
        out: dict = {}
        written = {}
        for tag, cache in (("off", "none"), ("cold", os.path.join(tmp, "xla")),
                           ("warm", os.path.join(tmp, "xla"))):
            fsd, png = os.path.join(tmp, f"fsd_{tag}"), os.path.join(tmp, f"png_{tag}")
            flags = [f"--workdir={workdir}", f"--compile_cache={cache}"]
            out[f"compress_{tag}_s"] = _run(["compress", faces, f"--out_dir={fsd}", *flags])
            out[f"decompress_{tag}_s"] = _run(["decompress", fsd, f"--out_dir={png}", *flags])
            written[tag] = (_tree_bytes(fsd), _tree_bytes(png))
        out["same_bytes"] = written["off"] == written["cold"] == written["warm"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        rows.append(one_round(args.workdir, args.images))
        print(json.dumps(rows[-1]), flush=True)
    medians = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0] if k.endswith("_s")}
    print(json.dumps({"medians": medians, "same_bytes": all(r["same_bytes"] for r in rows),
                      "images": args.images, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
