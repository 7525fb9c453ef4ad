"""The one exception for malformed files (kept in its own module to avoid import cycles)."""

from fasdiff_jax.errors import FasdiffError


class BitstreamError(FasdiffError, ValueError):
    """A compressed file is truncated, corrupt, of another format version or another model."""
