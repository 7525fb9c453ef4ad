"""Train FaSDiff: ``python -m fasdiff_jax.main --config=configs/tiny.py --workdir=DIR``
(or the mbt2018-mean baseline: ``--config=configs/mbt2018_mean.py``).

Any config field can be overridden on the command line (``--config.train.steps=50``). A
workdir that holds checkpoints is resumed. Multi-host: pass ``--jax_distributed`` on every
host (see ``launch/``); ``jax.distributed.initialize()`` then finds the coordinator itself
on Cloud TPU VMs and under SLURM, or from ``JAX_COORDINATOR_ADDRESS`` +
``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` anywhere else.

A run stopped by SIGTERM (a preemption notice) or a first Ctrl-C saves the step it is on and
exits with status 143 or 130, as a process the signal ended: ``main && evaluate`` must not go
on, and a scheduler must not count it as done (it exited 0: SLURM logged COMPLETED, a
Kubernetes Job never restarted it).

Errors the user can fix (a config field, data, a checkpoint, a NaN loss: every
``fasdiff_jax.errors.FasdiffError``) end the run with one ``error: ...`` line on stderr and exit
status 2; the last good checkpoint stays the latest. So do the machine's errors (a full disk,
a read-only or vanished folder: ``OSError``) and running out of device memory, the latter
with the settings that make a step smaller.
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
from typing import Any, Iterator, Mapping

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


OOM_ADVICE = ("A step needs less memory with --config.train.microbatches=N (the batch in N "
              "parts, one update), --config.model.remat=True (FaSDiff) or a smaller "
              "--config.data.global_batch_size; rerunning resumes from the last checkpoint.")


def quiet_orbax_info() -> None:
    """Keep Orbax's INFO lines (about 45 per checkpoint save: threads, renames, throughput)
    out of the run's log, where they buried the loss lines; its warnings and errors stay,
    and ``--verbosity=1`` shows everything."""
    handler = logging.get_absl_handler()
    if logging.get_verbosity() >= 1 or _orbax_info_filter in handler.filters:
        return
    handler.addFilter(_orbax_info_filter)


def _orbax_info_filter(record: std_logging.LogRecord) -> bool:
    from fasdiff_jax.train import is_orbax_record

    return record.levelno >= std_logging.WARNING or not is_orbax_record(record)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.jax_distributed:
        try:
            kwargs = distributed_settings(os.environ)
        except ValueError as e:
            print(f"error: --jax_distributed: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        jax.distributed.initialize(**kwargs)
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    from fasdiff_jax import train

    quiet_orbax_info()
    logging.info("compilation cache: %s", compile_cache.enable(FLAGS.compile_cache))
    from fasdiff_jax.errors import FasdiffError, is_out_of_memory

    try:
        out = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FasdiffError as e:  # a config, data or checkpoint to fix: the message, not a trace
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except OSError as e:  # the machine's side (a full disk, a vanished folder): no trace either
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves and stops): a line, no trace
        print("interrupted at once, the step it was on not saved; rerun the same command to "
              "resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory: {str(e).splitlines()[0][:300]}\n{OOM_ADVICE}",
              file=sys.stderr)
        raise SystemExit(2) from e
    if "stopped_by_signal" in out:  # not finished: a scheduler must not count it as done
        signum = out["stopped_by_signal"]
        logging.warning("stopped at step %d of %d by %s (checkpoint saved); rerun the same "
                        "command to resume. Exit status %d, as a process ended by it",
                        out["step"], FLAGS.config.train.steps, signal.Signals(signum).name,
                        128 + signum)
        raise SystemExit(128 + signum)


DISTRIBUTED_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """``jax.distributed.initialize``'s arguments on a generic cluster: all three
    :data:`DISTRIBUTED_VARIABLES` (TPU VMs and SLURM need none; JAX finds them). One missing
    or not a number was a KeyError/ValueError traceback from inside JAX."""
    if not any(env.get(n) for n in DISTRIBUTED_VARIABLES[1:]):
        return {}  # JAX_COORDINATOR_ADDRESS alone: JAX reads it beside SLURM's or the TPU's
    missing = [n for n in DISTRIBUTED_VARIABLES if not env.get(n)]
    if missing:
        given = [n for n in DISTRIBUTED_VARIABLES if env.get(n)]
        raise ValueError(f"{' and '.join(given)} set but not {' and '.join(missing)}: set all "
                         f"three (or none on Cloud TPU VMs and under SLURM, where JAX finds them)")
    try:
        count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                         f"{env['JAX_PROCESS_ID']!r} must be whole numbers") from None
    if not 0 <= index < count:
        raise ValueError(f"JAX_PROCESS_ID={index} must be in 0..JAX_NUM_PROCESSES-1 "
                         f"(JAX_NUM_PROCESSES={count})")
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                process_id=index)


def _config_file(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _field_paths(node: Any, prefix: str = "config") -> Iterator[str]:
    for k in node.keys():
        yield f"{prefix}.{k}"
        if hasattr(node[k], "keys"):
            yield from _field_paths(node[k], f"{prefix}.{k}")


def unknown_override(argv: list[str]) -> str | None:
    """The first ``--config.a.b=v`` whose field the config file does not have, as a message
    naming the field and the nearest known names; None when every override's path exists."""
    import difflib
    import runpy

    path = _config_file(argv)
    if path is None or not os.path.isfile(path):
        return None
    try:
        config = runpy.run_path(path)["get_config"]()
    except Exception:  # noqa: BLE001 - config_flags reports a broken config file itself
        return None
    for a in argv:
        if not a.startswith(("--config.", "--noconfig.")):
            continue
        parts = a.split("=", 1)[0].split(".")[1:]
        node = config
        for i, part in enumerate(parts):
            if hasattr(node, "keys") and part in node:
                node = node[part]
                continue
            parent = ".".join(["config", *parts[:i]])
            if not hasattr(node, "keys"):
                return f"{a.split('=', 1)[0]}: {path} holds {parent} as a value, not a section"
            near = [f"{parent}.{k}" for k in difflib.get_close_matches(part, list(node.keys()))]
            near = near or [p for p in _field_paths(config) if p.endswith(f".{part}")]
            hint = (f"did you mean {' or '.join(near)}?" if near
                    else f"{parent} has: {', '.join(sorted(node.keys()))}")
            return f"{a.split('=', 1)[0]}: {path} has no field {parent}.{part} ({hint})"
    return None


def config_file_problem(path: str | None) -> str | None:
    """Why ``--config=path`` gives no config, or None (also for ``path:arg``, which
    config_flags passes to ``get_config`` itself)."""
    if path is None or (":" in path and os.path.isfile(path.rsplit(":", 1)[0])):
        return None
    if not os.path.isfile(path):
        return f"--config={path}: no such file"
    from fasdiff_jax.codec import load_config
    from fasdiff_jax.errors import FasdiffError

    try:
        load_config(path)
    except FasdiffError as e:
        return str(e)
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of a field the config lacks (a typo such
    as ``--config.train.stpes=20``) or of the wrong type (``--config.train.steps=abc``)
    ends with one line naming it and exit status 2, as any other unusable value does:
    config_flags raises a bare ``AttributeError`` deep in its parser for it. So does a
    config file that is missing or gives no config (a syntax error, no ``get_config``, not a
    ConfigDict): config_flags ended those with a traceback."""
    message = config_file_problem(_config_file(argv))
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type (--config.train.steps=abc): absl
        print(f"error: {e} (--helpfull lists the flags)", file=sys.stderr)  # exited 1
        raise SystemExit(2) from e
    except (AttributeError, KeyError, TypeError):
        message = unknown_override(argv)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
