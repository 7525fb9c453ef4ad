"""How far the input pipeline reads ahead, and what that costs the train loop on a small host.

    python benchmarks/read_ahead.py [--rounds 2] [--out FILE.md]

Trains ``configs/mbt2018_mean.py`` at N=8, M=12, 64 px crops of the embedded default (batch 8
over 8 fake CPU devices) 15 steps from scratch, then resumes it to step 30 in the same
process, with ``config.data`` reading ahead as Grain does by default (``read_threads=16``,
``prefetch_batches=500``: Grain's ReadOptions, whose elements are our whole batches) and as
our configs do (8 threads, 8 batches). Each setting runs in its own process, alternating, for
``--rounds`` rounds; both must log the same losses (reading ahead changes no batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

from _timing import child_result  # benchmarks/ is this script's sys.path[0]
from input_pipeline import _cpu_name  # benchmarks/ is this script's sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"Grain's default": (16, 500), "ours": (8, 8)}

_CHILD = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, ROOT)
from configs import mbt2018_mean
from fasdiff_jax import train
from fasdiff_jax.data.embedded import embedded_dataset

dirs = embedded_dataset(cache_dir=CACHE)
out = {}
for steps, name in ((15, "fresh"), (30, "resume")):
    cfg = mbt2018_mean.get_config()
    cfg.model.update(N=8, M=12, image_size=64)
    cfg.data.update(source="prepared:" + dirs["train"], global_batch_size=8,
                    read_threads=THREADS, prefetch_batches=AHEAD)
    cfg.mesh.data = 8
    cfg.eval.source = ""
    cfg.train.update(steps=steps, learning_rate=1e-3, log_every=1, checkpoint_every=15)
    t = time.perf_counter()
    m = train.train_and_evaluate(cfg, WORKDIR)
    out[name] = time.perf_counter() - t
    out[name + "_loss"] = m["loss"]
print("RESULT " + json.dumps(out))
"""


def run(threads: int, ahead: int, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        code = (_CHILD.replace("ROOT", repr(ROOT)).replace("CACHE", repr(cache))
                .replace("THREADS", str(threads)).replace("AHEAD", str(ahead))
                .replace("WORKDIR", repr(os.path.join(work, "w"))))
        return child_result([sys.executable, "-c", code])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fasdiff_bench_cache"))
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args()
    rows = []
    for r in range(a.rounds):
        for name, (threads, ahead) in SETTINGS.items():
            got = run(threads, ahead, a.cache)
            rows.append((r + 1, name, threads, ahead, got))
            print(r + 1, name, json.dumps(got), flush=True)
    losses = {(round(g["fresh_loss"], 6), round(g["resume_loss"], 6)) for *_, g in rows}
    lines = [f"Command: `python benchmarks/read_ahead.py --rounds {a.rounds}`",
             f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}",
             f"Same losses in every run: {len(losses) == 1} ({sorted(losses)})", "",
             "| round | read ahead | threads | batches | 15 steps from scratch (s) | "
             "resume 15 -> 30 in-process (s) |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r} | {n} | {t} | {b} | {g['fresh']:.1f} | {g['resume']:.1f} |"
              for r, n, t, b, g in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if len(losses) != 1:
        sys.exit("the settings logged different losses")


if __name__ == "__main__":
    main()
