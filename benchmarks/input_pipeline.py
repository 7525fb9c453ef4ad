"""Input-pipeline throughput: images/s of the Grain pipeline (read ArrayRecord, decode PNG,
random resized crop, flip, batch) at 256 and 512 px with 0, 1 and 2 worker processes.

    python benchmarks/input_pipeline.py [--batch 8] [--steps 40] [--cache DIR] \
        [--out FILE.md]

Reads the embedded default, built at the measured size on first use (so 512 px means
512 px records, not upsampled 256 px ones). Host-side local batches only (no device
transfer). Each setting first takes 3 batches, which absorbs worker start-up, then times
``--steps`` batches. The load average is recorded because the numbers are only comparable
on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def measure(size: int, workers: int, batch: int, steps: int, cache: str | None) -> float:
    """Images/s of ``steps`` batches after a 3-batch warm-up."""
    from fasdiff_jax.data.pipeline import DataConfig, make_dataset

    cfg = DataConfig(source="embedded:train", image_size=size, global_batch_size=batch,
                     num_workers=workers, cache_dir=cache, worker_buffer_size=2)
    it = iter(make_dataset(cfg, None, 0, 1))
    try:
        for _ in range(3):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return steps * batch / dt


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cache", default=None, help="where the embedded default is built")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="also write the results as markdown here")
    a = p.parse_args()

    from fasdiff_jax.data.embedded import embedded_dataset

    for size in a.sizes:  # build outside the timed region
        embedded_dataset(cache_dir=a.cache, size=size)
    lines = [
        "# Input pipeline throughput (embedded default, train split)",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"Load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"Batch {a.batch}, {a.steps} timed batches after 3 warm-up batches; host batches only.",
        "",
        "| size (px) | workers | images/s | load avg (1 min) after |",
        "|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for size in a.sizes:
        for w in a.workers:
            ips = measure(size, w, a.batch, a.steps, a.cache)
            row = f"| {size} | {w} | {ips:.1f} | {os.getloadavg()[0]:.2f} |"
            lines.append(row)
            print(row, flush=True)
    lines += [
        "",
        "Images/s a train step consumes (tiny and reduced configs): TODO -- to be added when "
        "the training step exists (the model is not built yet).",
        "",
    ]
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
