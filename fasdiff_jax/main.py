"""Train FaSDiff: ``python -m fasdiff_jax.main --config=configs/tiny.py --workdir=DIR``
(or the mbt2018-mean baseline: ``--config=configs/mbt2018_mean.py``).

Any config field can be overridden on the command line (``--config.train.steps=50``). A
workdir that holds checkpoints is resumed. Multi-host: pass ``--jax_distributed`` on every
host (see ``launch/``); ``jax.distributed.initialize()`` then finds the coordinator itself
on Cloud TPU VMs and under SLURM, or from ``JAX_COORDINATOR_ADDRESS`` +
``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` anywhere else.

Errors the user can fix (a config field, data, a checkpoint, a NaN loss: every
``fasdiff_jax.errors.FasdiffError``) end the run with one ``error: ...`` line on stderr and exit
status 2; the last good checkpoint stays the latest.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fasdiff_jax import compile_cache  # no JAX import: flags first, then jax.distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and summaries go here; resumed if present.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() first (one process per host).")
flags.DEFINE_string("compile_cache", None, f"{compile_cache.HELP}; a resumed or restarted run "
                    "loads its compiled steps from it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.jax_distributed:
        env = os.environ
        kwargs = {}
        if "JAX_NUM_PROCESSES" in env:  # generic clusters (TPU VMs and SLURM auto-detect)
            kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]),
                          process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    from fasdiff_jax import train

    logging.info("compilation cache: %s", compile_cache.enable(FLAGS.compile_cache))
    from fasdiff_jax.errors import FasdiffError

    try:
        out = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FasdiffError as e:  # a config, data or checkpoint to fix: the message, not a trace
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    if out["step"] < FLAGS.config.train.steps:
        logging.warning("stopped at step %d of %d after a preemption notice (checkpoint saved); "
                        "rerun the same command to resume", out["step"], FLAGS.config.train.steps)


if __name__ == "__main__":
    app.run(main)
