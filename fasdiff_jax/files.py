"""Writing outputs so that a failed or interrupted write never leaves half a file where the
user's file was (disk full, a kill, an exception part-way)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from fasdiff_jax.errors import DataError


def write_atomically(path: str, content: bytes | Callable[[str], None]) -> None:
    """Write ``content`` (bytes, or ``content(tmp_path)`` writes the file) to a temporary name,
    then rename it to ``path``: an interrupted run never leaves half a file, a failed one
    removes its temporary file and raises an error naming ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content)
        os.replace(tmp, path)
    except OSError as e:  # named by the temporary file, gone when the user reads it: ``path``
        if e.errno is None or (e.filename is not None and e.filename != tmp):
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path: str, flag: str = "--out ") -> None:
    """Refuse an output path that cannot be written (a read-only place, a file where a folder
    should be) with a :class:`DataError` naming it (``flag`` and the path), before any work:
    the first write comes after the model is loaded and an image coded. Missing parent
    folders are made."""
    folder = os.path.dirname(os.path.abspath(path))
    there = folder
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        raise DataError(f"{flag}{path}: {there} is a file, not a folder")
    if os.path.isdir(path):
        raise DataError(f"{flag}{path} is a folder, not a file")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise DataError(f"{flag}{path}: cannot create a file in {folder} "
                        f"({e.strerror or e})") from e
