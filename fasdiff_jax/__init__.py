"""fasdiff-jax: FaSDiff face compression with a Stable Diffusion prior, in JAX/Flax."""

import os

__version__ = "0.1.0"


def cache_home() -> str:
    """Where fasdiff-jax keeps what it can rebuild (the embedded dataset, compiled programs,
    weight fingerprints): ``$FASDIFF_CACHE``, else ``$XDG_CACHE_HOME/fasdiff_jax``, else
    ``~/.cache/fasdiff_jax``."""
    if os.environ.get("FASDIFF_CACHE"):
        return os.environ["FASDIFF_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fasdiff_jax")
