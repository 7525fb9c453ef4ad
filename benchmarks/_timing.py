"""Timing shared by the benchmarks: this VM's speed drifts over minutes, so A/B calls alternate."""

import json
import statistics
import subprocess
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


def before_and_after(build, before, repeats: int) -> tuple[float, float]:
    """Median seconds of ``build()``'s call traced and compiled inside the context ``before()``
    (the code as it was) and of another built as the code is now, the calls alternating."""
    with before():
        old = build()
        old()  # traced and compiled here, inside the context
    med = alternating_medians({"before": old, "after": build()}, repeats)
    return med["before"][0], med["after"][0]


def child_result(argv: list, **kwargs) -> dict:
    """Run ``argv`` (a fresh Python process: first-call costs a cache in this one would hide)
    and return the JSON of its ``RESULT {...}`` line; its stderr's end if it printed none."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{argv[:3]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
