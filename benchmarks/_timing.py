"""Timing shared by the benchmarks: this VM's speed drifts over minutes, so A/B calls alternate."""

import statistics
import time


def alternating_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per named call, the calls taken in turn (after one warm-up each):
    ``{name: (median, [seconds, ...])}``. Calls must block until their work is done."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}
