"""A persistent XLA compilation cache for the commands (train, codec, evaluate).

Without it every run compiles all its programs again: the tiny FaSDiff model's
``codec decompress`` spends ~5 s of its ~12 s compiling, and a full-size model's programs
compile for minutes. With it, a later run with the same model, image size and devices loads
the executables (tiny model, 8 faces, this project's 2-core CPU: decompress 12.4 -> 7.3 s,
compress 6.5 -> 4.8 s per command; ``benchmarks/command_startup.py``).

Where: ``--compile_cache=DIR``, else ``$FASDIFF_COMPILE_CACHE``, else ``xla`` in
:func:`fasdiff_jax.cache_home` (``~/.cache/fasdiff_jax/xla``); ``none`` turns it off. A
process that already has JAX's own cache folder set (``JAX_COMPILATION_CACHE_DIR``, or a program
that runs these commands in-process) keeps it unless ``--compile_cache`` names one.

In a local folder every compile is cached (not only those over JAX's default 1 s: the many
small ones add up to 2.6 s of the tiny model's compress). A local folder has a size cap (``MAX_BYTES``, least
recently used entries go first), which also makes JAX lock the folder around each read and
write, so commands running at the same time can share it (without the lock one could read an
entry another is still writing). With several processes JAX writes entries from process 0
only, so a multi-host run needs one folder every host reads (a shared file system, or a
bucket) for all hosts to skip compiling. A bucket (``gs://...``) has no cap and no lock:
objects appear whole. An unreadable entry is compiled again. Like any JAX compilation cache, the folder holds code that will
run: keep it private.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ENV = "FASDIFF_COMPILE_CACHE"
OFF = "none"
MAX_BYTES = 4 << 30
HELP = (f"persistent compilation cache folder (default ${ENV}, else "
        f"~/.cache/fasdiff_jax/xla); '{OFF}' compiles everything afresh")


def default_dir() -> str:
    from fasdiff_jax import cache_home

    return os.path.join(cache_home(), "xla")


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--compile_cache", default=None, metavar=f"DIR|{OFF}", help=HELP)


def enable(cache_dir: str | None = None) -> str | None:
    """Compile through the cache folder the module docstring describes; returns that folder,
    or None when off or unusable (then a warning on stderr and no cache). Call it before the
    process compiles anything: JAX opens its cache once, at the first compile."""
    import jax
    from etils import epath
    from jax.experimental.compilation_cache import compilation_cache

    if cache_dir is None:
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir
        cache_dir = os.environ.get(ENV) or default_dir()
    if cache_dir == OFF:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
        return None
    try:  # an unwritable folder would make every compile wait out JAX's 10 s lock timeout
        folder = epath.Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError, or a bucket's auth/HTTP errors
        print(f"warning: compilation cache {cache_dir} is not a writable folder ({e}); "
              f"compiling without it", file=sys.stderr)
        return None
    for name, value in jax_settings(cache_dir).items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    return cache_dir


def jax_settings(cache_dir: str) -> dict[str, Any]:
    """The JAX options :func:`enable` sets for ``cache_dir``."""
    local = "://" not in cache_dir  # capped and locked; a bucket stores whole objects
    return {"jax_compilation_cache_dir": cache_dir,
            "jax_compilation_cache_max_size": MAX_BYTES if local else -1,  # -1: no cap
            # a bucket write is a network round trip: there only compiles over JAX's 1 s
            "jax_persistent_cache_min_compile_time_secs": 0.0 if local else 1.0}
