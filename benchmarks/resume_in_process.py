"""Runs of the train loop in one process: the jitted steps of an earlier run reused or built
again (``train._PROGRAMS``), e.g. a resume or a notebook cell run again.

    python benchmarks/resume_in_process.py --runs 3

Trains ``configs/tiny.py`` (8 fake CPU devices, held-out evaluation) 3 steps once, then
resumes a copy of that checkpoint to step 6 ``--runs`` times in this process, first with
the reuse on, then with it off (``_PROGRAMS_KEPT = 0``). The first resume of each pass also
pays one-time costs (TensorFlow's import for CLU's writers, ~9 s here). All resumes must log
the same metrics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import tiny  # noqa: E402
from fasdiff_jax import train  # noqa: E402
from fasdiff_jax.data.embedded import embedded_dataset  # noqa: E402


def _config(train_dir: str, heldout_dir: str, steps: int):
    cfg = tiny.get_config()
    cfg.data.source = f"prepared:{train_dir}"
    cfg.mesh.data = 8
    cfg.train.update(steps=steps, x0_every=1000, log_every=1, checkpoint_every=3)
    cfg.eval.update(source=f"prepared:{heldout_dir}", every_steps=3)
    cfg.model.sampler.steps = 3
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="resume_in_process_")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    dirs = embedded_dataset(cache_dir=os.path.join(root, "data"))
    first = os.path.join(root, "first")
    t = time.perf_counter()
    train.train_and_evaluate(_config(dirs["train"], dirs["heldout"], 3), first)
    print(f"first run (3 steps, compiles everything): {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for reuse in (True, False):
        train._PROGRAMS.clear()
        kept = train._PROGRAMS_KEPT
        train._PROGRAMS_KEPT = kept if reuse else 0
        try:
            for i in range(args.runs):
                work = os.path.join(root, f"{'reuse' if reuse else 'rebuild'}{i}")
                shutil.copytree(os.path.join(first, "checkpoints", "3"),
                                os.path.join(work, "checkpoints", "3"))
                t = time.perf_counter()
                results.append(train.train_and_evaluate(
                    _config(dirs["train"], dirs["heldout"], 6), work))
                print(f"steps {'reused' if reuse else 'rebuilt'}: resume {i} (3 steps + a "
                      f"held-out evaluation) {time.perf_counter() - t:.1f} s", flush=True)
        finally:
            train._PROGRAMS_KEPT = kept
    assert all(r == results[0] for r in results), "the resumes logged different metrics"
    print("all resumes logged the same metrics")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
