"""Writing outputs so that a failed or interrupted write never leaves half a file where the
user's file was (disk full, a kill, an exception part-way)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
from typing import Callable, Collection

from fasdiff_jax.errors import DataError


def write_atomically(path: str, content: bytes | Callable[[str], None]) -> None:
    """Write ``content`` (bytes, or ``content(tmp_path)`` writes the file) to a temporary name,
    then rename it to ``path``: an interrupted run never leaves half a file, a failed one
    removes its temporary file and raises an error naming ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
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
    the first write comes after the model is loaded and an image coded. Missing folders are
    probed, not made: :func:`write_atomically` makes them with the first output, so a run
    that fails before it (the model does not load) leaves no empty folders behind."""
    folder = os.path.dirname(os.path.abspath(path))
    there = folder
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        raise DataError(f"{flag}{path}: {there} is a file, not a folder")
    if os.path.isdir(path):
        raise DataError(f"{flag}{path} is a folder, not a file")
    try:
        if there == folder:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
            os.close(fd)
            os.remove(tmp)
        else:  # the first missing folder would be made here
            os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=there))
    except OSError as e:
        raise DataError(f"{flag}{path}: cannot create a file in {folder} "
                        f"({e.strerror or e})") from e


def temp_name(path: str) -> str:
    """Where an output is written before it is renamed to ``path``: ``path.tmp-HOST-PID``, so
    that :func:`remove_stale_temps` can tell a killed writer's leftover from a live one's,
    also where machines share the folder (NFS). HOST carries this boot's id where the
    system has one (``name@boot``): after a reboot a writer's pid may be another process's,
    which made its leftover look live for good."""
    return f"{path}.tmp-{_WRITER}-{os.getpid()}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip().replace("-", "")[:8]
    except OSError:
        return ""
    return boot if boot.isalnum() and boot.isascii() else ""


_HOST = socket.gethostname().replace(os.sep, "_") or "host"
_BOOT = _boot_id()
_WRITER = f"{_HOST}@{_BOOT}" if _BOOT else _HOST


def _writer(entry: str, names: Collection[str]) -> tuple[str | None, int] | None:
    """(host or None, pid) of a :func:`temp_name` of one of ``names``; None for any other
    entry. Names without a host (``.tmp-PID``, ``.tmpPID``) are those of earlier versions."""
    for name in names:
        if entry.startswith(f"{name}.tmp"):
            rest = entry[len(name) + 4:].removeprefix("-")
            host, _, pid = rest.rpartition("-")
            if pid.isdigit() and pid.isascii():
                return host or None, int(pid)
    return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a number no pid reaches)
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def is_temp_of(entry: str, names: Collection[str]) -> bool:
    """Whether the folder entry ``entry`` is a :func:`temp_name` of one of ``names``."""
    return _writer(entry, names) is not None


def is_leftover(folder: str, entry: str, names: Collection[str]) -> bool:
    """Whether ``entry`` in ``folder`` is a :func:`temp_name` of one of ``names`` whose
    writer, on this machine, no longer runs (killed, or before the last reboot: written
    before this boot began); other machines' and live writers' are not."""
    writer = _writer(entry, names)
    if writer is None:
        return False
    host, pid = writer
    if host in (None, _HOST, _WRITER):  # (this machine's names before boot ids: by pid)
        return not _running(pid)
    name, _, boot = host.rpartition("@")
    if not _BOOT or name != _HOST or boot == _BOOT:
        return False  # another machine's (one of the same name has its own boot id)
    try:  # the change time too: a folder renamed aside keeps its old modification time
        st = os.lstat(os.path.join(folder, entry))
    except OSError:
        return False
    return max(st.st_mtime, st.st_ctime) < _boot_time()


def _boot_time() -> float:
    """When this machine booted (seconds since the epoch), or 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def remove_stale_temps(folder: str, names: Collection[str], min_age_s: float = 0.0
                       ) -> list[str]:
    """Remove the :func:`temp_name` files and folders in ``folder`` of outputs named
    ``names`` that a killed writer on this machine left (its process no longer runs) and
    that were not modified for ``min_age_s``; other machines' stay. A ``kill -9`` never
    reaches a writer's own cleanup, and each kill left another temp (GBs for an SD UNet).
    Returns what was removed."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed, now = [], time.time()
    for entry in entries:
        if not is_leftover(folder, entry, names):
            continue
        path = os.path.join(folder, entry)
        try:
            if min_age_s and now - os.path.getmtime(path) < min_age_s:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
        except OSError:
            pass  # gone already, or not ours to remove: a later write names any real problem
    return removed


# What the messages of a failed write say where the OS's error arrives as text: Orbax and
# TensorStore raise ValueError ("RESOURCE_EXHAUSTED: Error writing ..."), ArrayRecord
# RuntimeError ("write() failed: No space left on device; writing <temp name>; ...").
WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "No space left", "Read-only file system",
                  "Disk quota exceeded", "Permission denied", "Is a directory",
                  "Not a directory", "write() failed", "open() failed", "close() failed")


def write_failure(e: BaseException) -> str | None:
    """The cause of a failed write in a few words ("No space left on device"), or None where
    ``e`` is not one (a bug, to be seen as it is). Never the temporary file's name, which
    the libraries' texts carry and which is gone when the user reads the message."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e).strip()
    if not isinstance(e, (ValueError, RuntimeError)) or not any(w in text for w in WRITE_FAILURES):
        return None
    for cause in ("No space left on device", "Disk quota exceeded"):  # TensorStore's text
        if cause in text:  # names the temporary chunk file first: the cause says enough
            return cause
    first = text.splitlines()[0].split(";")[0].strip()
    return first.split("failed: ", 1)[1] if "failed: " in first else first


def is_out_of_space(e: BaseException) -> bool:
    """Disk full or over quota, as an OSError or as a library's text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    return "No space left on device" in str(e) or "quota exceeded" in str(e).lower()


def free_bytes(path: str) -> int | None:
    """Bytes free to an unprivileged writer on the file system that holds ``path`` (or its
    nearest existing parent); None for URLs and where the system will not say."""
    if "://" in path:
        return None
    there = os.path.abspath(path)
    while not os.path.exists(there) and os.path.dirname(there) != there:
        there = os.path.dirname(there)
    try:
        return shutil.disk_usage(there).free
    except OSError:
        return None


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB pieces (shards and weights files can be
    larger than memory allows)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            h.update(piece)
    return h.hexdigest()
