"""Shared fixtures of the data tests (imported by tests/test_data_*.py)."""

import os
import struct
import zlib

import pytest


@pytest.fixture(scope="session")
def embedded_dirs(tmp_path_factory):
    """The embedded default, built once per test session in a temporary cache.

    Under pytest-xdist the workers share the session's parent temp dir; the build is
    atomic (temp folder + rename), so concurrent first uses are safe.
    """
    from fasdiff_jax.data.embedded import embedded_dataset

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return embedded_dataset(cache_dir=str(base / "fasdiff_cache"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming an RGB image of this size, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                     zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))
