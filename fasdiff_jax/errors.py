"""Typed errors users can catch. Every message names the file, key or field at fault."""


class FasdiffError(Exception):
    """Base class of this package's errors."""


class ConversionError(FasdiffError, ValueError):
    """A weight folder or file does not match the architecture it is loaded into."""


class UnsupportedConfigError(ConversionError):
    """A diffusers config uses a feature our Flax modules do not implement."""


class IdentityWeightsError(ConversionError):
    """dlib's face-recognition model file is missing, truncated, corrupt or another network."""


class DataError(FasdiffError, ValueError):
    """A data source, prepared folder or image file cannot be read or used as asked."""


class CheckpointError(FasdiffError, OSError):
    """A training checkpoint's files cannot be read: damaged, truncated or incomplete."""


class WriteError(FasdiffError, OSError):
    """An output (checkpoint, run config, export) could not be written: disk full, read-only
    or vanished folder. What was complete before is kept; rerunning resumes or redoes it."""


class WorkdirInUseError(FasdiffError, RuntimeError):
    """Another training run holds the workdir's lock: two runs would overwrite each other's
    checkpoints and config."""


class NonFiniteLossError(FasdiffError, FloatingPointError):
    """A loss term became NaN or Inf; ``terms`` names which."""

    def __init__(self, message: str, terms: tuple[str, ...] = ()):
        super().__init__(message)
        self.terms = terms


class OutOfMemoryError(FasdiffError, MemoryError):
    """The device or host ran out of memory for an input this large; names the input."""


def is_out_of_memory(e: BaseException) -> bool:
    """An XLA allocation failure (``RESOURCE_EXHAUSTED`` on accelerators, "Out of memory
    allocating N bytes" on CPU), raised as ``jax.errors.JaxRuntimeError``."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def listed(items: list[str], sep: str = "; ", most: int = 8) -> str:
    """The first ``most`` of ``items`` joined for a message, and how many more there are."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return sep.join(items[:most]) + more
