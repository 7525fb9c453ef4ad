"""Writing outputs so that a failed or interrupted write never leaves half a file where the
user's file was (disk full, a kill, an exception part-way)."""

from __future__ import annotations

import os
from typing import Callable


def write_atomically(path: str, content: bytes | Callable[[str], None]) -> None:
    """Write ``content`` (bytes, or ``content(tmp_path)`` writes the file) to a temporary name,
    then rename it to ``path``: an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
